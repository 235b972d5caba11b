//! The fuzz logic of the VM side, shared by the cargo-fuzz targets (`fuzz_targets/daemon_*.rs`,
//! `fuzz_targets/agent_wire.rs`) and the regular test `crates/ivcom-cli/tests/fuzz_vm_corpus.rs`,
//! which replays `fuzz/corpus/<target>/` and random inputs in the normal test suite. Both
//! include this file with `#[path]`; it depends on `ivcom`, `ivcom-daemon`, `ivcom-ivshmem`
//! and `std`.
//!
//! - [`daemon_config`]: arbitrary bytes as the daemon's configuration file. Parsing must not
//!   panic or allocate without bound; what it accepts must satisfy the documented bounds, and
//!   `qemu_args` for its regions must not panic.
//! - [`agent_wire`]: arbitrary bytes as a packet of the agent protocol (what a local process
//!   sends an agent, and an agent a process). Decoding must not panic; what decodes encodes
//!   back to the same packet.
//! - [`daemon_session`]: a real daemon (a group of 3 members, 1 vector) and a sequence of
//!   member actions decoded from the input: connect, close, send bytes (a protocol
//!   violation), connect and close at once, read. Every connection's messages must follow the
//!   protocol (version, own id of its member, memory, then joins with a descriptor and leaves
//!   without), and no connection is ever told that an id it saw leave joined again; the
//!   daemon must keep running and stop cleanly.
//!
//! Input format of [`daemon_session`] (bytes past the end end the session): pairs of bytes
//! (opcode, argument); see [`SessionOp`].
#![allow(dead_code)]

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ivcom_daemon::config::{MAX_GROUP_MEMBERS, MAX_REGIONS, MAX_TOTAL_SIZE};
use ivcom_daemon::{Config, Daemon, DaemonOptions};
use ivcom_ivshmem::protocol::{MessageReader, ReadOutcome, REFUSAL};

// ---------------------------------------------------------------------------------------------
// daemon_config
// ---------------------------------------------------------------------------------------------

/// Parses `data` as a configuration; returns whether it was accepted.
pub fn daemon_config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(cfg) = Config::parse(text, Path::new("fuzz.toml")) else { return false };
    assert!(cfg.regions.len() <= MAX_REGIONS);
    let total: u64 = cfg.regions.iter().map(|r| r.size).sum();
    assert!(total <= MAX_TOTAL_SIZE);
    for r in &cfg.regions {
        assert!(!r.members.is_empty() && r.members.len() <= MAX_GROUP_MEMBERS);
        assert_eq!(r.bindings.len(), r.members.len());
        assert!(r.size.is_power_of_two());
        assert!(ivcom_daemon::config::check_name(&r.members[0]).is_ok());
    }
    for r in cfg.regions.iter().take(8) {
        for m in r.members.iter().take(4) {
            let words = ivcom_daemon::qemu_args(&cfg, Path::new("/run/ivcom/vm"), &r.name, m, r.plain)
                .expect("qemu-args for a member of a region");
            let _ = ivcom_daemon::shell_line(&words);
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// agent_wire
// ---------------------------------------------------------------------------------------------

/// Decodes `data` as an agent packet; returns whether it decoded.
pub fn agent_wire(data: &[u8]) -> bool {
    use ivcom::vm::wire::{Packet, MAX_PACKET};
    let Ok(p) = Packet::decode(data) else { return false };
    let bytes = p.encode();
    let lossy_error = matches!(&p, Packet::Error { message, .. } if message.len() > MAX_PACKET - 16);
    if !lossy_error {
        assert_eq!(Packet::decode(&bytes).expect("a decoded packet encodes to a valid one"), p);
    }
    if let Packet::Bind { name } | Packet::Connect { name, .. } = &p {
        assert!(name.len() <= data.len());
    }
    true
}

// ---------------------------------------------------------------------------------------------
// daemon_session
// ---------------------------------------------------------------------------------------------

/// Members of the session's region.
pub const MEMBERS: usize = 3;
/// Most connections open at once in a session.
const MAX_CONNS: usize = 8;
/// Most operations of one session.
const MAX_OPS: usize = 64;

/// A session operation: `opcode % 5`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SessionOp {
    /// Connect as member `arg % 3`.
    Connect = 0,
    /// Close connection `arg % open`.
    Close = 1,
    /// Connection `arg % open` sends `arg / 16 + 1` bytes (ivshmem clients never send).
    Send = 2,
    /// Read what every connection has been sent.
    Read = 3,
    /// Connect as member `arg % 3` and close at once.
    ConnectClose = 4,
}

/// Encodes a session for hand-made seeds.
pub fn session(ops: &[(SessionOp, u8)]) -> Vec<u8> {
    ops.iter().flat_map(|&(op, arg)| [op as u8, arg]).collect()
}

/// What one connection has been told.
struct Member {
    sock: UnixStream,
    member: usize,
    reader: MessageReader,
    /// Messages of the setup received (version, id, memory).
    setup: usize,
    id: Option<u16>,
    refused: bool,
    closed: bool,
    present: HashSet<u16>,
    left: HashSet<u16>,
}

impl Member {
    /// Reads what is there and checks it against the protocol.
    fn read(&mut self) {
        while !self.closed {
            match self.reader.read(self.sock.as_fd()) {
                Ok(ReadOutcome::Message(m)) => self.check(m.value, m.fd.is_some()),
                Ok(ReadOutcome::Incomplete) => {
                    if !self.reader.in_message() {
                        return;
                    }
                }
                Ok(ReadOutcome::Closed) | Err(_) => self.closed = true,
            }
        }
    }

    fn check(&mut self, value: i64, fd: bool) {
        match self.setup {
            0 => {
                self.setup = 1;
                if value == REFUSAL {
                    self.refused = true;
                    return;
                }
                assert_eq!((value, fd), (0, false), "the version first");
            }
            1 => {
                assert!(!self.refused, "a message after a refusal");
                assert!(!fd && (0..=65535).contains(&value), "own id {value}");
                let id = value as u16;
                assert_eq!(usize::from(id) % MEMBERS, self.member, "id {id} is not member {}'s", self.member);
                self.id = Some(id);
                self.setup = 2;
            }
            2 => {
                assert_eq!((value, fd), (-1, true), "the memory third");
                self.setup = 3;
            }
            _ => {
                assert!((0..=65535).contains(&value), "peer id {value}");
                let id = value as u16;
                if fd {
                    if Some(id) != self.id {
                        assert!(
                            !self.left.contains(&id),
                            "told that id {id}, which it saw leave, joined again"
                        );
                        self.present.insert(id);
                    }
                } else {
                    assert_ne!(Some(id), self.id, "told that it left itself");
                    self.present.remove(&id);
                    self.left.insert(id);
                }
            }
        }
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Runs one session against a fresh daemon.
pub fn daemon_session(data: &[u8]) {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "ivcom-fuzz-session-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let text = "[[group]]\nname = 'f'\nmembers = ['a', 'b', 'c']\nsize = '1M'\n";
    let cfg = Config::parse(text, Path::new("session.toml")).expect("session config");
    let opts = DaemonOptions { socket_dir: Some(dir.clone()), ..Default::default() };
    let hooks: Box<dyn ivcom_daemon::RegionHooks> = Box::new(ivcom_daemon::DirectoryHooks::new());
    let mut daemon = Daemon::new(&cfg, &opts, Some(hooks)).expect("daemon starts");
    let socks: Vec<PathBuf> =
        ["a", "b", "c"].iter().map(|m| daemon.socket_path("f", m).expect("member socket")).collect();
    let stop = daemon.stop_handle();
    let server = std::thread::spawn(move || {
        let r = daemon.run();
        drop(daemon);
        r
    });
    let mut conns: Vec<Member> = Vec::new();
    let connect = |member: usize| {
        let sock = UnixStream::connect(&socks[member]).expect("the daemon listens");
        sock.set_nonblocking(true).expect("non-blocking");
        Member {
            sock,
            member,
            reader: MessageReader::new(),
            setup: 0,
            id: None,
            refused: false,
            closed: false,
            present: HashSet::new(),
            left: HashSet::new(),
        }
    };
    for pair in data.chunks(2).take(MAX_OPS) {
        let (op, arg) = (pair[0] % 5, pair.get(1).copied().unwrap_or(0));
        match op {
            0 if conns.len() < MAX_CONNS => conns.push(connect(usize::from(arg) % MEMBERS)),
            1 if !conns.is_empty() => {
                let i = usize::from(arg) % conns.len();
                conns.remove(i);
            }
            2 if !conns.is_empty() => {
                use std::io::Write;
                let i = usize::from(arg) % conns.len();
                let _ = conns[i].sock.write(&vec![arg; usize::from(arg / 16) + 1]);
            }
            3 => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                for c in &mut conns {
                    c.read();
                }
            }
            4 => drop(connect(usize::from(arg) % MEMBERS)),
            _ => {}
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(2));
    for c in &mut conns {
        c.read();
    }
    stop.stop();
    server.join().expect("the daemon thread does not panic").expect("the daemon stops cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}
