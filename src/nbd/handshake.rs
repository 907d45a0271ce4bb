//! Option haggling (proto.md "Fixed newstyle negotiation", "Option types").

use std::fs::File;
use std::io::{self, BufReader, Read, Write};

use super::proto::*;
use super::Export;
use crate::dm::target::Limits;
use crate::io::DataPlane;

/// Option data we read into memory; names are at most 4096 bytes, so anything longer is refused
/// (after skipping it) with NBD_REP_ERR_TOO_BIG.
const MAX_OPTION: u32 = 16 * 1024;
/// Longer options end the session: proto.md lets a server hard-disconnect a client it believes is
/// mounting a denial of service.
const MAX_SKIP: u32 = 1 << 20;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

struct Replier<'a> {
    w: &'a File,
}

impl Replier<'_> {
    fn send(&self, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(20 + data.len());
        msg.extend_from_slice(&option_reply(opt, typ, data.len() as u32));
        msg.extend_from_slice(data);
        (&mut &*self.w).write_all(&msg)
    }
    fn ack(&self, opt: u32) -> io::Result<()> {
        self.send(opt, REP_ACK, &[])
    }
    /// Error replies may carry a message for a human (proto.md "Option reply types").
    fn error(&self, opt: u32, typ: u32, msg: &str) -> io::Result<()> {
        self.send(opt, typ, msg.as_bytes())
    }
    fn info(&self, opt: u32, info: &[u8]) -> io::Result<()> {
        self.send(opt, REP_INFO, info)
    }
}

/// The transmission flags of an export.
pub(super) fn transmission_flags(read_only: bool, structured: bool, limits: &Limits) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;
    if read_only {
        f |= TF_READ_ONLY;
    } else {
        // Write-zeroes always works (zero buffers where the table cannot); trim only where
        // every target takes discards.
        f |= TF_SEND_FUA | TF_SEND_WRITE_ZEROES;
        if limits.discard {
            f |= TF_SEND_TRIM;
        }
    }
    if structured {
        // Every read is answered with one data chunk, so "don't fragment" always holds.
        f |= TF_SEND_DF;
    }
    f
}

/// The body of an NBD_OPT_INFO / NBD_OPT_GO request: name and the information requests.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let reqs = &rest[2..];
    if reqs.len() != n * 2 {
        return None;
    }
    let name = String::from_utf8(name.to_vec()).ok()?;
    Some((name, reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// The body of an NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT request: export name and
/// queries.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(data.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let name_len = u32_at(0)?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let mut at = 4 + name_len;
    let n = u32_at(at)?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = u32_at(at)?;
        let q = data.get(at + 4..(at + 4).checked_add(len)?)?;
        queries.push(String::from_utf8(q.to_vec()).ok()?);
        at += 4 + len;
    }
    if at != data.len() {
        return None;
    }
    Some((String::from_utf8(name.to_vec()).ok()?, queries))
}

/// Whether a query names `base:allocation`: for LIST, the namespace alone (`base:`) also does
/// (proto.md "NBD_OPT_LIST_META_CONTEXT"); unknown namespaces match nothing.
fn meta_query_matches(query: &str, list: bool) -> bool {
    query == META_BASE_ALLOCATION || (list && query == "base:")
}

/// What handling one option leads to.
enum Step {
    /// Another option follows.
    Next,
    /// The handshake is over: transmission on this export, or (`None`) a clean end.
    End(Option<Export>),
}

/// The state of one client's option haggling.
struct Negotiation<'a> {
    io: &'a DataPlane,
    rep: Replier<'a>,
    w: &'a File,
    /// The client asked for no zero padding after NBD_OPT_EXPORT_NAME's reply.
    no_zeroes: bool,
    structured: bool,
    /// The export NBD_OPT_SET_META_CONTEXT selected base:allocation for, if any: it applies only
    /// when the client then goes to that export.
    meta_for: Option<String>,
}

/// Runs the handshake. `Ok(Some)` enters transmission; `Ok(None)` is a clean end (the client
/// aborted); errors end the session with a hard disconnect.
pub(super) fn negotiate(io: &DataPlane, r: &mut BufReader<&File>, w: &File) -> io::Result<Option<Export>> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    (&mut &*w).write_all(&hello)?;

    let cflags = u32::from_be_bytes(read_array(r)?);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // proto.md "Client flags": the server MUST drop the connection on unknown flags.
        return Err(invalid(format!("unknown client flags {cflags:#x}")));
    }
    let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
    let mut n = Negotiation {
        io,
        rep: Replier { w },
        w,
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta_for: None,
    };
    loop {
        let Some((opt, data)) = n.read_option(r, fixed)? else { continue };
        let step = match opt {
            OPT_EXPORT_NAME => n.export_name(&data)?,
            OPT_ABORT => {
                // The client may already have closed; the ACK is a courtesy.
                let _ = n.rep.ack(opt);
                Step::End(None)
            }
            OPT_LIST => n.list(&data)?,
            OPT_STRUCTURED_REPLY => n.structured_reply(&data)?,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => n.meta_context(opt, &data)?,
            OPT_INFO | OPT_GO => n.info_or_go(opt, &data)?,
            _ => {
                n.rep.error(opt, REP_ERR_UNSUP, &format!("option {opt} is not supported"))?;
                Step::Next
            }
        };
        if let Step::End(export) = step {
            return Ok(export);
        }
    }
}

impl Negotiation<'_> {
    /// Reads the next option: its number and data, or `None` when it was too long and has been
    /// refused already.
    fn read_option(&self, r: &mut BufReader<&File>, fixed: bool) -> io::Result<Option<(u32, Vec<u8>)>> {
        let h: [u8; 16] = read_array(r)?;
        if u64::from_be_bytes(h[0..8].try_into().unwrap()) != IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        if !fixed && opt != OPT_EXPORT_NAME {
            // Non-fixed newstyle knows no option replies: the only way to refuse is to close.
            return Err(invalid(format!("option {opt} from a non-fixed-newstyle client")));
        }
        if len > MAX_OPTION {
            if len > MAX_SKIP {
                return Err(invalid(format!("option {opt} with {len} bytes of data")));
            }
            io::copy(&mut r.by_ref().take(len as u64), &mut io::sink())?;
            if opt == OPT_EXPORT_NAME {
                return Err(invalid("export name too long"));
            }
            self.rep.error(opt, REP_ERR_TOO_BIG, "option data too long")?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        Ok(Some((opt, data)))
    }

    /// Whether base:allocation was selected for the export the client goes to.
    fn meta_for(&self, name: &str) -> bool {
        self.meta_for.as_deref() == Some(name)
    }

    /// NBD_OPT_EXPORT_NAME: no error reply exists for it, so an unknown export ends the session
    /// (proto.md "Option types").
    fn export_name(&self, data: &[u8]) -> io::Result<Step> {
        // Export names are UTF-8 (proto.md); other bytes name no export, rather than being
        // replaced and perhaps matching another device.
        let Some((name, handle)) = std::str::from_utf8(data).ok().and_then(|n| Some((n, self.io.open(n)?))) else {
            let name = crate::dm::Escaped(data);
            return Err(invalid(format!("NBD_OPT_EXPORT_NAME for unknown export \"{name}\"")));
        };
        let size = handle.size();
        let flags = transmission_flags(handle.read_only(), self.structured, &handle.limits());
        let mut reply = Vec::with_capacity(10 + 124);
        reply.extend_from_slice(&size.to_be_bytes());
        reply.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        (&mut &*self.w).write_all(&reply)?;
        let meta = self.meta_for(name);
        Ok(Step::End(Some(Export { handle, size, flags, structured: self.structured, meta })))
    }

    fn list(&self, data: &[u8]) -> io::Result<Step> {
        if !data.is_empty() {
            self.rep.error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
            return Ok(Step::Next);
        }
        // Devices whose names are not UTF-8 cannot be exports (proto.md: names are UTF-8).
        for name in self.io.active().into_iter().filter_map(|(n, _)| String::from_utf8(n).ok()) {
            let mut d = Vec::with_capacity(4 + name.len());
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            self.rep.send(OPT_LIST, REP_SERVER, &d)?;
        }
        self.rep.ack(OPT_LIST)?;
        Ok(Step::Next)
    }

    fn structured_reply(&mut self, data: &[u8]) -> io::Result<Step> {
        if !data.is_empty() {
            self.rep.error(OPT_STRUCTURED_REPLY, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
            return Ok(Step::Next);
        }
        self.structured = true;
        self.rep.ack(OPT_STRUCTURED_REPLY)?;
        Ok(Step::Next)
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: the one context is base:allocation.
    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<Step> {
        let list = opt == OPT_LIST_META_CONTEXT;
        if !self.structured {
            // proto.md: metadata contexts need structured replies to be usable.
            self.rep.error(opt, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")?;
            return Ok(Step::Next);
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            self.rep.error(opt, REP_ERR_INVALID, "malformed metadata context request")?;
            return Ok(Step::Next);
        };
        if !self.io.active().iter().any(|(n, _)| n == name.as_bytes()) {
            self.rep.error(opt, REP_ERR_UNKNOWN, &format!("no active device named {name:?}"))?;
            return Ok(Step::Next);
        }
        // LIST without queries lists every context; SET without queries selects none.
        let chosen = if queries.is_empty() { list } else { queries.iter().any(|q| meta_query_matches(q, list)) };
        if !list {
            self.meta_for = chosen.then(|| name.clone());
        }
        if chosen {
            let mut d = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            self.rep.send(opt, REP_META_CONTEXT, &d)?;
        }
        self.rep.ack(opt)?;
        Ok(Step::Next)
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: GO opens the device (an open of its block device, until
    /// disconnect) and enters transmission; INFO only looks.
    fn info_or_go(&self, opt: u32, data: &[u8]) -> io::Result<Step> {
        let Some((name, wanted)) = parse_info_request(data) else {
            self.rep.error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO")?;
            return Ok(Step::Next);
        };
        let found = if opt == OPT_GO {
            self.io.open(&name).map(|h| (h.size(), h.read_only(), h.limits(), Some(h)))
        } else {
            self.io
                .active_devices()
                .into_iter()
                .find(|d| d.name == name.as_bytes())
                .map(|d| (d.size, d.read_only, d.limits, None))
        };
        let Some((size, read_only, limits, handle)) = found else {
            self.rep.error(opt, REP_ERR_UNKNOWN, &format!("no active device named {name:?}"))?;
            return Ok(Step::Next);
        };
        let flags = transmission_flags(read_only, self.structured, &limits);
        let mut export = [0u8; 12];
        export[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        export[2..10].copy_from_slice(&size.to_be_bytes());
        export[10..12].copy_from_slice(&flags.to_be_bytes());
        self.rep.info(opt, &export)?;
        // Sent whether asked or not (proto.md allows it): the device's logical block as the
        // minimum, its physical block (at least a page) as the preferred size. Requests that
        // ignore them still work (partial blocks are read and rewritten around them).
        let mut bs = [0u8; 14];
        bs[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs[2..6].copy_from_slice(&limits.logical_block_size.to_be_bytes());
        bs[6..10].copy_from_slice(&limits.physical_block_size.max(PREFERRED_BLOCK).to_be_bytes());
        bs[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.rep.info(opt, &bs)?;
        if wanted.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            self.rep.info(opt, &d)?;
        }
        if wanted.contains(&INFO_DESCRIPTION) {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(format!("dmemu device-mapper device {name}").as_bytes());
            self.rep.info(opt, &d)?;
        }
        self.rep.ack(opt)?;
        Ok(match handle {
            Some(handle) => {
                let meta = self.meta_for(&name);
                Step::End(Some(Export { handle, size, flags, structured: self.structured, meta }))
            }
            None => Step::Next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_and_reject_inconsistent_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(parse_info_request(&d), Some(("abc".into(), vec![INFO_BLOCK_SIZE, INFO_NAME])));
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut long = u32::MAX.to_be_bytes().to_vec();
        long.extend_from_slice(&[0, 0]);
        assert_eq!(parse_info_request(&long), None);
    }

    #[test]
    fn meta_requests_parse_and_match() {
        let mut d = 2u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"lv");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let (name, queries) = parse_meta_request(&d).unwrap();
        assert_eq!((name.as_str(), queries.len()), ("lv", 2));
        assert!(meta_query_matches(&queries[0], true));
        assert!(!meta_query_matches(&queries[0], false));
        assert!(!meta_query_matches(&queries[1], true));
        assert!(meta_query_matches("base:allocation", false));
        assert_eq!(parse_meta_request(&d[..d.len() - 1]), None);
        let mut trailing = d.clone();
        trailing.push(0);
        assert_eq!(parse_meta_request(&trailing), None);
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&1u32.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&huge), None);
    }

    #[test]
    fn read_only_exports_advertise_no_write_features() {
        let l = Limits::default();
        let ro = transmission_flags(true, false, &l);
        assert_ne!(ro & TF_READ_ONLY, 0);
        assert_eq!(ro & (TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_DF), 0);
        let rw = transmission_flags(false, true, &l);
        assert_eq!(rw & TF_READ_ONLY, 0);
        assert_ne!(rw & TF_SEND_DF, 0);
        assert_ne!(rw & TF_CAN_MULTI_CONN, 0);
        assert_ne!(rw & TF_SEND_TRIM, 0);
        let no_discard = transmission_flags(false, true, &Limits { discard: false, ..l });
        assert_eq!(no_discard & TF_SEND_TRIM, 0, "trim only where the table discards");
        assert_ne!(no_discard & TF_SEND_WRITE_ZEROES, 0);
    }
}
