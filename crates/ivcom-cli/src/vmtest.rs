//! `ivcom vm ...`: hidden guest-side commands of the VM harness (`scripts/vm-test.sh`).
//!
//! They run inside the test guests and print marker lines (`@@ivcom WORD key=value ...`) on
//! stdout, which the guest's /init sends to the serial console and the host greps.
//! - `vm probe`: lists the ivshmem devices and opens each (sysfs; VFIO too for doorbell ones).
//! - `vm pingpong`: a raw round trip over BAR2 between two guests, polled or doorbell-driven.
//! - `vm tcp`: the TCP baseline between the same guests: round trips and a bulk transfer
//!   whose SHA-256 both sides print.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ivcom_ivshmem::guest::{self, Access, Device, DeviceInfo};
use sha2::{Digest, Sha256};

/// Guest-side commands of the VM test harness (see docs/vm-harness.md).
#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// List ivshmem devices and open each one (sysfs; and VFIO for doorbell devices with --vfio).
    Probe {
        /// Also open doorbell devices through VFIO (binds them to vfio-pci).
        #[arg(long)]
        vfio: bool,
        /// Which guest this is: a and b check different words of the memory, so that two
        /// guests probing the same region at once do not disturb each other's check.
        #[arg(long, value_enum)]
        role: Option<Role>,
    },
    /// Raw ping-pong over the shared memory of one device between guests a and b.
    Pingpong(PingArgs),
    /// TCP baseline between guests a (client) and b (server).
    Tcp(TcpArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    A,
    B,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccessArg {
    Sysfs,
    Vfio,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Spin on the peer's sequence number in shared memory.
    Poll,
    /// Ring the peer's doorbell after each message and sleep on our MSI-X eventfd (VFIO).
    Doorbell,
}

#[derive(Args, Debug)]
pub struct PingArgs {
    #[arg(long, value_enum)]
    role: Role,
    /// Which device: `plain`, `doorbell` (the first of that kind) or a PCI address.
    #[arg(long, default_value = "plain")]
    device: String,
    /// On the host: the file behind the guests' ivshmem-plain device (`mem-path=`) instead of
    /// a device; the host takes part in the polled ping-pong like a guest.
    #[arg(long, conflicts_with = "device")]
    shm_file: Option<std::path::PathBuf>,
    #[arg(long, value_enum, default_value = "sysfs")]
    access: AccessArg,
    #[arg(long, value_enum, default_value = "poll")]
    mode: Mode,
    /// Message size in bytes (8..=16384).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Round trips.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Which 64 KiB slot of the shared memory this run uses (one per test in a boot), counted
    /// from the end of BAR2: the raw test overwrites it, and the start of a region served by
    /// `ivcom daemon` holds the region's directory.
    #[arg(long, default_value_t = 0)]
    slot: usize,
    /// A number both guests share for this run; stale data from another run never matches it.
    #[arg(long)]
    run: u64,
    /// Give up after this many seconds (handshake included).
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

#[derive(Args, Debug)]
pub struct TcpArgs {
    #[arg(long, value_enum)]
    role: Role,
    /// Address of guest b (a connects to it).
    #[arg(long, default_value = "10.0.2.2")]
    peer: Ipv4Addr,
    #[arg(long, default_value_t = 7070)]
    port: u16,
    /// Round-trip message sizes.
    #[arg(long, value_delimiter = ',', default_value = "64,4096")]
    sizes: Vec<usize>,
    /// Round trips per size.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Bulk transfer a -> b in MiB (0: none).
    #[arg(long, default_value_t = 256)]
    bulk_mib: u64,
    /// Seed of the bulk data.
    #[arg(long, default_value_t = 1)]
    run: u64,
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

pub fn run(cmd: VmCommand) -> Result<()> {
    match cmd {
        VmCommand::Probe { vfio, role } => probe(vfio, role),
        VmCommand::Pingpong(a) => pingpong(&a),
        VmCommand::Tcp(a) => tcp(&a),
    }
}

/// One marker line on stdout (line-buffered: each line goes out whole, at once).
fn marker(line: std::fmt::Arguments<'_>) {
    println!("@@ivcom {line}");
}

fn kind(d: &DeviceInfo) -> &'static str {
    if d.doorbell {
        "doorbell"
    } else {
        "plain"
    }
}

fn probe(vfio: bool, role: Option<Role>) -> Result<()> {
    let word = if role == Some(Role::B) { 2 } else { 1 };
    let devices = guest::find_devices().context("listing PCI devices")?;
    marker(format_args!("probe devices={}", devices.len()));
    ensure!(!devices.is_empty(), "no ivshmem device (1af4:1110) in /sys/bus/pci/devices");
    let mut failed = 0;
    for d in &devices {
        marker(format_args!(
            "probe-device bdf={} kind={} bar0={} bar2={} msix={} driver={} group={}",
            d.bdf,
            kind(d),
            d.bar0_size,
            d.bar2_size,
            d.msix_vectors,
            d.driver.as_deref().unwrap_or("none"),
            d.iommu_group.map_or("none".into(), |g| g.to_string()),
        ));
        let mut accesses = vec![Access::Sysfs];
        if vfio && d.doorbell {
            accesses.push(Access::Vfio);
        }
        for access in accesses {
            let name = if access == Access::Vfio { "vfio" } else { "sysfs" };
            match Device::open(d, access).and_then(|dev| self_check(&dev, word).map(|()| dev)) {
                Ok(dev) => {
                    let s = dev.share();
                    marker(format_args!(
                        "probe-open bdf={} kind={} access={name} ok=1 peer_id={} vectors={} len={} doorbell_mmap={}",
                        d.bdf,
                        kind(d),
                        dev.peer_id(),
                        dev.vectors(),
                        s.memory_len,
                        u8::from(s.doorbell_is_mmap),
                    ));
                }
                Err(e) => {
                    failed += 1;
                    marker(format_args!(
                        "probe-open bdf={} kind={} access={name} ok=0 error={:?}",
                        d.bdf,
                        kind(d),
                        e.to_string()
                    ));
                }
            }
        }
    }
    ensure!(failed == 0, "{failed} device opens failed");
    Ok(())
}

/// Writes and reads back the `word`-th 8 bytes from the end of the shared memory (restoring
/// them), then checks
/// that what [`Device::share`] hands out reaches the same memory and registers: BAR2 mapped
/// again from `memory_fd`, and a doorbell built from `doorbell_fd` (as another process would
/// after receiving the fds).
fn self_check(dev: &Device, word: usize) -> io::Result<()> {
    let mem = Shm::of(dev);
    let off = mem.len.checked_sub(8 * word).ok_or_else(|| io::Error::other("tiny BAR2"))?;
    let old = mem.load(off);
    mem.store(off, 0x1234_5678_9abc_def0);
    let back = mem.load(off);
    let s = dev.share();
    let again = guest::Mapping::map(s.memory_fd, s.memory_offset, s.memory_len)?;
    let (p, len) = again.as_ptr();
    let other = Shm { ptr: p, len };
    let seen = other.load(off);
    mem.store(off, old);
    if back != 0x1234_5678_9abc_def0 {
        return Err(io::Error::other("BAR2 read back differs from what was written"));
    }
    if seen != back {
        return Err(io::Error::other("share(): memory_fd maps other memory than BAR2"));
    }
    if dev.info().doorbell {
        // Ringing a peer id nobody has is dropped by QEMU: harmless, and proves the path.
        let fd = s.doorbell_fd.try_clone_to_owned()?;
        guest::Doorbell::from_shared(fd, s.doorbell_offset, s.doorbell_is_mmap)?.ring(u16::MAX, 0)?;
    }
    Ok(())
}

/// The shared memory of a device, accessed only through offsets (bounds- and
/// alignment-checked) and raw atomic/volatile accesses: the peer writes it concurrently.
struct Shm {
    ptr: *mut u8,
    len: usize,
}

impl Shm {
    fn of(dev: &Device) -> Shm {
        let (ptr, len) = dev.memory();
        Shm { ptr, len }
    }

    fn check(&self, off: usize, len: usize, align: usize) {
        assert!(
            off.is_multiple_of(align) && off.checked_add(len).is_some_and(|e| e <= self.len),
            "shm access out of range"
        );
    }

    fn atomic(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: in bounds and 8-aligned (checked; BAR2 is page-aligned), and the mapping lives
        // as long as the Device that `self` borrows from in every use below. An AtomicU64 may
        // be shared with other writers (another guest); any bit pattern is a valid u64.
        unsafe { AtomicU64::from_ptr(self.ptr.add(off).cast()) }
    }

    fn load(&self, off: usize) -> u64 {
        self.atomic(off).load(Ordering::Acquire)
    }

    fn store(&self, off: usize, v: u64) {
        self.atomic(off).store(v, Ordering::Release)
    }

    fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), 1);
        // SAFETY: the destination range is inside the mapping (checked) and cannot overlap
        // `src`, which is process memory; the peer may read it concurrently, which is what the
        // sequence numbers order.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) }
    }

    fn read(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len(), 1);
        // SAFETY: as for `write`, copying the other way; we never hold a reference into the
        // peer-writable range, only copy it out.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) }
    }
}

/// Byte layout of one ping-pong slot (offsets from the slot start).
mod slot {
    pub const SIZE: usize = 64 * 1024;
    pub const MAX_MSG: usize = 16 * 1024;
    /// Each side's hello: its peer id at +8, then the run nonce at +0 (written last).
    pub const HELLO_A: usize = 0;
    pub const HELLO_B: usize = 128;
    /// Sequence numbers: a's pings, b's pongs (cache lines of their own).
    pub const SEQ_A: usize = 256;
    pub const SEQ_B: usize = 384;
    pub const DATA_A: usize = 1024;
    pub const DATA_B: usize = DATA_A + MAX_MSG;
}

fn pick_device(which: &str) -> Result<DeviceInfo> {
    let devices = guest::find_devices().context("listing PCI devices")?;
    devices
        .into_iter()
        .find(|d| match which {
            "plain" => !d.doorbell,
            "doorbell" => d.doorbell,
            bdf => d.bdf == bdf,
        })
        .ok_or_else(|| anyhow!("no ivshmem device matching {which:?}"))
}

fn fill(buf: &mut [u8], seq: u64, side: u8) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in buf[8..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add(i as u8).wrapping_add(side);
    }
}

/// Where a ping-pong side runs: a guest's ivshmem device, or on the host the file that backs
/// an ivshmem-plain device.
enum Endpoint {
    Device(Device),
    File { path: String, map: guest::Mapping },
}

impl Endpoint {
    fn open(a: &PingArgs) -> Result<Endpoint> {
        if let Some(path) = &a.shm_file {
            ensure!(a.mode == Mode::Poll, "--shm-file has no doorbells: use --mode poll");
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let len = usize::try_from(f.metadata()?.len())?;
            let map = guest::Mapping::map(std::os::fd::AsFd::as_fd(&f), 0, len)
                .with_context(|| format!("mapping {}", path.display()))?;
            return Ok(Endpoint::File { path: path.display().to_string(), map });
        }
        let info = pick_device(&a.device)?;
        let access = match a.access {
            AccessArg::Sysfs => Access::Sysfs,
            AccessArg::Vfio => Access::Vfio,
        };
        ensure!(
            a.mode == Mode::Poll || (access == Access::Vfio && info.doorbell),
            "doorbell mode needs a doorbell device opened with --access vfio"
        );
        let dev =
            Device::open(&info, access).with_context(|| format!("opening {} ({access:?})", info.bdf))?;
        Ok(Endpoint::Device(dev))
    }

    fn shm(&self) -> Shm {
        let (ptr, len) = match self {
            Endpoint::Device(d) => d.memory(),
            Endpoint::File { map, .. } => map.as_ptr(),
        };
        Shm { ptr, len }
    }

    fn peer_id(&self) -> u16 {
        match self {
            Endpoint::Device(d) => d.peer_id(),
            Endpoint::File { .. } => 0,
        }
    }

    fn name(&self) -> &str {
        match self {
            Endpoint::Device(d) => &d.info().bdf,
            Endpoint::File { path, .. } => path,
        }
    }

    fn access(&self) -> &'static str {
        match self {
            Endpoint::Device(d) if d.access() == Access::Vfio => "Vfio",
            Endpoint::Device(_) => "Sysfs",
            Endpoint::File { .. } => "File",
        }
    }

    fn device(&self) -> Result<&Device> {
        match self {
            Endpoint::Device(d) => Ok(d),
            Endpoint::File { .. } => bail!("a file has no doorbells"),
        }
    }
}

fn pingpong(a: &PingArgs) -> Result<()> {
    ensure!((8..=slot::MAX_MSG).contains(&a.size), "--size must be 8..={}", slot::MAX_MSG);
    let end = Endpoint::open(a)?;
    let mem = end.shm();
    let access = end.access();
    let base = (a.slot + 1)
        .checked_mul(slot::SIZE)
        .and_then(|end| mem.len.checked_sub(end))
        .context("--slot beyond BAR2")?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    let nonce = a.run | 1; // never 0, the value of fresh memory
    let (my_hello, their_hello, my_seq, their_seq, my_data, their_data, side) = match a.role {
        Role::A => (slot::HELLO_A, slot::HELLO_B, slot::SEQ_A, slot::SEQ_B, slot::DATA_A, slot::DATA_B, 0u8),
        Role::B => (slot::HELLO_B, slot::HELLO_A, slot::SEQ_B, slot::SEQ_A, slot::DATA_B, slot::DATA_A, 1u8),
    };
    // Hello: our counters at zero, our peer id, then the nonce (release orders the rest).
    mem.store(base + my_seq, 0);
    mem.store(base + my_hello + 8, u64::from(end.peer_id()));
    mem.store(base + my_hello, nonce);
    // The peer may be seconds away (still booting, or in an earlier step): sleep between
    // checks so that waiting burns no core the others need.
    while mem.load(base + their_hello) != nonce {
        ensure!(Instant::now() < deadline, "timed out waiting for the peer's hello");
        std::thread::sleep(Duration::from_millis(1));
    }
    let peer = u16::try_from(mem.load(base + their_hello + 8)).context("peer id out of range")?;
    if a.mode == Mode::Doorbell {
        ensure!(peer != end.peer_id(), "peer reports our own peer id {peer}");
        // Drain wakeups left from the handshake or a previous run.
        while end.device()?.wait(0, Some(Duration::ZERO))? > 0 {}
    }
    marker(format_args!(
        "pingpong-start role={:?} at={} self={} peer={peer} mode={:?} access={}",
        a.role,
        end.name(),
        end.peer_id(),
        a.mode,
        access
    ));

    let mut out = vec![0u8; a.size];
    let mut got = vec![0u8; a.size];
    let mut expect = vec![0u8; a.size];
    let mut rtts = Vec::with_capacity(a.count as usize);
    let mut errors = 0u64;
    let mut wakeups = 0u64;
    let wait_seq = |seq: u64, wakeups: &mut u64| -> Result<()> {
        match a.mode {
            Mode::Poll => wait_until(deadline, || mem.load(base + their_seq) >= seq),
            Mode::Doorbell => loop {
                if mem.load(base + their_seq) >= seq {
                    return Ok(());
                }
                let left =
                    deadline.checked_duration_since(Instant::now()).ok_or_else(|| anyhow!("timed out"))?;
                *wakeups += end.device()?.wait(0, Some(left))?;
            },
        }
    };
    let start = Instant::now();
    for seq in 1..=u64::from(a.count) {
        let t0 = Instant::now();
        if a.role == Role::A {
            fill(&mut out, seq, side);
            mem.write(base + my_data, &out);
            fence(Ordering::Release);
            mem.store(base + my_seq, seq);
            if a.mode == Mode::Doorbell {
                end.device()?.ring(peer, 0)?;
            }
        }
        wait_seq(seq, &mut wakeups).with_context(|| format!("waiting for message {seq}"))?;
        mem.read(base + their_data, &mut got);
        fill(&mut expect, seq, 1 - side);
        if got != expect {
            errors += 1;
        }
        if a.role == Role::B {
            fill(&mut out, seq, side);
            mem.write(base + my_data, &out);
            mem.store(base + my_seq, seq);
            if a.mode == Mode::Doorbell {
                end.device()?.ring(peer, 0)?;
            }
        } else {
            rtts.push(t0.elapsed());
        }
    }
    let total = start.elapsed();
    let stats = if rtts.is_empty() { String::new() } else { latency_fields(&mut rtts) };
    marker(format_args!(
        "pingpong role={:?} mode={:?} access={access} slot={} size={} count={} errors={errors} wakeups={wakeups} secs={:.3} {stats}",
        a.role,
        a.mode,
        a.slot,
        a.size,
        a.count,
        total.as_secs_f64()
    ));
    ensure!(errors == 0, "{errors} messages arrived corrupted");
    Ok(())
}

/// Spins (with a bounded deadline) until `cond` holds.
fn wait_until(deadline: Instant, mut cond: impl FnMut() -> bool) -> Result<()> {
    let mut spins = 0u32;
    loop {
        if cond() {
            return Ok(());
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) && Instant::now() > deadline {
            bail!("timed out");
        }
        std::hint::spin_loop();
    }
}

/// `rtt_us_mean=.. rtt_us_p50=.. rtt_us_p99=.. rtt_us_min=..` (first 5% dropped as warm-up).
fn latency_fields(rtts: &mut Vec<Duration>) -> String {
    let warm = rtts.len() / 20;
    rtts.drain(..warm);
    rtts.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = rtts.iter().map(|d| us(*d)).sum::<f64>() / rtts.len() as f64;
    let pct = |p: usize| us(rtts[(rtts.len() - 1) * p / 100]);
    format!(
        "rtt_us_mean={mean:.1} rtt_us_p50={:.1} rtt_us_p99={:.1} rtt_us_min={:.1}",
        pct(50),
        pct(99),
        us(rtts[0])
    )
}

/// A fast deterministic byte stream (xorshift64*) both sides can agree on.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const OP_RTT: u8 = b'R';
const OP_BULK: u8 = b'B';
const OP_QUIT: u8 = b'Q';
/// Bytes per write call of the bulk transfer (the same as `ivcom vm-chan transfer`'s default).
const BULK_WRITE: usize = 64 * 1024;

fn tcp(a: &TcpArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    let timeout = Some(Duration::from_secs(a.timeout_secs));
    let mut s = match a.role {
        Role::B => {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, a.port)).context("binding the TCP listener")?;
            l.set_nonblocking(true)?;
            let s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(e).context("accepting the TCP connection"),
                }
            };
            s.set_nonblocking(false)?;
            s
        }
        Role::A => {
            let addr = SocketAddr::from((a.peer, a.port));
            loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
                }
            }
        }
    };
    s.set_nodelay(true)?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    match a.role {
        Role::A => tcp_client(&mut s, a),
        Role::B => tcp_server(&mut s),
    }
}

fn tcp_client(s: &mut TcpStream, a: &TcpArgs) -> Result<()> {
    let mut errors = 0u64;
    for &size in &a.sizes {
        ensure!(size > 0 && size <= 1 << 20, "round-trip sizes must be 1..=1MiB");
        let mut hdr = [0u8; 13];
        hdr[0] = OP_RTT;
        hdr[1..5].copy_from_slice(&(size as u32).to_le_bytes());
        hdr[5..9].copy_from_slice(&a.count.to_le_bytes());
        s.write_all(&hdr)?;
        let mut out = vec![0u8; size];
        let mut back = vec![0u8; size];
        let mut rtts = Vec::with_capacity(a.count as usize);
        let mut pat = Pattern(a.run | 1);
        for _ in 0..a.count {
            pat.fill(&mut out);
            let t0 = Instant::now();
            s.write_all(&out)?;
            s.read_exact(&mut back)?;
            rtts.push(t0.elapsed());
            if back != out {
                errors += 1;
            }
        }
        marker(format_args!(
            "tcp-rtt size={size} count={} errors={errors} {}",
            a.count,
            latency_fields(&mut rtts)
        ));
    }
    if a.bulk_mib > 0 {
        // Measured as `ivcom vm-chan transfer` measures a channel: the data is made before
        // the clock starts; the clock runs from the first write (the receiver has said it is
        // ready, its buffer allocated and touched) to the receiver's one-byte acknowledgement
        // that every byte is in its memory; then both sides hash, at the same time.
        let total = a.bulk_mib << 20;
        let t = Instant::now();
        let mut data = vec![0u8; usize::try_from(total)?];
        Pattern(a.run.wrapping_mul(31) | 1).fill(&mut data);
        let gen_secs = t.elapsed().as_secs_f64();
        let mut hdr = [0u8; 13];
        hdr[0] = OP_BULK;
        hdr[1..9].copy_from_slice(&total.to_le_bytes());
        s.write_all(&hdr)?;
        let mut ready = [0u8; 1];
        s.read_exact(&mut ready).context("waiting for the receiver to be ready")?;
        ensure!(ready[0] == b'R', "receiver said {:?}, not ready", ready[0]);
        let t0 = Instant::now();
        let mut writes = 0u64;
        for chunk in data.chunks(BULK_WRITE) {
            s.write_all(chunk)?;
            writes += 1;
        }
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).context("waiting for the receiver's acknowledgement")?;
        let secs = t0.elapsed().as_secs_f64();
        ensure!(ack[0] == b'K', "receiver acknowledged with {:?}", ack[0]);
        let t = Instant::now();
        let ours: [u8; 32] = Sha256::digest(&data).into();
        let hash_secs = t.elapsed().as_secs_f64();
        let mut theirs = [0u8; 32];
        s.read_exact(&mut theirs).context("reading the receiver's SHA-256")?;
        let matched = ours == theirs;
        marker(format_args!(
            "tcp-bulk-send bytes={total} write_size={BULK_WRITE} writes={writes} secs={secs:.3} mb_per_s={:.1} gen_secs={gen_secs:.3} hash_secs={hash_secs:.3} sha256={} peer_sha256={} match={}",
            total as f64 / secs / 1e6,
            hex(&ours),
            hex(&theirs),
            u8::from(matched)
        ));
        if !matched {
            errors += 1;
        }
    }
    s.write_all(&[OP_QUIT; 13])?;
    ensure!(errors == 0, "{errors} TCP integrity errors");
    Ok(())
}

fn tcp_server(s: &mut TcpStream) -> Result<()> {
    // A fixed number of commands at most, so a confused peer cannot keep us forever.
    for _ in 0..64 {
        let mut hdr = [0u8; 13];
        s.read_exact(&mut hdr).context("reading a command")?;
        match hdr[0] {
            OP_RTT => {
                let size = u32::from_le_bytes(hdr[1..5].try_into()?) as usize;
                let count = u32::from_le_bytes(hdr[5..9].try_into()?);
                ensure!(size > 0 && size <= 1 << 20, "bad size {size}");
                let mut buf = vec![0u8; size];
                for _ in 0..count {
                    s.read_exact(&mut buf)?;
                    s.write_all(&buf)?;
                }
                marker(format_args!("tcp-rtt-echo size={size} count={count}"));
            }
            OP_BULK => {
                let total = u64::from_le_bytes(hdr[1..9].try_into()?);
                ensure!(total <= 1 << 30, "bulk of {total} bytes refused (at most 1 GiB)");
                // Received into memory (pages touched before we say we are ready), acknowledged
                // at once, hashed afterwards: see the sender.
                let mut buf = vec![0u8; usize::try_from(total)?];
                for i in (0..buf.len()).step_by(4096) {
                    // SAFETY: i < len; volatile so the store that maps the page stays.
                    unsafe { std::ptr::write_volatile(buf.as_mut_ptr().add(i), 0) };
                }
                s.write_all(b"R")?;
                let mut got = 0usize;
                let mut t0 = None;
                while got < buf.len() {
                    let n = s.read(&mut buf[got..])?;
                    ensure!(n > 0, "connection closed with {} bulk bytes to go", buf.len() - got);
                    t0.get_or_insert_with(Instant::now);
                    got += n;
                }
                let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
                s.write_all(b"K")?;
                let th = Instant::now();
                let ours: [u8; 32] = Sha256::digest(&buf).into();
                let hash_secs = th.elapsed().as_secs_f64();
                s.write_all(&ours)?;
                marker(format_args!(
                    "tcp-bulk-recv bytes={total} secs={secs:.3} mb_per_s={:.1} hash_secs={hash_secs:.3} sha256={}",
                    total as f64 / secs.max(1e-9) / 1e6,
                    hex(&ours)
                ));
            }
            OP_QUIT => return Ok(()),
            op => bail!("unknown command byte {op}"),
        }
    }
    bail!("too many commands")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(role: Role, file: &std::path::Path, slot: usize) -> PingArgs {
        PingArgs {
            role,
            device: "plain".into(),
            shm_file: Some(file.to_path_buf()),
            access: AccessArg::Sysfs,
            mode: Mode::Poll,
            size: 4096,
            count: 500,
            slot,
            run: 7,
            timeout_secs: 30,
        }
    }

    /// The polled ping-pong between two threads on one file, as between two guests on one
    /// ivshmem-plain region: the handshake, sequence numbers and payload checks.
    #[test]
    fn pingpong_over_a_file() {
        let path = std::env::temp_dir().join(format!("ivcom-vmtest-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(256 * 1024).unwrap();
        let p = path.clone();
        let b = std::thread::spawn(move || pingpong(&args(Role::B, &p, 2)));
        let a = pingpong(&args(Role::A, &path, 2));
        let b = b.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        a.unwrap();
        b.unwrap();
    }

    #[test]
    fn doorbell_mode_needs_a_device() {
        let mut a = args(Role::A, std::path::Path::new("/nonexistent"), 0);
        a.mode = Mode::Doorbell;
        assert!(Endpoint::open(&a).is_err());
    }

    #[test]
    fn pattern_is_deterministic() {
        let (mut x, mut y) = (vec![0u8; 1001], vec![0u8; 1001]);
        Pattern(5).fill(&mut x);
        Pattern(5).fill(&mut y);
        assert_eq!(x, y);
        Pattern(6).fill(&mut y);
        assert_ne!(x, y);
    }

    #[test]
    fn latency_percentiles() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = latency_fields(&mut v);
        assert!(s.contains("rtt_us_min=6.0"), "{s}"); // the first 5% are warm-up
        assert!(s.contains("rtt_us_p99=99.0"), "{s}");
    }
}
