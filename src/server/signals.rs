//! SIGTERM, SIGINT and SIGHUP end the daemon gracefully: they are blocked in every thread (call
//! [`block_exit_signals`] before any thread starts, so all inherit the mask) and one thread waits
//! for them and runs the drain it was given (docs/reliability.md, "Stopping").

use std::io;

/// The blocked set, handed to [`on_exit_signal`].
pub struct ExitSignals(libc::sigset_t);

/// Blocks the exit signals in the calling thread (and every thread it starts from now on).
pub fn block_exit_signals() -> ExitSignals {
    // SAFETY: signal-set manipulation on a local set; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        ExitSignals(set)
    }
}

/// Starts the thread that waits for an exit signal, runs `drain`, then ends the process by that
/// signal's default action (so the exit status says which signal ended it, as without us).
pub fn on_exit_signal(signals: ExitSignals, drain: impl FnOnce(i32) + Send + 'static) -> io::Result<()> {
    let set = signals.0;
    std::thread::Builder::new().name("dmemu-signals".into()).spawn(move || {
        let mut sig = 0;
        // SAFETY: waits on the blocked set.
        while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
        drain(sig);
        // SAFETY: restores the default action and delivers the signal to ourselves unblocked.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
            libc::_exit(128 + sig);
        }
    })?;
    Ok(())
}

/// A signal's name for the log.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}
