//! Option haggling (proto.md "Fixed newstyle negotiation", "Option types").

use std::fs::File;
use std::io::{self, BufReader, Read, Write};

use super::proto::*;
use super::Export;
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
pub(super) fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;
    if read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
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
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let rep = Replier { w };
    let mut structured = false;
    // The export NBD_OPT_SET_META_CONTEXT selected base:allocation for, if any: it applies only
    // when the client then goes to that export.
    let mut meta_for: Option<String> = None;

    loop {
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
            rep.error(opt, REP_ERR_TOO_BIG, "option data too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;

        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No error reply exists for NBD_OPT_EXPORT_NAME: an unknown export ends the
                // session (proto.md "Option types").
                let Some(handle) = io.open(&name) else {
                    return Err(invalid(format!("NBD_OPT_EXPORT_NAME for unknown export {name:?}")));
                };
                let size = handle.size();
                let flags = transmission_flags(handle.read_only(), structured);
                let meta = meta_for.as_deref() == Some(name.as_str());
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&size.to_be_bytes());
                reply.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                (&mut &*w).write_all(&reply)?;
                return Ok(Some(Export { handle, size, flags, structured, meta }));
            }
            OPT_ABORT => {
                // The client may already have closed; the ACK is a courtesy.
                let _ = rep.ack(opt);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    rep.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for (name, _) in io.active() {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    rep.send(opt, REP_SERVER, &d)?;
                }
                rep.ack(opt)?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    rep.error(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                structured = true;
                rep.ack(opt)?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = opt == OPT_LIST_META_CONTEXT;
                if !structured {
                    // proto.md: metadata contexts need structured replies to be usable.
                    rep.error(opt, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    rep.error(opt, REP_ERR_INVALID, "malformed metadata context request")?;
                    continue;
                };
                if !io.active().iter().any(|(n, _)| *n == name) {
                    rep.error(opt, REP_ERR_UNKNOWN, &format!("no active device named {name:?}"))?;
                    continue;
                }
                // LIST without queries lists every context; SET without queries selects none.
                let chosen =
                    if queries.is_empty() { list } else { queries.iter().any(|q| meta_query_matches(q, list)) };
                if !list {
                    meta_for = chosen.then(|| name.clone());
                }
                if chosen {
                    let mut d = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    rep.send(opt, REP_META_CONTEXT, &d)?;
                }
                rep.ack(opt)?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, wanted)) = parse_info_request(&data) else {
                    rep.error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO")?;
                    continue;
                };
                // GO opens the device (an open of its block device, until disconnect); INFO only
                // looks.
                let (handle, size, read_only) = if opt == OPT_GO {
                    match io.open(&name) {
                        Some(h) => {
                            let (s, ro) = (h.size(), h.read_only());
                            (Some(h), s, ro)
                        }
                        None => {
                            rep.error(opt, REP_ERR_UNKNOWN, &format!("no active device named {name:?}"))?;
                            continue;
                        }
                    }
                } else {
                    match io.active_devices().into_iter().find(|d| d.name == name) {
                        Some(d) => (None, d.size, d.read_only),
                        None => {
                            rep.error(opt, REP_ERR_UNKNOWN, &format!("no active device named {name:?}"))?;
                            continue;
                        }
                    }
                };
                let flags = transmission_flags(read_only, structured);
                let mut export = [0u8; 12];
                export[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
                export[2..10].copy_from_slice(&size.to_be_bytes());
                export[10..12].copy_from_slice(&flags.to_be_bytes());
                rep.info(opt, &export)?;
                // Sent whether asked or not (proto.md allows it): these are the protocol's
                // defaults, so clients that ignore them lose nothing.
                let mut bs = [0u8; 14];
                bs[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs[2..6].copy_from_slice(&MIN_BLOCK.to_be_bytes());
                bs[6..10].copy_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                bs[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
                rep.info(opt, &bs)?;
                if wanted.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    rep.info(opt, &d)?;
                }
                if wanted.contains(&INFO_DESCRIPTION) {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(format!("dmemu device-mapper device {name}").as_bytes());
                    rep.info(opt, &d)?;
                }
                rep.ack(opt)?;
                if let Some(handle) = handle {
                    let meta = meta_for.as_deref() == Some(name.as_str());
                    return Ok(Some(Export { handle, size, flags, structured, meta }));
                }
            }
            _ => rep.error(opt, REP_ERR_UNSUP, &format!("option {opt} is not supported"))?,
        }
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
        let ro = transmission_flags(true, false);
        assert_ne!(ro & TF_READ_ONLY, 0);
        assert_eq!(ro & (TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_DF), 0);
        let rw = transmission_flags(false, true);
        assert_eq!(rw & TF_READ_ONLY, 0);
        assert_ne!(rw & TF_SEND_DF, 0);
        assert_ne!(rw & TF_CAN_MULTI_CONN, 0);
    }
}
