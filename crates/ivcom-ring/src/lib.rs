//! ivcom's shared region: the byte layout (version 1) and the single-producer
//! single-consumer rings that live in it. No I/O: the region backends, kernel wakeup objects
//! and the socket-like API are in the `ivcom` crate.
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
pub use shm::{HeapRegion, OutOfBounds, ShmRegion, SubRegion};
