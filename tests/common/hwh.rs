//! `dmemu hwh` (the reference userspace hardware handler) as a child process, its output read
//! line by line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

/// Only a broken build waits this long.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A running `dmemu hwh`, its standard output line by line; killed when dropped.
pub struct Hwh {
    pub child: Child,
    pub lines: Receiver<String>,
}

impl Hwh {
    pub fn start(socket: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(super::bin())
            .arg("hwh")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start dmemu hwh");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    #[track_caller]
    pub fn line(&self) -> String {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!("dmemu hwh printed nothing"),
            Err(RecvTimeoutError::Disconnected) => panic!("dmemu hwh ended"),
        }
    }

    #[track_caller]
    pub fn expect(&self, want: &str) {
        assert_eq!(self.line(), want);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Hwh {
    fn drop(&mut self) {
        self.kill();
    }
}
