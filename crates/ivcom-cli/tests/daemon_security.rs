//! The VM side of ivcom attacked as a hostile local user would: `ivcom daemon`, `ivcom agent`
//! and `ivcom qemu-args` run as root (or as the victim), the attacks run as an unprivileged
//! user (`ivcom-testkit`). Each test asserts what the attacker obtains (nothing) and what the
//! victim gets (its real peer, or a clear error). Without root the tests that need users print
//! a note and pass.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ivcom_ivshmem::client::{Client, ClientError, PeerEvent};
use ivcom_testkit::{run_bounded, Bounded, Scratch, User};

const BIN: &str = env!("CARGO_BIN_EXE_ivcom");
/// Bound on any one child or wait (never asserted as a speed).
const T: Duration = Duration::from_secs(20);

/// The group every member's QEMU user is in, as docs/daemon.md recommends (`socket_group`).
fn vm_group() -> u32 {
    let name = "ivcomsec-vm";
    let look = || {
        let out = Command::new("getent").args(["group", name]).output().ok()?;
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        line.trim().split(':').nth(2)?.parse::<u32>().ok()
    };
    if let Some(g) = look() {
        return g;
    }
    let _ = Command::new("groupadd").args(["--system", name]).status();
    look().expect("groupadd ivcomsec-vm")
}

/// `program` run as `user` with supplementary `groups`, an environment holding only PATH,
/// HOME, TMPDIR and IVCOM_LOG.
fn as_user(user: &User, groups: &[u32], program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
        .env("HOME", "/")
        .env("TMPDIR", "/tmp")
        .env("IVCOM_LOG", "info")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!("--groups={}", groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
    }
    c.arg("--").arg(program).stdin(Stdio::null());
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !ok() {
        assert!(Instant::now() < end, "{what} did not happen within {T:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("ivcom.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn daemon(config: &Path, socket_dir: &Path) -> Bounded {
    let mut c = Command::new(BIN);
    c.args(["daemon", "--config"]).arg(config).arg("--socket-dir").arg(socket_dir).stdin(Stdio::null());
    Bounded::spawn(&mut c)
}

/// Runs the daemon expecting it to refuse to start; returns its output.
fn daemon_refuses(config: &Path, socket_dir: &Path) -> String {
    let (out, in_time) = daemon(config, socket_dir).finish(T);
    let t = text(&out);
    assert!(in_time, "the daemon kept running instead of refusing:\n{t}");
    assert!(!out.status.success(), "the daemon succeeded:\n{t}");
    t
}

/// (a) Another user plants the plain region's `/dev/shm` file (or a symlink in its place)
/// before the daemon starts: the daemon refuses with the path, the owner and the mode, and
/// never maps, formats or resizes the attacker's file. When the daemon makes the file itself,
/// it is 0600 and the attacker can neither open nor truncate it.
#[test]
fn plain_region_file_planted_by_another_user_is_never_used() {
    let Some((_victim, attacker)) = ivcom_testkit::users("plain_region_file_planted") else { return };
    let scratch = Scratch::new("plain");
    let region = format!("secplain{}", std::process::id());
    let shm = PathBuf::from(format!("/dev/shm/ivcom.{region}"));
    let _ = std::fs::remove_file(&shm);
    let cfg = write_config(
        scratch.path(),
        &format!("[[group]]\nname = '{region}'\nmembers = ['a', 'b']\nsize = '1M'\nplain = true\n"),
    );
    let sock = scratch.path().join("vm");

    // The attacker's own file, of exactly the configured size, writable by everyone.
    let plant = format!("umask 0; head -c 1048576 /dev/zero > {}", shm.display());
    let (o, _) = run_bounded(attacker.command("sh").args(["-c", &plant]), T);
    assert!(o.status.success(), "planting: {}", text(&o));
    let t = daemon_refuses(&cfg, &sock);
    assert!(t.contains(&shm.display().to_string()), "{t}");
    assert!(t.contains(&format!("owned by uid {}", attacker.uid)), "{t}");
    assert!(t.contains("mode 0666"), "{t}");
    // Untouched: still the attacker's, still all zero (no directory formatted into it).
    let md = std::fs::metadata(&shm).unwrap();
    assert_eq!((md.uid(), md.len()), (attacker.uid, 1 << 20));
    assert!(
        std::fs::read(&shm).unwrap().iter().all(|&b| b == 0),
        "the daemon wrote into the attacker's file"
    );
    std::fs::remove_file(&shm).unwrap();

    // A symlink to a file the attacker controls.
    let target = scratch.dir_for("att", &attacker, 0o755).join("target");
    let plant = format!(
        "umask 0; head -c 1048576 /dev/zero > {t}; ln -s {t} {s}",
        t = target.display(),
        s = shm.display()
    );
    let (o, _) = run_bounded(attacker.command("sh").args(["-c", &plant]), T);
    assert!(o.status.success(), "planting: {}", text(&o));
    let t = daemon_refuses(&cfg, &sock);
    assert!(t.contains("symbolic link") && t.contains(&format!("owned by uid {}", attacker.uid)), "{t}");
    assert!(std::fs::read(&target).unwrap().iter().all(|&b| b == 0), "the daemon wrote through the link");
    std::fs::remove_file(&shm).unwrap();

    // The daemon's own file: 0600, the daemon's; the attacker cannot truncate it.
    let d = daemon(&cfg, &sock);
    wait_for("the region file", || shm.exists());
    wait_for("the directory in the region", || std::fs::read(&shm).is_ok_and(|b| b.iter().any(|&x| x != 0)));
    let md = std::fs::symlink_metadata(&shm).unwrap();
    assert_eq!((md.uid(), md.permissions().mode() & 0o7777), (0, 0o600));
    let (o, _) = run_bounded(attacker.command("truncate").args(["-s", "0"]).arg(&shm), T);
    assert!(!o.status.success(), "the attacker truncated the region");
    assert_eq!(std::fs::metadata(&shm).unwrap().len(), 1 << 20);
    drop(d);
    let _ = std::fs::remove_file(&shm);
}

/// (b) In the recommended setup (docs/daemon.md: members bound to their QEMU users' uids,
/// `socket_group` for the directories), the attacker, bound to member `a`, tries to attach as
/// member `b` of the pair `b`-`c` it is not part of: refused by the socket's owner and mode,
/// and, with the socket made world-writable, by the daemon's credential check. The victim's
/// real member keeps being served throughout.
#[test]
fn a_member_cannot_attach_as_a_member_of_a_pair_it_is_not_in() {
    let Some((victim, attacker)) = ivcom_testkit::users("member_binding") else { return };
    let g = vm_group();
    let scratch = Scratch::new("bind");
    let cfg = write_config(
        scratch.path(),
        &format!(
            "socket_group = {g}\n[members.a]\nuid = {}\n[members.b]\nuid = {}\n\
             [[pairs]]\nname = 'mesh'\nmembers = ['a', 'b', 'c']\nsize = '1M'\n",
            attacker.uid, victim.uid
        ),
    );
    let sock = scratch.path().join("vm");
    let _d = daemon(&cfg, &sock);
    let b_sock = sock.join("mesh.b.c/b.sock");
    let c_sock = sock.join("mesh.b.c/c.sock");
    // c is bound last; b's socket got its owner before c was bound.
    wait_for("the daemon's sockets", || c_sock.exists());
    let md = std::fs::symlink_metadata(&b_sock).unwrap();
    assert_eq!((md.uid(), md.permissions().mode() & 0o777), (victim.uid, 0o600));

    // The victim's real member b (a host agent as the victim), and c (root) watching.
    let vdir = scratch.dir_for("victim", &victim, 0o755);
    let mut agent = as_user(&victim, &[g], BIN);
    agent.args(["agent", "--join"]).arg(&b_sock).arg("--socket").arg(vdir.join("agent.sock"));
    let victim_agent = Bounded::spawn(&mut agent);
    wait_for("the victim's agent", || vdir.join("agent.sock").exists());
    let mut watcher = Client::connect_with_vectors(&c_sock, 1, T).unwrap();
    let b_id = *watcher.peers().keys().next().expect("b is connected");

    let attack = |tag: &str| {
        let adir = scratch.dir_for(&format!("att-{tag}"), &attacker, 0o755);
        for target in [&b_sock, &c_sock] {
            let mut c = as_user(&attacker, &[g], BIN);
            c.args(["agent", "--join"]).arg(target).arg("--socket").arg(adir.join("agent.sock"));
            let (o, in_time) = run_bounded(&mut c, T);
            let t = text(&o);
            assert!(in_time && !o.status.success(), "attacker joined {}:\n{t}", target.display());
            assert!(!t.contains("agent: peer"), "{t}");
        }
    };
    attack("mode");
    // Even with b's socket world-writable, the credentials decide.
    std::fs::set_permissions(&b_sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    attack("cred");

    // The watcher was told of no newcomer; b is still there; the victim's agent still runs.
    let events = watcher.wait_events(Duration::from_millis(200)).unwrap();
    assert!(events.is_empty(), "the watcher saw {events:?}");
    assert_eq!(watcher.peers().keys().copied().collect::<Vec<_>>(), [b_id]);
    let (out, in_time) = victim_agent.finish(Duration::from_millis(100));
    assert!(!in_time, "the victim's agent ended: {}", text(&out));
}

/// (c) Peer ids: a member that reconnects again and again while an observer stays connected
/// never gets an id the observer saw leave; once every id of the member was seen, the join
/// is refused (not reissued), and ids are free again once the observer reconnects.
#[test]
fn peer_ids_are_never_reissued_to_a_member_that_saw_them() {
    let scratch = Scratch::new("ids");
    // 1024 members: each has 64 ids (m1: 1, 1025, ..., 64513).
    let members: Vec<String> = (0..1024).map(|i| format!("m{i}")).collect();
    let cfg_text = format!("[[group]]\nname = 'big'\nmembers = {members:?}\nsize = '1M'\n");
    let cfg = ivcom_daemon::Config::parse(&cfg_text, Path::new("ids.toml")).unwrap();
    let opts =
        ivcom_daemon::DaemonOptions { socket_dir: Some(scratch.path().join("vm")), ..Default::default() };
    let mut d = ivcom_daemon::Daemon::new(&cfg, &opts, None).unwrap();
    let stop = d.stop_handle();
    let sock = |m: &str| d.socket_path("big", m).unwrap();
    let (s0, s1) = (sock("m0"), sock("m1"));
    let server = std::thread::spawn(move || {
        d.run().unwrap();
        d
    });

    let mut observer = Client::connect_with_vectors(&s0, 1, T).unwrap();
    let mut left = std::collections::HashSet::new();
    let mut issued = Vec::new();
    let mut refused = 0;
    for _ in 0..70 {
        match Client::connect_with_vectors(&s1, 1, T) {
            Ok(c) => {
                let id = c.id();
                assert_eq!(id % 1024, 1, "id {id} is not member 1's");
                issued.push(id);
                let mut joined = false;
                wait_for("the observer's join notice", || {
                    for e in observer.wait_events(Duration::from_millis(10)).unwrap() {
                        match e {
                            PeerEvent::Joined { id: j, .. } => {
                                assert!(
                                    !left.contains(&j),
                                    "the observer was told that id {j}, which it saw leave, joined again"
                                );
                                joined |= j == id;
                            }
                            PeerEvent::Left { id: l } => panic!("unexpected departure of {l}"),
                        }
                    }
                    joined
                });
                drop(c);
                let mut gone = false;
                wait_for("the observer's departure notice", || {
                    for e in observer.wait_events(Duration::from_millis(10)).unwrap() {
                        if let PeerEvent::Left { id: l } = e {
                            left.insert(l);
                            gone |= l == id;
                        }
                    }
                    gone
                });
            }
            Err(ClientError::Refused) => refused += 1,
            Err(e) => panic!("join failed: {e}"),
        }
    }
    assert_eq!(issued.len(), 64, "ids issued: {issued:?}");
    assert_eq!(refused, 70 - 64);
    let distinct: std::collections::HashSet<_> = issued.iter().collect();
    assert_eq!(distinct.len(), 64, "an id was issued twice: {issued:?}");
    // The observer reconnects: it has seen nothing yet, so member 1 can join again.
    drop(observer);
    // Until the daemon has seen the old connection close, the new one is a second connection
    // for a connected member (a child another test forks may hold the socket for a moment).
    let end = Instant::now() + T;
    let _observer = loop {
        match Client::connect_with_vectors(&s0, 1, T) {
            Err(ClientError::Refused) if Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => break r.unwrap(),
        }
    };
    let again = Client::connect_with_vectors(&s1, 1, T).unwrap();
    assert_eq!(again.id() % 1024, 1);
    stop.stop();
    drop(server.join().unwrap());
}

/// (d) A socket directory planted by another user, made world-writable, or replaced by a
/// symlink: the daemon and the agent refuse it with its path, owner and mode.
#[test]
fn runtime_directories_someone_else_controls_are_refused() {
    let Some((victim, attacker)) = ivcom_testkit::users("runtime_directories") else { return };
    let scratch = Scratch::new("dirs");
    let cfg = write_config(scratch.path(), "[[group]]\nname = 'lab'\nmembers = ['v', 'w']\nsize = '1M'\n");

    // Owned by the attacker.
    let planted = scratch.dir_for("planted", &attacker, 0o755);
    let t = daemon_refuses(&cfg, &planted);
    assert!(
        t.contains(&planted.display().to_string()) && t.contains(&format!("owned by uid {}", attacker.uid)),
        "{t}"
    );
    assert!(std::fs::read_dir(&planted).unwrap().next().is_none(), "the daemon put something in it");

    // Ours, but everyone can write it.
    let wide = scratch.path().join("wide");
    std::fs::create_dir(&wide).unwrap();
    std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o777)).unwrap();
    let t = daemon_refuses(&cfg, &wide);
    assert!(t.contains("mode 0777") && t.contains("others can write"), "{t}");

    // A symlink the attacker made (in a sticky, world-writable directory) to its directory.
    let sticky = scratch.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let link = sticky.join("vm");
    let (o, _) = run_bounded(attacker.command("ln").arg("-s").arg(&planted).arg(&link), T);
    assert!(o.status.success(), "{}", text(&o));
    let t = daemon_refuses(&cfg, &link);
    assert!(t.contains("symbolic link") && t.contains(&format!("owned by uid {}", attacker.uid)), "{t}");

    // The agent: its socket directory planted by the attacker.
    let g = vm_group();
    let cfg = write_config(
        scratch.path(),
        &format!("socket_group = {g}\n[members.v]\nuid = {}\n[[group]]\nname = 'lab'\nmembers = ['v', 'w']\nsize = '1M'\n", victim.uid),
    );
    let sock = scratch.path().join("vm");
    let _d = daemon(&cfg, &sock);
    let v_sock = sock.join("lab/v.sock");
    // The daemon gives each socket its owner right after binding it, before it listens.
    wait_for("v's socket", || std::fs::symlink_metadata(&v_sock).is_ok_and(|m| m.uid() == victim.uid));
    let adir = scratch.dir_for("agentdir", &attacker, 0o777);
    let mut c = as_user(&victim, &[g], BIN);
    c.args(["agent", "--join"]).arg(&v_sock).arg("--socket").arg(adir.join("agent.sock"));
    let (o, in_time) = run_bounded(&mut c, T);
    let t = text(&o);
    assert!(in_time && !o.status.success(), "the agent ran in the attacker's directory:\n{t}");
    assert!(
        t.contains(&adir.display().to_string()) && t.contains(&format!("owned by uid {}", attacker.uid)),
        "{t}"
    );
    assert!(!adir.join("agent.sock").exists());
}

/// A `[[pairs]]` set of 7000 members in 47 KB.
fn huge_pairs(dir: &Path) -> PathBuf {
    let members: Vec<String> = (0..7000).map(|i| format!("m{i}")).collect();
    let body = format!("[[pairs]]\nname = 'p'\nmembers = {members:?}\nsize = '1M'\n");
    assert!(body.len() > 47_000, "{}", body.len());
    write_config(dir, &body)
}

/// (e) A 47 KB `[[pairs]]` configuration (24 million pairs): `ivcom qemu-args` and `ivcom
/// daemon` fail at once with a clear error, within 512 MiB of address space.
#[test]
fn huge_pair_configuration_fails_fast_in_bounded_memory() {
    let scratch = Scratch::new("huge");
    let cfg = huge_pairs(scratch.path());
    for args in [
        format!("qemu-args --config {} --region p.m0.m1 --member m0", cfg.display()),
        format!("daemon --config {} --socket-dir {}/vm", cfg.display(), scratch.path().display()),
    ] {
        let script = format!("ulimit -v 524288; exec {BIN} {args}");
        let (o, in_time) = run_bounded(Command::new("sh").args(["-c", &script]).stdin(Stdio::null()), T);
        let t = text(&o);
        assert!(in_time, "{args}: still running\n{t}");
        assert_eq!(o.status.code(), Some(1), "{args}: {t}");
        assert!(t.contains("7000 members; at most 64 are allowed"), "{args}: {t}");
        assert!(t.contains(&cfg.display().to_string()), "{t}");
    }
}

/// (f) Agent sockets: a process of a uid the victim's agent does not admit is refused with a
/// clear error (and the agent keeps serving the victim), and the victim's process refuses an
/// agent socket served by another, non-root user.
#[test]
fn agent_sockets_admit_only_their_policy_and_processes_only_trust_their_own_agent() {
    let Some((victim, attacker)) = ivcom_testkit::users("agent_sockets") else { return };
    let g = vm_group();
    let scratch = Scratch::new("agent");
    let cfg = write_config(
        scratch.path(),
        &format!(
            "socket_group = {g}\n[members.v]\nuid = {}\n[members.w]\nuid = {}\n\
             [[group]]\nname = 'lab'\nmembers = ['v', 'w']\nsize = '1M'\n",
            victim.uid, attacker.uid
        ),
    );
    let sock = scratch.path().join("vm");
    let _d = daemon(&cfg, &sock);
    // The daemon gives each socket its owner right after binding it, before it listens.
    wait_for("w's socket", || {
        std::fs::symlink_metadata(sock.join("lab/w.sock")).is_ok_and(|m| m.uid() == attacker.uid)
    });

    // The victim's agent admits uid 65534 besides the victim, so its socket is world-writable
    // (0666) and only the credential check keeps the attacker out.
    let vbase = scratch.dir_for("victim", &victim, 0o755);
    let vsock = vbase.join("run/agent.sock");
    let mut c = as_user(&victim, &[g], BIN);
    c.args(["agent", "--access", "uids:65534", "--join"])
        .arg(sock.join("lab/v.sock"))
        .arg("--socket")
        .arg(&vsock);
    let victim_agent = Bounded::spawn(&mut c);
    wait_for("the victim's agent socket", || vsock.exists());
    assert_eq!(std::fs::symlink_metadata(&vsock).unwrap().permissions().mode() & 0o777, 0o666);

    // ivcom's own client would not even talk to another user's agent; a hostile one skips
    // that check: a raw connection as the attacker, from a thread that drops to its uid.
    let (uid, gid, path) = (attacker.uid, attacker.gid, vsock.clone());
    let answer = std::thread::spawn(move || {
        use rustix::fs::{Gid, Uid};
        use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
        set_thread_groups(&[]).unwrap();
        let g = Gid::from_raw(gid);
        set_thread_res_gid(g, g, g).unwrap();
        let u = Uid::from_raw(uid);
        set_thread_res_uid(u, u, u).unwrap();
        let fd =
            rustix::net::socket(rustix::net::AddressFamily::UNIX, rustix::net::SocketType::SEQPACKET, None)
                .unwrap();
        rustix::net::connect(&fd, &rustix::net::SocketAddrUnix::new(&path).unwrap()).unwrap();
        // The agent answers a connection it refuses at once, before any request.
        let mut buf = [0u8; 512];
        let n = rustix::net::recv(&fd, &mut buf, rustix::net::RecvFlags::empty()).unwrap().0;
        let first = ivcom::vm::wire::Packet::decode(&buf[..n]).unwrap();
        // A request anyway gets nothing: the connection is closed (or reset).
        let bind = ivcom::vm::wire::Packet::Bind { name: "stolen".into() }.encode();
        let _ = rustix::net::send(&fd, &bind, rustix::net::SendFlags::NOSIGNAL);
        let closed = match rustix::net::recv(&fd, &mut buf, rustix::net::RecvFlags::empty()) {
            Ok((n, _)) => n == 0,
            Err(e) => e == rustix::io::Errno::CONNRESET,
        };
        (first, closed)
    })
    .join()
    .unwrap();
    match answer {
        (ivcom::vm::wire::Packet::Error { errno, message }, true) => {
            assert_eq!(errno, rustix::io::Errno::ACCESS.raw_os_error());
            assert!(message.contains(&format!("does not serve uid {}", attacker.uid)), "{message}");
        }
        other => panic!("the agent answered the attacker with {other:?}"),
    }

    // The agent still serves the victim: a listener and a connector of the victim's.
    let mut l = as_user(&victim, &[], BIN);
    l.args(["listen", "echo", "--agent"]).arg(&vsock);
    let listener = Bounded::spawn(&mut l);
    let mut out = None;
    let end = Instant::now() + T;
    while Instant::now() < end {
        let mut c = as_user(&victim, &[], BIN);
        c.args(["connect", "echo", "--agent"]).arg(&vsock).stdin(Stdio::piped());
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        // A connector that found no listener yet may have exited already: a broken pipe here
        // is that retry case, and its failed status below says so.
        let _ = child.stdin.take().unwrap().write_all(b"hello from the victim\n");
        let b = Bounded(child);
        let (o, _) = b.finish(T);
        if o.status.success() {
            out = Some(o);
            break;
        }
        std::thread::sleep(Duration::from_millis(50)); // the listener is not bound yet
    }
    assert!(out.is_some(), "the victim could not connect through its own agent");
    let (lo, _) = listener.finish(T);
    assert_eq!(String::from_utf8_lossy(&lo.stdout), "hello from the victim\n");

    // The attacker serves an agent socket (its own membership, admitting anyone) and points
    // the victim at it: the victim refuses it.
    let abase = scratch.dir_for("attacker", &attacker, 0o755);
    let asock = abase.join("run/agent.sock");
    let mut c = as_user(&attacker, &[g], BIN);
    c.args(["agent", "--access", "anyone", "--join"])
        .arg(sock.join("lab/w.sock"))
        .arg("--socket")
        .arg(&asock);
    let attacker_agent = Bounded::spawn(&mut c);
    wait_for("the attacker's agent socket", || asock.exists());
    let mut c = as_user(&victim, &[], BIN);
    c.args(["connect", "echo", "--agent"]).arg(&asock);
    let (o, in_time) = run_bounded(&mut c, T);
    let t = text(&o);
    assert!(in_time && !o.status.success(), "{t}");
    assert!(
        t.contains(&format!("served by uid {}", attacker.uid)) && t.contains("refusing to use it"),
        "{t}"
    );
    drop(attacker_agent);
    let (o, in_time) = victim_agent.finish(Duration::from_millis(100));
    assert!(!in_time, "the victim's agent ended: {}", text(&o));
}
