//! Engine tests: commands in, replies out, with an in-memory resolver (no IO).

use super::pdev::{DeviceResolver, Identity, Resolved};
use super::*;

struct FakeFiles;

impl DeviceResolver for FakeFiles {
    /// `/f/<ino>/<sectors>` is a regular file of that size.
    fn resolve_path(&self, path: &str, _writable: bool) -> DmResult<Resolved> {
        let mut it = path.strip_prefix("/f/").ok_or_else(|| DmError::NoSuchBlockDevice(path.into()))?.split('/');
        let ino = it.next().and_then(|s| s.parse().ok()).ok_or_else(|| DmError::NoSuchBlockDevice(path.into()))?;
        let size = it.next().and_then(|s| s.parse().ok()).ok_or_else(|| DmError::NoSuchBlockDevice(path.into()))?;
        Ok(Resolved::unopened(Identity::File { dev: 1, ino }, path.into(), Sectors(size)))
    }
    fn resolve_block(&self, dev: DevNum, _writable: bool) -> DmResult<Resolved> {
        Err(DmError::NoSuchBlockDevice(dev.to_string()))
    }
}

fn engine() -> Engine {
    Engine::new(EngineConfig { major: 252, file_major: 251 }, crate::targets::registry(), Box::new(FakeFiles))
}

fn run(e: &mut Engine, c: Command) -> DmResult<Reply> {
    e.execute(Request::new(c))
}

fn name(s: &str) -> DevKey {
    DevKey::Name(s.into())
}

fn create(e: &mut Engine, n: &str) {
    run(e, Command::DevCreate { name: DmName::new(n).unwrap(), uuid: None, minor: None }).unwrap();
}

fn spec(start: u64, len: u64, ty: &str, params: &str) -> TargetSpec {
    TargetSpec { start: Sectors(start), length: Sectors(len), target_type: ty.into(), params: params.into() }
}

fn load(e: &mut Engine, n: &str, specs: Vec<TargetSpec>) -> DmResult<Reply> {
    run(e, Command::TableLoad { key: name(n), targets: specs, read_only: false })
}

fn resume(e: &mut Engine, n: &str) -> DmResult<Reply> {
    run(e, Command::DevResume { key: name(n), opts: SuspendOpts::default() })
}

fn table(e: &mut Engine, n: &str) -> Vec<String> {
    match run(e, Command::TableStatus { key: name(n), status: StatusType::Table, noflush: false }).unwrap() {
        Reply::Status(_, Some(t)) => {
            t.into_iter().map(|t| format!("{} {} {} {}", t.start, t.length, t.target_type, t.text)).collect()
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn linear_over_file_prints_pseudo_numbers_and_stacks() {
    let mut e = engine();
    create(&mut e, "a");
    load(&mut e, "a", vec![spec(0, 100, "linear", "/f/7/1000 10")]).unwrap();
    resume(&mut e, "a").unwrap();
    assert_eq!(table(&mut e, "a"), ["0 100 linear 251:0 10"]);
    create(&mut e, "b");
    load(&mut e, "b", vec![spec(0, 50, "linear", "/dev/mapper/a 50")]).unwrap();
    resume(&mut e, "b").unwrap();
    assert_eq!(table(&mut e, "b"), ["0 50 linear 252:0 50"]);
    // a is held by b's table.
    assert!(matches!(run(&mut e, Command::DevRemove { key: name("a"), deferred: false }), Err(DmError::Busy(_))));
    // Feeding the printed table back works (pseudo number resolves to the file).
    create(&mut e, "c");
    load(&mut e, "c", vec![spec(0, 100, "linear", "251:0 10")]).unwrap();
    // Deferred removal happens once the holder goes.
    let r = run(&mut e, Command::DevRemove { key: name("a"), deferred: true }).unwrap();
    assert!(matches!(r, Reply::Removed { deferred: true, .. }));
    run(&mut e, Command::DevRemove { key: name("b"), deferred: false }).unwrap();
    assert!(matches!(run(&mut e, Command::DevStatus { key: name("a") }), Err(DmError::NoDevice(_))));
}

#[test]
fn table_validation_follows_the_kernel() {
    let mut e = engine();
    create(&mut e, "a");
    let gap = load(&mut e, "a", vec![spec(0, 10, "zero", ""), spec(11, 10, "zero", "")]);
    assert!(matches!(gap, Err(DmError::Invalid(_))));
    assert!(matches!(load(&mut e, "a", vec![spec(0, 0, "zero", "")]), Err(DmError::Invalid(_))));
    assert!(matches!(load(&mut e, "a", vec![spec(0, 1, "nope", "")]), Err(DmError::Invalid(_))));
    assert!(matches!(load(&mut e, "a", vec![spec(0, 2000, "linear", "/f/1/1000 0")]), Err(DmError::Invalid(_))));
    assert!(matches!(load(&mut e, "a", vec![spec(0, 8, "zero", "x")]), Err(DmError::Invalid(_))));
    assert!(matches!(load(&mut e, "a", vec![spec(0, 8, "linear", "/dev/mapper/a 0")]), Err(DmError::Invalid(_))));
    // error ignores odd argument counts
    load(&mut e, "a", vec![spec(0, 8, "error", "x y z")]).unwrap();
}

#[test]
fn striped_maps_chunks_round_robin() {
    let mut e = engine();
    create(&mut e, "s");
    assert!(matches!(
        load(&mut e, "s", vec![spec(0, 100, "striped", "2 8 /f/1/1000 0 /f/2/1000 0")]),
        Err(DmError::Invalid(_))
    ));
    load(&mut e, "s", vec![spec(0, 64, "striped", "2 8 /f/1/1000 0 /f/2/1000 16")]).unwrap();
    resume(&mut e, "s").unwrap();
    assert_eq!(table(&mut e, "s"), ["0 64 striped 2 8 251:0 0 251:1 16"]);
    let dev = e.device(0).unwrap();
    let live = dev.live.clone().unwrap();
    let t = &live.targets()[0];
    match t.target.query(Sectors(9), Sectors(100)) {
        target::Mapping::Remap { dev, at, len } => {
            assert_eq!((dev.dev.minor, at.0, len.0), (1, 17, 7));
        }
        m => panic!("{m:?}"),
    }
}

#[test]
fn resume_swaps_and_reports() {
    let mut e = engine();
    create(&mut e, "a");
    // resume without any table: not suspended, no inactive → no-op
    resume(&mut e, "a").unwrap();
    run(&mut e, Command::DevSuspend { key: name("a"), opts: SuspendOpts::default() }).unwrap();
    assert!(matches!(resume(&mut e, "a"), Err(DmError::Invalid(_))));
    load(&mut e, "a", vec![spec(0, 8, "zero", "")]).unwrap();
    let Reply::Device(info) = resume(&mut e, "a").unwrap() else { panic!() };
    assert!(info.active_present && !info.inactive_present && !info.suspended);
    assert_eq!(info.target_count, 1);
}

#[test]
fn rename_and_uuid_rules() {
    let mut e = engine();
    create(&mut e, "a");
    create(&mut e, "b");
    let to = |s: &str| RenameTo::Name(DmName::new(s).unwrap());
    assert!(matches!(run(&mut e, Command::DevRename { name: "a".into(), to: to("b") }), Err(DmError::Busy(_))));
    run(&mut e, Command::DevRename { name: "a".into(), to: to("c") }).unwrap();
    let u = |s: &str| RenameTo::Uuid(DmUuid::new(s).unwrap());
    run(&mut e, Command::DevRename { name: "c".into(), to: u("U1") }).unwrap();
    assert!(matches!(run(&mut e, Command::DevRename { name: "c".into(), to: u("U2") }), Err(DmError::Invalid(_))));
    assert!(matches!(run(&mut e, Command::DevRename { name: "b".into(), to: u("U1") }), Err(DmError::Busy(_))));
    match run(&mut e, Command::ListDevices { name_prefix: Vec::new(), uuid_prefix: Vec::new(), with_uuid: true })
        .unwrap()
    {
        Reply::DeviceList(l) => {
            let names: Vec<_> =
                l.iter().map(|d| (d.name.to_string(), d.uuid.as_ref().map(|u| u.to_string()))).collect();
            assert_eq!(names, [("b".into(), None), ("c".into(), Some("U1".into()))]);
        }
        r => panic!("{r:?}"),
    }
}

/// Names and uuids are bytes: LIST_DEVICES is in `strcmp` (unsigned byte) order, prefixes match bytes, and
/// lookups and renames take any bytes the kernel does.
#[test]
fn byte_names_list_in_strcmp_order_and_filter_by_byte_prefix() {
    let mut e = engine();
    let make = |e: &mut Engine, n: &[u8], u: Option<&[u8]>| {
        let (name, uuid) = (DmName::new(n).unwrap(), u.map(|u| DmUuid::new(u).unwrap()));
        run(e, Command::DevCreate { name, uuid, minor: None }).unwrap();
    };
    make(&mut e, b"caf\xe9", Some(b"U-\xff"));
    make(&mut e, b"cafe", None);
    make(&mut e, b"caf\xc3\xa9", Some(b"U-\x80"));
    make(&mut e, b"\x01", None);
    let list = |e: &mut Engine, n: &[u8], u: &[u8]| match run(
        e,
        Command::ListDevices { name_prefix: n.to_vec(), uuid_prefix: u.to_vec(), with_uuid: true },
    )
    .unwrap()
    {
        Reply::DeviceList(l) => l.iter().map(|d| d.name.as_bytes().to_vec()).collect::<Vec<_>>(),
        r => panic!("{r:?}"),
    };
    let all: Vec<&[u8]> = vec![b"\x01", b"cafe", b"caf\xc3\xa9", b"caf\xe9"];
    assert_eq!(list(&mut e, b"", b""), all);
    assert_eq!(list(&mut e, b"caf\xe9", b""), [b"caf\xe9"]);
    assert_eq!(list(&mut e, b"caf", b"U-\xff"), [b"caf\xe9"]);
    assert_eq!(list(&mut e, b"caf\xc3", b"U-"), [b"caf\xc3\xa9"]);
    let key = DevKey::Uuid(b"U-\x80".to_vec());
    assert!(
        matches!(run(&mut e, Command::DevStatus { key }), Ok(Reply::Device(i)) if i.name.as_bytes() == b"caf\xc3\xa9")
    );
    let to = RenameTo::Name(DmName::new(b"\xfe").unwrap());
    run(&mut e, Command::DevRename { name: b"caf\xe9".to_vec(), to }).unwrap();
    assert_eq!(list(&mut e, b"", b"U-\xff"), [b"\xfe"]);
    let gone = run(&mut e, Command::DevStatus { key: DevKey::Name(b"caf\xe9".to_vec()) });
    assert!(matches!(gone, Err(DmError::NoDevice(ref m)) if m.contains("caf\\xe9")), "{gone:?}");
}

#[test]
fn message_without_table_returns_two() {
    let mut e = engine();
    create(&mut e, "a");
    let m = run(&mut e, Command::TargetMsg { key: name("a"), sector: Sectors(0), message: "hello".into() }).unwrap();
    assert_eq!(m, Reply::MessageNoTable);
    assert!(run(
        &mut e,
        Command::TargetMsg { key: name("a"), sector: Sectors(0), message: "@cancel_deferred_remove".into() }
    )
    .is_ok());
    assert!(matches!(
        run(&mut e, Command::TargetMsg { key: name("a"), sector: Sectors(0), message: "  ".into() }),
        Err(DmError::Invalid(_))
    ));
}

/// Records its lifecycle calls; `fail` in its parameters makes preresume fail.
struct Lifecycle {
    fail: bool,
}

static CALLS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

impl target::Target for Lifecycle {
    fn status(&self, _: StatusType, _: bool) -> String {
        String::new()
    }
    fn iterate_devices(&self, _: Sectors, _: &mut dyn FnMut(&std::sync::Arc<pdev::Pdev>, Sectors, Sectors)) {}
    fn map(&self, bio: crate::io::Bio) -> target::Map {
        target::Map::Kill(bio)
    }
    fn presuspend(&self, _noflush: bool) {
        CALLS.lock().unwrap().push("presuspend");
    }
    fn presuspend_undo(&self) {
        CALLS.lock().unwrap().push("presuspend_undo");
    }
    fn postsuspend(&self) {
        CALLS.lock().unwrap().push("postsuspend");
    }
    fn preresume(&self) -> DmResult<()> {
        CALLS.lock().unwrap().push("preresume");
        if self.fail {
            return Err(DmError::Invalid("preresume refused".into()));
        }
        Ok(())
    }
    fn resume(&self) {
        CALLS.lock().unwrap().push("resume");
    }
}

fn lifecycle_ctor(_: &mut target::CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn target::Target>> {
    Ok(Box::new(Lifecycle { fail: argv.first().is_some_and(|a| a == "fail") }))
}

static LIFECYCLE: target::TargetType =
    target::TargetType { name: "lifecycle", version: [1, 0, 0], ctor: lifecycle_ctor, flags: target::TypeFlags::empty() };

#[test]
fn suspend_and_resume_call_targets_in_the_kernels_order_and_a_failing_preresume_fails_the_resume() {
    let mut reg = crate::targets::registry();
    reg.register(&LIFECYCLE);
    let mut e = Engine::new(EngineConfig { major: 252, file_major: 251 }, reg, Box::new(FakeFiles));
    let take = || std::mem::take(&mut *CALLS.lock().unwrap());
    create(&mut e, "l");
    load(&mut e, "l", vec![spec(0, 8, "lifecycle", "")]).unwrap();
    resume(&mut e, "l").unwrap();
    assert_eq!(take(), ["preresume", "resume"]);
    // The server's order: presuspend before IO drains, postsuspend with the command.
    let suspend =
        Command::DevSuspend { key: name("l"), opts: SuspendOpts { noflush: false, ..SuspendOpts::default() } };
    let m = e.begin_suspend(&suspend).unwrap().0;
    assert_eq!(take(), ["presuspend"]);
    e.abandon_suspend(m);
    assert_eq!(take(), ["presuspend_undo"]);
    e.begin_suspend(&suspend).unwrap();
    run(&mut e, suspend.clone()).unwrap();
    assert_eq!(take(), ["presuspend", "postsuspend"]);
    // A table whose preresume fails: the resume fails, the device stays suspended with the new
    // table live.
    load(&mut e, "l", vec![spec(0, 8, "lifecycle", "fail")]).unwrap();
    assert!(matches!(resume(&mut e, "l"), Err(DmError::Invalid(_))));
    assert_eq!(take(), ["preresume"]);
    let d = e.device(m).unwrap();
    assert!(d.suspended && d.inactive.is_none() && d.live.is_some());
}

/// A device's open count comes from use counts kept as tables come and go (no walk over every
/// table); every way a table leaves — replaced, cleared, swapped out, refused at resume, its
/// device removed — gives its uses back, and `take_changed` names the devices a command touched.
#[test]
fn table_uses_balance_and_changed_devices_are_reported() {
    let mut e = engine();
    for n in ["low", "mid", "top"] {
        create(&mut e, n);
    }
    load(&mut e, "low", vec![spec(0, 100, "zero", "")]).unwrap();
    resume(&mut e, "low").unwrap();
    load(&mut e, "mid", vec![spec(0, 100, "linear", "252:0 0")]).unwrap();
    assert_eq!(e.open_count(0), 1, "an inactive table holds its devices");
    load(&mut e, "mid", vec![spec(0, 50, "linear", "252:0 0")]).unwrap();
    assert_eq!(e.open_count(0), 1, "a replaced inactive table gives its use back");
    run(&mut e, Command::TableClear { key: name("mid") }).unwrap();
    assert_eq!(e.open_count(0), 0);
    load(&mut e, "mid", vec![spec(0, 100, "linear", "252:0 0")]).unwrap();
    resume(&mut e, "mid").unwrap();
    assert_eq!(e.open_count(0), 1, "the live table holds it");
    // A table past the end of `low` is refused at the swap and gives its use back.
    load(&mut e, "mid", vec![spec(0, 200, "linear", "252:0 0")]).unwrap();
    assert_eq!(e.open_count(0), 2);
    assert!(resume(&mut e, "mid").is_err());
    assert_eq!(e.open_count(0), 1);
    e.take_changed();
    load(&mut e, "top", vec![spec(0, 100, "linear", "252:1 0")]).unwrap();
    resume(&mut e, "top").unwrap();
    assert_eq!(e.take_changed(), vec![1, 2], "top and the device it now holds");
    assert!(matches!(run(&mut e, Command::DevRemove { key: name("mid"), deferred: false }), Err(DmError::Busy(_))));
    run(&mut e, Command::DevRemove { key: name("top"), deferred: false }).unwrap();
    assert_eq!(e.open_count(1), 0);
    assert_eq!(e.take_changed(), vec![1, 2]);
    // remove_all takes a stack apart top-down.
    create(&mut e, "top");
    load(&mut e, "top", vec![spec(0, 100, "linear", "252:1 0")]).unwrap();
    resume(&mut e, "top").unwrap();
    run(&mut e, Command::RemoveAll { deferred: false }).unwrap();
    assert_eq!(e.devices().count(), 0);
    assert_eq!(e.open_count(0), 0);
    // Freed minors are reused lowest first.
    create(&mut e, "again");
    assert_eq!(e.devices().next().unwrap().minor, 0);
}
