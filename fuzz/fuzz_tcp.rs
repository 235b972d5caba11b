//! The fuzz logic of `ivcom run`'s parsers, shared by the cargo-fuzz targets
//! (`fuzz_targets/tcp_*.rs`) and the regular test `crates/ivcom-interpose/tests/fuzz_corpus.rs`,
//! which replays `fuzz/corpus/<target>/` and random inputs in the normal test suite. Both
//! include this file with `#[path]`; it depends on `ivcom-interpose` and `std`.
//!
//! What they read comes from other processes: an announcement file and a registration packet
//! can be written by any process of the user (the runtime directory is the user's), and the
//! exec hand-over variable by the program itself.
//!
//! - [`tcp_announcement`]: arbitrary bytes as an `.ann` file. Parsing must not panic; what it
//!   accepts renders back to text that parses to the same announcement, and asking whether
//!   it serves an address must not panic.
//! - [`tcp_registration`]: arbitrary bytes as a packet on a registration connection.
//!   Decoding must not panic; what decodes as a registration encodes back to the same bytes
//!   and is never also taken for a claim.
//! - [`tcp_inherit`]: arbitrary bytes as the value of `IVCOM_INHERIT`. Decoding must not
//!   panic; the entries it accepts encode to a value that decodes to the same entries.
#![allow(dead_code)]

use ivcom_interpose::announce::{self, Announcement};
use ivcom_interpose::exec;
use ivcom_interpose::net::Endpoint;

/// Parses `data` as an announcement; returns whether it was accepted.
pub fn tcp_announcement(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Some(a) = Announcement::parse(text) else { return false };
    assert_eq!(Announcement::parse(&a.render()).as_ref(), Some(&a), "render/parse round trip");
    let mine = || vec![std::net::Ipv6Addr::LOCALHOST];
    for dst in [a.bound, Endpoint { ip: std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port: a.bound.port }]
    {
        let _ = a.serves(&dst, a.netns, &mut { mine });
        let _ = a.serves(&dst, a.netns.wrapping_add(1), &mut { mine });
    }
    true
}

/// Decodes `data` as a registration packet; returns whether it was one.
pub fn tcp_registration(data: &[u8]) -> bool {
    let claim = announce::is_claim(data);
    match announce::decode(data) {
        Some(t) => {
            assert_eq!(&announce::encode(&t)[..], data, "decode/encode round trip");
            assert!(!claim, "a packet is both a registration and a claim");
            true
        }
        None => false,
    }
}

/// Decodes `data` as the value of `IVCOM_INHERIT`; returns how many entries it accepted.
pub fn tcp_inherit(data: &[u8]) -> usize {
    let Ok(text) = std::str::from_utf8(data) else { return 0 };
    let (entries, _bad) = exec::decode(text);
    if !entries.is_empty() {
        let (again, bad) = exec::decode(&exec::encode(&entries));
        assert!(bad.is_empty(), "re-encoded entries did not decode: {bad:?}");
        assert_eq!(again, entries, "encode/decode round trip");
    }
    entries.len()
}
