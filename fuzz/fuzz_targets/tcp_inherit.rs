//! `fuzz_tcp::tcp_inherit` on arbitrary input (see `fuzz/fuzz_tcp.rs`).
#![no_main]

#[path = "../fuzz_tcp.rs"]
mod fuzz_tcp;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_tcp::tcp_inherit(data);
});
