//! `dmemu exec -- CMD ARGS…`: runs CMD with the shim preloaded against a daemon, starting one in
//! the background first if none answers.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use dmemu::client::daemon::{default_socket, hello_or_start, preload_path};

use super::Result;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Control socket path (default: $DMEMU_SOCKET, else a per-user default).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The command and its arguments (any bytes: device names need not be UTF-8).
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    pub command: Vec<std::ffi::OsString>,
}

pub fn run(a: ExecArgs) -> Result {
    let socket = std::path::absolute(a.socket.unwrap_or_else(default_socket))?;
    let exe = std::env::current_exe()?;
    let hello = hello_or_start(&exe, &socket)?;
    let run_dir = hello.run_dir().ok_or("daemon did not report its run dir")?;
    let dev_dir = run_dir.join("dev");
    std::fs::create_dir_all(dev_dir.join("mapper"))?;
    let mut preload = preload_path(&exe)?.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        preload.push(":");
        preload.push(old);
    }
    let err = std::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .env("LD_PRELOAD", preload)
        .env("DMEMU_SOCKET", &socket)
        .env("DM_DEV_DIR", &dev_dir)
        .env("DM_DISABLE_UDEV", "1")
        .exec();
    Err(format!("{}: {err}", a.command[0].to_string_lossy()).into())
}
