//! The logic of ivcom's preload library (`libivcom_preload.so`, loaded by `ivcom run`):
//! TCP connections between two programs that both run under ivcom on the same host are
//! carried over shared-memory channels; every other connection, socket and descriptor goes to
//! the kernel unchanged. See `docs/preload.md` for what is intercepted, what falls back, and
//! the limits.
//!
//! - [`announce`]: listeners announce themselves in the runtime directory; connectors find
//!   them and register a channel before the TCP handshake.
//! - [`conn`]: the data path of one connection and the TCP handoff.
//! - [`wait`], [`epoll`]: blocking, `poll`/`select` and `epoll` over shared memory and the kernel.
//! - [`exec`]: what of a connection crosses `exec` and `posix_spawn` (only to an image that
//!   continues under the library).
//! - [`fds`]: descriptors made or closed behind the table's back.
//! - [`signals`]: the program's signal handlers, counted so that waits end as the kernel's.
//! - [`ops`]: the intercepted calls, as the shim library exports them.

pub mod announce;
pub mod conn;
pub mod epoll;
pub mod exec;
pub mod fds;
pub mod net;
pub mod ops;
pub mod real;
pub mod settings;
pub mod signals;
pub mod table;
pub mod verify;
pub mod wait;
