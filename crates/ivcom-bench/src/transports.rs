//! The byte-stream transports under test (ivcom, TCP, Unix sockets) and the generic
//! rtt / stream loops that run over any of them.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

use crate::hist;
use crate::plan::Kind;

/// A connected byte stream under test.
pub trait Conn: Read + Write {
    /// ivcom's counters, for transports that have them.
    fn ivcom_stats(&self) -> Option<ivcom::Stats> {
        None
    }
}

impl Conn for TcpStream {}
impl Conn for UnixStream {}
impl Conn for ivcom::Stream {
    fn ivcom_stats(&self) -> Option<ivcom::Stats> {
        Some(self.stats())
    }
}

/// ivcom options for a mode, with the run's private runtime directory.
pub fn ivcom_options(kind: Kind, dir: &Path) -> ivcom::Options {
    let opts = ivcom::Options::new().runtime_dir(dir.join("ivcom"));
    match kind {
        Kind::IvcomSleep => opts.spin(Duration::ZERO),
        _ => opts,
    }
}

/// A bound server endpoint, before its one connection is accepted.
pub enum Server {
    /// ivcom listener.
    Ivcom(Box<ivcom::Listener>),
    /// TCP listener on 127.0.0.1.
    Tcp(TcpListener),
    /// Unix listener and its socket path (removed once accepted).
    Uds(UnixListener, std::path::PathBuf),
}

/// Binds the server side of `kind`; returns it and the address for the client.
pub fn bind(kind: Kind, dir: &Path) -> Result<(Server, String)> {
    let pid = std::process::id();
    match kind {
        Kind::IvcomAdaptive | Kind::IvcomSleep => {
            let name = format!("bench-{pid}");
            let opts = ivcom_options(kind, dir);
            let l =
                ivcom::Listener::bind_with(&name, &opts).with_context(|| format!("ivcom bind {name:?}"))?;
            Ok((Server::Ivcom(Box::new(l)), name))
        }
        Kind::Tcp => {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("tcp bind")?;
            let port = l.local_addr()?.port();
            Ok((Server::Tcp(l), port.to_string()))
        }
        Kind::Uds => {
            let path = dir.join(format!("uds-{pid}.sock"));
            let l = UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
            let addr = path.to_string_lossy().into_owned();
            Ok((Server::Uds(l, path), addr))
        }
        Kind::SpinFloor | Kind::CopyFloor => bail!("{kind:?} is not a socket transport"),
    }
}

/// Accepts the one connection of the slice and runs `f` on it.
pub fn accept_and<T>(server: Server, f: impl FnOnce(&mut dyn ConnRun) -> T) -> Result<T> {
    match server {
        Server::Ivcom(l) => {
            let mut s = l.accept().context("ivcom accept")?;
            drop(l);
            Ok(f(&mut s))
        }
        Server::Tcp(l) => {
            let (mut s, _) = l.accept().context("tcp accept")?;
            s.set_nodelay(true)?;
            drop(l);
            Ok(f(&mut s))
        }
        Server::Uds(l, path) => {
            let (mut s, _) = l.accept().context("uds accept")?;
            drop(l);
            let _ = std::fs::remove_file(path);
            Ok(f(&mut s))
        }
    }
}

/// Connects the client side of `kind` to `addr` and runs `f` on the connection.
pub fn connect_and<T>(
    kind: Kind,
    dir: &Path,
    addr: &str,
    f: impl FnOnce(&mut dyn ConnRun) -> T,
) -> Result<T> {
    match kind {
        Kind::IvcomAdaptive | Kind::IvcomSleep => {
            let opts = ivcom_options(kind, dir);
            let mut s = ivcom::Stream::connect_with(addr, &opts)
                .with_context(|| format!("ivcom connect {addr:?}"))?;
            Ok(f(&mut s))
        }
        Kind::Tcp => {
            let port: u16 = addr.parse().context("tcp port")?;
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).context("tcp connect")?;
            s.set_nodelay(true)?;
            Ok(f(&mut s))
        }
        Kind::Uds => {
            let mut s = UnixStream::connect(addr).with_context(|| format!("connect {addr}"))?;
            Ok(f(&mut s))
        }
        Kind::SpinFloor | Kind::CopyFloor => bail!("{kind:?} is not a socket transport"),
    }
}

/// What one side of a socket slice measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Round trips (rtt client/server) or write/read calls (stream).
    pub ops: u64,
    /// Bytes read (stream reader).
    pub bytes: u64,
    /// Stream reader: nanoseconds from the first byte to the end of the stream.
    pub elapsed_ns: u64,
    /// Rtt client: recorded round-trip times.
    pub hist: Option<Histogram<u64>>,
    /// ivcom counters at the end of the slice.
    pub stats: Option<ivcom::Stats>,
}

/// The test loops, object-safe so that one monomorphic copy per transport is
/// compiled (the loops themselves are generic and inlined per transport).
pub trait ConnRun {
    /// Echo exactly `size` bytes back per message until the client closes.
    fn rtt_server(&mut self, size: usize) -> io::Result<Outcome>;
    /// Time round trips of `size` bytes for `duration`, recording after `warmup`.
    fn rtt_client(&mut self, size: usize, duration: Duration, warmup: Duration) -> io::Result<Outcome>;
    /// Read with a `max(size, 64 KiB)` buffer until the client closes; count bytes.
    fn stream_reader(&mut self, size: usize) -> io::Result<Outcome>;
    /// Write `size`-byte buffers for `duration`, then close.
    fn stream_writer(&mut self, size: usize, duration: Duration) -> io::Result<Outcome>;
}

impl<C: Conn> ConnRun for C {
    fn rtt_server(&mut self, size: usize) -> io::Result<Outcome> {
        let mut buf = vec![0u8; size];
        let mut ops = 0;
        while read_exact_or_eof(self, &mut buf)? {
            self.write_all(&buf)?;
            self.flush()?;
            ops += 1;
        }
        Ok(Outcome { ops, stats: self.ivcom_stats(), ..Outcome::default() })
    }

    fn rtt_client(&mut self, size: usize, duration: Duration, warmup: Duration) -> io::Result<Outcome> {
        let msg = vec![0x5Au8; size];
        let mut back = vec![0u8; size];
        let mut h = hist::new_hist();
        let start = Instant::now();
        let (warm_end, end) = (start + warmup, start + duration);
        let mut ops = 0;
        loop {
            let t0 = Instant::now();
            if t0 >= end {
                break;
            }
            self.write_all(&msg)?;
            self.flush()?;
            self.read_exact(&mut back)?;
            let dt = t0.elapsed();
            ops += 1;
            if t0 >= warm_end {
                hist::record(&mut h, dt.as_nanos() as u64);
            }
        }
        Ok(Outcome { ops, hist: Some(h), stats: self.ivcom_stats(), ..Outcome::default() })
    }

    fn stream_reader(&mut self, size: usize) -> io::Result<Outcome> {
        let mut buf = vec![0u8; size.max(64 * 1024)];
        let (mut bytes, mut ops) = (0u64, 0u64);
        let mut first: Option<Instant> = None;
        loop {
            let n = match self.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if is_peer_gone(&e) => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            bytes += n as u64;
            ops += 1;
        }
        Ok(Outcome {
            ops,
            bytes,
            elapsed_ns: first.map_or(0, |t| t.elapsed().as_nanos() as u64),
            stats: self.ivcom_stats(),
            hist: None,
        })
    }

    fn stream_writer(&mut self, size: usize, duration: Duration) -> io::Result<Outcome> {
        let msg = vec![0xA5u8; size];
        let check_every = (4096 / size.max(1)).max(1) as u64;
        let end = Instant::now() + duration;
        let mut ops = 0u64;
        loop {
            if ops.is_multiple_of(check_every) && Instant::now() >= end {
                break;
            }
            self.write_all(&msg)?;
            ops += 1;
        }
        self.flush()?;
        Ok(Outcome { ops, stats: self.ivcom_stats(), ..Outcome::default() })
    }
}

/// Errors that mean the other side closed the connection.
fn is_peer_gone(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof)
}

/// Fills `buf` completely; `Ok(false)` on a clean end of stream before any byte.
fn read_exact_or_eof<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if filled == 0 && is_peer_gone(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_over_a_socketpair() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || b.rtt_server(1024).unwrap());
        let out = a.rtt_client(1024, Duration::from_millis(20), Duration::from_millis(2)).unwrap();
        drop(a);
        let s = srv.join().unwrap();
        assert_eq!(s.ops, out.ops);
        assert!(!out.hist.unwrap().is_empty());

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let rd = std::thread::spawn(move || b.stream_reader(100).unwrap());
        let w = a.stream_writer(100, Duration::from_millis(20)).unwrap();
        drop(a);
        let r = rd.join().unwrap();
        assert_eq!(r.bytes, w.ops * 100);
    }

    #[test]
    fn short_message_then_eof_is_an_error() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        let mut buf = [0u8; 8];
        assert!(read_exact_or_eof(&mut b, &mut buf).is_err());
        let (a, mut b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(!read_exact_or_eof(&mut b, &mut buf).unwrap());
    }
}
