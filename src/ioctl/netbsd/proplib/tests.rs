//! The XML dialect: the spec's example payloads byte for byte, what the kernel-side parser accepts
//! and refuses (§5.3), and round trips of arbitrary values.

use proptest::prelude::*;

use super::*;

const HEAD: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE plist PUBLIC \"-//Apple Computer//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n<plist version=\"1.0\">\n";

fn doc(body: &str) -> String {
    format!("{HEAD}{body}</plist>\n")
}

fn d(entries: Vec<(&str, Value)>) -> Dict {
    entries.into_iter().map(|(k, v)| (k.as_bytes().to_vec(), v)).collect()
}

fn version(minor: u32) -> Value {
    Value::Array(vec![Value::u(4u32), Value::u(minor), Value::u(0u32)])
}

fn text(d: &Dict) -> String {
    let x = externalize(d);
    assert_eq!(x.last(), Some(&0), "the NUL is part of the buffer");
    String::from_utf8(x[..x.len() - 1].to_vec()).unwrap()
}

fn parse(s: &str) -> Result<Dict, ParseError> {
    internalize(s.as_bytes())
}

fn num(s: &str) -> Result<Num, ParseError> {
    let d = parse(&doc(&format!("<dict>\n\t<key>n</key>\n\t<integer>{s}</integer>\n</dict>\n")))?;
    Ok(d[b"n".as_slice()].as_num().unwrap())
}

/// §6.1: the version request, 357 bytes plus the NUL.
#[test]
fn version_request_is_byte_exact() {
    let req = d(vec![("command", Value::str("version")), ("version", version(0))]);
    let t = text(&req);
    assert_eq!(
        t,
        doc("<dict>\n\t<key>command</key>\n\t<string>version</string>\n\t<key>version</key>\n\t<array>\n\t\t<integer>0x4</integer>\n\t\t<integer>0x0</integer>\n\t\t<integer>0x0</integer>\n\t</array>\n</dict>\n")
    );
    assert_eq!(t.len(), 357);
    assert_eq!(parse(&t).unwrap(), req);
}

/// §6.2–§6.5: sizes of the other examples (keys sorted whatever the insertion order).
#[test]
fn example_sizes_match_the_spec() {
    let create = d(vec![
        ("version", version(0)),
        ("uuid", Value::str("LVM-Q8nN0example")),
        ("name", Value::str("vg0-lv0")),
        ("flags", Value::u(4u32)),
        ("event_nr", Value::u(0u32)),
        ("command", Value::str("create")),
        ("cmd_data", Value::Array(vec![])),
    ]);
    assert_eq!(text(&create).len(), 569);
    assert!(text(&create).contains("\t<key>cmd_data</key>\n\t<array/>\n\t<key>command</key>\n"));
    let entry = |len: u64, params: &str, start: u64, ty: &str| {
        Value::Dict(d(vec![
            ("type", Value::str(ty)),
            ("start", Value::u(start)),
            ("params", Value::str(params)),
            ("length", Value::u(len)),
        ]))
    };
    let reload = d(vec![
        (
            "cmd_data",
            Value::Array(vec![
                entry(0x800, "/dev/wd0e 2048", 0, "linear"),
                entry(0x1000, "2 128 /dev/wd1e 0 /dev/wd2e 0", 0x800, "striped"),
            ]),
        ),
        ("command", Value::str("reload")),
        ("event_nr", Value::u(0u32)),
        ("flags", Value::u(4u32)),
        ("name", Value::str("vg0-lv0")),
        ("version", version(0)),
    ]);
    assert_eq!(text(&reload).len(), 977);
    let dev = |n: u32, name: &str| Value::Dict(d(vec![("dev", Value::u(n)), ("name", Value::str(name))]));
    let names = d(vec![
        ("cmd_data", Value::Array(vec![dev(1, "vg0-lv0"), dev(2, "vg0-swap")])),
        ("command", Value::str("names")),
        ("version", version(16)),
    ]);
    assert_eq!(text(&names).len(), 617);
    let mut t = d(vec![
        ("length", Value::u(0x800u32)),
        ("params", Value::str("0:4 2048")),
        ("start", Value::u(0u32)),
        ("status", Value::i(0)),
        ("type", Value::str("linear")),
    ]);
    let table = d(vec![
        ("cmd_data", Value::Array(vec![Value::Dict(std::mem::take(&mut t))])),
        ("command", Value::str("table")),
        ("flags", Value::u(0x34u32)),
        ("minor", Value::u(1u32)),
        ("name", Value::str("vg0-lv0")),
        ("version", version(16)),
    ]);
    let tt = text(&table);
    assert_eq!(tt.len(), 779);
    assert!(tt.contains("\t\t\t<key>status</key>\n\t\t\t<integer>0</integer>\n"), "signed numbers are decimal");
    for x in [create, reload, names, table] {
        assert_eq!(internalize(&externalize(&x)).unwrap(), x);
    }
}

#[test]
fn scalars_are_written_as_proplib_writes_them() {
    let x = d(vec![
        ("a", Value::str("")),
        ("b", Value::str("x&y<z>\"'\t")),
        ("c", Value::Dict(Dict::new())),
        ("d", Value::u(u64::MAX)),
        ("e", Value::i(-1)),
        ("f", Value::Bool(true)),
        ("g", Value::Data(b"any carnal pleas".to_vec())),
        ("h", Value::Data(vec![])),
        ("B", Value::Bool(false)),
    ]);
    assert_eq!(
        text(&x),
        doc("<dict>\n\t<key>B</key>\n\t<false/>\n\t<key>a</key>\n\t<string/>\n\t<key>b</key>\n\t<string>x&amp;y&lt;z&gt;\"'\t</string>\n\t<key>c</key>\n\t<dict/>\n\t<key>d</key>\n\t<integer>0xffffffffffffffff</integer>\n\t<key>e</key>\n\t<integer>-1</integer>\n\t<key>f</key>\n\t<true/>\n\t<key>g</key>\n\t<data>YW55IGNhcm5hbCBwbGVhcw==</data>\n\t<key>h</key>\n\t<data/>\n</dict>\n")
    );
    assert_eq!(text(&Dict::new()), doc("<dict/>\n"));
}

#[test]
fn numbers_follow_c_base_zero_on_kernel_terms() {
    assert_eq!(num("0x10"), Ok(Num::U(16)));
    assert_eq!(num("0xFF"), Ok(Num::U(255)));
    assert_eq!(num("0xffffffffffffffff"), Ok(Num::U(u64::MAX)));
    assert_eq!(num("0x1ffffffffffffffff"), Ok(Num::U(u64::MAX)), "strtoull saturates");
    assert_eq!(num("16"), Ok(Num::I(16)));
    assert_eq!(num("010"), Ok(Num::I(8)), "leading 0 is octal");
    assert_eq!(num("0X1F"), Ok(Num::I(31)), "uppercase X is signed hex");
    assert_eq!(num("-1"), Ok(Num::I(-1)));
    assert_eq!(num("+5"), Ok(Num::I(5)));
    assert_eq!(num("-0x10"), Ok(Num::I(-16)));
    assert_eq!(num(" 5 "), Ok(Num::I(5)), "blanks before and after are skipped");
    assert_eq!(num("9223372036854775808"), Ok(Num::I(i64::MAX)), "the kernel cannot see ERANGE");
    assert_eq!(num("-9223372036854775809"), Ok(Num::I(i64::MIN)));
    assert_eq!(num("0"), Ok(Num::I(0)));
    for bad in ["", "x", "5x", "09", "0x", "- 1", "1 2", "&#53;"] {
        assert!(num(bad).is_err(), "{bad:?}");
    }
    assert_eq!(Num::I(5).as_u32(), Some(5), "getters ignore signedness");
    assert_eq!(Num::I(-1).as_u32(), None);
    assert_eq!(Num::U(1 << 32).as_u32(), None);
    assert_eq!(Num::U(u64::from(u32::MAX)).as_i32(), None);
}

#[test]
fn accepted_variations() {
    let want = d(vec![("k", Value::str("a<b>&'\" c"))]);
    let body = "<dict><key>k</key><string>a&lt;b&gt;&amp;&apos;&quot; c</string></dict>";
    // No prologue, several declarations, comments, the plist attribute, trailing junk, the NUL.
    for s in [
        format!("<plist>{body}</plist>"),
        format!(
            "  \n<?xml version=\"1.0\"?><?xml x?>\n<!DOCTYPE plist SYSTEM \"x\"><plist version=\"9\">{body}</plist>"
        ),
        format!("<!-- c --><plist><!-- c -->{body}<!-- c --></plist>trailing garbage"),
        format!("<plist>{body}</plist>\n\0<junk after the NUL"),
    ] {
        assert_eq!(parse(&s), Ok(want.clone()), "{s}");
    }
    // Duplicate keys: the later value wins; empties; nesting.
    let s = "<plist><dict><key>a</key><integer>1</integer><key>a</key><array><dict/><array/><string/><true/><false/><data>AAE=</data></array></dict></plist>";
    assert_eq!(
        parse(s).unwrap(),
        d(vec![(
            "a",
            Value::Array(vec![
                Value::Dict(Dict::new()),
                Value::Array(vec![]),
                Value::str(""),
                Value::Bool(true),
                Value::Bool(false),
                Value::Data(vec![0, 1])
            ])
        )])
    );
    assert_eq!(parse("<plist><dict/></plist>"), Ok(Dict::new()));
    assert_eq!(parse(&format!("<plist><dict><key>{}</key><true/></dict></plist>", "k".repeat(128))).unwrap().len(), 1);
}

#[test]
fn refused_documents() {
    for s in [
        "",
        "junk",
        "<dict/>",
        "<?xml version=\"1.0\"?><dict/>",
        "<!DOCTYPE html><plist><dict/></plist>",
        "<plist a=\"1\"><dict/></plist>",
        "<plist><array/></plist>",
        "<plist><string>x</string></plist>",
        "<plist><dict/>",
        "<plist><dict></plist>",
        "<plist><Dict/></plist>",
        "<plist><dict><key/><true/></dict></plist>",
        "<plist><dict><key>a</key></dict></plist>",
        "<plist><dict><string>a</string></dict></plist>",
        "<plist><dict><key>a</key><real>1</real></dict></plist>",
        "<plist><dict><key>a</key><string>&#65;</string></dict></plist>",
        "<plist><dict><key>a</key><string>&nbsp;</string></dict></plist>",
        "<plist><dict><key>a</key><string><![CDATA[x]]></string></dict></plist>",
        "<plist><dict><key>a</key><true>x</true></dict></plist>",
        "<plist><dict><key>a</key><integer/></dict></plist>",
        "<plist><dict><key>a</key><integer a=\"b\">1</integer></dict></plist>",
        "<plist><dict><key>a</key><data/></dict></plist>",
        "<plist><dict><key>a</key><data>!!</data></dict></plist>",
        "<plist><dict><key>a</key><string>x</strin></dict></plist>",
        "<plist><dict><key>a</key><array><true/></dict></array></dict></plist>",
        "<plist><dict></dict><dict/></plist>",
        "<plist><!-- open <dict/></plist>",
    ] {
        assert!(parse(s).is_err(), "accepted {s:?}");
    }
    let long = format!("<plist><dict><key>{}</key><true/></dict></plist>", "k".repeat(129));
    assert!(parse(&long).is_err(), "keys are at most 128 bytes");
}

#[test]
fn nesting_is_bounded() {
    // The root dictionary is level 1.
    let nested =
        |n: usize| format!("<plist><dict><key>a</key>{}{}</dict></plist>", "<array>".repeat(n), "</array>".repeat(n));
    assert!(parse(&nested(MAX_DEPTH - 1)).is_ok());
    assert!(parse(&nested(MAX_DEPTH)).is_err());
    // Far beyond: refused without recursion.
    assert!(parse(&nested(20_000)).is_err());
}

fn value_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        proptest::collection::vec(any::<u8>().prop_filter("no NUL", |&b| b != 0), 0..12).prop_map(Value::String),
        any::<u64>().prop_map(Value::u),
        any::<i64>().prop_map(Value::i),
        any::<bool>().prop_map(Value::Bool),
        proptest::collection::vec(any::<u8>(), 1..12).prop_map(Value::Data),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(proptest::collection::vec(1u8..=255, 0..8), inner, 0..6)
                .prop_map(Value::Dict),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever is externalized internalizes to the same value, signedness included.
    #[test]
    fn round_trip(root in proptest::collection::btree_map(proptest::collection::vec(1u8..=255, 0..8), value_strategy(), 0..8)) {
        prop_assert_eq!(internalize(&externalize(&root)).unwrap(), root);
    }

    /// The parser never panics, on noise or on damaged documents.
    #[test]
    fn parser_survives_damage(root in proptest::collection::btree_map(proptest::collection::vec(1u8..=255, 0..8), value_strategy(), 0..4),
                              cut in any::<prop::sample::Index>(),
                              flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                              noise in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut x = externalize(&root);
        for (i, b) in flips {
            let i = i.index(x.len());
            x[i] = b;
        }
        x.truncate(cut.index(x.len() + 1));
        let _ = internalize(&x);
        let _ = internalize(&noise);
    }
}
