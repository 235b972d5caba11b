//! Which descriptors the preload looks after. A flat array of flags answers "not ours" for
//! every other descriptor without a lock; the entries themselves sit behind a lock.
//!
//! A descriptor number is not an identity: the program may close a socket behind the
//! library's back (`fclose` of an `fdopen`ed socket closes through a C library internal) and
//! get the number back for a file. Each entry therefore records the device and inode of what
//! it was made for ([`Ident`]); callers compare them where a system call is cheap or made
//! anyway ([`verify`]: `close`, `dup`, exec, entering a blocking wait), and every
//! intercepted call that returns a new descriptor drops an entry still recorded at that number
//! ([`forget_stale`]): the kernel only hands out free numbers, so our socket there is gone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use libc::c_int;

use crate::announce::Listening;
use crate::conn::TcpConn;
use crate::epoll::EpollSet;

/// Descriptors at or above this number are never accelerated (they stay plain TCP).
pub const MAX_FD: usize = 1 << 16;

static FLAGS: [AtomicU8; MAX_FD] = [const { AtomicU8::new(0) }; MAX_FD];
static TABLE: RwLock<BTreeMap<c_int, Slot>> = RwLock::new(BTreeMap::new());

/// What a descriptor referred to when it was recorded: `st_dev` and `st_ino` of its open
/// file (for a socket, the socket inode of `/proc/PID/fd/N -> socket:[INO]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ident {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl Ident {
    /// The identity of what `fd` refers to now; `None` if it is not open.
    pub fn of(fd: c_int) -> Option<Ident> {
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is only borrowed for this `fstat`; a closed number makes it fail.
        let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        rustix::fs::fstat(b).ok().map(|st| Ident { dev: st.st_dev, ino: st.st_ino })
    }
}

#[derive(Debug, Clone)]
struct Slot {
    entry: Entry,
    ident: Ident,
}

/// What a descriptor of ours is.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A TCP connection with a channel.
    Conn(Arc<TcpConn>),
    /// An announced listening socket.
    Listener(Arc<Listening>),
    /// An epoll instance watching some of our connections.
    Epoll(Arc<EpollSet>),
}

fn slot(fd: c_int) -> Option<&'static AtomicU8> {
    usize::try_from(fd).ok().and_then(|i| FLAGS.get(i))
}

/// Children started with `clone(CLONE_VM)` (not threads) that may still run in this
/// process's memory; never decremented for children without `CLONE_VFORK` (their end is
/// not observable).
static VM_CHILDREN: AtomicU32 = AtomicU32::new(0);
/// This process's pid, recorded when a `CLONE_VM` child is started (and after `fork`).
static OWN_PID: AtomicI32 = AtomicI32::new(0);

/// A `clone(CLONE_VM)` child is about to start: until [`vm_child_done`], every call made in
/// a process other than this one ([`foreign`]) passes the table by.
pub fn vm_child_starting() {
    OWN_PID.store(rustix::process::getpid().as_raw_nonzero().get(), Ordering::SeqCst);
    VM_CHILDREN.fetch_add(1, Ordering::SeqCst);
}

/// A `CLONE_VFORK` child has exec'd or exited (its parent resumed).
pub fn vm_child_done() {
    VM_CHILDREN.fetch_sub(1, Ordering::SeqCst);
}

/// After `fork`, in the child: its own pid is the one that owns the table.
pub fn after_fork_in_child() {
    if VM_CHILDREN.load(Ordering::SeqCst) > 0 {
        OWN_PID.store(rustix::process::getpid().as_raw_nonzero().get(), Ordering::SeqCst);
    }
}

/// Whether the caller runs in another process's memory: a child of `clone(CLONE_VM)`
/// (e.g. a `posix_spawn`-style helper) shares our memory but has its own descriptor
/// table, so nothing it does may touch ours. Costs a load, and a `getpid` only while such a
/// child may be running.
#[inline]
pub fn foreign() -> bool {
    VM_CHILDREN.load(Ordering::Relaxed) > 0
        && rustix::process::getpid().as_raw_nonzero().get() != OWN_PID.load(Ordering::Relaxed)
}

/// Whether `fd` may be ours (no lock taken).
#[inline]
pub fn tracked(fd: c_int) -> bool {
    slot(fd).is_some_and(|f| f.load(Ordering::Relaxed) != 0) && !foreign()
}

/// The entry of `fd`.
#[inline]
pub fn get(fd: c_int) -> Option<Entry> {
    if !tracked(fd) {
        return None;
    }
    TABLE.read().unwrap_or_else(|e| e.into_inner()).get(&fd).map(|s| s.entry.clone())
}

/// The identity recorded for `fd`.
pub fn ident(fd: c_int) -> Option<Ident> {
    if !tracked(fd) {
        return None;
    }
    TABLE.read().unwrap_or_else(|e| e.into_inner()).get(&fd).map(|s| s.ident)
}

/// Whether `fd` still refers to what was recorded for it (one `fstat`). An entry whose
/// descriptor was closed or now refers to something else is dropped; returns false then, and
/// when `fd` is not tracked.
pub fn verify(fd: c_int) -> bool {
    let Some(want) = ident(fd) else { return false };
    if Ident::of(fd) == Some(want) {
        return true;
    }
    crate::decision!(
        "fd {fd} was closed behind the library's back (its number now refers to something else); forgotten"
    );
    drop(remove(fd));
    false
}

/// The kernel just returned `fd` as a new descriptor: whatever was recorded at that number
/// was closed behind our back. Drops it (no system call).
#[inline]
pub fn forget_stale(fd: c_int) {
    if tracked(fd) {
        crate::decision!(
            "fd {fd} was closed behind the library's back (its number was handed out again); forgotten"
        );
        drop(remove(fd));
    }
}

/// [`forget_stale`] for every descriptor at or above `first` (after `closefrom`).
pub fn forget_from(first: c_int) {
    if foreign() {
        return;
    }
    let fds: Vec<c_int> = {
        let t = TABLE.read().unwrap_or_else(|e| e.into_inner());
        t.range(first.max(0)..).map(|(fd, _)| *fd).collect()
    };
    let dropped: Vec<Option<Entry>> = fds.into_iter().map(remove).collect();
    drop(dropped);
}

/// Every connection entry, plain ones included (after `fork`, all are shared).
pub fn all_conns() -> Vec<Arc<TcpConn>> {
    conn_entries(true).into_iter().map(|(_, c)| c).collect()
}

/// Every accelerated connection (not plain) with its descriptors, for `exec`.
pub fn conns() -> Vec<(c_int, Arc<TcpConn>)> {
    conn_entries(false)
}

fn conn_entries(plain_too: bool) -> Vec<(c_int, Arc<TcpConn>)> {
    if foreign() {
        return Vec::new();
    }
    TABLE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(fd, s)| match &s.entry {
            Entry::Conn(c) if plain_too || !c.is_plain() => Some((*fd, c.clone())),
            _ => None,
        })
        .collect()
}

/// The connection of `fd`, unless it runs as plain TCP.
#[inline]
pub fn conn(fd: c_int) -> Option<Arc<TcpConn>> {
    match get(fd) {
        Some(Entry::Conn(c)) if !c.is_plain() => Some(c),
        _ => None,
    }
}

/// Records `fd` (which must be below [`MAX_FD`]) with the identity of what it refers to now
/// (one `fstat`); returns false if it is out of range or not open.
pub fn set(fd: c_int, e: Entry) -> bool {
    if foreign() {
        return false;
    }
    let Some(f) = slot(fd) else { return false };
    let Some(ident) = Ident::of(fd) else { return false };
    set_with(f, fd, e, ident);
    true
}

fn set_with(f: &AtomicU8, fd: c_int, entry: Entry, ident: Ident) {
    if let Entry::Conn(c) = &entry {
        c.fd_added();
    }
    let old = TABLE.write().unwrap_or_else(|e| e.into_inner()).insert(fd, Slot { entry, ident });
    f.store(1, Ordering::Relaxed);
    if let Some(Slot { entry: e @ (Entry::Conn(_) | Entry::Epoll(_)), .. }) = old {
        forget_registrations(fd, &e);
    }
}

/// The program's epoll registrations of `fd`, which no longer refers to `e`: as in the
/// kernel, a registration lives as long as its open file does, so a connection's lives on
/// while another descriptor number of it is open (its `dup`), and goes with the last one.
fn forget_registrations(fd: c_int, e: &Entry) {
    match e {
        Entry::Conn(c) => {
            if c.fd_removed() {
                if c.shared() {
                    c.count_holder(false);
                }
                for set in epoll_sets() {
                    set.forget_conn(fd, c);
                }
            } else {
                let other =
                    TABLE.read().unwrap_or_else(|e| e.into_inner()).iter().find_map(|(k, s)| {
                        match &s.entry {
                            Entry::Conn(o) if Arc::ptr_eq(o, c) && *k != fd => Some(*k),
                            _ => None,
                        }
                    });
                if let Some(to) = other {
                    for set in epoll_sets() {
                        set.moved(fd, c, to);
                    }
                }
            }
        }
        Entry::Epoll(_) => {
            for set in epoll_sets() {
                set.forget(fd);
            }
        }
        Entry::Listener(_) => {}
    }
}

/// Forgets `fd` (it was closed). The entry is dropped after the lock is released.
pub fn remove(fd: c_int) -> Option<Entry> {
    let f = slot(fd)?;
    if f.load(Ordering::Relaxed) == 0 || foreign() {
        return None;
    }
    let e = {
        let mut t = TABLE.write().unwrap_or_else(|e| e.into_inner());
        f.store(0, Ordering::Relaxed);
        t.remove(&fd).map(|s| s.entry)
    };
    if let Some(e) = &e {
        forget_registrations(fd, e);
    }
    e
}

/// `new` now refers to what `old` refers to (after `dup2`/`F_DUPFD`). `old` is checked
/// first ([`verify`]) when it is tracked, so a stale entry is not copied.
pub fn copy(old: c_int, new: c_int) {
    if foreign() {
        return;
    }
    let dropped = remove(new);
    if tracked(old) && verify(old) {
        let s = TABLE.read().unwrap_or_else(|e| e.into_inner()).get(&old).cloned();
        if let (Some(s), Some(f)) = (s, slot(new)) {
            set_with(f, new, s.entry, s.ident);
        }
    }
    drop(dropped);
}

/// Every epoll instance we track.
pub fn epoll_sets() -> Vec<Arc<EpollSet>> {
    TABLE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter_map(|e| match &e.entry {
            Entry::Epoll(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// Every announced listener (at exit, to withdraw the announcements).
pub fn drain_listeners() -> Vec<Arc<Listening>> {
    let mut t = TABLE.write().unwrap_or_else(|e| e.into_inner());
    let fds: Vec<c_int> =
        t.iter().filter(|(_, e)| matches!(e.entry, Entry::Listener(_))).map(|(fd, _)| *fd).collect();
    fds.into_iter()
        .filter_map(|fd| {
            if let Some(f) = slot(fd) {
                f.store(0, Ordering::Relaxed);
            }
            match t.remove(&fd).map(|s| s.entry) {
                Some(Entry::Listener(l)) => Some(l),
                _ => None,
            }
        })
        .collect()
}

/// Runs `f` (the real `fork`) with the table locked, so the child does not inherit a lock
/// some other thread held mid-update.
pub fn around_fork<T>(f: impl FnOnce() -> T) -> T {
    let g = TABLE.write().unwrap_or_else(|e| e.into_inner());
    let r = f();
    drop(g);
    r
}
