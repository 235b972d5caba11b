//! The multi-channel directory against a hostile peer (see `fuzz_logic::directory_ops`).
#![no_main]

#[path = "../fuzz_logic.rs"]
mod fuzz_logic;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_logic::directory_ops(data));
