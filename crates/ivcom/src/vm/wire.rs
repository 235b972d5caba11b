//! The local protocol between a process and its agent, over a Unix seqpacket socket
//! (`docs/protocols.md`, "agent protocol"). Every packet starts with the magic `IVAG`, a u16
//! version and a u16 kind; integers are little-endian.
//!
//! - `BIND` (process to agent): u16 name length, name. Answer `OK` or `ERROR`; after `OK` the
//!   agent sends one `CHANNEL` per accepted connection on the same socket until it closes.
//! - `CONNECT`: u32 timeout in ms, u16 name length, name. Answer `CHANNEL` or `ERROR`.
//! - `ERROR`: i32 errno, then a UTF-8 message.
//! - `CHANNEL`: u8 role (0 connector, 1 listener), u8 doorbell kind (0 eventfd, 1 pwrite,
//!   2 mmio, 3 none), u16 zero, u32 doorbell value, u64 memory offset, u64 memory length, u64
//!   doorbell offset, u64 doorbell mapping length, u32 peer id; descriptors: memory, liveness
//!   socket, data eventfd, space eventfd, and the doorbell's unless its kind is none.

use std::io;

/// `b"IVAG"` as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"IVAG");
/// Agent protocol version.
pub const VERSION: u16 = 1;

/// Packet kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// `BIND`.
    Bind = 1,
    /// `CONNECT`.
    Connect = 2,
    /// `OK`.
    Ok = 3,
    /// `ERROR`.
    Error = 4,
    /// `CHANNEL`.
    Channel = 5,
}

/// Largest packet.
pub const MAX_PACKET: usize = 512;

/// A decoded packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Process to agent: listen on `name`.
    Bind {
        /// Listener name.
        name: String,
    },
    /// Process to agent: connect to the listener `name`, answering within `timeout_ms`.
    Connect {
        /// How long the agent may wait for the listener's answer, in milliseconds.
        timeout_ms: u32,
        /// Listener name.
        name: String,
    },
    /// Agent to process: the bind succeeded.
    Ok,
    /// Agent to process: the request failed (or was refused).
    Error {
        /// An errno value (`EACCES` for a process the agent's policy does not admit).
        errno: i32,
        /// What went wrong, for people.
        message: String,
    },
    /// Agent to process: a channel; its descriptors come with the packet.
    Channel(Channel),
}

/// Where a channel lives and how to ring its peer; the descriptors travel beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel {
    /// We are the listener's side (else the connector's).
    pub listener_side: bool,
    /// 0 eventfd, 1 pwrite, 2 mmio, 3 none.
    pub doorbell_kind: u8,
    /// Value written to ring the peer (pwrite and mmio doorbells).
    pub doorbell_value: u32,
    /// Offset of the channel's slot in the memory descriptor, in bytes.
    pub mem_offset: u64,
    /// Length of the slot, in bytes.
    pub mem_len: u64,
    /// Offset of the doorbell register in the doorbell descriptor, in bytes.
    pub doorbell_offset: u64,
    /// Length to map of the doorbell descriptor (mmio doorbells), in bytes.
    pub doorbell_map_len: u64,
    /// The peer's member index.
    pub peer: u32,
}

fn head(kind: Kind) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&MAGIC.to_le_bytes());
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&(kind as u16).to_le_bytes());
    v
}

fn put_name(v: &mut Vec<u8>, name: &str) {
    v.extend_from_slice(&(name.len() as u16).to_le_bytes());
    v.extend_from_slice(name.as_bytes());
}

impl Packet {
    /// Encodes the packet.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Packet::Bind { name } => {
                let mut v = head(Kind::Bind);
                put_name(&mut v, name);
                v
            }
            Packet::Connect { timeout_ms, name } => {
                let mut v = head(Kind::Connect);
                v.extend_from_slice(&timeout_ms.to_le_bytes());
                put_name(&mut v, name);
                v
            }
            Packet::Ok => head(Kind::Ok),
            Packet::Error { errno, message } => {
                let mut v = head(Kind::Error);
                v.extend_from_slice(&errno.to_le_bytes());
                let m = message.as_bytes();
                v.extend_from_slice(&m[..m.len().min(MAX_PACKET - 16)]);
                v
            }
            Packet::Channel(c) => {
                let mut v = head(Kind::Channel);
                v.push(u8::from(c.listener_side));
                v.push(c.doorbell_kind);
                v.extend_from_slice(&0u16.to_le_bytes());
                v.extend_from_slice(&c.doorbell_value.to_le_bytes());
                for x in [c.mem_offset, c.mem_len, c.doorbell_offset, c.doorbell_map_len] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
                v.extend_from_slice(&c.peer.to_le_bytes());
                v
            }
        }
    }

    /// Decodes a packet; anything malformed is `InvalidData` naming what was wrong.
    pub fn decode(b: &[u8]) -> io::Result<Self> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("agent protocol: {what}"));
        let mut r = Reader { b, at: 0 };
        let magic = r.u32().ok_or_else(|| bad("short packet"))?;
        if magic != MAGIC {
            return Err(bad("bad magic"));
        }
        let version = r.u16().ok_or_else(|| bad("short packet"))?;
        if version != VERSION {
            return Err(bad(&format!("version {version}, this build speaks {VERSION}")));
        }
        let kind = r.u16().ok_or_else(|| bad("short packet"))?;
        let name = |r: &mut Reader<'_>| -> io::Result<String> {
            let len = r.u16().ok_or_else(|| bad("short name"))? as usize;
            let bytes = r.take(len).ok_or_else(|| bad("short name"))?;
            String::from_utf8(bytes.to_vec()).map_err(|_| bad("name is not UTF-8"))
        };
        let p = match kind {
            1 => Packet::Bind { name: name(&mut r)? },
            2 => {
                let timeout_ms = r.u32().ok_or_else(|| bad("short connect"))?;
                Packet::Connect { timeout_ms, name: name(&mut r)? }
            }
            3 => Packet::Ok,
            4 => {
                let errno = r.u32().ok_or_else(|| bad("short error"))? as i32;
                let message = String::from_utf8_lossy(r.rest()).into_owned();
                Packet::Error { errno, message }
            }
            5 => {
                let short = || bad("short channel");
                let side = r.take(1).ok_or_else(short)?[0];
                let doorbell_kind = r.take(1).ok_or_else(short)?[0];
                r.u16().ok_or_else(short)?;
                let doorbell_value = r.u32().ok_or_else(short)?;
                let mem_offset = r.u64().ok_or_else(short)?;
                let mem_len = r.u64().ok_or_else(short)?;
                let doorbell_offset = r.u64().ok_or_else(short)?;
                let doorbell_map_len = r.u64().ok_or_else(short)?;
                let peer = r.u32().ok_or_else(short)?;
                if side > 1 || doorbell_kind > 3 {
                    return Err(bad("bad channel role or doorbell kind"));
                }
                Packet::Channel(Channel {
                    listener_side: side == 1,
                    doorbell_kind,
                    doorbell_value,
                    mem_offset,
                    mem_len,
                    doorbell_offset,
                    doorbell_map_len,
                    peer,
                })
            }
            k => return Err(bad(&format!("unknown packet kind {k}"))),
        };
        Ok(p)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at.min(self.b.len())..];
        self.at = self.b.len();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_and_garbage_is_refused() {
        let c = Channel {
            listener_side: true,
            doorbell_kind: 1,
            doorbell_value: 0x10000,
            mem_offset: 1 << 40,
            mem_len: 135168,
            doorbell_offset: 12,
            doorbell_map_len: 0,
            peer: 3,
        };
        for p in [
            Packet::Bind { name: "echo".into() },
            Packet::Connect { timeout_ms: 5000, name: "a.b-c_d".into() },
            Packet::Ok,
            Packet::Error { errno: 111, message: "no listener".into() },
            Packet::Channel(c),
        ] {
            assert_eq!(Packet::decode(&p.encode()).unwrap(), p);
        }
        let good = Packet::Channel(c).encode();
        for n in 0..good.len() {
            assert!(Packet::decode(&good[..n]).is_err(), "truncated to {n} bytes");
        }
        let mut v = good.clone();
        v[4] = 9;
        assert!(Packet::decode(&v).is_err());
    }
}
