//! Attacks on `ivcom run` by another local user and by another process of the same user (a
//! co-tenant container sharing the runtime directory), acted out as root with two
//! unprivileged users (`ivcom-testkit`). Each test asserts what the attacker obtains (nothing)
//! and what the victim gets (its real peer, or plain TCP). Without root they print a note and
//! pass. The attacker's side is this test binary re-run in a role (`SEC_ROLE`).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ivcom_ring::layout::{self, tcp, Direction, Params};
use ivcom_ring::{MappedRegion, StreamReader, StreamWriter};
use ivcom_testkit::{Bounded, Scratch, User};

mod support;
use support::{c_bin, preload_lib, IVCOM};

const LIMIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The victim of a test: a user with a private runtime directory (mode 0700) and a directory
/// for its decision logs, under a scratch directory of the test.
struct Victim {
    user: User,
    scratch: Scratch,
    run: PathBuf,
}

/// How the victim runs `sec_echo`.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Plainly, without ivcom.
    Plain,
    /// Under `ivcom run` with these options, its runtime directory and no log.
    Ivcom(&'a [&'a str]),
    /// Under `ivcom run` with its runtime directory and the decision log of this name.
    Logged(&'a str),
    /// Under `ivcom run` with the environment as it is (no runtime directory set).
    Bare,
}

impl Victim {
    fn new(user: &User, test: &str) -> Self {
        let scratch = Scratch::new(test);
        let run = scratch.dir_for("run", user, 0o700);
        Victim { user: user.clone(), scratch, run }
    }

    /// Its runtime directory's `tcp/`, where listeners are announced.
    fn tcp_dir(&self) -> String {
        self.run.join("tcp").to_string_lossy().into_owned()
    }

    /// The path of its decision log `name`.
    fn log(&self, name: &str) -> PathBuf {
        self.scratch.dir_for("logs", &self.user, 0o755).join(name)
    }

    /// The text of its decision log `name`.
    fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.log(name)).unwrap_or_default()
    }

    /// `sec_echo ARGS` as the victim, run as `mode` says.
    fn echo(&self, mode: Mode<'_>, args: &[&str]) -> Command {
        let mut c = match mode {
            Mode::Plain => self.user.command(c_bin("sec_echo")),
            Mode::Ivcom(_) | Mode::Logged(_) | Mode::Bare => {
                let mut c = self.user.command(IVCOM);
                c.arg("run");
                match mode {
                    Mode::Ivcom(extra) => {
                        c.args(extra);
                    }
                    Mode::Logged(name) => {
                        c.arg("--log").arg(self.log(name));
                    }
                    _ => {}
                }
                c.arg("--").arg(c_bin("sec_echo"));
                c
            }
        };
        if !matches!(mode, Mode::Bare) {
            c.env("IVCOM_RUNTIME_DIR", &self.run);
        }
        c.args(args).env("IVCOM_PRELOAD_LIB", preload_lib());
        c
    }

    /// Starts the real server on 127.0.0.1:`port` (serving `conns` connections, the first
    /// after `delay_ms`) and waits until it listens.
    fn server(&self, mode: Mode<'_>, port: u16, delay_ms: u32, conns: u32) -> Bounded {
        let (p, d, n) = (port.to_string(), delay_ms.to_string(), conns.to_string());
        start_until(&mut self.echo(mode, &["server", "127.0.0.1", &p, &d, &n]), "listening")
    }

    /// Runs the client against 127.0.0.1:`port` with `msg`; returns its output.
    fn client(&self, mode: Mode<'_>, port: u16, msg: &str) -> std::process::Output {
        let (out, in_time) = ivcom_testkit::run_bounded(
            &mut self.echo(mode, &["client", "127.0.0.1", &port.to_string(), msg]),
            LIMIT,
        );
        assert!(in_time, "the victim's client hung");
        out
    }
}

/// The client got the real server's answer to `msg`.
fn assert_real_answer(client: &std::process::Output, msg: &str, context: &str) {
    assert_eq!(
        text(&client.stdout).trim(),
        format!("real:{msg}"),
        "the client must get the real server's answer; stderr: {}\n{context}",
        text(&client.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// The attacker's roles.

fn role() -> Option<String> {
    std::env::var("SEC_ROLE").ok()
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("role needs ${name}"))
}

fn escaped(b: &[u8]) -> String {
    b.iter()
        .map(|&c| if (32..127).contains(&c) { (c as char).to_string() } else { format!("\\x{c:02x}") })
        .collect()
}

/// An established TCP socket of the attacker's own (what it can offer as "proof").
fn own_tcp_socket() -> (std::net::TcpListener, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    (l, s)
}

/// Reads what arrives in `ring` of `map` for `secs`, printing `stolen <bytes>` for any bytes
/// (and answering the first line with `fake:` in the other ring when `answer` is set).
fn steal(map: &MappedRegion, params: &Params, from: Direction, answer: Option<Direction>, secs: u64) {
    let mut r = StreamReader::new(params.ring(from));
    let mut w = answer.map(|d| StreamWriter::new(params.ring(d)));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    while Instant::now() < end {
        let mut b = [0u8; 4096];
        match r.try_read(map.region(), &mut b, &mut || {}) {
            Ok(n) if n > 0 => {
                println!("stolen {}", escaped(&b[..n]));
                got.extend_from_slice(&b[..n]);
                if let (Some(w), true) = (w.as_mut(), got.contains(&b'\n')) {
                    let _ = w.try_write(map.region(), b"fake:injected\n", &mut || {});
                }
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
        let _ = std::io::stdout().flush();
    }
}

/// Role `plant`: makes `SEC_DIR` (and parents) world-writable if missing, announces
/// `SEC_ADDR:SEC_PORT` there (in namespace `SEC_NETNS`, `self` for its own) in every
/// announcement version, and for `SEC_SECONDS` claims every registration it gets and reads the
/// victim's data from the ring.
fn role_plant() {
    let dir = PathBuf::from(env("SEC_DIR"));
    for d in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
        if !d.exists() {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
    }
    let port: u16 = env("SEC_PORT").parse().unwrap();
    let addr: std::net::Ipv4Addr = env("SEC_ADDR").parse().unwrap();
    let netns = match env("SEC_NETNS").as_str() {
        "self" => {
            std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap()
        }
        n => n.parse().unwrap(),
    };
    let mut socks = Vec::new();
    let mut locks = Vec::new();
    for version in [1, 2] {
        let stem = format!("{port}-{netns}-{}-{version}", std::process::id());
        let text = format!(
            "ivcom-tcp {version}\nnetns {netns}\naddr {}\nport {port}\nv6only 0\nlocal {}\n",
            addr.to_ipv6_mapped(),
            addr.to_ipv6_mapped()
        );
        let ann = dir.join(format!("{stem}.ann"));
        std::fs::write(&ann, text).unwrap();
        let f = std::fs::File::open(&ann).unwrap();
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockShared).unwrap();
        locks.push(f);
        let path = dir.join(format!("{stem}.sock"));
        let s =
            rustix::net::socket(rustix::net::AddressFamily::UNIX, rustix::net::SocketType::SEQPACKET, None)
                .unwrap();
        rustix::net::bind(&s, &rustix::net::SocketAddrUnix::new(&path).unwrap()).unwrap();
        rustix::net::listen(&s, 64).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        socks.push((version, s));
    }
    println!("planted");
    let _ = std::io::stdout().flush();
    let end = Instant::now() + Duration::from_secs(env("SEC_SECONDS").parse().unwrap());
    let (_l, proof) = own_tcp_socket();
    while Instant::now() < end {
        for (version, s) in &socks {
            let mut p = [rustix::event::PollFd::new(s, rustix::event::PollFlags::IN)];
            if rustix::event::poll(&mut p, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 20_000_000 }))
                .unwrap_or(0)
                == 0
            {
                continue;
            }
            let conn = rustix::net::accept(s).unwrap();
            let mut buf = [0u8; 128];
            let Ok((_, fds)) = ivcom::sys::recv_packet(conn.as_fd(), &mut buf) else { continue };
            println!("registration v{version} with {} descriptors", fds.len());
            let Some(memfd) = fds.into_iter().next() else { continue };
            let size = rustix::fs::fstat(&memfd).unwrap().st_size as usize;
            let map = MappedRegion::map(memfd.as_fd(), 0, size).unwrap();
            let params = layout::validate_shape(map.region(), false).unwrap();
            tcp::claim(map.region()).unwrap();
            if *version == 2 {
                // The claim message, with the only kind of socket this user can offer.
                let mut h = Vec::from(*b"IVTC");
                h.extend_from_slice(&2u16.to_le_bytes());
                h.extend_from_slice(&2u16.to_le_bytes());
                let _ = ivcom::sys::send_packet(conn.as_fd(), &h, &[proof.as_fd()]);
            }
            steal(&map, &params, Direction::ToListener, Some(Direction::ToConnector), 4);
            drop(conn);
        }
    }
}

/// The 4-tuples (client, server) of established connections to `port` in this namespace.
fn tuples_to(port: u16) -> Vec<(std::net::SocketAddrV4, std::net::SocketAddrV4)> {
    let parse = |s: &str| -> Option<std::net::SocketAddrV4> {
        let (ip, p) = s.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        Some(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::from(u32::from_be(ip)),
            u16::from_str_radix(p, 16).ok()?,
        ))
    };
    let t = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote) = (parse(f.get(1)?)?, parse(f.get(2)?)?);
            (f.get(3) == Some(&"01") && local.port() == port).then_some((remote, local))
        })
        .collect()
}

/// Role `register`: same user as a server under `ivcom run` (`SEC_DIR` is its `tcp`
/// directory), watches `/proc/net/tcp` for a client connection to `SEC_PORT` and registers a
/// channel of its own for that 4-tuple (in every registration version), then reads what the
/// server writes into it.
fn role_register() {
    let dir = PathBuf::from(env("SEC_DIR"));
    let port: u16 = env("SEC_PORT").parse().unwrap();
    let end = Instant::now() + Duration::from_secs(env("SEC_SECONDS").parse().unwrap());
    let (_l, proof) = own_tcp_socket();
    while Instant::now() < end {
        let Some((client, server)) = tuples_to(port).into_iter().next() else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let mut held = Vec::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&format!("{port}-")) || !name.ends_with(".sock") {
                continue;
            }
            for version in [1u32, 2] {
                let params = Params { capacity: [65536, 65536], max_message: None };
                let size = params.region_size().unwrap();
                let memfd = ivcom_ring::shm::create_memfd_named("ivcom-tcp", size).unwrap();
                let map = MappedRegion::map(memfd.as_fd(), 0, size).unwrap();
                layout::init(map.region(), &params).unwrap();
                let mut b = Vec::from(*b"IVTC");
                if version == 1 {
                    b.extend_from_slice(&1u32.to_le_bytes());
                } else {
                    b.extend_from_slice(&2u16.to_le_bytes());
                    b.extend_from_slice(&1u16.to_le_bytes());
                }
                for a in [client, server] {
                    b.extend_from_slice(&a.ip().to_ipv6_mapped().octets());
                    b.extend_from_slice(&a.port().to_le_bytes());
                }
                let s = rustix::net::socket(
                    rustix::net::AddressFamily::UNIX,
                    rustix::net::SocketType::SEQPACKET,
                    None,
                )
                .unwrap();
                if rustix::net::connect(&s, &rustix::net::SocketAddrUnix::new(e.path()).unwrap()).is_err() {
                    continue;
                }
                let fds: Vec<std::os::fd::BorrowedFd<'_>> =
                    if version == 1 { vec![memfd.as_fd()] } else { vec![memfd.as_fd(), proof.as_fd()] };
                if ivcom::sys::send_packet(s.as_fd(), &b, &fds).is_ok() {
                    println!("registered v{version} for {client} -> {server}");
                }
                held.push((s, memfd, map, params));
            }
        }
        let _ = std::io::stdout().flush();
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            for (_, _, map, params) in &held {
                let mut r = StreamReader::new(params.ring(Direction::ToConnector));
                let mut b = [0u8; 4096];
                if let Ok(n @ 1..) = r.try_read(map.region(), &mut b, &mut || {}) {
                    println!("stolen {}", escaped(&b[..n]));
                }
            }
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_millis(5));
        }
        return;
    }
}

/// Role `flood`: opens `SEC_COUNT` registration connections to the first registration socket
/// of `SEC_DIR` (well-formed registrations with a memfd and a socket each) and holds them
/// for `SEC_SECONDS`.
fn role_flood() {
    let dir = PathBuf::from(env("SEC_DIR"));
    let count: usize = env("SEC_COUNT").parse().unwrap();
    let sock = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .expect("a registration socket");
    let ann = std::fs::read_to_string(sock.with_extension("ann")).unwrap_or_default();
    let version = if ann.starts_with("ivcom-tcp 1\n") { 1 } else { 2 };
    let (_l, proof) = own_tcp_socket();
    let params = Params { capacity: [4096, 4096], max_message: None };
    let size = params.region_size().unwrap();
    let memfd = ivcom_ring::shm::create_memfd_named("ivcom-tcp", size).unwrap();
    let mut held: Vec<OwnedFd> = Vec::new();
    for i in 0..count {
        let s = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        if rustix::net::connect(&s, &rustix::net::SocketAddrUnix::new(&sock).unwrap()).is_err() {
            continue;
        }
        // In the registration format the listener announced.
        let mut b = Vec::from(*b"IVTC");
        if version == 1 {
            b.extend_from_slice(&1u32.to_le_bytes());
        } else {
            b.extend_from_slice(&2u16.to_le_bytes());
            b.extend_from_slice(&1u16.to_le_bytes());
        }
        b.extend_from_slice(&[0u8; 36]);
        b[8 + 16..8 + 18].copy_from_slice(&(i as u16).to_le_bytes());
        let fds: Vec<std::os::fd::BorrowedFd<'_>> =
            if version == 1 { vec![memfd.as_fd()] } else { vec![memfd.as_fd(), proof.as_fd()] };
        let _ = ivcom::sys::send_packet(s.as_fd(), &b, &fds);
        held.push(s);
    }
    println!("flooded {}", held.len());
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(env("SEC_SECONDS").parse().unwrap()));
    drop(held);
}

/// Role `unix_server`: serves a Unix stream socket at `SEC_PATH` (mode 0777) for
/// `SEC_SECONDS`, answering every connection with an ivshmem-server greeting (protocol
/// version 0, peer id 0) as a daemon would.
fn role_unix_server() {
    let path = PathBuf::from(env("SEC_PATH"));
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    l.set_nonblocking(true).unwrap();
    println!("serving");
    let _ = std::io::stdout().flush();
    let end = Instant::now() + Duration::from_secs(env("SEC_SECONDS").parse().unwrap());
    while Instant::now() < end {
        match l.accept() {
            Ok((mut c, _)) => {
                println!("connection");
                let _ = std::io::stdout().flush();
                let mut hello = 0i64.to_le_bytes().to_vec();
                hello.extend_from_slice(&0i64.to_le_bytes());
                let _ = c.write_all(&hello);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Role `relay`: a man in the middle. Waits for the real announcement of `SEC_PORT` in
/// `SEC_DIR`, hides
/// it, announces the same listener with a registration socket of its own, and relays
/// every registration to the real one and every claim back, keeping the channel's memfd
/// (and whatever else passes) to read the ring; for `SEC_SECONDS`.
fn role_relay() {
    let dir = PathBuf::from(env("SEC_DIR"));
    let port = env("SEC_PORT");
    let end = Instant::now() + Duration::from_secs(env("SEC_SECONDS").parse().unwrap());
    let real = loop {
        let found = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&format!("{port}-")) && name.ends_with(".ann") && !name.contains("-relay")
        });
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < end, "no announcement to relay");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = std::fs::read_to_string(&real).unwrap();
    let real_sock = real.with_extension("sock");
    std::fs::rename(&real, real.with_extension("hidden")).unwrap();
    let mode = std::env::var("SEC_MODE").unwrap_or_default();
    // `impostor`: a listener of its own on the same port at another address, announced as
    // the victim's (its own descriptor and inode, the victim's address).
    let _impostor = (mode == "impostor").then(|| {
        let port: u16 = text.lines().find_map(|l| l.strip_prefix("port ")).unwrap().parse().unwrap();
        let l = std::net::TcpListener::bind(("127.0.0.2", port)).unwrap();
        let ino = rustix::fs::fstat(&l).unwrap().st_ino;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        text = text
            .lines()
            .map(|x| match x.split_once(' ') {
                Some(("fd", _)) => format!("fd {fd}"),
                Some(("inode", _)) => format!("inode {ino}"),
                _ => x.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        l
    });
    let stem = format!("{}-relay", real.file_stem().unwrap().to_string_lossy());
    let ann = dir.join(format!("{stem}.ann"));
    std::fs::write(&ann, &text).unwrap();
    let lock = std::fs::File::open(&ann).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared).unwrap();
    let own = rustix::net::socket(rustix::net::AddressFamily::UNIX, rustix::net::SocketType::SEQPACKET, None)
        .unwrap();
    rustix::net::bind(&own, &rustix::net::SocketAddrUnix::new(dir.join(format!("{stem}.sock"))).unwrap())
        .unwrap();
    if mode == "orphan" {
        // `orphan`: `listen` is called by a child that exits at once, so the socket's
        // credentials name a pid that may later be anyone's (the victim's, after pid reuse).
        // SAFETY: the child makes one system call and exits without returning.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: listen on a socket the child inherited, then _exit.
                unsafe {
                    libc::listen(std::os::fd::AsRawFd::as_raw_fd(&own), 64);
                    libc::_exit(0)
                }
            }
            child => {
                let mut st = 0;
                // SAFETY: reaping the child we just forked.
                unsafe { libc::waitpid(child, &mut st, 0) };
            }
        }
    } else {
        rustix::net::listen(&own, 64).unwrap();
    }
    println!("relaying");
    let _ = std::io::stdout().flush();
    let mut p = [rustix::event::PollFd::new(&own, rustix::event::PollFlags::IN)];
    while Instant::now() < end {
        if rustix::event::poll(&mut p, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 20_000_000 }))
            .unwrap_or(0)
            == 0
        {
            continue;
        }
        let victim = rustix::net::accept(&own).unwrap();
        let mut buf = [0u8; 256];
        // A client that checked us and went away sends nothing.
        let Ok((n @ 1.., fds)) = ivcom::sys::recv_packet(victim.as_fd(), &mut buf) else { continue };
        println!("registration with {} descriptors", fds.len());
        let up =
            rustix::net::socket(rustix::net::AddressFamily::UNIX, rustix::net::SocketType::SEQPACKET, None)
                .unwrap();
        rustix::net::connect(&up, &rustix::net::SocketAddrUnix::new(&real_sock).unwrap()).unwrap();
        let borrowed: Vec<std::os::fd::BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        ivcom::sys::send_packet(up.as_fd(), &buf[..n], &borrowed).unwrap();
        let mut claim = [0u8; 64];
        if let Ok((m @ 1.., cfds)) = ivcom::sys::recv_packet(up.as_fd(), &mut claim) {
            let cb: Vec<std::os::fd::BorrowedFd<'_>> = cfds.iter().map(|f| f.as_fd()).collect();
            let _ = ivcom::sys::send_packet(victim.as_fd(), &claim[..m], &cb);
            println!("claim relayed");
        }
        let _ = std::io::stdout().flush();
        if let Some(memfd) = fds.first() {
            let size = rustix::fs::fstat(memfd).unwrap().st_size as usize;
            let map = MappedRegion::map(memfd.as_fd(), 0, size).unwrap();
            let params = layout::validate_shape(map.region(), false).unwrap();
            steal(&map, &params, Direction::ToListener, None, 4);
        }
    }
}

/// Role `mirror`, run inside a user and network namespace of the attacker's own (`unshare
/// -Urn`): makes there a connection whose 4-tuple mirrors a victim's real one
/// (127.0.0.1:`SEC_CPORT` -> 127.0.0.1:`SEC_PORT`) and registers a channel for it with the
/// victim's listener (`SEC_DIR`, reachable by path from any namespace), passing that
/// connection's socket as "proof"; then reads what the victim's server writes into it.
fn role_mirror() {
    let dir = PathBuf::from(env("SEC_DIR"));
    let port: u16 = env("SEC_PORT").parse().unwrap();
    let cport: u16 = env("SEC_CPORT").parse().unwrap();
    let lo = std::net::Ipv4Addr::LOCALHOST;
    let l = std::net::TcpListener::bind((lo, port)).unwrap();
    let s =
        rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::STREAM, None).unwrap();
    rustix::net::bind(&s, &std::net::SocketAddrV4::new(lo, cport)).unwrap();
    rustix::net::connect(&s, &std::net::SocketAddrV4::new(lo, port)).unwrap();
    let _accepted = l.accept().unwrap();
    let sock = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "sock") && p.to_string_lossy().contains(&format!("/{port}-"))
        })
        .expect("the victim's registration socket");
    let params = Params { capacity: [65536, 65536], max_message: None };
    let size = params.region_size().unwrap();
    let memfd = ivcom_ring::shm::create_memfd_named("ivcom-tcp", size).unwrap();
    let map = MappedRegion::map(memfd.as_fd(), 0, size).unwrap();
    layout::init(map.region(), &params).unwrap();
    let mut b = Vec::from(*b"IVTC");
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    for p in [cport, port] {
        b.extend_from_slice(&lo.to_ipv6_mapped().octets());
        b.extend_from_slice(&p.to_le_bytes());
    }
    let r = rustix::net::socket(rustix::net::AddressFamily::UNIX, rustix::net::SocketType::SEQPACKET, None)
        .unwrap();
    rustix::net::connect(&r, &rustix::net::SocketAddrUnix::new(&sock).unwrap()).unwrap();
    ivcom::sys::send_packet(r.as_fd(), &b, &[memfd.as_fd(), s.as_fd()]).unwrap();
    println!("registered");
    let _ = std::io::stdout().flush();
    steal(&map, &params, Direction::ToConnector, None, 5);
}

#[test]
fn attacker_roles() {
    match role().as_deref() {
        Some("mirror") => role_mirror(),
        Some("relay") => role_relay(),
        Some("unix_server") => role_unix_server(),
        Some("plant") => role_plant(),
        Some("register") => role_register(),
        Some("flood") => role_flood(),
        Some(r) => panic!("unknown role {r}"),
        None => return,
    }
    std::process::exit(0);
}

fn attacker(user: &User, role: &str, vars: &[(&str, &str)]) -> Command {
    let mut c = user.command(std::env::current_exe().unwrap());
    c.args(["--exact", "attacker_roles", "--nocapture", "--test-threads", "1"]).env("SEC_ROLE", role);
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

fn assert_nothing_stolen(out: &std::process::Output) {
    let o = text(&out.stdout);
    assert!(!o.contains("stolen"), "the attacker read the victim's data:\n{o}");
}

/// Starts `cmd` and waits until it prints a line containing `ready` (its output stays
/// connected, so it can go on printing).
fn start_until(cmd: &mut Command, ready: &str) -> Bounded {
    let mut a = Bounded::spawn(cmd);
    let out = a.0.stdout.take().expect("stdout");
    let mut r = std::io::BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut r, &mut line).unwrap() > 0, "{cmd:?} ended before {ready}");
        if line.contains(ready) {
            break;
        }
    }
    // Keep its output flowing into the pipe for `finish`.
    a.0.stdout = Some(r.into_inner());
    a
}

// ---------------------------------------------------------------------------------------
// The attacks.

/// Another user creates the victim's fallback runtime directory (`$TMPDIR/ivcom-UID`, used
/// when `XDG_RUNTIME_DIR` is unset) before the victim's first use and announces the port the
/// victim's client connects to. The victim's client must get the real server's answer (the
/// directory is refused, the connection stays on TCP) and the attacker nothing.
#[test]
fn another_user_cannot_take_the_fallback_runtime_directory() {
    let Some((user, bad)) = ivcom_testkit::users("another_user_cannot_take_the_fallback_runtime_directory")
    else {
        return;
    };
    let victim = Victim::new(&user, "fallback");
    let fallback = PathBuf::from(format!("/tmp/ivcom-{}", user.uid));
    let _ = std::fs::remove_dir_all(&fallback);
    let port = free_port();
    let _server = victim.server(Mode::Plain, port, 0, 1);
    let planted = plant(&bad, &fallback.join("tcp").to_string_lossy(), port, "self", 8);
    let client = victim.client(Mode::Bare, port, "secret");
    let (stolen, _) = planted.finish(LIMIT);
    let _ = std::fs::remove_dir_all(&fallback);
    assert_real_answer(&client, "secret", "");
    assert!(
        text(&client.stderr).contains(&fallback.to_string_lossy().into_owned()),
        "ivcom run should say which runtime directory it refused: {}",
        text(&client.stderr)
    );
    assert_nothing_stolen(&stolen);
    assert!(!text(&stolen.stdout).contains("registration"), "the victim registered with the attacker");
}

/// The attacker `user` announces 127.0.0.1:`port` in `dir` (namespace `netns`) for `secs`.
fn plant(user: &User, dir: &str, port: u16, netns: &str, secs: u32) -> Bounded {
    let (p, t) = (port.to_string(), secs.to_string());
    let vars = [
        ("SEC_DIR", dir),
        ("SEC_PORT", &p),
        ("SEC_ADDR", "127.0.0.1"),
        ("SEC_NETNS", netns),
        ("SEC_SECONDS", &t),
    ];
    start_until(&mut attacker(user, "plant", &vars), "planted")
}

/// A process of the same user that shares the runtime directory (another container) announces
/// the address the victim connects to, in its own namespace or a made-up one, and claims
/// what registers with it. The victim's client must get the real (plain) server's answer and
/// the attacker none of its data.
#[test]
fn same_user_announcement_cannot_hijack_a_client() {
    let Some((user, _)) = ivcom_testkit::users("same_user_announcement_cannot_hijack_a_client") else {
        return;
    };
    let victim = Victim::new(&user, "hijack");
    for netns in ["self", "4026599999"] {
        let port = free_port();
        let _server = victim.server(Mode::Plain, port, 0, 1);
        let planted = plant(&user, &victim.tcp_dir(), port, netns, 6);
        let log = format!("client-{netns}.log");
        let client = victim.client(Mode::Logged(&log), port, "secret");
        let (stolen, _) = planted.finish(LIMIT);
        assert_real_answer(&client, "secret", &format!("netns {netns}; log:\n{}", victim.log_text(&log)));
        assert_nothing_stolen(&stolen);
    }
}

/// A process of the same user puts itself between a client and a server that both run under
/// `ivcom run`: it hides the server's announcement and announces the same listener with a
/// registration socket of its own, (`relay`) relaying registrations and claims between them to
/// keep the channel, (`impostor`) naming a listener of its own on the same port at another
/// address, or (`orphan`) serving a socket whose `listen` was called by a child that exited,
/// so that its credentials name a pid the victim's process could later get. The client must
/// not register with it in any case: the relay gets nothing and the client the real answer.
#[test]
fn a_relay_between_client_and_server_gets_nothing() {
    let Some((user, _)) = ivcom_testkit::users("a_relay_between_client_and_server_gets_nothing") else {
        return;
    };
    let victim = Victim::new(&user, "relay");
    for (mode, why) in [
        ("relay", "does not hold the announced listening socket"),
        ("impostor", "is not the one listener a connection"),
        ("orphan", "has exited"),
    ] {
        let port = free_port();
        let _server = victim.server(Mode::Logged(&format!("server-{mode}.log")), port, 0, 1);
        let tcp = victim.tcp_dir();
        let relay = start_until(
            &mut attacker(
                &user,
                "relay",
                &[
                    ("SEC_DIR", &tcp),
                    ("SEC_PORT", &port.to_string()),
                    ("SEC_SECONDS", "8"),
                    ("SEC_MODE", mode),
                ],
            ),
            "relaying",
        );
        let log_name = format!("client-{mode}.log");
        let client = victim.client(Mode::Logged(&log_name), port, "secret");
        let (relayed, _) = relay.finish(LIMIT);
        let log = victim.log_text(&log_name);
        assert_real_answer(&client, "secret", &format!("{mode}: client log:\n{log}"));
        assert!(
            !text(&relayed.stdout).contains("registration"),
            "{mode}: the client registered with the relay:\n{}\n{log}",
            text(&relayed.stdout)
        );
        assert_nothing_stolen(&relayed);
        assert!(log.contains(why), "{mode}: the client should say why it did not register ({why}):\n{log}");
    }
}

/// A process of the same user reads a plain client's 4-tuple from `/proc/net/tcp` and
/// registers a channel for it before the victim's server (under `ivcom run`) accepts. The
/// server must not claim it: the attacker gets none of the server's reply and the client gets
/// it whole over TCP.
#[test]
fn a_registration_for_someone_elses_connection_is_never_claimed() {
    let Some((user, _)) =
        ivcom_testkit::users("a_registration_for_someone_elses_connection_is_never_claimed")
    else {
        return;
    };
    let victim = Victim::new(&user, "register");
    let port = free_port();
    let _server = victim.server(Mode::Logged("server.log"), port, 1500, 1);
    let p = port.to_string();
    let tcp = victim.tcp_dir();
    let reg = Bounded::spawn(&mut attacker(
        &user,
        "register",
        &[("SEC_DIR", &tcp), ("SEC_PORT", &p), ("SEC_SECONDS", "20")],
    ));
    let client = victim.client(Mode::Plain, port, "secret");
    let (stolen, _) = reg.finish(LIMIT);
    assert!(text(&stolen.stdout).contains("registered"), "the attack did not run: {}", text(&stolen.stdout));
    assert_real_answer(&client, "secret", &format!("server log:\n{}", victim.log_text("server.log")));
    assert_nothing_stolen(&stolen);
}

/// A process of the same user creates a user and network namespace of its own, makes there a
/// connection whose 4-tuple mirrors a plain client's connection to the victim's server, and
/// registers a channel for it with that socket as proof. The server must not claim it (the
/// socket lives in a namespace owned by another user namespace), so the attacker gets none
/// of the server's reply and the client gets it whole over TCP.
#[test]
fn a_registration_from_a_namespace_of_the_attackers_own_is_never_claimed() {
    let Some((user, _)) =
        ivcom_testkit::users("a_registration_from_a_namespace_of_the_attackers_own_is_never_claimed")
    else {
        return;
    };
    let victim = Victim::new(&user, "mirror");
    let port = free_port();
    let _server = victim.server(Mode::Logged("server.log"), port, 2500, 1);
    let client =
        Bounded::spawn(&mut victim.echo(Mode::Plain, &["client", "127.0.0.1", &port.to_string(), "secret"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let cport = loop {
        if let Some((c, _)) = tuples_to(port).into_iter().next() {
            break c.port();
        }
        assert!(Instant::now() < deadline, "the client did not connect");
        std::thread::sleep(Duration::from_millis(5));
    };
    let (p, c, tcp) = (port.to_string(), cport.to_string(), victim.tcp_dir());
    let mut cmd = user.command("unshare");
    cmd.args(["--user", "--map-root-user", "--net", "sh", "-c"])
        .arg("ip link set lo up && exec \"$0\" --exact attacker_roles --nocapture --test-threads 1")
        .arg(std::env::current_exe().unwrap())
        .envs([
            ("SEC_ROLE", "mirror"),
            ("SEC_DIR", tcp.as_str()),
            ("SEC_PORT", p.as_str()),
            ("SEC_CPORT", c.as_str()),
        ]);
    let mirror = start_until(&mut cmd, "registered");
    let (client, in_time) = client.finish(LIMIT);
    let (stolen, _) = mirror.finish(LIMIT);
    assert!(in_time, "the client hung");
    let log = victim.log_text("server.log");
    assert_real_answer(&client, "secret", &format!("server log:\n{log}"));
    assert_nothing_stolen(&stolen);
    assert!(
        log.contains("owned by another user namespace"),
        "the server should say why it ignored the registration:\n{log}"
    );
}

/// A FIFO and a link to `/dev/zero` planted as announcements (by a process that can write the
/// directory) must not hang `connect` or `ivcom run`'s exit sweep, nor make it read without
/// bound.
#[test]
fn planted_fifos_and_links_do_not_hang_connect() {
    let Some((user, _)) = ivcom_testkit::users("planted_fifos_and_links_do_not_hang_connect") else {
        return;
    };
    let victim = Victim::new(&user, "fifo");
    let tcp_dir = victim.scratch.dir_for("run/tcp", &user, 0o700);
    let port = free_port();
    let fifo = tcp_dir.join(format!("{port}-1-1-0.ann"));
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let link = tcp_dir.join(format!("{port}-1-1-1.ann"));
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    for p in [&fifo, &link] {
        ivcom_testkit::chown(p, user.uid, user.gid);
    }
    let _server = victim.server(Mode::Plain, port, 0, 1);
    let client = victim.client(Mode::Ivcom(&[]), port, "hello");
    assert_real_answer(&client, "hello", "");
}

/// Registrations held open by the thousand must not take a server's descriptors: the server
/// keeps a bounded number and still serves.
#[test]
fn a_registration_flood_is_bounded() {
    let Some((user, _)) = ivcom_testkit::users("a_registration_flood_is_bounded") else {
        return;
    };
    let victim = Victim::new(&user, "flood");
    let port = free_port();
    // Two connections: it is still running, to be counted, after answering the first.
    let server = victim.server(Mode::Ivcom(&[]), port, 3000, 2);
    let tcp = victim.tcp_dir();
    let flood = start_until(
        &mut attacker(&user, "flood", &[("SEC_DIR", &tcp), ("SEC_COUNT", "3000"), ("SEC_SECONDS", "15")]),
        "flooded",
    );
    let client = victim.client(Mode::Ivcom(&[]), port, "hello");
    // The server has accepted by now (it answered); count what it holds.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server_pid(&server)))
        .expect("the server is still running (it serves two connections)")
        .count();
    drop(flood);
    assert_real_answer(&client, "hello", "");
    assert!(fds < 900, "the server holds {fds} descriptors after a flood of 3000 registrations");
}

/// The PID of the program `ivcom run` started (its only child).
fn server_pid(s: &Bounded) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", s.0.id())).unwrap_or_default();
    children.split_whitespace().next().and_then(|c| c.parse().ok()).unwrap_or(s.0.id())
}

/// A connector that asks for huge rings (pinning memory charged to the server) gets plain
/// TCP from a server with the default cap, and both ends still work.
#[test]
fn a_connector_cannot_make_the_server_map_huge_rings() {
    let Some((user, _)) = ivcom_testkit::users("a_connector_cannot_make_the_server_map_huge_rings") else {
        return;
    };
    let victim = Victim::new(&user, "bigring");
    let port = free_port();
    let server = victim.server(Mode::Logged("server.log"), port, 0, 1);
    let client = victim.client(Mode::Ivcom(&["--ring-kib", "65536"]), port, "hello");
    let _ = server.finish(Duration::from_secs(10));
    assert_real_answer(&client, "hello", "");
    let l = victim.log_text("server.log");
    assert!(l.contains("registered channel refused"), "the server should refuse the huge region:\n{l}");
    assert!(!l.contains("channel claimed"), "the server claimed a huge region:\n{l}");
}

/// The decision log is created 0600 and never written through a link another user planted.
#[test]
fn the_decision_log_is_private_and_follows_no_link() {
    let Some((user, bad)) = ivcom_testkit::users("the_decision_log_is_private_and_follows_no_link") else {
        return;
    };
    let victim = Victim::new(&user, "log");
    let shared = victim.scratch.dir_for("shared", &bad, 0o777);
    let precious = victim.scratch.dir_for("victim-home", &user, 0o700).join("precious");
    std::fs::write(&precious, "keep me\n").unwrap();
    ivcom_testkit::chown(&precious, user.uid, user.gid);
    let link = shared.join("ivcom.log");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    ivcom_testkit::chown(&link, bad.uid, bad.gid);
    let port = free_port().to_string();
    let with_log = |log: &Path| -> Command {
        let log = log.to_string_lossy().into_owned();
        victim.echo(Mode::Ivcom(&["--log", &log]), &["server", "127.0.0.1", &port, "0"])
    };
    // Through the link: refused with the reason, before the program starts.
    let (refused, in_time) = ivcom_testkit::run_bounded(&mut with_log(&link), Duration::from_secs(30));
    assert!(in_time && !refused.status.success(), "ivcom run accepted a log path that is a link");
    assert!(text(&refused.stderr).contains("symbolic link"), "{}", text(&refused.stderr));
    // A fresh log: the server announces (one line) and waits for a client; killed after 3 s.
    let fresh = victim.log("fresh.log");
    let _ = ivcom_testkit::run_bounded(&mut with_log(&fresh), Duration::from_secs(3));
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "keep me\n",
        "the log was written through the link"
    );
    let mode = std::fs::metadata(&fresh).expect("the log was created").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the decision log is readable by others");
}

/// The same rule for the daemon's clients: a host agent joining a region (`ivcom agent
/// --join SOCKET`) refuses a socket served by another (non-root) user, who could hand it any
/// memory and doorbells.
#[test]
fn a_host_agent_refuses_a_daemon_socket_of_another_user() {
    let Some((user, bad)) = ivcom_testkit::users("a_host_agent_refuses_a_daemon_socket_of_another_user")
    else {
        return;
    };
    let victim = Victim::new(&user, "daemon-socket");
    let shared = victim.scratch.dir_for("shared", &bad, 0o755);
    let sock = shared.join("member.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let server = start_until(
        &mut attacker(&bad, "unix_server", &[("SEC_PATH", &sock_s), ("SEC_SECONDS", "20")]),
        "serving",
    );
    let agent_sock = victim.run.join("agent.sock");
    let mut agent = victim.user.command(IVCOM);
    agent.args(["agent", "--join", &sock_s, "--socket"]).arg(&agent_sock);
    let (out, in_time) = ivcom_testkit::run_bounded(&mut agent, Duration::from_secs(30));
    drop(server);
    assert!(in_time, "the agent kept running on a socket another user serves");
    assert!(!out.status.success(), "the agent accepted a daemon socket of another user");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("served by uid {}", bad.uid)),
        "the agent should name who serves the socket: {err}"
    );
}
