//! ivcom's shared region: the byte layout (version 1), the single-producer single-consumer
//! rings that live in it, and the directory of regions many members share. No I/O beyond
//! mapping a file ([`MappedRegion`]): kernel wakeup objects, rendezvous and the socket-like
//! API are in the `ivcom` crate.
//!
//! Everything a peer can write is read through [`shm::ShmRegion`] (bounds-checked offsets,
//! atomics or copies, never references) and validated where it is read.

#![deny(missing_docs)]

pub mod copy;
pub mod directory;
pub mod layout;
pub mod ring;
pub mod shm;

pub use layout::{Direction, LayoutError, Params, RingGeometry};
pub use ring::{
    ConsumerState, Ctrl, MessageReader, MessageWriter, ProducerState, RingError, ShmCtrl, StreamReader,
    StreamWriter,
};
pub use shm::{HeapRegion, MappedRegion, OutOfBounds, ShmRegion, SubRegion};
