//! Cells and messages: a `MessageReader` fed cells sealed with the
//! reader's key (plaintexts of the fuzzer's choosing, so the length prefix
//! and padding checks see them), cells with a changed sequence number or a
//! flipped bit, raw cells, and whole messages (round trip); under either
//! cell suite.

use mixnn_crypto::cells::{
    message_cells, seal_message, CellError, CellKey, CellOpener, CellSealer, CellSuite,
    MessageReader, CELL_BYTES, CELL_PAYLOAD, CELL_SEQ_BYTES,
};

use crate::input::{seed, Input};
use crate::Target;

pub const TARGET: Target = Target {
    name: "cell",
    run,
    seeds,
    max_len: 4096,
};

/// The largest message limit tried: messages of up to 3 cells.
const MAX_LIMIT: usize = 3 * CELL_PAYLOAD;
/// Cells per input, so one input stays fast.
const MAX_OPS: usize = 16;

const PREFIX: u8 = 0;
const SUFFIX: u8 = 1;
const SEQ: u8 = 2;
const FLIP: u8 = 3;
const RAW: u8 = 4;
const MESSAGE: u8 = 5;
const OPS: u8 = 6;

struct State {
    sealer: CellSealer,
    opener: CellOpener,
    reader: MessageReader,
    /// Set once the opener will refuse every cell the sealer makes: it saw
    /// a gap, or refused a cell that took a sequence number.
    refused: bool,
    /// Set by any error: the message boundaries are lost from there on.
    lost: bool,
}

impl State {
    /// `sealed`: the cell took a sequence number from the sealer.
    fn push(&mut self, cell: &mut [u8], sealed: bool) -> Result<Option<Vec<u8>>, CellError> {
        let r = self.reader.push(&mut self.opener, cell);
        match &r {
            Ok(Some(msg)) => assert!(msg.len() <= self.reader.max_len()),
            Ok(None) => assert!(self.reader.in_progress()),
            Err(_) => assert!(!self.reader.in_progress(), "an error drops the message"),
        }
        if self.refused {
            assert!(r.is_err(), "a cell after a refused one was accepted");
        }
        // A message too large or badly padded was opened: the opener moved
        // on with the sealer. A refused cell leaves the opener where it was
        // (behind the sealer, if the cell took a number); a gap, for good.
        self.refused |= match &r {
            Err(CellError::Gap { .. }) => true,
            Err(CellError::MessageTooLarge { .. } | CellError::BadPadding) | Ok(_) => false,
            Err(_) => sealed,
        };
        self.lost |= r.is_err();
        r
    }

    /// A sealed cell whose plaintext starts (or ends) with `bytes`.
    fn sealed(&mut self, bytes: &[u8], at_end: bool) -> Vec<u8> {
        let mut plain = [0u8; CELL_PAYLOAD];
        if at_end {
            plain[CELL_PAYLOAD - bytes.len()..].copy_from_slice(bytes);
        } else {
            plain[..bytes.len()].copy_from_slice(bytes);
        }
        let mut cell = vec![0u8; CELL_BYTES];
        self.sealer
            .seal_into(&plain, &mut cell)
            .expect("sequence numbers left");
        cell
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let key = CellKey::from_bytes([7; 32]);
    // The limit's top bit picks the suite: both see the same checks.
    let first = input.u32();
    let suite = if first & (1 << 31) == 0 {
        CellSuite::ChaCha20Poly1305
    } else {
        CellSuite::Aes256Gcm
    };
    let mut s = State {
        sealer: CellSealer::with_suite(&key, suite),
        opener: CellOpener::with_suite(&key, suite),
        reader: MessageReader::new((first & !(1 << 31)) as usize % (MAX_LIMIT + 1)),
        refused: false,
        lost: false,
    };
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % OPS {
            op @ (PREFIX | SUFFIX) => {
                let n = usize::from(input.u8());
                let mut cell = s.sealed(input.bytes(n), op == SUFFIX);
                let _ = s.push(&mut cell, true);
            }
            SEQ => {
                let delta = i64::from(input.u8() as i8);
                let mut cell = s.sealed(&[], false);
                let seq = u64::from_le_bytes(cell[..CELL_SEQ_BYTES].try_into().expect("8 bytes"));
                let seq = seq.wrapping_add_signed(if delta == 0 { 1 } else { delta });
                cell[..CELL_SEQ_BYTES].copy_from_slice(&seq.to_le_bytes());
                assert!(s.push(&mut cell, true).is_err(), "a cell with another seq");
            }
            FLIP => {
                let bit = input.u32() as usize % (CELL_BYTES * 8);
                let mut cell = s.sealed(&[], false);
                cell[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    s.push(&mut cell, true).is_err(),
                    "a cell with bit {bit} flipped"
                );
            }
            RAW => {
                let n = usize::from(input.u16());
                let mut cell = input.bytes(n).to_vec();
                cell.resize(CELL_BYTES, 0);
                // Forging a tag is out of a fuzzer's reach.
                assert!(s.push(&mut cell, false).is_err(), "a forged cell");
            }
            _ => message(&mut s, &mut input),
        }
    }
}

/// A whole message through `seal_message`: read back as it was, or
/// refused for its size, when nothing went wrong before.
fn message(s: &mut State, input: &mut Input<'_>) {
    let len = usize::from(input.u16()) * 3;
    let byte = input.u8();
    let msg = vec![byte; len];
    let mut out = Vec::new();
    let n = seal_message(&mut s.sealer, &msg, &mut out).expect("sealable");
    assert_eq!(n, message_cells(len));
    assert_eq!(out.len(), n * CELL_BYTES);
    let clean = !s.lost && !s.reader.in_progress();
    for (i, cell) in out.chunks_mut(CELL_BYTES).enumerate() {
        let r = s.push(cell, true);
        if !clean {
            continue;
        }
        if len > s.reader.max_len() {
            assert!(matches!(r, Err(CellError::MessageTooLarge { .. })), "{r:?}");
            return;
        }
        let last = i + 1 == n;
        match r {
            Ok(Some(m)) if last => assert!(m == msg, "the message read back differs"),
            Ok(None) if !last => {}
            other => panic!("cell {i} of {n}: {other:?}"),
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let limit = (3 * CELL_PAYLOAD as u32).to_le_bytes();
    let aes_limit = ((3 * CELL_PAYLOAD as u32) | (1 << 31)).to_le_bytes();
    let len = 100u64.to_le_bytes();
    vec![
        seed(&[&limit, &[PREFIX, 8], &len]),
        seed(&[&limit, &[PREFIX, 12], &len, &[1, 2, 3, 4]]),
        seed(&[&limit, &[MESSAGE, 10, 0, 0xAB, MESSAGE, 0, 0, 1]]),
        seed(&[&limit, &[MESSAGE, 0xff, 0x7f, 0xCD]]),
        seed(&[
            &limit,
            &[SEQ, 1, SEQ, 0xff, FLIP, 9, 0, 0, 0, RAW, 4, 0, 1, 2, 3, 4],
        ]),
        seed(&[&limit, &[SUFFIX, 1, 1]]),
        seed(&[
            &aes_limit,
            &[MESSAGE, 10, 0, 0xAB, SEQ, 1, FLIP, 9, 0, 0, 0],
        ]),
    ]
}
