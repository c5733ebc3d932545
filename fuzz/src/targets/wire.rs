//! Circuit frames: `read_frame` over a byte stream until it ends, every
//! frame written again byte for byte and read the same by a relay
//! (`read_relay_frame`); and frames of the fuzzer's choosing written, read
//! back, and read from a stream cut short.

use futures::executor::block_on;
use futures::io::Cursor;
use mixnn_crypto::cells::CELL_BYTES;
use mixnn_crypto::onion::SETUP_PACKET_BYTES;
use mixnn_node::circuit::wire::{
    read_frame, read_relay_frame, write_cell_frame, write_error, write_setup, write_teardown,
    FrameKind, WireError, CELL_FRAME_BYTES, HEADER_BYTES, MAX_ERROR_BYTES,
};

use crate::input::{seed, Input};
use crate::Target;

pub const TARGET: Target = Target {
    name: "circuit_frame",
    run,
    seeds,
    max_len: 2 * (CELL_BYTES + 9) + 1,
};

const RAW: u8 = 0;
const FRAMES: u8 = 1;
const MAX_FRAMES: usize = 8;

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 2 {
        RAW => raw(input.rest()),
        _ => frames(input),
    }
}

fn raw(stream: &[u8]) {
    block_on(async {
        let mut r = Cursor::new(stream);
        let mut buf = Vec::new();
        loop {
            let start = r.position() as usize;
            let frame = match read_frame(&mut r, &mut buf).await {
                Ok(f) => f,
                Err(WireError::Closed) => {
                    assert!(stream.len() - start < 9, "closed with a whole header left");
                    return;
                }
                Err(_) => return,
            };
            let end = r.position() as usize;
            let again = write(frame, &buf).await;
            assert!(again == stream[start..end], "{frame:?} written differs");
            // A relay reads the same frame, a cell kept whole.
            let mut relay = Cursor::new(&stream[start..]);
            let mut whole = Vec::new();
            let got = read_relay_frame(&mut relay, &mut whole).await;
            assert!(matches!(got, Ok(f) if f == frame), "a relay read {got:?}");
            match frame.1 {
                FrameKind::Cell => assert!(whole == stream[start..end], "relay frame differs"),
                _ => assert!(whole == buf, "relay body differs"),
            }
        }
    });
}

/// The frame `(cid, kind)` with body `body`, as the writers put it.
async fn write((cid, kind): (u64, FrameKind), body: &[u8]) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    let r = match kind {
        FrameKind::Setup { epoch } => {
            assert_eq!(body.len(), SETUP_PACKET_BYTES);
            write_setup(&mut out, cid, epoch, body).await
        }
        FrameKind::Cell => {
            assert_eq!(body.len(), CELL_BYTES);
            let mut frame = vec![0u8; CELL_FRAME_BYTES];
            frame[HEADER_BYTES..].copy_from_slice(body);
            write_cell_frame(&mut out, cid, &mut frame).await
        }
        FrameKind::Error => {
            assert!(body.len() <= MAX_ERROR_BYTES);
            write_error(&mut out, cid, body).await
        }
        FrameKind::Teardown => {
            assert!(body.is_empty());
            write_teardown(&mut out, cid).await
        }
    };
    r.expect("writing to memory");
    out.into_inner()
}

/// Frames of the fuzzer's choosing, written, read back, then read from
/// the stream cut short.
fn frames(mut input: Input<'_>) {
    let cut = input.u32() as usize;
    let mut frames = Vec::new();
    while !input.is_empty() && frames.len() < MAX_FRAMES {
        let kind = input.u8();
        let cid = input.u64();
        let (kind, len) = match kind % 4 {
            0 => (FrameKind::Setup { epoch: input.u64() }, SETUP_PACKET_BYTES),
            1 => (FrameKind::Cell, CELL_BYTES),
            2 => (
                FrameKind::Error,
                usize::from(input.u16()) % (MAX_ERROR_BYTES + 1),
            ),
            _ => (FrameKind::Teardown, 0),
        };
        let n = usize::from(input.u8());
        let mut body = input.bytes(n).to_vec();
        body.resize(len, 0);
        frames.push((cid, kind, body));
    }
    block_on(async {
        let mut stream = Vec::new();
        for (cid, kind, body) in &frames {
            stream.extend(write((*cid, *kind), body).await);
        }
        let mut r = Cursor::new(&stream[..]);
        let mut buf = Vec::new();
        for (cid, kind, body) in &frames {
            let got = read_frame(&mut r, &mut buf).await.expect("a frame written");
            assert_eq!(got, (*cid, *kind));
            assert!(buf == *body, "{kind:?} body differs");
        }
        assert!(matches!(
            read_frame(&mut r, &mut buf).await,
            Err(WireError::Closed)
        ));
        if stream.is_empty() {
            return;
        }
        // Cut short: whole frames, then an error, never a panic.
        let cut = cut % stream.len();
        let mut r = Cursor::new(&stream[..cut]);
        let mut read = 0;
        while let Ok(f) = read_frame(&mut r, &mut buf).await {
            assert_eq!(f, (frames[read].0, frames[read].1));
            read += 1;
        }
        assert!(read < frames.len());
    });
}

fn seeds() -> Vec<Vec<u8>> {
    let stream = block_on(async {
        let mut s = write((7, FrameKind::Setup { epoch: 3 }), &[1; SETUP_PACKET_BYTES]).await;
        s.extend(write((7, FrameKind::Error), b"sealed report").await);
        s.extend(write((7, FrameKind::Teardown), &[]).await);
        s.extend(write((7, FrameKind::Cell), &[2; CELL_BYTES]).await);
        s
    });
    vec![
        seed(&[&[RAW], &stream]),
        seed(&[&[RAW], &stream[..100]]),
        seed(&[
            &[FRAMES],
            &20_000u32.to_le_bytes(),
            &[0],
            &5u64.to_le_bytes(),
            &9u64.to_le_bytes(),
            &[2, 1, 2],
            &[2],
            &5u64.to_le_bytes(),
            &[4, 0, 4, 1, 2, 3, 4],
            &[3],
            &5u64.to_le_bytes(),
            &[0],
            &[1],
            &5u64.to_le_bytes(),
            &[0],
        ]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_stream_holds_four_frames() {
        let s = &seeds()[0][1..];
        let mut r = Cursor::new(s);
        let mut buf = Vec::new();
        let mut n = 0;
        while block_on(read_frame(&mut r, &mut buf)).is_ok() {
            n += 1;
        }
        assert_eq!(n, 4);
    }
}
