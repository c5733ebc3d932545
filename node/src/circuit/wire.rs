//! Frames on a circuit stream.
//!
//! Each direct stream between adjacent hops carries one circuit. Every frame
//! starts with a kind byte and the link-local circuit id (u64 LE) and has a
//! size fixed by its kind, so a reader never allocates what a peer claims:
//!
//! ```text
//! SETUP    1 | cid | epoch u64 | onion packet (SETUP_PACKET_BYTES)   downstream
//! CELL     2 | cid | cell (CELL_BYTES)                                downstream
//! ERROR    3 | cid | len u16 | sealed report (<= MAX_ERROR_BYTES)     upstream
//! TEARDOWN 4 | cid                                                    downstream
//! ```

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use mixnn_crypto::cells::CELL_BYTES;
use mixnn_crypto::onion::SETUP_PACKET_BYTES;
use thiserror::Error;

pub const HEADER_BYTES: usize = 9;
/// A cell frame: header and cell, written in one piece so that the link
/// carries it as one multiplexer frame.
pub const CELL_FRAME_BYTES: usize = HEADER_BYTES + CELL_BYTES;
const _: () = assert!(CELL_FRAME_BYTES <= crate::network::mux::FRAME_BYTES);
/// Largest sealed error report.
pub const MAX_ERROR_BYTES: usize = 1024;

const SETUP: u8 = 1;
const CELL: u8 = 2;
const ERROR: u8 = 3;
const TEARDOWN: u8 = 4;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("stream closed")]
    Closed,
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame for circuit {got} on the stream of circuit {expected}")]
    WrongCircuit { expected: u64, got: u64 },
    #[error("error report of {0} bytes exceeds the limit")]
    ErrorTooLarge(usize),
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
}

/// What a frame carries; the bytes themselves stay in the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// `epoch` of the key the packet is sealed to; packet in the buffer.
    Setup {
        epoch: u64,
    },
    /// Cell bytes in the buffer.
    Cell,
    /// Sealed report in the buffer.
    Error,
    Teardown,
}

impl FrameKind {
    pub fn name(&self) -> &'static str {
        match self {
            FrameKind::Setup { .. } => "setup",
            FrameKind::Cell => "cell",
            FrameKind::Error => "error",
            FrameKind::Teardown => "teardown",
        }
    }
}

/// Read one frame. Its body is left in `buf` (resized to the body length).
/// Returns the circuit id and kind; a clean end of stream before a frame is
/// [`WireError::Closed`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(u64, FrameKind), WireError> {
    read(r, buf, false).await
}

/// [`read_frame`] for a relay: a cell is left in `buf` as a whole cell
/// frame, header in front, for [`write_cell_frame`] to send on under the
/// next link's circuit id. Other frames are left as [`read_frame`] leaves
/// them.
pub async fn read_relay_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(u64, FrameKind), WireError> {
    read(r, buf, true).await
}

async fn read<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    keep_cell_header: bool,
) -> Result<(u64, FrameKind), WireError> {
    let mut head = [0u8; HEADER_BYTES];
    match r.read_exact(&mut head).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let cid = u64::from_le_bytes(head[1..9].try_into().map_err(|_| WireError::Closed)?);
    match head[0] {
        SETUP => {
            let mut epoch = [0u8; 8];
            r.read_exact(&mut epoch).await?;
            buf.resize(SETUP_PACKET_BYTES, 0);
            r.read_exact(buf).await?;
            Ok((
                cid,
                FrameKind::Setup {
                    epoch: u64::from_le_bytes(epoch),
                },
            ))
        }
        CELL if keep_cell_header => {
            buf.resize(CELL_FRAME_BYTES, 0);
            buf[..HEADER_BYTES].copy_from_slice(&head);
            r.read_exact(&mut buf[HEADER_BYTES..]).await?;
            Ok((cid, FrameKind::Cell))
        }
        CELL => {
            buf.resize(CELL_BYTES, 0);
            r.read_exact(buf).await?;
            Ok((cid, FrameKind::Cell))
        }
        ERROR => {
            let mut len = [0u8; 2];
            r.read_exact(&mut len).await?;
            let len = u16::from_le_bytes(len) as usize;
            if len > MAX_ERROR_BYTES {
                return Err(WireError::ErrorTooLarge(len));
            }
            buf.resize(len, 0);
            r.read_exact(buf).await?;
            Ok((cid, FrameKind::Error))
        }
        TEARDOWN => {
            buf.clear();
            Ok((cid, FrameKind::Teardown))
        }
        k => Err(WireError::UnknownKind(k)),
    }
}

/// The cell of a cell frame (see [`CELL_FRAME_BYTES`]).
pub fn cell_of(frame: &[u8]) -> &[u8] {
    &frame[HEADER_BYTES..]
}

/// The cell of a cell frame, to seal into.
pub fn cell_of_mut(frame: &mut [u8]) -> &mut [u8] {
    &mut frame[HEADER_BYTES..]
}

fn header(kind: u8, cid: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0] = kind;
    h[1..].copy_from_slice(&cid.to_le_bytes());
    h
}

pub async fn write_setup<W: AsyncWrite + Unpin>(
    w: &mut W,
    cid: u64,
    epoch: u64,
    packet: &[u8],
) -> Result<(), WireError> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + 8 + packet.len());
    frame.extend_from_slice(&header(SETUP, cid));
    frame.extend_from_slice(&epoch.to_le_bytes());
    frame.extend_from_slice(packet);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Write one cell frame (`CELL_FRAME_BYTES`: room for the header, then
/// the cell) under circuit `cid`, in one write; the caller flushes after
/// the last cell of a message.
pub async fn write_cell_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    cid: u64,
    frame: &mut [u8],
) -> Result<(), WireError> {
    debug_assert_eq!(frame.len(), CELL_FRAME_BYTES);
    frame[..HEADER_BYTES].copy_from_slice(&header(CELL, cid));
    w.write_all(frame).await?;
    Ok(())
}

/// Write every cell frame in `frames` (a multiple of `CELL_FRAME_BYTES`)
/// and flush.
pub async fn write_cell_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    cid: u64,
    frames: &mut [u8],
) -> Result<(), WireError> {
    for frame in frames.chunks_mut(CELL_FRAME_BYTES) {
        write_cell_frame(w, cid, frame).await?;
    }
    w.flush().await?;
    Ok(())
}

pub async fn write_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    cid: u64,
    report: &[u8],
) -> Result<(), WireError> {
    if report.len() > MAX_ERROR_BYTES {
        return Err(WireError::ErrorTooLarge(report.len()));
    }
    let mut frame = Vec::with_capacity(HEADER_BYTES + 2 + report.len());
    frame.extend_from_slice(&header(ERROR, cid));
    frame.extend_from_slice(&(report.len() as u16).to_le_bytes());
    frame.extend_from_slice(report);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

pub async fn write_teardown<W: AsyncWrite + Unpin>(w: &mut W, cid: u64) -> Result<(), WireError> {
    w.write_all(&header(TEARDOWN, cid)).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::io::Cursor;

    #[test]
    fn frames_round_trip() {
        block_on(async {
            let mut out = Cursor::new(Vec::new());
            write_setup(&mut out, 7, 3, &vec![9u8; SETUP_PACKET_BYTES])
                .await
                .expect("setup");
            write_cell_frames(&mut out, 7, &mut vec![1u8; 3 * CELL_FRAME_BYTES])
                .await
                .expect("cells");
            write_error(&mut out, 7, b"boom").await.expect("error");
            write_teardown(&mut out, 7).await.expect("teardown");
            let mut r = Cursor::new(out.into_inner());
            let mut buf = Vec::new();
            assert_eq!(
                read_frame(&mut r, &mut buf).await.expect("f").1,
                FrameKind::Setup { epoch: 3 }
            );
            assert_eq!(buf.len(), SETUP_PACKET_BYTES);
            for _ in 0..2 {
                assert_eq!(
                    read_frame(&mut r, &mut buf).await.expect("f"),
                    (7, FrameKind::Cell)
                );
                assert!(buf.iter().all(|&b| b == 1));
            }
            // A relay keeps the frame whole, header in front.
            let mut frame = Vec::new();
            assert_eq!(
                read_relay_frame(&mut r, &mut frame).await.expect("f"),
                (7, FrameKind::Cell)
            );
            assert_eq!(frame.len(), CELL_FRAME_BYTES);
            assert!(cell_of(&frame).iter().all(|&b| b == 1));
            // And sends it on under another circuit id, byte for byte.
            let mut on = Cursor::new(Vec::new());
            write_cell_frame(&mut on, 9, &mut frame)
                .await
                .expect("relay");
            let mut back = Cursor::new(on.into_inner());
            assert_eq!(
                read_frame(&mut back, &mut buf).await.expect("f"),
                (9, FrameKind::Cell)
            );
            assert!(buf.len() == CELL_BYTES && buf.iter().all(|&b| b == 1));
            assert_eq!(
                read_relay_frame(&mut r, &mut buf).await.expect("f").1,
                FrameKind::Error
            );
            assert_eq!(buf, b"boom");
            assert_eq!(
                read_frame(&mut r, &mut buf).await.expect("f").1,
                FrameKind::Teardown
            );
            assert!(matches!(
                read_frame(&mut r, &mut buf).await,
                Err(WireError::Closed)
            ));
        });
    }

    #[test]
    fn bad_frames_are_errors() {
        block_on(async {
            let mut buf = Vec::new();
            let mut r = Cursor::new(vec![9u8; 20]);
            assert!(matches!(
                read_frame(&mut r, &mut buf).await,
                Err(WireError::UnknownKind(9))
            ));
            let mut bad = header(ERROR, 1).to_vec();
            bad.extend_from_slice(&60_000u16.to_le_bytes());
            let mut r = Cursor::new(bad);
            assert!(matches!(
                read_frame(&mut r, &mut buf).await,
                Err(WireError::ErrorTooLarge(60_000))
            ));
            // Truncated cell.
            let mut short = header(CELL, 1).to_vec();
            short.extend_from_slice(&[0u8; 100]);
            let mut r = Cursor::new(short);
            assert!(read_frame(&mut r, &mut buf).await.is_err());
            // Truncated header.
            let mut r = Cursor::new(vec![CELL, 1, 2]);
            assert!(matches!(
                read_frame(&mut r, &mut buf).await,
                Err(WireError::Closed)
            ));
        });
    }
}
