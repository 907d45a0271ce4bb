//! `/proc/devices` with a `device-mapper` line (interposition.md §1.1 item 5: without one libdm fails
//! every command with "No entry for device-mapper found").

use crate::{daemon, sys};
use libc::c_int;

/// A memfd holding the real /proc/devices plus the DM line, positioned at 0; None (errno untouched)
/// if the daemon cannot be reached or anything else fails — the caller then passes the open through.
pub fn open(cloexec: bool) -> Option<c_int> {
    let major = daemon::facts()?.major;
    sys::keep_errno(|| {
        let text = with_dm_line(&read_real()?, major);
        let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
        // SAFETY: NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"devices".as_ptr(), flags) };
        if fd < 0 {
            return None;
        }
        let mut off = 0;
        while off < text.len() {
            // SAFETY: writing from our own buffer.
            let n = unsafe { libc::write(fd, text[off..].as_ptr().cast(), text.len() - off) };
            if n <= 0 {
                sys::sys_close(fd);
                return None;
            }
            off += n as usize;
        }
        // SAFETY: plain lseek on our memfd.
        unsafe { libc::lseek(fd, 0, libc::SEEK_SET) };
        Some(fd)
    })
}

fn read_real() -> Option<Vec<u8>> {
    let fd = sys::sys_open(c"/proc/devices", libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return None;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let ok = loop {
        // SAFETY: reading into our buffer (read is not hooked).
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => break true,
            n if n > 0 => out.extend_from_slice(&buf[..n as usize]),
            _ if sys::errno() == libc::EINTR => {}
            _ => break false,
        }
    };
    sys::sys_close(fd);
    ok.then_some(out)
}

/// Inserts `"%3u device-mapper\n"` as the last line of the "Block devices:" section (or at the end if
/// there is no such section). Left as is if the line is already there.
fn with_dm_line(real: &[u8], major: u32) -> Vec<u8> {
    let entry = format!("{major} device-mapper");
    if real.split(|&c| c == b'\n').any(|l| l.trim_ascii() == entry.as_bytes()) {
        return real.to_vec();
    }
    let (mut at, mut in_block, mut start) = (None, false, 0);
    for line in real.split_inclusive(|&c| c == b'\n') {
        let end = start + line.len();
        let text = line.trim_ascii();
        if text == b"Block devices:" {
            in_block = true;
            at = Some(end);
        } else if in_block {
            if text.is_empty() {
                break;
            }
            at = Some(end);
        }
        start = end;
    }
    let at = at.unwrap_or(real.len());
    let mut out = Vec::with_capacity(real.len() + entry.len() + 3);
    out.extend_from_slice(&real[..at]);
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(format!("{major:>3} device-mapper\n").as_bytes());
    out.extend_from_slice(&real[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::with_dm_line;

    #[test]
    fn inserted_at_end_of_block_section() {
        let real = b"Character devices:\n  1 mem\n\nBlock devices:\n  7 loop\n254 virtblk\n";
        let out = with_dm_line(real, 252);
        assert_eq!(out, b"Character devices:\n  1 mem\n\nBlock devices:\n  7 loop\n254 virtblk\n252 device-mapper\n");
        assert_eq!(with_dm_line(&out, 252), out);
        assert_eq!(with_dm_line(b"x", 9), b"x\n  9 device-mapper\n");
    }
}
