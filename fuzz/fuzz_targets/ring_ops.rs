//! Ring operations against a hostile peer (see `fuzz_logic::ring_ops`).
#![no_main]

#[path = "../fuzz_logic.rs"]
mod fuzz_logic;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_logic::ring_ops(data));
