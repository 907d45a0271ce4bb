#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dmemu::fuzzing::dm_switch(data));
