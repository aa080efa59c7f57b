//! Connection plumbing: the response body type (whole or streamed over a
//! channel) and a TCP wrapper that can abort its connection with a RST.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// One piece of a streamed body; an `Err` makes hyper abort the connection.
pub type StreamItem = Result<Bytes, io::Error>;

/// A response body: either complete (sent with `Content-Length`) or fed by a
/// producer task over a channel (sent chunked, one HTTP chunk per event).
pub enum MockBody {
    /// A complete body; `None` once sent.
    Full(Option<Bytes>),
    /// A streamed body; dropping it (client gone) closes the channel, which
    /// the producer notices.
    Channel(mpsc::Receiver<StreamItem>),
}

impl MockBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        MockBody::Full(Some(b.into()))
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Channel(_) => SizeHint::default(),
        }
    }
}

/// An accepted TCP connection whose `reset` flag, once set, fails every
/// further read and write and makes the close a RST (`SO_LINGER` 0) instead
/// of a FIN, as a provider crashing mid-stream would look to the gateway.
pub struct MockIo {
    tcp: TcpStream,
    reset: Arc<AtomicBool>,
}

impl MockIo {
    /// Wraps `tcp`; setting `reset` aborts the connection.
    pub fn new(tcp: TcpStream, reset: Arc<AtomicBool>) -> Self {
        MockIo { tcp, reset }
    }

    fn check(&self) -> io::Result<()> {
        if self.reset.load(Ordering::Relaxed) {
            Err(io::ErrorKind::ConnectionReset.into())
        } else {
            Ok(())
        }
    }
}

impl Drop for MockIo {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            // Zero linger: close() discards and sends RST without blocking.
            let _ = socket2::SockRef::from(&self.tcp).set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for MockIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.check()?;
        Pin::new(&mut me.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for MockIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        me.check()?;
        Pin::new(&mut me.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        me.check()?;
        Pin::new(&mut me.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.check()?;
        Pin::new(&mut me.tcp).poll_shutdown(cx)
    }
}
