//! `layout::validate` on arbitrary region bytes (see `fuzz_logic::region_header`).
#![no_main]

#[path = "../fuzz_logic.rs"]
mod fuzz_logic;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_logic::region_header(data);
});
