//! Public-API behaviour within one process (two threads): data, EOF, half-close, timeouts,
//! non-blocking mode, messages, naming, access errors.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use ivcom::{Listener, MessageListener, MessageStream, Options, Stream};

fn opts(dir: &tempdir::Dir) -> Options {
    Options::new().runtime_dir(dir.path())
}

mod tempdir {
    //! A private runtime directory per test, removed at the end.
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ivcom-test-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            // Runtime directories must be closed to others.
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
            Self(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
        pub fn entries(&self) -> Vec<String> {
            std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn pair(dir: &tempdir::Dir, o: Options) -> (Stream, Stream) {
    let l = Listener::bind_with("pair", &o.clone().runtime_dir(dir.path())).unwrap();
    let server = thread::spawn(move || l.accept().unwrap());
    let c = Stream::connect_with("pair", &o.runtime_dir(dir.path())).unwrap();
    (c, server.join().unwrap())
}

#[test]
fn echo_round_trip_and_eof() {
    let dir = tempdir::Dir::new("echo");
    let (mut c, mut s) = pair(&dir, Options::new());
    let t = thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
            s.write_all(&buf[..n]).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        total
    });
    for i in 0..1000u32 {
        let msg = i.to_le_bytes().repeat(16);
        c.write_all(&msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(t.join().unwrap(), 64 * 1000);
    let st = c.stats();
    assert_eq!(st.bytes_sent, 64_000);
    assert_eq!(st.bytes_received, 64_000);
}

#[test]
fn bytes_written_before_close_arrive_before_eof() {
    let dir = tempdir::Dir::new("close");
    let (mut c, mut s) = pair(&dir, Options::new().capacity(4096));
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d2 = data.clone();
    let w = thread::spawn(move || {
        c.write_all(&d2).unwrap();
        drop(c);
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    w.join().unwrap();
    assert_eq!(got, data);
    // The peer is gone: writing now is EPIPE, as for TCP after the peer closed.
    assert_eq!(s.write(b"x").unwrap_err().kind(), ErrorKind::BrokenPipe);
}

#[test]
fn timeouts_and_nonblocking() {
    let dir = tempdir::Dir::new("timeouts");
    let (mut c, mut s) = pair(&dir, Options::new().capacity(4096));
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let t0 = Instant::now();
    let e = s.read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert!(s.set_read_timeout(Some(Duration::ZERO)).is_err());

    c.set_nonblocking(true).unwrap();
    // Fill the ring: a non-blocking write returns what fits, then WouldBlock.
    let mut written = 0;
    loop {
        match c.write(&[7u8; 1000]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(written, 4096);
    // The write-readiness descriptor becomes readable once the reader frees space.
    let mut buf = vec![0u8; 4096];
    s.read_exact(&mut buf[..100]).unwrap();
    let fd = c.write_ready_fd();
    let mut pfd = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    let n = rustix::event::poll(&mut pfd, Some(&rustix::event::Timespec { tv_sec: 5, tv_nsec: 0 })).unwrap();
    assert_eq!(n, 1);
    assert_eq!(c.write(&[1u8; 1000]).unwrap(), 100);
}

#[test]
fn split_halves_work_from_two_threads() {
    let dir = tempdir::Dir::new("split");
    let (c, mut s) = pair(&dir, Options::new().capacity(8192));
    let (mut rx, mut tx) = c.split();
    let n = 2_000_000usize;
    let w = thread::spawn(move || {
        let chunk = vec![3u8; 3000];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            tx.write_all(&chunk[..k]).unwrap();
            left -= k;
        }
    });
    let echo = thread::spawn(move || {
        let mut buf = vec![0u8; 5000];
        loop {
            let k = s.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            s.write_all(&buf[..k]).unwrap();
        }
    });
    let mut got = 0;
    let mut buf = vec![0u8; 7000];
    while got < n {
        let k = rx.read(&mut buf).unwrap();
        assert!(buf[..k].iter().all(|&b| b == 3));
        got += k;
    }
    w.join().unwrap();
    drop(rx);
    echo.join().unwrap();
}

#[test]
fn messages_keep_boundaries() {
    let dir = tempdir::Dir::new("msg");
    let o = opts(&dir).max_message(1000).capacity(4096);
    let l = MessageListener::bind_with("m", &o).unwrap();
    let t = thread::spawn(move || {
        let mut s = l.accept().unwrap();
        let mut out = Vec::new();
        while let Some(m) = s.recv_vec().unwrap() {
            out.push(m);
        }
        out
    });
    let mut c = MessageStream::connect_with("m", &o).unwrap();
    assert_eq!(c.max_message(), 1000);
    let sent: Vec<Vec<u8>> = (0..500).map(|i| vec![i as u8; i % 1001]).collect();
    for m in &sent {
        c.send(m).unwrap();
    }
    assert_eq!(c.send(&[0u8; 1001]).unwrap_err().kind(), ErrorKind::InvalidInput);
    drop(c);
    assert_eq!(t.join().unwrap(), sent);
    // A stream connection to a message listener is refused with a clear error.
    let l2 = MessageListener::bind_with("m2", &o).unwrap();
    let t = thread::spawn(move || l2.accept().map(|_| ()));
    let e = Stream::connect_with("m2", &o).unwrap_err();
    assert!(e.to_string().contains("message listener"), "{e}");
    drop(t);
}

#[test]
fn names_are_exclusive_and_cleaned_up() {
    let dir = tempdir::Dir::new("names");
    let o = opts(&dir);
    let l = Listener::bind_with("svc", &o).unwrap();
    let e = Listener::bind_with("svc", &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrInUse);
    assert!(e.to_string().contains("already taken"), "{e}");
    drop(l);
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
    let e = Stream::connect_with("svc", &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    assert!(e.to_string().contains("no ivcom listener"), "{e}");
    assert_eq!(Listener::bind_with("../evil", &o).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(
        Stream::connect_with("svc", &o.clone().capacity(1000)).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempdir::Dir::new("stale");
    // A socket file nobody listens on, as a killed listener leaves behind.
    let path = dir.path().join("old.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let l = Listener::bind_with("old", &opts(&dir)).unwrap();
    let t = thread::spawn(move || l.accept().map(|_| ()));
    let c = Stream::connect_with("old", &opts(&dir)).unwrap();
    drop(c);
    t.join().unwrap().unwrap();
}
