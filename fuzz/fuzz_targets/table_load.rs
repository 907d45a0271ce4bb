#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dmemu::fuzzing::table_load(data));
