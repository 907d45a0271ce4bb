//! proplib's XML dialect as the NetBSD kernel speaks it (netbsd-dm-proplib.md §5): a small value
//! model, the kernel-side parser (`internalize`) and the byte-exact writer (`externalize`).
//!
//! Why not the `plist` crate (§7): it keeps integers as one signed/unsigned-agnostic `Integer`, so
//! `0x5` and `5` become the same value and cannot be written back as the kernel writes them
//! (unsigned in hex, signed in decimal); it keeps keys in insertion order where proplib sorts them
//! byte-wise; it writes Apple's DOCTYPE, `<string></string>` for empties, escapes quotes and ends
//! without a newline or the counted NUL; and its reader parses `010` as ten and rejects the trailing
//! NUL, where the kernel reads octal eight and stops at the NUL. Neither direction fits, so both are
//! written here (about as much code as adapting the crate would take).

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A proplib number: the signedness bit decides how it is written (§5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Num {
    U(u64),
    I(i64),
}

impl Num {
    /// The kernel's `prop_*_get_uint32`: any number that is ≥ 0 and fits (§5.4).
    pub fn as_u32(self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }
    /// `prop_*_get_uint64`.
    pub fn as_u64(self) -> Option<u64> {
        match self {
            Num::U(v) => Some(v),
            Num::I(v) => u64::try_from(v).ok(),
        }
    }
    /// `prop_*_get_int32`.
    pub fn as_i32(self) -> Option<i32> {
        match self {
            Num::U(v) => i32::try_from(v).ok(),
            Num::I(v) => i32::try_from(v).ok(),
        }
    }
}

/// Keys in byte-wise `strcmp` order, as proplib keeps them (§5.2).
pub type Dict = BTreeMap<Vec<u8>, Value>;

/// A proplib object. Strings are bytes: proplib neither validates nor transcodes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Dict(Dict),
    Array(Vec<Value>),
    String(Vec<u8>),
    Num(Num),
    Bool(bool),
    Data(Vec<u8>),
}

impl Value {
    pub fn str(s: &str) -> Self {
        Value::String(s.as_bytes().to_vec())
    }
    pub fn u(v: impl Into<u64>) -> Self {
        Value::Num(Num::U(v.into()))
    }
    pub fn i(v: impl Into<i64>) -> Self {
        Value::Num(Num::I(v.into()))
    }
    pub fn as_num(&self) -> Option<Num> {
        match self {
            Value::Num(n) => Some(*n),
            _ => None,
        }
    }
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The kernel's copy-in limit: `pref_len` (NUL included) at or beyond it is E2BIG (prop_kern 1.27,
/// §1.2; the 2015 generation had 64 KiB and EINVAL).
pub const COPYIN_LIMIT: usize = 128 * 1024;

/// Deepest container nesting accepted. proplib has no limit; DM dictionaries nest three deep, and a
/// bound keeps a hostile request from exhausting the daemon's stack in the (recursive) drop and
/// externalize of what it parsed.
pub const MAX_DEPTH: usize = 256;

/// Why a text was not a proplib dictionary (the kernel answers EIO for all of these).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("plist parse error at byte {at}: {what}")]
pub struct ParseError {
    pub at: usize,
    pub what: &'static str,
}

// ---- externalize --------------------------------------------------------------------------------

const PROLOGUE: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE plist PUBLIC \"-//Apple Computer//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n<plist version=\"1.0\">\n";
const EPILOGUE: &str = "</plist>\n";

/// The dictionary as the kernel copies it out: §5.1 framing, §5.2 encoding, and the NUL that
/// `pref_len` counts (§1.2).
pub fn externalize(d: &Dict) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(PROLOGUE.as_bytes());
    write_dict(&mut out, d, 0);
    out.extend_from_slice(EPILOGUE.as_bytes());
    out.push(0);
    out
}

fn indent(out: &mut Vec<u8>, depth: usize) {
    out.resize(out.len() + depth, b'\t');
}

/// Only `&`, `<` and `>` are escaped; everything else is copied as-is (§5.2).
fn escaped(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        match b {
            b'&' => out.extend_from_slice(b"&amp;"),
            b'<' => out.extend_from_slice(b"&lt;"),
            b'>' => out.extend_from_slice(b"&gt;"),
            _ => out.push(b),
        }
    }
}

fn write_dict(out: &mut Vec<u8>, d: &Dict, depth: usize) {
    indent(out, depth);
    if d.is_empty() {
        out.extend_from_slice(b"<dict/>\n");
        return;
    }
    out.extend_from_slice(b"<dict>\n");
    for (k, v) in d {
        indent(out, depth + 1);
        out.extend_from_slice(b"<key>");
        escaped(out, k);
        out.extend_from_slice(b"</key>\n");
        write_value(out, v, depth + 1);
    }
    indent(out, depth);
    out.extend_from_slice(b"</dict>\n");
}

fn write_value(out: &mut Vec<u8>, v: &Value, depth: usize) {
    match v {
        Value::Dict(d) => return write_dict(out, d, depth),
        Value::Array(a) if !a.is_empty() => {
            indent(out, depth);
            out.extend_from_slice(b"<array>\n");
            for e in a {
                write_value(out, e, depth + 1);
            }
            indent(out, depth);
            out.extend_from_slice(b"</array>\n");
            return;
        }
        _ => {}
    }
    indent(out, depth);
    let mut line = String::new();
    match v {
        Value::Dict(_) => unreachable!("handled above"),
        Value::Array(_) => line.push_str("<array/>"),
        Value::String(s) if s.is_empty() => line.push_str("<string/>"),
        Value::String(s) => {
            out.extend_from_slice(b"<string>");
            escaped(out, s);
            line.push_str("</string>");
        }
        Value::Num(Num::U(n)) => {
            let _ = write!(line, "<integer>0x{n:x}</integer>");
        }
        Value::Num(Num::I(n)) => {
            let _ = write!(line, "<integer>{n}</integer>");
        }
        Value::Bool(true) => line.push_str("<true/>"),
        Value::Bool(false) => line.push_str("<false/>"),
        Value::Data(d) if d.is_empty() => line.push_str("<data/>"),
        Value::Data(d) => {
            let _ = write!(line, "<data>{}</data>", base64_encode(d));
        }
    }
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(d: &[u8]) -> String {
    let mut s = String::with_capacity(d.len().div_ceil(3) * 4);
    for chunk in d.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits, mut pad) = (0u32, 0u32, 0usize);
    for &c in text {
        if is_space(c) {
            continue;
        }
        if c == b'=' {
            pad += 1;
            continue;
        }
        // Data after padding is malformed.
        if pad > 0 {
            return None;
        }
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // Leftover bits must be padding the `=` count accounts for.
    (pad <= 2 && (bits == 0 || (bits / 2) as usize == pad)).then_some(out)
}

// ---- internalize --------------------------------------------------------------------------------

/// C's `isspace` in the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Parses a dictionary as the kernel's `prop_dictionary_internalize` does (§5.3). The kernel
/// appends a NUL to what it copied in, so the text ends at the first NUL; anything after the
/// closing `</plist>` is ignored.
pub fn internalize(buf: &[u8]) -> Result<Dict, ParseError> {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Parser { s: &buf[..end], pos: 0 }.document()
}

struct Tag<'a> {
    name: &'a [u8],
    end: bool,
    empty: bool,
    attr: Option<(&'a [u8], &'a [u8])>,
}

/// An open container while parsing (an explicit stack, so deep nesting cannot overflow ours).
enum Open {
    /// The dictionary so far and the key whose value is being parsed.
    Dict(Dict, Option<Vec<u8>>),
    Array(Vec<Value>),
}

/// What a start tag produced: a finished value, or a container to fill.
enum Started {
    Value(Value),
    Open(Open),
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn fail<T>(&self, what: &'static str) -> Result<T, ParseError> {
        Err(ParseError { at: self.pos, what })
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn rest(&self) -> &'a [u8] {
        self.s.get(self.pos..).unwrap_or_default()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.pos += 1;
        }
    }

    /// Moves just past the next `pat`, or fails.
    fn skip_past(&mut self, pat: &[u8], what: &'static str) -> Result<(), ParseError> {
        match self.rest().windows(pat.len()).position(|w| w == pat) {
            Some(i) => {
                self.pos += i + pat.len();
                Ok(())
            }
            None => self.fail(what),
        }
    }

    fn expect(&mut self, b: u8, what: &'static str) -> Result<(), ParseError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            self.fail(what)
        }
    }

    /// The XML declarations, the `<plist>` wrapper, the root dictionary, `</plist>`.
    fn document(mut self) -> Result<Dict, ParseError> {
        loop {
            self.skip_space();
            let r = self.rest();
            if r.starts_with(b"<?xml") && r.get(5).copied().is_some_and(is_space) {
                self.skip_past(b"?>", "unterminated XML declaration")?;
            } else if r.starts_with(b"<!DOCTYPE") {
                if !r.starts_with(b"<!DOCTYPE plist") {
                    return self.fail("not a plist DOCTYPE");
                }
                self.skip_past(b">", "unterminated DOCTYPE")?;
            } else {
                break;
            }
        }
        let t = self.tag()?;
        if t.end || t.empty || t.name != b"plist" {
            return self.fail("expected <plist>");
        }
        if t.attr.is_some_and(|(k, _)| k != b"version") {
            return self.fail("<plist> takes only a version attribute");
        }
        let t = self.tag()?;
        if t.end || t.name != b"dict" {
            return self.fail("the root object is not a dictionary");
        }
        let root = match self.start(&t)? {
            Started::Value(Value::Dict(d)) => d,
            Started::Open(open) => self.fill(open)?,
            Started::Value(_) => return self.fail("the root object is not a dictionary"),
        };
        let t = self.tag()?;
        if !t.end || t.name != b"plist" {
            return self.fail("expected </plist>");
        }
        Ok(root)
    }

    /// The next tag, after whitespace and comments.
    fn tag(&mut self) -> Result<Tag<'a>, ParseError> {
        loop {
            self.skip_space();
            if self.peek() != Some(b'<') {
                return self.fail("expected a tag");
            }
            if self.rest().starts_with(b"<!--") {
                self.pos += 4;
                self.skip_past(b"-->", "unterminated comment")?;
                continue;
            }
            break;
        }
        self.pos += 1;
        let end = self.peek() == Some(b'/');
        if end {
            self.pos += 1;
        }
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_alphabetic()) {
            self.pos += 1;
        }
        let name = &self.s[start..self.pos];
        if name.is_empty() {
            return self.fail("empty tag name");
        }
        let mut attr = None;
        if self.peek().is_some_and(is_space) {
            self.skip_space();
            if !end && !matches!(self.peek(), Some(b'/' | b'>')) {
                let k0 = self.pos;
                while self.peek().is_some_and(|b| !is_space(b) && !matches!(b, b'=' | b'>' | b'/')) {
                    self.pos += 1;
                }
                let key = &self.s[k0..self.pos];
                self.expect(b'=', "attribute without a value")?;
                self.expect(b'"', "attribute value not quoted")?;
                let v0 = self.pos;
                self.skip_past(b"\"", "unterminated attribute value")?;
                attr = Some((key, &self.s[v0..self.pos - 1]));
                self.skip_space();
            }
        }
        let mut empty = false;
        if self.peek() == Some(b'/') {
            if end {
                return self.fail("malformed end tag");
            }
            empty = true;
            self.pos += 1;
        }
        self.expect(b'>', "expected '>'")?;
        Ok(Tag { name, end, empty, attr })
    }

    fn end_tag(&mut self, name: &[u8]) -> Result<(), ParseError> {
        let t = self.tag()?;
        if t.end && t.name == name {
            Ok(())
        } else {
            self.fail("mismatched end tag")
        }
    }

    /// Character data up to the next `<`, with the five named entities decoded (§5.3).
    fn text(&mut self) -> Result<Vec<u8>, ParseError> {
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return self.fail("unterminated text"),
                Some(b'<') => return Ok(out),
                Some(b'&') => {
                    const ENTITIES: [(&[u8], u8); 5] =
                        [(b"&amp;", b'&'), (b"&lt;", b'<'), (b"&gt;", b'>'), (b"&apos;", b'\''), (b"&quot;", b'"')];
                    let r = self.rest();
                    let Some((name, c)) = ENTITIES.iter().find(|(n, _)| r.starts_with(n)) else {
                        return self.fail("unknown entity");
                    };
                    out.push(*c);
                    self.pos += name.len();
                }
                Some(b) => {
                    out.push(b);
                    self.pos += 1;
                }
            }
        }
    }

    /// A value's start tag: scalars are read to their end tag here, containers are opened.
    fn start(&mut self, t: &Tag<'a>) -> Result<Started, ParseError> {
        let no_attr = |p: &Self| if t.attr.is_some() { p.fail("unexpected attribute") } else { Ok(()) };
        let v = match t.name {
            b"dict" | b"array" => {
                no_attr(self)?;
                let dict = t.name == b"dict";
                return Ok(match (t.empty, dict) {
                    (true, true) => Started::Value(Value::Dict(Dict::new())),
                    (true, false) => Started::Value(Value::Array(Vec::new())),
                    (false, true) => Started::Open(Open::Dict(Dict::new(), None)),
                    (false, false) => Started::Open(Open::Array(Vec::new())),
                });
            }
            b"string" => {
                no_attr(self)?;
                if t.empty {
                    Value::String(Vec::new())
                } else {
                    let s = self.text()?;
                    self.end_tag(b"string")?;
                    Value::String(s)
                }
            }
            b"integer" => {
                no_attr(self)?;
                if t.empty {
                    return self.fail("empty <integer/>");
                }
                let (n, used) = parse_number(self.rest());
                if used == 0 {
                    return self.fail("not a number");
                }
                self.pos += used;
                self.end_tag(b"integer")?;
                Value::Num(n)
            }
            b"true" | b"false" => {
                no_attr(self)?;
                if !t.empty {
                    return self.fail("<true>/<false> must be empty elements");
                }
                Value::Bool(t.name == b"true")
            }
            b"data" => {
                if t.attr.is_some_and(|(k, _)| k != b"size") {
                    return self.fail("unexpected attribute");
                }
                // The 2016 generation refuses `<data/>` on input although it writes it (§5.3).
                if t.empty {
                    return self.fail("empty <data/>");
                }
                let start = self.pos;
                let len = self.rest().iter().position(|&b| b == b'<').unwrap_or(self.rest().len());
                self.pos += len;
                let Some(d) = base64_decode(&self.s[start..self.pos]) else {
                    return self.fail("bad base64");
                };
                self.end_tag(b"data")?;
                Value::Data(d)
            }
            _ => return self.fail("unknown element"),
        };
        Ok(Started::Value(v))
    }

    /// Fills `root` and everything opened inside it, up to its end tag.
    fn fill(&mut self, root: Open) -> Result<Dict, ParseError> {
        let mut stack = vec![root];
        while let Some(top) = stack.last_mut() {
            let t = self.tag()?;
            let finished = match top {
                Open::Dict(d, pending) => {
                    if t.end {
                        if t.name != b"dict" {
                            return self.fail("mismatched end tag");
                        }
                        Some(Value::Dict(std::mem::take(d)))
                    } else {
                        if t.name != b"key" || t.empty {
                            return self.fail("expected <key>");
                        }
                        if t.attr.is_some() {
                            return self.fail("unexpected attribute");
                        }
                        let key = self.text()?;
                        if key.len() > 128 {
                            return self.fail("key longer than 128 bytes");
                        }
                        self.end_tag(b"key")?;
                        let vt = self.tag()?;
                        if vt.end {
                            return self.fail("key without a value");
                        }
                        match self.start(&vt)? {
                            // Duplicate keys: the later value replaces the earlier (§5.3).
                            Started::Value(v) => {
                                d.insert(key, v);
                            }
                            Started::Open(o) => {
                                *pending = Some(key);
                                stack.push(o);
                                if stack.len() > MAX_DEPTH {
                                    return self.fail("nested too deeply");
                                }
                            }
                        }
                        None
                    }
                }
                Open::Array(a) => {
                    if t.end {
                        if t.name != b"array" {
                            return self.fail("mismatched end tag");
                        }
                        Some(Value::Array(std::mem::take(a)))
                    } else {
                        match self.start(&t)? {
                            Started::Value(v) => a.push(v),
                            Started::Open(o) => {
                                stack.push(o);
                                if stack.len() > MAX_DEPTH {
                                    return self.fail("nested too deeply");
                                }
                            }
                        }
                        None
                    }
                }
            };
            let Some(v) = finished else { continue };
            stack.pop();
            match stack.last_mut() {
                None => match v {
                    Value::Dict(d) => return Ok(d),
                    _ => return self.fail("the root object is not a dictionary"),
                },
                Some(Open::Dict(d, pending)) => {
                    let key = pending.take().unwrap_or_default();
                    d.insert(key, v);
                }
                Some(Open::Array(a)) => a.push(v),
            }
        }
        self.fail("unbalanced containers")
    }
}

/// `<integer>` text as proplib reads it in the kernel (§5.3): a leading `-` (or `+`) is signed,
/// a leading lowercase `0x` unsigned, anything else signed; all through C's base-0 conversion
/// (`0x`/`0X` hex, leading `0` octal), saturating on overflow since the kernel cannot see
/// `errno`. Returns the number and the bytes it used (0: no number).
pub fn parse_number(s: &[u8]) -> (Num, usize) {
    let unsigned = s.starts_with(b"0x");
    let (mag, neg, used) = c_strtou(s);
    if used == 0 {
        return (Num::I(0), 0);
    }
    let n = if unsigned {
        let v = u64::try_from(mag).unwrap_or(u64::MAX);
        Num::U(if neg { v.wrapping_neg() } else { v })
    } else if neg {
        Num::I(if mag > 1u128 << 63 { i64::MIN } else { (mag as i128).wrapping_neg() as i64 })
    } else {
        Num::I(i64::try_from(mag).unwrap_or(i64::MAX))
    };
    (n, used)
}

/// The scanning half of `strtoll`/`strtoull` with base 0: (magnitude clamped just above u64,
/// negative sign, bytes used).
fn c_strtou(s: &[u8]) -> (u128, bool, usize) {
    let mut i = 0;
    while s.get(i).copied().is_some_and(is_space) {
        i += 1;
    }
    let neg = s.get(i) == Some(&b'-');
    if matches!(s.get(i), Some(b'-' | b'+')) {
        i += 1;
    }
    let hex_digit = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_hexdigit());
    let radix: u32 = if s.get(i) == Some(&b'0') && matches!(s.get(i + 1), Some(b'x' | b'X')) && hex_digit(s.get(i + 2))
    {
        i += 2;
        16
    } else if s.get(i) == Some(&b'0') {
        8
    } else {
        10
    };
    let first = i;
    let mut mag: u128 = 0;
    while let Some(d) = s.get(i).and_then(|&b| char::from(b).to_digit(radix)) {
        mag = (mag * u128::from(radix) + u128::from(d)).min(u128::from(u64::MAX) + 1);
        i += 1;
    }
    if i == first {
        return (0, false, 0);
    }
    (mag, neg, i)
}

#[cfg(test)]
mod tests;
