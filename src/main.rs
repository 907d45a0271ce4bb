//! `dmemu`: the daemon and its helpers. This file only parses the command line and dispatches to
//! `cli/`, one file per subcommand.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dmemu", version, about = "The device-mapper driver, in userspace")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Serve(cli::serve::ServeArgs),
    /// Run a command against dmemu (LD_PRELOAD shim), starting a daemon first if none answers.
    Exec(cli::exec::ExecArgs),
    /// Switch-target tools: `switch upload` loads a page table (docs/protocols.md).
    Switch(cli::switch::SwitchArgs),
    /// NetBSD's dmctl over the proplib ioctl (NETBSD_DM_IOCTL).
    Nbsd(cli::nbsd::NbsdArgs),
    /// Answer the `userspace` multipath hardware handler's requests from a script
    /// (docs/multipath-hwh.md).
    Hwh(cli::hwh::HwhArgs),
}

fn main() -> ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::Serve(a) => cli::serve::run(a),
        Cmd::Exec(a) => cli::exec::run(a),
        Cmd::Switch(a) => cli::switch::run(a),
        Cmd::Nbsd(a) => cli::nbsd::run(a),
        Cmd::Hwh(a) => cli::hwh::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmemu: {e}");
            ExitCode::FAILURE
        }
    }
}
