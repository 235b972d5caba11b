//! Shared-memory channels between programs on one host: processes, containers, and (with the
//! VM transport) virtual machines.
//!
//! A [`Listener`] has a name in a runtime directory; [`Stream::connect`] reaches it and the
//! two sides then share a memory region holding one ring per direction. Data never goes
//! through the kernel while both sides are busy; a side that waits polls for a short budget,
//! then announces sleep and sleeps on an eventfd that the other side signals only when told
//! to (event suppression).
//!
//! ```no_run
//! use std::io::{Read, Write};
//! let listener = ivcom::Listener::bind("echo")?;
//! std::thread::spawn(move || -> std::io::Result<()> {
//!     let mut s = listener.accept()?;
//!     let mut buf = [0u8; 5];
//!     s.read_exact(&mut buf)?;
//!     s.write_all(&buf)
//! });
//! let mut c = ivcom::Stream::connect("echo")?;
//! c.write_all(b"hello")?;
//! let mut back = [0u8; 5];
//! c.read_exact(&mut back)?;
//! assert_eq!(&back, b"hello");
//! # Ok::<(), std::io::Error>(())
//! ```

#![deny(missing_docs)]

mod config;
mod conn;
mod message;
mod rendezvous;
pub mod rundir;
mod signal;
mod stream;
pub mod sys;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod vm;
mod wait;

pub use config::{
    check_name, Access, Options, DEFAULT_CAPACITY, DEFAULT_MAX_CAPACITY, DEFAULT_MAX_MESSAGE, DEFAULT_SPIN,
    ENV_AGENT, ENV_CAPACITY, ENV_RUNTIME_DIR, ENV_SPIN_US,
};
pub use conn::Stats;
pub use message::{MessageListener, MessageStream};
pub use rendezvous::{Listener, HS_MAGIC, HS_VERSION};
pub use stream::{ReadHalf, Stream, WriteHalf};
