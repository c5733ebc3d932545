//! Stream multiplexing: yamux, speaking `/yamux/1.0.0` like every libp2p
//! peer, with frames as large as a circuit cell.
//!
//! libp2p's own yamux upgrade fixes yamux's 16 KiB split size, so a 64 KiB
//! cell left a hop as four frames plus one for its 9-byte header: five
//! trips through the muxer, the link's write buffer and TLS, and up to five
//! wakeups of the next hop. Here a stream write of up to [`FRAME_BYTES`] is
//! one frame, so a cell written with its header in one piece is one frame.
//! The wire format is yamux's: a frame's size is the sender's choice within
//! the receiver's window (256 KiB per stream to start with), so peers on
//! libp2p's own yamux read these frames as they read any other.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::{ready, AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

/// The largest frame a stream write becomes: a cell and its circuit header,
/// with room to spare.
pub const FRAME_BYTES: usize = 66 * 1024;
/// Inbound streams held for the swarm before new ones are refused (yamux's
/// own backlog of unacknowledged streams).
const MAX_WAITING_INBOUND: usize = 256;

/// The upgrade: `/yamux/1.0.0` with [`FRAME_BYTES`] frames.
#[derive(Clone, Debug)]
pub struct Yamux {
    config: yamux::Config,
}

impl Yamux {
    /// At most `max_streams` streams open at once on one connection.
    pub fn new(max_streams: usize) -> Self {
        let mut config = yamux::Config::default();
        config.set_max_num_streams(max_streams);
        config.set_split_send_size(FRAME_BYTES);
        Self { config }
    }

    fn muxer<C>(&self, io: C, mode: yamux::Mode) -> Muxer<C>
    where
        C: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        Muxer {
            connection: yamux::Connection::new(io, self.config.clone(), mode),
            waiting: VecDeque::new(),
            inbound_waker: None,
        }
    }
}

impl UpgradeInfo for Yamux {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = futures::future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        futures::future::ready(Ok(self.muxer(io, yamux::Mode::Server)))
    }
}

impl<C> OutboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = futures::future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        futures::future::ready(Ok(self.muxer(io, yamux::Mode::Client)))
    }
}

/// One multiplexed connection.
pub struct Muxer<C> {
    connection: yamux::Connection<C>,
    /// Inbound streams that arrived while the swarm drove the connection
    /// through [`StreamMuxer::poll`], until it asks for them.
    waiting: VecDeque<Stream>,
    inbound_waker: Option<Waker>,
}

/// A connection failed.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct MuxError(#[from] yamux::ConnectionError);

impl<C> Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
{
    /// Drives the connection until the remote opens a stream.
    fn poll_next_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Result<Stream, MuxError>> {
        match ready!(self.connection.poll_next_inbound(cx)) {
            Some(Ok(s)) => Poll::Ready(Ok(Stream(s))),
            Some(Err(e)) => Poll::Ready(Err(e.into())),
            None => Poll::Ready(Err(yamux::ConnectionError::Closed.into())),
        }
    }
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Substream = Stream;
    type Error = MuxError;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Stream, MuxError>> {
        if let Some(s) = self.waiting.pop_front() {
            return Poll::Ready(Ok(s));
        }
        if let Poll::Ready(r) = self.poll_next_inbound(cx) {
            return Poll::Ready(r);
        }
        self.inbound_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Stream, MuxError>> {
        let s = ready!(self.connection.poll_new_outbound(cx))?;
        Poll::Ready(Ok(Stream(s)))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), MuxError>> {
        self.connection.poll_close(cx).map_err(MuxError)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, MuxError>> {
        let this = self.get_mut();
        let s = ready!(this.poll_next_inbound(cx))?;
        if this.waiting.len() < MAX_WAITING_INBOUND {
            this.waiting.push_back(s);
            if let Some(w) = this.inbound_waker.take() {
                w.wake();
            }
        } else {
            tracing::debug!(event = "inbound_stream_dropped", reason = "backlog full");
        }
        // Come back at once: the connection may have more to do.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// One stream of a [`Muxer`].
#[derive(Debug)]
pub struct Stream(yamux::Stream);

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }

    fn poll_read_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read_vectored(cx, bufs)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use futures::AsyncWriteExt;

    use super::*;

    /// A connection that never receives and records what is written.
    #[derive(Clone, Default)]
    struct Wire {
        sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Wire {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Wire {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.sent.lock().expect("lock").extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The lengths of the data frames (yamux type 0) in `bytes`.
    fn data_frames(mut bytes: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        while bytes.len() >= 12 {
            let kind = bytes[1];
            let len = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
            let body = if kind == 0 { len } else { 0 };
            if kind == 0 {
                out.push(len);
            }
            bytes = &bytes[12 + body..];
        }
        out
    }

    #[test]
    fn a_write_of_a_cell_frame_is_one_yamux_frame() {
        futures::executor::block_on(async {
            let wire = Wire::default();
            let mut m = Yamux::new(8).muxer(wire.clone(), yamux::Mode::Client);
            let mut s = poll_fn(|cx| Pin::new(&mut m).poll_outbound(cx))
                .await
                .expect("a stream");
            let cell_frame = 9 + 64 * 1024;
            let write = async {
                s.write_all(&vec![7u8; cell_frame]).await?;
                s.write_all(&vec![8u8; FRAME_BYTES + 1]).await?;
                s.flush().await
            };
            // The connection writes frames only while it is driven.
            let drive = poll_fn(|cx| {
                let _ = Pin::new(&mut m).poll(cx);
                Poll::<()>::Pending
            });
            futures::pin_mut!(write, drive);
            match futures::future::select(write, drive).await {
                futures::future::Either::Left((r, _)) => r.expect("written"),
                futures::future::Either::Right(_) => unreachable!("driving never ends"),
            }
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            for _ in 0..8 {
                let _ = Pin::new(&mut m).poll(&mut cx);
            }
            let sent = wire.sent.lock().expect("lock");
            assert_eq!(data_frames(&sent), vec![cell_frame, FRAME_BYTES, 1]);
        });
    }
}
