//! tokio support (feature `tokio`): [`AsyncStream`] implements `AsyncRead` and `AsyncWrite`.
//!
//! The halves run in non-blocking mode; readiness comes from the pollable descriptors
//! (an epoll of the wakeup eventfd and the control socket), registered with tokio's reactor.
//! Connecting and accepting perform a short blocking handshake on tokio's blocking pool.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::tokio::io::unix::AsyncFd;
use ::tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::{Listener, Options, ReadHalf, Stats, Stream, WriteHalf};

/// The reading half of an [`AsyncStream`].
#[derive(Debug)]
pub struct AsyncReadHalf {
    inner: AsyncFd<ReadHalf>,
}

/// The writing half of an [`AsyncStream`].
#[derive(Debug)]
pub struct AsyncWriteHalf {
    inner: AsyncFd<WriteHalf>,
}

/// An async byte-stream channel.
#[derive(Debug)]
pub struct AsyncStream {
    rx: AsyncReadHalf,
    tx: AsyncWriteHalf,
}

impl AsyncStream {
    /// Wraps a connected stream; must be called within a tokio runtime.
    pub fn new(stream: Stream) -> io::Result<Self> {
        let (rx, tx) = stream.split();
        Ok(Self { rx: AsyncReadHalf::new(rx)?, tx: AsyncWriteHalf::new(tx)? })
    }

    /// Connects to the listener `name`.
    pub async fn connect(name: &str, opts: &Options) -> io::Result<Self> {
        let (name, opts) = (name.to_owned(), opts.clone());
        let s = ::tokio::task::spawn_blocking(move || Stream::connect_with(&name, &opts))
            .await
            .map_err(io::Error::other)??;
        Self::new(s)
    }

    /// Splits into halves usable from two tasks.
    pub fn into_split(self) -> (AsyncReadHalf, AsyncWriteHalf) {
        (self.rx, self.tx)
    }

    /// Counters of this endpoint.
    pub fn stats(&self) -> Stats {
        self.rx.inner.get_ref().stats()
    }
}

impl AsyncReadHalf {
    fn new(mut half: ReadHalf) -> io::Result<Self> {
        half.set_nonblocking(true);
        // SAFETY: the descriptor is the half's readiness epoll, owned by the connection the
        // half keeps alive; it stays open and unchanged for as long as the `AsyncFd` owns
        // the half.
        let inner = unsafe { AsyncFd::register_with_interest(half, Interest::READABLE) }?;
        Ok(Self { inner })
    }
}

impl AsyncWriteHalf {
    fn new(mut half: WriteHalf) -> io::Result<Self> {
        half.set_nonblocking(true);
        // SAFETY: as for `AsyncReadHalf::new`, with the write-readiness epoll (which polls
        // readable when a write may progress, hence the READABLE interest).
        let inner = unsafe { AsyncFd::register_with_interest(half, Interest::READABLE) }?;
        Ok(Self { inner })
    }
}

impl AsyncRead for AsyncReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Try first: the wakeup is armed only by a read that found nothing, so waiting for
            // readiness before any attempt could wait for a signal nobody will send.
            let unfilled = buf.initialize_unfilled();
            match this.inner.get_mut().read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            // Armed: the descriptor becomes readable once the peer publishes, closes or dies.
            let mut guard = ready!(this.inner.poll_read_ready_mut(cx))?;
            guard.clear_ready();
        }
    }
}

impl AsyncWrite for AsyncWriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.inner.get_mut().write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
            let mut guard = ready!(this.inner.poll_read_ready_mut(cx))?;
            guard.clear_ready();
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().inner.get_mut().shutdown())
    }
}

impl AsyncRead for AsyncStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().rx).poll_read(cx, buf)
    }
}

impl AsyncWrite for AsyncStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tx).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tx).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tx).poll_shutdown(cx)
    }
}

/// An async listener: accepts on tokio's blocking pool.
#[derive(Debug, Clone)]
pub struct AsyncListener {
    inner: Arc<Listener>,
}

impl AsyncListener {
    /// Listens on `name`.
    pub fn bind(name: &str, opts: &Options) -> io::Result<Self> {
        Ok(Self { inner: Arc::new(Listener::bind_with(name, opts)?) })
    }

    /// Waits for a connection.
    pub async fn accept(&self) -> io::Result<AsyncStream> {
        let l = self.inner.clone();
        let s = ::tokio::task::spawn_blocking(move || l.accept()).await.map_err(io::Error::other)??;
        AsyncStream::new(s)
    }
}
