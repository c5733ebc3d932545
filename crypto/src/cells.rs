//! Fixed-size AEAD data cells and the messages (tensors) split across them.
//!
//! # Cells
//!
//! Every cell is [`CELL_BYTES`] on the wire after the node's 8-byte circuit id:
//!
//! ```text
//! seq: u64 LE (8) | AEAD ciphertext (CELL_PAYLOAD) | tag (16)
//! ```
//!
//! The AEAD is the segment's [`CellSuite`]: ChaCha20-Poly1305, or
//! AES-256-GCM where both ends of the segment have AES instructions (the
//! client chooses, and tells each layer host the suite of its two
//! segments in its setup payload). Both have the same key, nonce and tag
//! sizes, so the layout, the size classes and every check below are the
//! same under either.
//!
//! The nonce is `0u32 || seq LE`, so the sequence number is bound to the
//! ciphertext without associated data. A [`CellSealer`] numbers cells 0, 1,
//! 2, ... and a [`CellOpener`] accepts only the next number: an old number is
//! a [`CellError::Replay`], a later one a [`CellError::Gap`], and the expected
//! one after a later one has been seen a [`CellError::Reordered`]. Refused
//! cells are not decrypted and do not move the opener. Keys are per segment
//! and per direction ([`CellKey::derive`]); never use one key in two sealers.
//! The AEAD runs through [`crate::aead`]: assembly, and the same bytes as
//! the RustCrypto crates.
//!
//! # Messages
//!
//! A message (an encoded tensor) becomes the plaintext
//! `len: u64 LE | message | zero padding` cut into cells; the number of cells
//! is rounded up to a size class (see [`message_cells`]) so that a mix, which
//! sees only cell counts, cannot tell nearby layer shapes apart. [`seal_message`] writes
//! whole sealed cells; [`MessageReader`] takes them one at a time, learns the
//! length from the first one (refusing one over its limit before allocating),
//! checks that all padding is zero and returns the message once the whole
//! bucket has arrived.
//!
//! Hot path: a cell whose payload is all message bytes is sealed straight
//! from the message and opened straight into the message buffer (the cipher
//! reads one buffer and writes the other, [`CellSealer::seal_from`] and
//! [`CellOpener::open_to`]); only the first cell (the length prefix) and the
//! last ones (the padding) go through a copy. The message buffer can be
//! handed back with [`MessageReader::recycle`], and the next message of at
//! most its length reuses it without a fill. A message that is made as it
//! goes (a tensor's encoding) is written straight into each cell's payload
//! and sealed there ([`MessageCells::from_source`], a [`MessageSource`]), so
//! no buffer holds it whole.

use hkdf::Hkdf;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroize;

pub use crate::aead::CellSuite;
use crate::aead::{CellAead, NONCE_BYTES, TAG_BYTES};

/// Bytes of one cell on the wire, not counting the node's circuit id.
///
/// 256 bytes short of 64 KiB so that a cell, with the circuit header, the
/// multiplexer's frame header and four TLS records around it (65,389
/// bytes), leaves a hop as one TCP segment of a 64 KiB MTU (loopback, and
/// the unit of segmentation offload): a 64 KiB cell took 65,667 bytes, a
/// full segment and a 184-byte one, each with its own trip through the
/// receiver's stack and its own acknowledgement.
pub const CELL_BYTES: usize = 64 * 1024 - 256;
/// Bytes of the sequence number heading a cell.
pub const CELL_SEQ_BYTES: usize = 8;
/// Bytes of the AEAD tag ending a cell.
pub const CELL_TAG_BYTES: usize = 16;
/// Plaintext bytes one cell carries.
pub const CELL_PAYLOAD: usize = CELL_BYTES - CELL_SEQ_BYTES - CELL_TAG_BYTES;
/// Largest message [`seal_message`] accepts.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

const LEN_PREFIX_BYTES: usize = 8;
const PAYLOAD_RANGE: std::ops::Range<usize> = CELL_SEQ_BYTES..CELL_SEQ_BYTES + CELL_PAYLOAD;
const KDF_SALT: &[u8] = b"mixnn/cell/v1";

/// Why a cell or message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    #[error("cell buffer is {got} bytes, expected {expected}")]
    Length { expected: usize, got: usize },
    #[error("cell failed authentication")]
    Auth,
    #[error("replayed cell: seq {seq}, expected {expected}")]
    Replay { seq: u64, expected: u64 },
    #[error("gap in cells: seq {seq}, expected {expected}")]
    Gap { seq: u64, expected: u64 },
    #[error("reordered cell: seq {seq} arrived after a later cell (up to {ahead})")]
    Reordered { seq: u64, ahead: u64 },
    #[error("sequence numbers exhausted for this key")]
    SequenceExhausted,
    #[error("message of {len} bytes exceeds the limit of {max}")]
    MessageTooLarge { len: u64, max: usize },
    #[error("nonzero message padding")]
    BadPadding,
}

/// A 32-byte cell key. Zeroized on drop.
#[derive(Clone)]
pub struct CellKey([u8; 32]);

impl CellKey {
    /// Wraps key bytes (for example a key from [`crate::onion::HopSecrets::key`]).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random key.
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        Self(k)
    }

    /// An independent key for `label` (HKDF-SHA256), e.g. `"forward"` and
    /// `"backward"` from one segment secret.
    pub fn derive(&self, label: &str) -> CellKey {
        let hk = Hkdf::<Sha256>::new(Some(KDF_SALT), &self.0);
        let mut out = [0u8; 32];
        if hk.expand(label.as_bytes(), &mut out).is_err() {
            // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
            unreachable!("HKDF-SHA256 can always expand 32 bytes");
        }
        Self(out)
    }

    /// The key bytes (to hand to a peer inside a sealed setup payload).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self, suite: CellSuite) -> CellAead {
        CellAead::for_suite(&self.0, suite)
    }
}

impl Drop for CellKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for CellKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CellKey(..)")
    }
}

fn nonce(seq: u64) -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    n
}

fn check_cell_len(len: usize) -> Result<(), CellError> {
    if len == CELL_BYTES {
        Ok(())
    } else {
        Err(CellError::Length {
            expected: CELL_BYTES,
            got: len,
        })
    }
}

/// Seals cells with consecutive sequence numbers starting at 0.
pub struct CellSealer {
    cipher: CellAead,
    next_seq: u64,
}

impl CellSealer {
    /// A ChaCha20-Poly1305 sealer for `key`, starting at sequence number 0.
    pub fn new(key: &CellKey) -> Self {
        Self::with_suite(key, CellSuite::ChaCha20Poly1305)
    }

    /// A sealer for `key` under `suite`, starting at sequence number 0.
    pub fn with_suite(key: &CellKey, suite: CellSuite) -> Self {
        Self {
            cipher: key.cipher(suite),
            next_seq: 0,
        }
    }

    /// The suite this sealer seals with.
    pub fn suite(&self) -> CellSuite {
        self.cipher.suite()
    }

    /// The sequence number the next cell will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The sequence number for the next cell, refusing the last one.
    fn take_seq(&self) -> Result<u64, CellError> {
        // u64::MAX is never used, so `seq + 1` cannot overflow.
        match self.next_seq {
            u64::MAX => Err(CellError::SequenceExhausted),
            seq => Ok(seq),
        }
    }

    /// Seals a cell whose plaintext the caller already wrote at
    /// `cell[8..8 + CELL_PAYLOAD]`; fills in the sequence number and tag.
    /// `cell` must be exactly [`CELL_BYTES`]. Returns the sequence number used.
    pub fn seal_in_place(&mut self, cell: &mut [u8]) -> Result<u64, CellError> {
        check_cell_len(cell.len())?;
        let seq = self.take_seq()?;
        let (head, rest) = cell.split_at_mut(CELL_SEQ_BYTES);
        let (body, tag_out) = rest.split_at_mut(CELL_PAYLOAD);
        let tag = self
            .cipher
            .seal_in_place(&nonce(seq), &[], body)
            .ok_or(CellError::Length {
                expected: CELL_PAYLOAD,
                got: body.len(),
            })?;
        Ok(self.finish(seq, head, tag_out, &tag))
    }

    /// Seals `plaintext` (exactly [`CELL_PAYLOAD`] bytes) straight into
    /// `cell` (exactly [`CELL_BYTES`]): the cipher reads the plaintext where
    /// it lies, so it is never copied. Returns the sequence number used.
    pub fn seal_from(&mut self, plaintext: &[u8], cell: &mut [u8]) -> Result<u64, CellError> {
        check_cell_len(cell.len())?;
        if plaintext.len() != CELL_PAYLOAD {
            return Err(CellError::Length {
                expected: CELL_PAYLOAD,
                got: plaintext.len(),
            });
        }
        let seq = self.take_seq()?;
        let (head, rest) = cell.split_at_mut(CELL_SEQ_BYTES);
        let (body, tag_out) = rest.split_at_mut(CELL_PAYLOAD);
        let tag = self
            .cipher
            .seal_to(&nonce(seq), &[], plaintext, body)
            .ok_or(CellError::Length {
                expected: CELL_PAYLOAD,
                got: body.len(),
            })?;
        Ok(self.finish(seq, head, tag_out, &tag))
    }

    /// Writes the sequence number and tag around a sealed payload and
    /// moves to the next number.
    fn finish(
        &mut self,
        seq: u64,
        head: &mut [u8],
        tag_out: &mut [u8],
        tag: &[u8; TAG_BYTES],
    ) -> u64 {
        head.copy_from_slice(&seq.to_le_bytes());
        tag_out.copy_from_slice(tag);
        self.next_seq = seq + 1;
        seq
    }

    /// Seals `plaintext` into `out` (exactly [`CELL_BYTES`]).
    pub fn seal_into(
        &mut self,
        plaintext: &[u8; CELL_PAYLOAD],
        out: &mut [u8],
    ) -> Result<u64, CellError> {
        self.seal_from(plaintext, out)
    }
}

/// Opens cells, accepting only the next sequence number.
pub struct CellOpener {
    cipher: CellAead,
    next_seq: u64,
    /// Highest sequence number seen beyond `next_seq`, once order is broken.
    ahead: Option<u64>,
}

impl CellOpener {
    /// A ChaCha20-Poly1305 opener for `key`, expecting sequence number 0
    /// first.
    pub fn new(key: &CellKey) -> Self {
        Self::with_suite(key, CellSuite::ChaCha20Poly1305)
    }

    /// An opener for `key` under `suite`, expecting sequence number 0
    /// first. A cell sealed under the other suite fails as
    /// [`CellError::Auth`].
    pub fn with_suite(key: &CellKey, suite: CellSuite) -> Self {
        Self {
            cipher: key.cipher(suite),
            next_seq: 0,
            ahead: None,
        }
    }

    /// The suite this opener opens.
    pub fn suite(&self) -> CellSuite {
        self.cipher.suite()
    }

    /// The sequence number the next cell must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Authenticates and decrypts `cell` (exactly [`CELL_BYTES`]) in place
    /// and returns its plaintext, a [`CELL_PAYLOAD`]-byte slice of `cell`.
    ///
    /// Once a cell from beyond the expected number has been seen, the stream
    /// is out of order for good: the expected cell is then refused as
    /// [`CellError::Reordered`]; the circuit should be torn down.
    pub fn open_in_place<'a>(&mut self, cell: &'a mut [u8]) -> Result<&'a [u8], CellError> {
        let seq = self.check_seq(cell)?;
        let (body, tag_in) = cell[CELL_SEQ_BYTES..].split_at_mut(CELL_PAYLOAD);
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(tag_in);
        if !self.cipher.open_in_place(&nonce(seq), &[], body, &tag) {
            return Err(CellError::Auth);
        }
        self.next_seq = seq + 1;
        Ok(body)
    }

    /// Authenticates `cell` (exactly [`CELL_BYTES`]) and decrypts its
    /// plaintext straight into `out` (exactly [`CELL_PAYLOAD`] bytes),
    /// leaving `cell` as it was. The same checks as
    /// [`CellOpener::open_in_place`]; on an error `out` holds unspecified
    /// bytes.
    pub fn open_to(&mut self, cell: &[u8], out: &mut [u8]) -> Result<(), CellError> {
        if out.len() != CELL_PAYLOAD {
            return Err(CellError::Length {
                expected: CELL_PAYLOAD,
                got: out.len(),
            });
        }
        let seq = self.check_seq(cell)?;
        let (body, tag_in) = cell[CELL_SEQ_BYTES..].split_at(CELL_PAYLOAD);
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(tag_in);
        if !self.cipher.open_to(&nonce(seq), &[], body, &tag, out) {
            return Err(CellError::Auth);
        }
        self.next_seq = seq + 1;
        Ok(())
    }

    /// The cell's length and sequence number against what this opener
    /// accepts next; returns the number.
    fn check_seq(&mut self, cell: &[u8]) -> Result<u64, CellError> {
        check_cell_len(cell.len())?;
        let mut seq_bytes = [0u8; CELL_SEQ_BYTES];
        seq_bytes.copy_from_slice(&cell[..CELL_SEQ_BYTES]);
        let seq = u64::from_le_bytes(seq_bytes);
        let expected = self.next_seq;
        if seq < expected {
            return Err(CellError::Replay { seq, expected });
        }
        if seq > expected {
            self.ahead = Some(self.ahead.map_or(seq, |a| a.max(seq)));
            return Err(CellError::Gap { seq, expected });
        }
        if let Some(ahead) = self.ahead {
            return Err(CellError::Reordered { seq, ahead });
        }
        if seq == u64::MAX {
            return Err(CellError::SequenceExhausted);
        }
        Ok(seq)
    }
}

/// Size classes per power of two above [`EXACT_CELLS`].
pub const CLASSES_PER_OCTAVE: usize = 8;
/// Messages of up to this many cells are not padded further.
pub const EXACT_CELLS: usize = 8;

/// How many cells a message of `len` bytes occupies: its cells rounded up to
/// a size class. Up to [`EXACT_CELLS`] cells every count is a class; above,
/// each power of two is cut into [`CLASSES_PER_OCTAVE`] classes, so padding
/// costs at most 1/8 while a mix learns only about 3 bits of a tensor's size
/// beyond its order of magnitude. (Whole powers of two would waste up to half
/// of every power-of-two tensor, which the length prefix always pushes over.)
pub fn message_cells(len: usize) -> usize {
    let plain = len.saturating_add(LEN_PREFIX_BYTES);
    let cells = plain.div_ceil(CELL_PAYLOAD).max(1);
    if cells <= EXACT_CELLS {
        return cells;
    }
    let octave = usize::BITS - 1 - cells.leading_zeros(); // floor(log2(cells))
    let step = 1usize << (octave as usize - CLASSES_PER_OCTAVE.trailing_zeros() as usize);
    cells.div_ceil(step) * step
}

/// Seals `msg` into whole cells (without circuit id) appended to `out` and
/// returns how many. On error `out` is left as it was.
pub fn seal_message(
    sealer: &mut CellSealer,
    msg: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, CellError> {
    let start_len = out.len();
    let mut cells = MessageCells::new(sealer, msg)?;
    out.reserve(cells.total() * CELL_BYTES);
    while cells.remaining() > 0 {
        let cell_start = out.len();
        out.resize(cell_start + CELL_BYTES, 0);
        if let Err(e) = cells.seal_next(&mut out[cell_start..]) {
            out.truncate(start_len);
            return Err(e);
        }
    }
    Ok(cells.total())
}

/// A message written piece by piece, front to back, straight into the
/// cells that carry it (an encoding that is made as it is sealed).
pub trait MessageSource {
    /// The whole message's length in bytes.
    fn len(&self) -> usize;

    /// Whether the message is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the message's next `dst.len()` bytes into `dst`. Called with
    /// consecutive pieces that add up to [`MessageSource::len`].
    fn fill(&mut self, dst: &mut [u8]);
}

/// Where a message's bytes come from.
enum Body<'a> {
    /// All of it in hand: whole cells seal straight from it.
    Slice(&'a [u8]),
    /// Written into each cell as it is sealed.
    Source(&'a mut (dyn MessageSource + Send)),
}

/// A message being sealed one cell at a time, so that the first cells can
/// be on their way while the rest are sealed. Produces exactly the cells
/// [`seal_message`] would.
pub struct MessageCells<'a> {
    sealer: &'a mut CellSealer,
    body: Body<'a>,
    len: usize,
    /// Message bytes sealed so far.
    given: usize,
    total: usize,
    done: usize,
}

impl<'a> MessageCells<'a> {
    /// Checks the size and that the sealer has sequence numbers for every
    /// cell before sealing any.
    pub fn new(sealer: &'a mut CellSealer, msg: &'a [u8]) -> Result<Self, CellError> {
        Self::start(sealer, Body::Slice(msg), msg.len())
    }

    /// The same for a message written into each cell as it is sealed: the
    /// same cells as [`MessageCells::new`] on the whole message.
    pub fn from_source(
        sealer: &'a mut CellSealer,
        source: &'a mut (dyn MessageSource + Send),
    ) -> Result<Self, CellError> {
        let len = source.len();
        Self::start(sealer, Body::Source(source), len)
    }

    fn start(sealer: &'a mut CellSealer, body: Body<'a>, len: usize) -> Result<Self, CellError> {
        if len > MAX_MESSAGE_BYTES {
            return Err(CellError::MessageTooLarge {
                len: len as u64,
                max: MAX_MESSAGE_BYTES,
            });
        }
        let total = message_cells(len);
        // The last sequence number used must stay below u64::MAX.
        match sealer.next_seq.checked_add(total as u64) {
            Some(end) if end < u64::MAX => {}
            _ => return Err(CellError::SequenceExhausted),
        }
        Ok(Self {
            sealer,
            body,
            len,
            given: 0,
            total,
            done: 0,
        })
    }

    /// Cells in the message's size class.
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn remaining(&self) -> usize {
        self.total - self.done
    }

    /// Seal the next cell into `cell` (CELL_BYTES long).
    pub fn seal_next(&mut self, cell: &mut [u8]) -> Result<(), CellError> {
        check_cell_len(cell.len())?;
        if self.done == self.total {
            return Err(CellError::Length {
                expected: 0,
                got: cell.len(),
            });
        }
        let left = self.len - self.given;
        if let Body::Slice(msg) = &self.body {
            if self.done > 0 && left >= CELL_PAYLOAD {
                // A whole cell of message bytes: sealed where they lie.
                let take = &msg[self.given..self.given + CELL_PAYLOAD];
                self.sealer.seal_from(take, cell)?;
                self.given += CELL_PAYLOAD;
                self.done += 1;
                return Ok(());
            }
        }
        let body = &mut cell[PAYLOAD_RANGE];
        let mut at = 0;
        if self.done == 0 {
            body[..LEN_PREFIX_BYTES].copy_from_slice(&(self.len as u64).to_le_bytes());
            at = LEN_PREFIX_BYTES;
        }
        let take = left.min(CELL_PAYLOAD - at);
        let piece = &mut body[at..at + take];
        match &mut self.body {
            Body::Slice(msg) => piece.copy_from_slice(&msg[self.given..self.given + take]),
            Body::Source(source) => source.fill(piece),
        }
        body[at + take..].fill(0);
        self.given += take;
        self.sealer.seal_in_place(cell)?;
        self.done += 1;
        Ok(())
    }
}

struct Partial {
    len: usize,
    cells_total: usize,
    cells_done: usize,
    /// Message bytes written so far, at the front of `buf`.
    filled: usize,
    /// `len` bytes long from the start; filled from the front.
    buf: Vec<u8>,
}

/// Reassembles messages from cells fed one at a time.
pub struct MessageReader {
    max_len: usize,
    partial: Option<Partial>,
    spare: Vec<u8>,
}

impl MessageReader {
    /// A reader that refuses messages longer than `max_len` bytes (capped at
    /// [`MAX_MESSAGE_BYTES`]).
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len: max_len.min(MAX_MESSAGE_BYTES),
            partial: None,
            spare: Vec::new(),
        }
    }

    /// The length limit in force.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Whether a message has started but not finished.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// The message in progress: its bytes so far (from its start) and its
    /// whole length, as the first cell declared it.
    pub fn partial(&self) -> Option<(&[u8], usize)> {
        self.partial.as_ref().map(|p| (&p.buf[..p.filled], p.len))
    }

    /// Hands back a finished message's buffer so the next message reuses
    /// its allocation.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() > self.spare.capacity() {
            self.spare = buf;
        }
    }

    /// Opens `cell` in place with `opener` and adds it to the current message.
    /// Returns the message once its last (padding included) cell is in.
    ///
    /// Any error drops the partial message; the circuit should be torn down.
    pub fn push(
        &mut self,
        opener: &mut CellOpener,
        cell: &mut [u8],
    ) -> Result<Option<Vec<u8>>, CellError> {
        let r = self.push_inner(opener, cell);
        if r.is_err() {
            if let Some(p) = self.partial.take() {
                self.recycle(p.buf);
            }
        }
        r
    }

    fn push_inner(
        &mut self,
        opener: &mut CellOpener,
        cell: &mut [u8],
    ) -> Result<Option<Vec<u8>>, CellError> {
        if let Some(p) = self.partial.as_mut() {
            if p.len - p.filled >= CELL_PAYLOAD {
                // A whole cell of message bytes: decrypted where they go.
                opener.open_to(cell, &mut p.buf[p.filled..p.filled + CELL_PAYLOAD])?;
                p.filled += CELL_PAYLOAD;
                return Ok(self.cell_done());
            }
        }
        let plain = opener.open_in_place(cell)?;
        let (partial, data) = match self.partial.as_mut() {
            Some(p) => (p, plain),
            None => {
                let mut len_bytes = [0u8; LEN_PREFIX_BYTES];
                len_bytes.copy_from_slice(&plain[..LEN_PREFIX_BYTES]);
                let claimed = u64::from_le_bytes(len_bytes);
                let len = match usize::try_from(claimed) {
                    Ok(len) if len <= self.max_len => len,
                    _ => {
                        return Err(CellError::MessageTooLarge {
                            len: claimed,
                            max: self.max_len,
                        })
                    }
                };
                // The spare keeps its length: a message no longer than the
                // last one costs neither an allocation nor a fill.
                let mut buf = std::mem::take(&mut self.spare);
                if buf.len() >= len {
                    buf.truncate(len);
                } else {
                    buf.reserve_exact(len - buf.len());
                    buf.resize(len, 0);
                }
                let p = self.partial.insert(Partial {
                    len,
                    cells_total: message_cells(len),
                    cells_done: 0,
                    filled: 0,
                    buf,
                });
                (p, &plain[LEN_PREFIX_BYTES..])
            }
        };
        let take = (partial.len - partial.filled).min(data.len());
        partial.buf[partial.filled..partial.filled + take].copy_from_slice(&data[..take]);
        partial.filled += take;
        if !is_zero(&data[take..]) {
            return Err(CellError::BadPadding);
        }
        Ok(self.cell_done())
    }

    /// Counts a cell of the current message; returns the message once its
    /// last cell is in.
    fn cell_done(&mut self) -> Option<Vec<u8>> {
        let p = self.partial.as_mut()?;
        p.cells_done += 1;
        if p.cells_done < p.cells_total {
            return None;
        }
        self.partial.take().map(|p| p.buf)
    }
}

fn is_zero(b: &[u8]) -> bool {
    // Word-at-a-time OR; the compiler vectorizes this.
    let mut chunks = b.chunks_exact(8);
    let mut acc = 0u64;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        acc |= u64::from_ne_bytes(w);
    }
    let tail = chunks.remainder().iter().fold(0u8, |a, x| a | x);
    acc == 0 && tail == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    use chacha20poly1305::ChaCha20Poly1305;

    #[test]
    fn layout_constants() {
        assert_eq!(CELL_PAYLOAD, 65_256);
        assert_eq!(message_cells(0), 1);
        assert_eq!(message_cells(CELL_PAYLOAD - 8), 1);
        assert_eq!(message_cells(CELL_PAYLOAD - 7), 2);
        assert_eq!(message_cells(2 * CELL_PAYLOAD), 3);
        assert_eq!(message_cells(8 * CELL_PAYLOAD - 8), 8);
        assert_eq!(message_cells(8 * CELL_PAYLOAD), 9);
        assert_eq!(message_cells(16 * CELL_PAYLOAD), 18);
        assert_eq!(message_cells(33 * CELL_PAYLOAD), 36);
        assert_eq!(message_cells(64 * CELL_PAYLOAD), 72);
    }

    /// A whole message sealed at once is exactly its cells sealed one by
    /// one into a reused buffer, at every boundary of the length prefix,
    /// the padding and the size classes, and nothing before it changes.
    #[test]
    fn sealed_message_equals_its_cells_sealed_one_by_one() {
        let key = CellKey::from_bytes([9; 32]);
        let lens = [
            0,
            1,
            CELL_PAYLOAD - 8,
            CELL_PAYLOAD - 7,
            2 * CELL_PAYLOAD,
            8 * CELL_PAYLOAD + 3,
        ];
        for len in lens {
            let msg: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut appended = vec![0xEE; 5];
            let (mut a, mut b) = (CellSealer::new(&key), CellSealer::new(&key));
            let total = seal_message(&mut a, &msg, &mut appended).expect("seal");
            assert_eq!(&appended[..5], &[0xEE; 5], "len {len}: bytes before");
            let mut cells = MessageCells::new(&mut b, &msg).expect("cells");
            let mut one = vec![0u8; CELL_BYTES];
            for i in 0..total {
                cells.seal_next(&mut one).expect("seal next");
                assert_eq!(
                    &appended[5 + i * CELL_BYTES..][..CELL_BYTES],
                    &one[..],
                    "len {len}, cell {i}"
                );
            }
            assert_eq!(appended.len(), 5 + total * CELL_BYTES);
            assert_eq!(cells.remaining(), 0);
        }
    }

    /// A source that hands out a message's bytes and records the pieces it
    /// was asked for.
    struct Pieces<'a> {
        msg: &'a [u8],
        at: usize,
        asked: Vec<usize>,
    }

    impl MessageSource for Pieces<'_> {
        fn len(&self) -> usize {
            self.msg.len()
        }

        fn fill(&mut self, dst: &mut [u8]) {
            dst.copy_from_slice(&self.msg[self.at..self.at + dst.len()]);
            self.at += dst.len();
            self.asked.push(dst.len());
        }
    }

    /// A message written into each cell as it is sealed gives the cells
    /// the whole message gives, into a dirty reused buffer, and is asked
    /// for its bytes once each, in order, a cell's worth at a time.
    #[test]
    fn a_message_written_into_its_cells_seals_to_the_same_cells() {
        let key = CellKey::from_bytes([3; 32]);
        for len in [
            0,
            1,
            CELL_PAYLOAD - 8,
            CELL_PAYLOAD - 7,
            2 * CELL_PAYLOAD,
            8 * CELL_PAYLOAD + 3,
            9 * CELL_PAYLOAD,
        ] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 17 % 253) as u8).collect();
            let mut whole = Vec::new();
            let total = seal_message(&mut CellSealer::new(&key), &msg, &mut whole).expect("seal");
            let mut source = Pieces {
                msg: &msg,
                at: 0,
                asked: Vec::new(),
            };
            let mut sealer = CellSealer::new(&key);
            let mut cells = MessageCells::from_source(&mut sealer, &mut source).expect("cells");
            assert_eq!(cells.total(), total);
            let mut one = vec![0x5Au8; CELL_BYTES];
            for i in 0..total {
                cells.seal_next(&mut one).expect("seal next");
                assert_eq!(
                    &whole[i * CELL_BYTES..][..CELL_BYTES],
                    &one[..],
                    "len {len}, cell {i}"
                );
            }
            assert!(
                cells.seal_next(&mut one).is_err(),
                "len {len}: a cell past the end"
            );
            assert_eq!(source.at, len);
            assert!(
                source.asked.iter().all(|&n| n <= CELL_PAYLOAD),
                "len {len}: {:?}",
                source.asked
            );
        }
    }

    #[test]
    fn nonce_is_seq_le_after_four_zero_bytes() {
        let n = nonce(0x0102_0304_0506_0708);
        assert_eq!(n, [0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn derive_separates_labels_and_is_deterministic() {
        let k = CellKey::from_bytes([7; 32]);
        assert_eq!(
            k.derive("forward").as_bytes(),
            k.derive("forward").as_bytes()
        );
        assert_ne!(
            k.derive("forward").as_bytes(),
            k.derive("backward").as_bytes()
        );
        assert_ne!(k.derive("forward").as_bytes(), k.as_bytes());
    }

    #[test]
    fn is_zero_sees_every_byte() {
        for len in [0usize, 1, 7, 8, 9, 100] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v));
            for i in 0..len {
                v[i] = 0x10;
                assert!(!is_zero(&v), "len {len} byte {i}");
                v[i] = 0;
            }
        }
    }

    #[test]
    fn sealed_cell_layout() {
        let key = CellKey::from_bytes([1; 32]);
        let mut s = CellSealer::new(&key);
        let mut cell = vec![0u8; CELL_BYTES];
        let pt = Box::new([0x55u8; CELL_PAYLOAD]);
        assert_eq!(s.seal_into(&pt, &mut cell), Ok(0));
        assert_eq!(s.seal_into(&pt, &mut cell), Ok(1));
        assert_eq!(&cell[..8], &1u64.to_le_bytes());
        // Matches a plain ChaCha20-Poly1305 seal with nonce 0^4 || seq.
        let mut body = pt.to_vec();
        let tag = ChaCha20Poly1305::new(&[1u8; 32].into())
            .encrypt_in_place_detached(&nonce(1).into(), &[], &mut body)
            .expect("seal");
        assert_eq!(&cell[8..8 + CELL_PAYLOAD], &body[..]);
        assert_eq!(&cell[8 + CELL_PAYLOAD..], tag.as_slice());
    }
}
