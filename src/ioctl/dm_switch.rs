//! The RFC dm-switch page-table upload (the 2011 Dell EqualLogic patch) as it travels on the control socket: the RFC's
//! `IpcPgTable` request and `IpcResponse` answer, inside a generic-netlink message of family
//! `"DM_SWITCH"`, command `GET_PAGE_TBL` (framing: docs/protocols.md). Pure functions — bytes in,
//! bytes out; the engine is reached through a closure.
//!
//! Layouts are native-endian like the netlink socket the RFC used (the control socket never
//! leaves the host). Every struct is read and written by copy, so buffer alignment never matters.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::dm::{DevNum, DmError, DmResult};
use crate::targets::switch::PageTableUpload;

/// `MAX_IPC_MSG_LEN`: the largest `IpcPgTable` (the netlink attribute policy's length).
pub const MAX_IPC_MSG_LEN: usize = 65480;
/// `MAX_ERR_STR_LEN`: `err_str` holds this many characters and a NUL.
pub const MAX_ERR_STR_LEN: usize = 255;
/// `OPCODE_PAGE_TABLE_UPLOAD`.
pub const OPCODE_PAGE_TABLE_UPLOAD: u32 = 1;

/// The generic-netlink family of the upload.
pub const FAMILY_NAME: &str = "DM_SWITCH";
/// The family's id on the control socket (the kernel assigned one at registration; dmemu's is
/// fixed, and `CTRL_CMD_GETFAMILY` reports it as a kernel would).
pub const FAMILY_ID: u16 = 0x13;
pub const FAMILY_VERSION: u8 = 1;
/// `NETLINK_ATTR_MSG`: the attribute carrying the `IpcPgTable` / `IpcResponse`.
pub const NETLINK_ATTR_MSG: u16 = 1;
/// `NETLINK_CMD_GET_PAGE_TBL`.
pub const NETLINK_CMD_GET_PAGE_TBL: u8 = 1;

/// Netlink and generic-netlink constants (`linux/netlink.h`, `linux/genetlink.h`).
pub const NLMSG_ERROR: u16 = 2;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_CAPPED: u16 = 0x100;
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_NEWFAMILY: u8 = 1;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const CTRL_ATTR_VERSION: u16 = 3;
pub const CTRL_ATTR_HDRSIZE: u16 = 4;
pub const CTRL_ATTR_MAXATTR: u16 = 5;

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct NlMsgHdr {
    /// Length of the message including this header.
    pub len: u32,
    /// The family id (or `NLMSG_ERROR`).
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

/// `struct genlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct GenlMsgHdr {
    pub cmd: u8,
    pub version: u8,
    pub reserved: u16,
}

/// `struct nlattr`: `len` covers this header and the payload, not the padding to 4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct NlAttr {
    pub len: u16,
    pub ty: u16,
}

/// `struct nlmsgerr`: a negative errno (0 = ack) and the request's header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct NlMsgErr {
    pub error: i32,
    pub msg: NlMsgHdr,
}

/// `IpcPgTable_t` up to its variable `ptbl_buff`. (The C `sizeof` is 48 because of
/// `ptbl_buff[1]` and tail padding; the entries start at offset 44, which is what the checks use.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct IpcPgTable {
    /// Total length of this message (carried, not checked, as in the RFC).
    pub total_len: u32,
    pub opcode: u32,
    /// Userland data shown by `dmsetup status`.
    pub userland: [u32; 2],
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Total pages (regions) in the volume.
    pub page_total: u32,
    /// First page this message sets.
    pub page_offset: u32,
    /// Entries in this message.
    pub page_count: u32,
    /// Page size in sectors (carried, not checked, as in the RFC).
    pub page_size: u32,
    pub dev_count: u16,
    /// Entry width in bits.
    pub pte_bits: u8,
    pub reserved: u8,
}

/// `IpcResponse_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct IpcResponse {
    pub total_len: u32,
    pub opcode: u32,
    pub userland: [u32; 2],
    pub dev_major: u32,
    pub dev_minor: u32,
    /// 0, or a positive errno (`EINVAL` for every refusal, as in the RFC).
    pub status: u32,
    pub err_str: [u8; MAX_ERR_STR_LEN + 1],
}

pub const NLMSG_HDRLEN: usize = size_of::<NlMsgHdr>();
pub const GENL_HDRLEN: usize = size_of::<GenlMsgHdr>();
pub const NLA_HDRLEN: usize = size_of::<NlAttr>();
/// `offsetof(IpcPgTable_t, ptbl_buff)`.
pub const IPC_PG_TABLE_LEN: usize = size_of::<IpcPgTable>();
pub const IPC_RESPONSE_LEN: usize = size_of::<IpcResponse>();
/// The most entry bytes one message can carry, whole 32-bit words.
pub const MAX_ENTRY_BYTES: usize = (MAX_IPC_MSG_LEN - IPC_PG_TABLE_LEN) / 4 * 4;

const _: () = {
    assert!(NLMSG_HDRLEN == 16);
    assert!(GENL_HDRLEN == 4);
    assert!(NLA_HDRLEN == 4);
    assert!(size_of::<NlMsgErr>() == 20);
    assert!(IPC_PG_TABLE_LEN == 44);
    assert!(offset_of!(IpcPgTable, userland) == 8);
    assert!(offset_of!(IpcPgTable, dev_major) == 16);
    assert!(offset_of!(IpcPgTable, page_total) == 24);
    assert!(offset_of!(IpcPgTable, page_size) == 36);
    assert!(offset_of!(IpcPgTable, dev_count) == 40);
    assert!(offset_of!(IpcPgTable, pte_bits) == 42);
    assert!(IPC_RESPONSE_LEN == 284);
    assert!(offset_of!(IpcResponse, status) == 24);
    assert!(offset_of!(IpcResponse, err_str) == 28);
};

/// `NLMSG_ALIGN` / `NLA_ALIGN`.
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Reads a struct from the front of `b`, zero-extending a short buffer.
fn read_padded<T: FromBytes + IntoBytes + FromZeros>(b: &[u8]) -> T {
    let mut v = T::new_zeroed();
    let dst = v.as_mut_bytes();
    let n = dst.len().min(b.len());
    dst[..n].copy_from_slice(&b[..n]);
    v
}

const INVALID_MSG: &str = "Invalid Page Table message";

/// The RFC's checks on the message itself, in its order: too short, too many entries, invalid
/// mask, incomplete. Returns the device and the upload, or the `err_str`.
///
/// Corrections of evident slips, all in the RFC's own words: lengths are those of the
/// `IpcPgTable` (the RFC compared `nla_len`, which includes the 4-byte attribute header, with
/// `sizeof(IpcPgTable_t) - 1`); the sums are computed without 32-bit wrap-around; `pte_bits` of 0
/// (a division by zero in the RFC) or over 32 and a device count of 0 are invalid masks; the
/// "incomplete message" text loses the RFC's typo ("messsage").
pub fn check_page_table(msg: &[u8]) -> Result<(DevNum, PageTableUpload), String> {
    if msg.len() < IPC_PG_TABLE_LEN {
        return Err(format!("{INVALID_MSG}: too short ({})", msg.len()));
    }
    let h: IpcPgTable = read_padded(msg);
    let end = h.page_offset as u64 + h.page_count as u64;
    if end > h.page_total as u64 {
        return Err(format!("{INVALID_MSG}: too many page table entries ({end} > {})", h.page_total));
    }
    let bits = h.pte_bits as u32;
    let mask: u64 = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
    if bits == 0 || bits > 32 || h.dev_count == 0 || (h.dev_count as u64 - 1) & !mask != 0 {
        return Err(format!("{INVALID_MSG}: invalid mask {mask:#x} for {} devices", h.dev_count));
    }
    let per_word = (32 / bits) as u64;
    let size = (h.page_count as u64).div_ceil(per_word) * 4;
    if IPC_PG_TABLE_LEN as u64 + size > msg.len() as u64 {
        return Err(format!("{INVALID_MSG}: incomplete message"));
    }
    let words = &msg[IPC_PG_TABLE_LEN..IPC_PG_TABLE_LEN + size as usize];
    let entries = words.chunks_exact(4).map(|w| u32::from_ne_bytes(w.try_into().expect("4 bytes"))).collect();
    let upload = PageTableUpload {
        userland: h.userland,
        page_total: h.page_total,
        page_offset: h.page_offset,
        page_count: h.page_count,
        page_size: h.page_size,
        dev_count: h.dev_count,
        pte_bits: h.pte_bits,
        entries,
    };
    Ok((DevNum::new(h.dev_major, h.dev_minor), upload))
}

/// The `IpcResponse` to a request (its header zero-extended if short): userland words and device
/// echoed, `status` 0 or `EINVAL`, `err_str` NUL-terminated and cut to 255 bytes (all zero on
/// success; the RFC left it uninitialised).
pub fn response(msg: &[u8], err: Option<&str>) -> IpcResponse {
    let h: IpcPgTable = read_padded(msg);
    let mut r = IpcResponse {
        total_len: IPC_RESPONSE_LEN as u32,
        opcode: OPCODE_PAGE_TABLE_UPLOAD,
        userland: h.userland,
        dev_major: h.dev_major,
        dev_minor: h.dev_minor,
        status: if err.is_some() { libc::EINVAL as u32 } else { 0 },
        err_str: [0; MAX_ERR_STR_LEN + 1],
    };
    if let Some(e) = err {
        let n = e.len().min(MAX_ERR_STR_LEN);
        r.err_str[..n].copy_from_slice(&e.as_bytes()[..n]);
    }
    r
}

impl IpcResponse {
    /// `err_str` up to its NUL.
    pub fn error(&self) -> String {
        let n = self.err_str.iter().position(|&c| c == 0).unwrap_or(self.err_str.len());
        String::from_utf8_lossy(&self.err_str[..n]).into_owned()
    }
}

/// The RFC's `get_page_tbl`: the message checks, then `upload` (the engine: device lookup and the
/// table checks), answered with an `IpcResponse` whatever happens.
pub fn get_page_tbl(msg: &[u8], upload: impl FnOnce(DevNum, &PageTableUpload) -> DmResult<()>) -> IpcResponse {
    let err = match check_page_table(msg) {
        Err(e) => Some(e),
        Ok((dev, u)) => match upload(dev, &u) {
            Ok(()) => None,
            Err(DmError::NoDevice(_)) => {
                Some(format!("{INVALID_MSG}: invalid target device {}:{}", dev.major, dev.minor))
            }
            Err(DmError::Invalid(s)) => Some(s),
            Err(e) => Some(e.to_string()),
        },
    };
    if let Some(e) = &err {
        tracing::warn!("get_page_tbl: {e}");
    }
    response(msg, err.as_deref())
}

/// One netlink attribute (type, payload).
fn put_attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let a = NlAttr { len: (NLA_HDRLEN + payload.len()) as u16, ty };
    out.extend_from_slice(a.as_bytes());
    out.extend_from_slice(payload);
    out.resize(align4(out.len()), 0);
}

/// A whole generic-netlink message.
pub fn genl_message(ty: u16, flags: u16, seq: u32, pid: u32, cmd: u8, version: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDRLEN];
    out.extend_from_slice(GenlMsgHdr { cmd, version, reserved: 0 }.as_bytes());
    for (t, p) in attrs {
        put_attr(&mut out, *t, p);
    }
    let h = NlMsgHdr { len: out.len() as u32, ty, flags, seq, pid };
    out[..NLMSG_HDRLEN].copy_from_slice(h.as_bytes());
    out
}

/// An `NLMSG_ERROR` message: `errno` 0 is an ack. Only the request's header is echoed
/// (`NLM_F_CAPPED`).
pub fn nlmsg_error(req: &NlMsgHdr, errno: i32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + size_of::<NlMsgErr>();
    let h = NlMsgHdr { len: len as u32, ty: NLMSG_ERROR, flags: NLM_F_CAPPED, seq: req.seq, pid: req.pid };
    let e = NlMsgErr { error: -errno, msg: *req };
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(e.as_bytes());
    out
}

/// Attributes of a message body: `(type, payload)`; `None` if one is malformed.
pub fn parse_attrs(mut b: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let a: NlAttr = read_padded(b);
        let len = a.len as usize;
        if len < NLA_HDRLEN || len > b.len() {
            return None;
        }
        out.push((a.ty, &b[NLA_HDRLEN..len]));
        b = &b[align4(len).min(b.len())..];
    }
    Some(out)
}

/// Answers one GENL frame: exactly one netlink message, what the kernel's netlink and
/// generic-netlink layers would do with it, then the RFC's `get_page_tbl`. Returns the netlink
/// messages of the reply, concatenated (possibly none: a non-request without `NLM_F_ACK`).
/// `privileged` callers may upload (as with `GENL_ADMIN_PERM`; the RFC's op had no permission
/// flag); `upload` runs an upload that passed the message checks.
pub fn serve(frame: &[u8], privileged: bool, upload: impl FnOnce(DevNum, &PageTableUpload) -> DmResult<()>) -> Vec<u8> {
    let req: NlMsgHdr = read_padded(frame);
    let len = req.len as usize;
    if frame.len() < NLMSG_HDRLEN || len < NLMSG_HDRLEN || len > frame.len() || align4(len) < frame.len() {
        return nlmsg_error(&req, libc::EINVAL);
    }
    let msg = &frame[..len];
    let ack = |err: i32| if req.flags & NLM_F_ACK != 0 || err != 0 { nlmsg_error(&req, err) } else { Vec::new() };
    // Only requests are handled; control types below NLMSG_MIN_TYPE are skipped.
    if req.flags & NLM_F_REQUEST == 0 || req.ty < 0x10 {
        return ack(0);
    }
    if req.ty != GENL_ID_CTRL && req.ty != FAMILY_ID {
        return ack(libc::ENOENT);
    }
    if len < NLMSG_HDRLEN + GENL_HDRLEN {
        return ack(libc::EINVAL);
    }
    let g: GenlMsgHdr = read_padded(&msg[NLMSG_HDRLEN..]);
    let Some(attrs) = parse_attrs(&msg[NLMSG_HDRLEN + GENL_HDRLEN..]) else {
        return ack(libc::EINVAL);
    };
    let mut out = if req.ty == GENL_ID_CTRL {
        if g.cmd != CTRL_CMD_GETFAMILY {
            return ack(libc::EOPNOTSUPP);
        }
        let by_name = attrs
            .iter()
            .find(|(t, _)| *t == CTRL_ATTR_FAMILY_NAME)
            .map(|(_, p)| p.split(|&c| c == 0).next().unwrap_or(&[]));
        let by_id = attrs
            .iter()
            .find(|(t, p)| *t == CTRL_ATTR_FAMILY_ID && p.len() >= 2)
            .map(|(_, p)| u16::from_ne_bytes([p[0], p[1]]));
        match (by_name, by_id) {
            (Some(n), _) if n == FAMILY_NAME.as_bytes() => family_reply(&req),
            (None, Some(FAMILY_ID)) => family_reply(&req),
            (None, None) => return ack(libc::EINVAL),
            _ => return ack(libc::ENOENT),
        }
    } else {
        if g.cmd != NETLINK_CMD_GET_PAGE_TBL {
            return ack(libc::EOPNOTSUPP);
        }
        if !privileged {
            return ack(libc::EPERM);
        }
        // The attribute policy: NLA_BINARY of at most MAX_IPC_MSG_LEN.
        let Some((_, body)) = attrs.iter().find(|(t, _)| *t == NETLINK_ATTR_MSG) else {
            // The RFC logged and sent nothing, leaving the caller waiting; answer instead.
            return ack(libc::EINVAL);
        };
        if body.len() > MAX_IPC_MSG_LEN {
            return ack(libc::ERANGE);
        }
        let resp = get_page_tbl(body, upload);
        // The RFC put the response under attribute type NLA_BINARY (a policy constant, 11); it
        // plainly meant its only attribute, NETLINK_ATTR_MSG.
        genl_message(
            FAMILY_ID,
            0,
            req.seq,
            0,
            NETLINK_CMD_GET_PAGE_TBL,
            FAMILY_VERSION,
            &[(NETLINK_ATTR_MSG, resp.as_bytes())],
        )
    };
    out.extend(ack(0));
    out
}

fn family_reply(req: &NlMsgHdr) -> Vec<u8> {
    let mut name = FAMILY_NAME.as_bytes().to_vec();
    name.push(0);
    genl_message(
        GENL_ID_CTRL,
        0,
        req.seq,
        req.pid,
        CTRL_CMD_NEWFAMILY,
        2,
        &[
            (CTRL_ATTR_FAMILY_ID, &FAMILY_ID.to_ne_bytes()),
            (CTRL_ATTR_FAMILY_NAME, &name),
            (CTRL_ATTR_VERSION, &(FAMILY_VERSION as u32).to_ne_bytes()),
            (CTRL_ATTR_HDRSIZE, &0u32.to_ne_bytes()),
            (CTRL_ATTR_MAXATTR, &(NETLINK_ATTR_MSG as u32).to_ne_bytes()),
        ],
    )
}

// ---- the client side (`dmemu switch upload`, tests, benchmarks) ----

/// Packs path indices `bits` wide, `32 / bits` to a 32-bit word, least significant first (the
/// RFC's `ptbl_buff` layout).
pub fn pack_entries(entries: impl IntoIterator<Item = u32>, bits: u8) -> Vec<u32> {
    assert!((1..=32).contains(&bits), "entry width {bits}");
    let per_word = 32 / bits as usize;
    let mask = if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 };
    let mut out = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        if i % per_word == 0 {
            out.push(0);
        }
        *out.last_mut().expect("pushed") |= (e & mask) << ((i % per_word) as u32 * bits as u32);
    }
    out
}

/// An `IpcPgTable` message: `h` (with `total_len` and `opcode` filled in) and its entry words.
pub fn page_table_message(h: &IpcPgTable, words: &[u32]) -> Vec<u8> {
    let mut h = *h;
    h.total_len = (IPC_PG_TABLE_LEN + words.len() * 4) as u32;
    h.opcode = OPCODE_PAGE_TABLE_UPLOAD;
    let mut out = Vec::with_capacity(h.total_len as usize);
    out.extend_from_slice(h.as_bytes());
    for w in words {
        out.extend_from_slice(&w.to_ne_bytes());
    }
    out
}

/// A GET_PAGE_TBL request carrying `msg` (an `IpcPgTable`).
pub fn upload_request(seq: u32, msg: &[u8]) -> Vec<u8> {
    genl_message(FAMILY_ID, NLM_F_REQUEST, seq, 0, NETLINK_CMD_GET_PAGE_TBL, FAMILY_VERSION, &[(NETLINK_ATTR_MSG, msg)])
}

/// A `CTRL_CMD_GETFAMILY` request for `name`.
pub fn getfamily_request(seq: u32, name: &str) -> Vec<u8> {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    genl_message(GENL_ID_CTRL, NLM_F_REQUEST, seq, 0, CTRL_CMD_GETFAMILY, 1, &[(CTRL_ATTR_FAMILY_NAME, &n)])
}

/// One netlink message of a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyMsg {
    /// The `IpcResponse` to a GET_PAGE_TBL.
    Response(Box<IpcResponse>),
    /// `NLMSG_ERROR`: 0 is an ack, else a negative errno.
    Error(i32),
    /// `CTRL_CMD_NEWFAMILY`: the family id.
    Family(u16),
}

/// Splits a GENL_REPLY payload into its messages.
pub fn parse_reply(mut b: &[u8]) -> Result<Vec<ReplyMsg>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let h: NlMsgHdr = read_padded(b);
        let len = h.len as usize;
        if b.len() < NLMSG_HDRLEN || len < NLMSG_HDRLEN || len > b.len() {
            return Err(format!("malformed netlink message ({len} of {} bytes)", b.len()));
        }
        let body = &b[NLMSG_HDRLEN..len];
        match h.ty {
            NLMSG_ERROR => out.push(ReplyMsg::Error(read_padded::<NlMsgErr>(body).error)),
            GENL_ID_CTRL => {
                let attrs = parse_attrs(body.get(GENL_HDRLEN..).unwrap_or(&[])).ok_or("malformed attributes")?;
                let id = attrs
                    .iter()
                    .find(|(t, p)| *t == CTRL_ATTR_FAMILY_ID && p.len() >= 2)
                    .map(|(_, p)| u16::from_ne_bytes([p[0], p[1]]))
                    .ok_or("family reply without an id")?;
                out.push(ReplyMsg::Family(id));
            }
            _ => {
                let attrs = parse_attrs(body.get(GENL_HDRLEN..).unwrap_or(&[])).ok_or("malformed attributes")?;
                let (_, p) = attrs.first().ok_or("reply without an attribute")?;
                if p.len() < IPC_RESPONSE_LEN {
                    return Err(format!("short IpcResponse ({} bytes)", p.len()));
                }
                out.push(ReplyMsg::Response(Box::new(read_padded(p))));
            }
        }
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(dev_count: u16, pte_bits: u8, total: u32, offset: u32, count: u32) -> IpcPgTable {
        IpcPgTable {
            dev_major: 252,
            dev_minor: 3,
            userland: [0xdead, 0xbeef],
            page_total: total,
            page_offset: offset,
            page_count: count,
            page_size: 8,
            dev_count,
            pte_bits,
            ..Default::default()
        }
    }

    #[test]
    fn packing_follows_the_rfc_word_layout() {
        assert_eq!(pack_entries([1, 2, 3], 4), vec![0x321]);
        let w = pack_entries([1u32; 11], 3);
        assert_eq!((w.len(), w[0], w[1]), (2, 0o1111111111, 1));
        assert_eq!(pack_entries([5, 6], 32), vec![5, 6]);
    }

    #[test]
    fn the_rfc_checks_run_in_its_order() {
        let m = |h: IpcPgTable, words: &[u32]| page_table_message(&h, words);
        let e = |b: &[u8]| check_page_table(b).unwrap_err();
        assert_eq!(e(&[0; 43]), "Invalid Page Table message: too short (43)");
        // Too many entries wins over an invalid mask and an incomplete body.
        assert_eq!(
            e(&m(header(0, 0, 10, 8, 3), &[])),
            "Invalid Page Table message: too many page table entries (11 > 10)"
        );
        // No 32-bit wrap-around.
        assert_eq!(
            e(&m(header(2, 1, 10, u32::MAX, 2), &[])),
            "Invalid Page Table message: too many page table entries (4294967297 > 10)"
        );
        assert_eq!(e(&m(header(5, 2, 10, 0, 1), &[0])), "Invalid Page Table message: invalid mask 0x3 for 5 devices");
        assert_eq!(e(&m(header(1, 0, 10, 0, 1), &[0])), "Invalid Page Table message: invalid mask 0x0 for 1 devices");
        assert_eq!(e(&m(header(0, 4, 10, 0, 1), &[0])), "Invalid Page Table message: invalid mask 0xf for 0 devices");
        assert_eq!(
            e(&m(header(2, 33, 10, 0, 1), &[0])),
            "Invalid Page Table message: invalid mask 0x1ffffffff for 2 devices"
        );
        assert_eq!(e(&m(header(4, 2, 40, 0, 17), &[0])), "Invalid Page Table message: incomplete message");
        let (dev, u) = check_page_table(&m(header(4, 2, 40, 0, 17), &[1, 2])).unwrap();
        assert_eq!(dev, DevNum::new(252, 3));
        assert_eq!((u.entries, u.userland, u.page_size), (vec![1, 2], [0xdead, 0xbeef], 8));
        // Exactly 16 entries of 2 bits need one word; 32-bit entries one word each.
        assert!(check_page_table(&m(header(4, 2, 40, 0, 16), &[7])).is_ok());
        assert!(check_page_table(&m(header(4, 32, 40, 0, 2), &[1, 3])).is_ok());
    }

    #[test]
    fn responses_echo_the_request_and_cut_the_error() {
        let msg = page_table_message(&header(2, 1, 4, 0, 4), &[0b1010]);
        let r = get_page_tbl(&msg, |_, _| Err(DmError::NoDevice("x".into())));
        assert_eq!((r.status, r.dev_major, r.dev_minor, r.userland), (libc::EINVAL as u32, 252, 3, [0xdead, 0xbeef]));
        assert_eq!(r.error(), "Invalid Page Table message: invalid target device 252:3");
        let r = get_page_tbl(&msg, |_, u| {
            assert_eq!(u.entries, vec![0b1010]);
            Ok(())
        });
        assert_eq!((r.status, r.error(), r.total_len, r.opcode), (0, String::new(), 284, 1));
        let long = "x".repeat(300);
        assert_eq!(response(&msg, Some(&long)).error().len(), 255);
        // A short message still gets an answer, its fields zero-extended.
        let r = get_page_tbl(&msg[..18], |_, _| unreachable!());
        assert_eq!((r.dev_major, r.dev_minor, r.userland), (252, 0, [0xdead, 0xbeef]));
        assert_eq!(r.error(), "Invalid Page Table message: too short (18)");
    }

    #[test]
    fn netlink_layer_answers_like_the_kernel() {
        let msg = page_table_message(&header(2, 1, 4, 0, 4), &[0]);
        let ok = |_: DevNum, _: &PageTableUpload| Ok(());
        let one = |b: Vec<u8>| parse_reply(&b).unwrap();
        assert!(
            matches!(&one(serve(&upload_request(7, &msg), true, ok))[..], [ReplyMsg::Response(r)] if r.status == 0)
        );
        // NLM_F_ACK adds an ack after the response.
        let mut req = upload_request(7, &msg);
        req[6] |= NLM_F_ACK as u8;
        assert!(matches!(&one(serve(&req, true, ok))[..], [ReplyMsg::Response(_), ReplyMsg::Error(0)]));
        assert_eq!(one(serve(&upload_request(7, &msg), false, ok)), vec![ReplyMsg::Error(-libc::EPERM)]);
        let wrong_family = genl_message(0x42, NLM_F_REQUEST, 1, 0, 1, 1, &[]);
        assert_eq!(one(serve(&wrong_family, true, ok)), vec![ReplyMsg::Error(-libc::ENOENT)]);
        let wrong_cmd = genl_message(FAMILY_ID, NLM_F_REQUEST, 1, 0, 9, 1, &[]);
        assert_eq!(one(serve(&wrong_cmd, true, ok)), vec![ReplyMsg::Error(-libc::EOPNOTSUPP)]);
        let no_attr = genl_message(FAMILY_ID, NLM_F_REQUEST, 1, 0, 1, 1, &[]);
        assert_eq!(one(serve(&no_attr, true, ok)), vec![ReplyMsg::Error(-libc::EINVAL)]);
        let big = vec![0u8; MAX_IPC_MSG_LEN + 1];
        assert_eq!(one(serve(&upload_request(1, &big), true, ok)), vec![ReplyMsg::Error(-libc::ERANGE)]);
        assert_eq!(one(serve(&[1, 2, 3], true, ok)), vec![ReplyMsg::Error(-libc::EINVAL)]);
        let mut truncated = upload_request(7, &msg);
        truncated.truncate(30);
        assert_eq!(one(serve(&truncated, true, ok)), vec![ReplyMsg::Error(-libc::EINVAL)]);
        let not_request = genl_message(FAMILY_ID, 0, 1, 0, 1, 1, &[]);
        assert!(serve(&not_request, true, ok).is_empty());
        assert_eq!(one(serve(&getfamily_request(3, FAMILY_NAME), false, ok)), vec![ReplyMsg::Family(FAMILY_ID)]);
        assert_eq!(one(serve(&getfamily_request(3, "nope"), false, ok)), vec![ReplyMsg::Error(-libc::ENOENT)]);
    }
}
