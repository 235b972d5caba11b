//! Which descriptors the preload looks after. A flat array of flags answers "not ours" for
//! every other descriptor without a lock; the entries themselves sit behind a lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use libc::c_int;

use crate::announce::Listening;
use crate::conn::TcpConn;
use crate::epoll::EpollSet;

/// Descriptors at or above this number are never accelerated (they stay plain TCP).
pub const MAX_FD: usize = 1 << 16;

static FLAGS: [AtomicU8; MAX_FD] = [const { AtomicU8::new(0) }; MAX_FD];
static TABLE: RwLock<BTreeMap<c_int, Entry>> = RwLock::new(BTreeMap::new());

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

/// Whether `fd` may be ours (no lock taken).
#[inline]
pub fn tracked(fd: c_int) -> bool {
    slot(fd).is_some_and(|f| f.load(Ordering::Relaxed) != 0)
}

/// The entry of `fd`.
#[inline]
pub fn get(fd: c_int) -> Option<Entry> {
    if !tracked(fd) {
        return None;
    }
    TABLE.read().unwrap_or_else(|e| e.into_inner()).get(&fd).cloned()
}

/// The connection of `fd`, unless it runs as plain TCP.
#[inline]
pub fn conn(fd: c_int) -> Option<Arc<TcpConn>> {
    match get(fd) {
        Some(Entry::Conn(c)) if !c.is_plain() => Some(c),
        _ => None,
    }
}

/// Records `fd` (which must be below [`MAX_FD`]); returns false if it is out of range.
pub fn set(fd: c_int, e: Entry) -> bool {
    let Some(f) = slot(fd) else { return false };
    TABLE.write().unwrap_or_else(|e| e.into_inner()).insert(fd, e);
    f.store(1, Ordering::Relaxed);
    true
}

/// Forgets `fd` (it was closed). The entry is dropped after the lock is released.
pub fn remove(fd: c_int) -> Option<Entry> {
    let f = slot(fd)?;
    if f.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let e = {
        let mut t = TABLE.write().unwrap_or_else(|e| e.into_inner());
        f.store(0, Ordering::Relaxed);
        t.remove(&fd)
    };
    if let Some(Entry::Conn(_)) = &e {
        for set in epoll_sets() {
            set.forget(fd);
        }
    }
    e
}

/// `new` now refers to what `old` refers to (after `dup2`/`F_DUPFD`).
pub fn copy(old: c_int, new: c_int) {
    let dropped = remove(new);
    if let Some(e) = get(old) {
        set(new, e);
    }
    drop(dropped);
}

/// Every epoll instance we track.
pub fn epoll_sets() -> Vec<Arc<EpollSet>> {
    TABLE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter_map(|e| match e {
            Entry::Epoll(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// Every announced listener (at exit, to withdraw the announcements).
pub fn drain_listeners() -> Vec<Arc<Listening>> {
    let mut t = TABLE.write().unwrap_or_else(|e| e.into_inner());
    let fds: Vec<c_int> =
        t.iter().filter(|(_, e)| matches!(e, Entry::Listener(_))).map(|(fd, _)| *fd).collect();
    fds.into_iter()
        .filter_map(|fd| {
            if let Some(f) = slot(fd) {
                f.store(0, Ordering::Relaxed);
            }
            match t.remove(&fd) {
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
