//! `fuzz_vm::daemon_config` on arbitrary input (see `fuzz/fuzz_vm.rs`).
#![no_main]

#[path = "../fuzz_vm.rs"]
mod fuzz_vm;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_vm::daemon_config(data);
});
