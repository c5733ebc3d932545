//! [`HostTensor`] and its wire codec.
//!
//! Layout: one byte holding the rank (low bits) and the [`SPARSE`] flag,
//! then `rank` dims as `u32` little-endian, then the elements, row-major:
//!
//! - dense: every element as `f32` little-endian;
//! - sparse: a bitmap of `ceil(n / 8)` bytes (bit `i % 8` of byte `i / 8`
//!   set when element `i` is stored, unused high bits of the last byte
//!   clear), then the stored elements as `f32` little-endian, in order.
//!   Elements whose bits are all zero (`+0.0`) are left out; `-0.0` is kept.
//!
//! The encoder takes the sparse form exactly when it is shorter, and the
//! decoder refuses any other choice, so every tensor has one encoding. The
//! sparse form is lossless: activations after a ReLU, their masked
//! gradients and MNIST images are mostly `+0.0`, and they cross the
//! network at a fraction of their dense size.
//!
//! [`HostTensor::encoding`] gives the same bytes in pieces of any size, so a
//! sender writes each cell straight from the tensor, and [`StreamDecoder`]
//! takes them as they arrive.

use serde::{Deserialize, Serialize};

/// Highest rank the codec accepts.
pub const MAX_RANK: usize = 4;

/// Flag in the first byte: the elements follow in the sparse form.
pub const SPARSE: u8 = 0x80;

/// The index of the first NaN or infinity in `data`, if any: the answer
/// of `data.iter().position(|x| !x.is_finite())`, found a block at a time
/// with no branch per element, so that the check vectorises. A slot checks
/// every tensor it takes from the network (hundreds of thousands of values
/// a step); a branch per element cost the hosts about 0.8 ms of CPU a
/// step between them (perf, `bench paper` on a 2-core AMD EPYC).
pub fn first_non_finite(data: &[f32]) -> Option<usize> {
    /// A value is NaN or infinite exactly when its exponent bits are all set.
    const EXPONENT: u32 = 0x7f80_0000;
    const BLOCK: usize = 512;
    let bad = |x: &f32| x.to_bits() & EXPONENT == EXPONENT;
    data.chunks(BLOCK).enumerate().find_map(|(i, block)| {
        let any = block.iter().fold(0u32, |any, x| any | u32::from(bad(x)));
        if any == 0 {
            None
        } else {
            block.iter().position(bad).map(|j| i * BLOCK + j)
        }
    })
}

/// A dense row-major `f32` tensor in host memory: what crosses the wire.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Limits applied while decoding untrusted bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Highest rank accepted (never more than [`MAX_RANK`]).
    pub max_rank: usize,
    /// Most elements accepted.
    pub max_elements: usize,
}

impl Default for DecodeLimits {
    /// Rank 4 and 16 Mi elements (64 MiB of `f32`).
    fn default() -> Self {
        DecodeLimits {
            max_rank: MAX_RANK,
            max_elements: 1 << 24,
        }
    }
}

/// Errors decoding a tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty buffer (no rank byte)")]
    Empty,
    #[error("rank {rank} exceeds the limit {limit}")]
    RankTooHigh { rank: usize, limit: usize },
    #[error("header truncated: rank {rank} needs {needed} bytes, have {have}")]
    HeaderTruncated {
        rank: usize,
        needed: usize,
        have: usize,
    },
    #[error("shape {shape:?} has more than {limit} elements")]
    TooManyElements { shape: Vec<usize>, limit: usize },
    #[error("shape {shape:?} needs {expected} payload bytes, have {have}")]
    LengthMismatch {
        shape: Vec<usize>,
        expected: usize,
        have: usize,
    },
    #[error("unknown flags {0:#04x} in the first byte")]
    UnknownFlags(u8),
    #[error("sparse bitmap sets bits past the last of {elements} elements")]
    BitmapOverrun { elements: usize },
    #[error("sparse form stores a +0.0 element")]
    StoredZero,
    #[error("{form} form chosen where the {other} one is shorter")]
    NotCanonical {
        form: &'static str,
        other: &'static str,
    },
    #[error("shape {shape:?} holds {expected} elements but data has {have}")]
    DataLength {
        shape: Vec<usize>,
        expected: usize,
        have: usize,
    },
}

impl HostTensor {
    /// A tensor, checking that `data` fits `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<HostTensor, CodecError> {
        let expected = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match expected {
            Some(n) if n == data.len() => Ok(HostTensor { shape, data }),
            _ => Err(CodecError::DataLength {
                expected: expected.unwrap_or(usize::MAX),
                have: data.len(),
                shape,
            }),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> HostTensor {
        let n = shape.iter().product();
        HostTensor {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Number of elements the shape describes.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of [`HostTensor::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let n = self.data.len();
        1 + 4 * self.shape.len() + body_len(n, count_stored(&self.data))
    }

    /// An upper bound of [`HostTensor::encoded_len`] that costs nothing:
    /// the dense size.
    pub fn max_encoded_len(&self) -> usize {
        1 + 4 * self.shape.len() + 4 * self.data.len()
    }

    /// Encodes to a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoding to `out`.
    ///
    /// The tensor must be well formed (rank ≤ 4, dims ≤ `u32::MAX`, data
    /// matching the shape); a malformed one encodes to bytes that `decode`
    /// rejects.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut e = self.encoding();
        let start = out.len();
        out.resize(start + e.len(), 0);
        e.fill(&mut out[start..]);
    }

    /// The encoding, to be written piece by piece ([`Encoding::fill`]):
    /// a sender fills each cell straight from the tensor, so its first
    /// cells can travel while the rest are encoded. Counts the stored
    /// elements (and, for the sparse form, makes the bitmap) first, so the
    /// whole length is known before any byte is written.
    pub fn encoding(&self) -> Encoding<'_> {
        let n = self.data.len();
        let rank = u8::try_from(self.shape.len()).unwrap_or(u8::MAX);
        let arch = pulp::Arch::new();
        let stored = arch.dispatch(|| count_stored(&self.data));
        let sparse = prefers_sparse(n, stored);
        let mut head = Vec::with_capacity(1 + 4 * self.shape.len());
        head.push(if sparse {
            rank.min(!SPARSE) | SPARSE
        } else {
            rank
        });
        for &d in &self.shape {
            head.extend_from_slice(&u32::try_from(d).unwrap_or(u32::MAX).to_le_bytes());
        }
        let len = head.len() + body_len(n, stored);
        Encoding {
            data: &self.data,
            head,
            bitmap: if sparse {
                arch.dispatch(|| sparse_bitmap(&self.data))
            } else {
                Vec::new()
            },
            sparse,
            len,
            at: 0,
            next: 0,
            pending: [0; GROUP_BYTES],
            pending_at: 0,
            pending_end: 0,
        }
    }

    /// Reads the rank and dims of an encoded tensor without decoding its
    /// elements (nothing is allocated): a receiver checks the shape against
    /// what it expects before it lets the tensor take `4 × elements` bytes,
    /// whatever the encoding's own length. Returns the dims, of which the
    /// first `rank` count, and whether the elements are in the sparse form.
    pub fn peek_shape(bytes: &[u8]) -> Result<(usize, [usize; MAX_RANK], bool), CodecError> {
        let (&first, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
        let sparse = first & SPARSE != 0;
        let flags = first & !SPARSE & !0x0f;
        if flags != 0 {
            return Err(CodecError::UnknownFlags(flags));
        }
        let rank = usize::from(first & 0x0f);
        if rank > MAX_RANK {
            return Err(CodecError::RankTooHigh {
                rank,
                limit: MAX_RANK,
            });
        }
        if rest.len() < 4 * rank {
            return Err(CodecError::HeaderTruncated {
                rank,
                needed: 1 + 4 * rank,
                have: bytes.len(),
            });
        }
        let mut shape = [0usize; MAX_RANK];
        for (slot, chunk) in shape.iter_mut().zip(rest[..4 * rank].chunks_exact(4)) {
            *slot = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
        }
        Ok((rank, shape, sparse))
    }

    /// Decodes untrusted bytes. Checks rank, element count and exact length
    /// before allocating anything, and refuses all but the one encoding
    /// [`HostTensor::encode`] gives. The same checks and work as a
    /// [`StreamDecoder`] fed everything at once.
    pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<HostTensor, CodecError> {
        StreamDecoder::start(bytes, bytes.len(), limits)?
            .ok_or(CodecError::Empty)?
            .finish(bytes)
    }
}

/// Decodes a tensor while its encoding arrives front to back: a host
/// turns the cells of a message into elements as they come in, so little
/// is left to decode once the last cell is in.
///
/// It checks exactly what [`HostTensor::decode`] checks, as soon as the
/// bytes that decide it are in: the header and the encoding's total
/// length (known from the message's first cell) at [`StreamDecoder::start`],
/// a sparse bitmap once all of it is in, stored `+0.0` elements and the
/// dense form's canonical choice at [`StreamDecoder::finish`]. Fed in any
/// pieces, it gives what `decode` gives on the whole encoding, error or
/// tensor. Its elements take memory only once those checks allow them:
/// for the dense form at the start (the encoding is then `4 × elements`
/// long), for the sparse form once its bitmap has passed.
#[derive(Debug)]
pub struct StreamDecoder {
    shape: Vec<usize>,
    n: usize,
    /// Bytes of the rank byte and the dims.
    header: usize,
    /// The whole encoding's length.
    total: usize,
    sparse: bool,
    /// Dense: the elements so far, in order. Sparse: all `n` of them,
    /// `+0.0` until decoded, once the bitmap has passed its checks.
    data: Vec<f32>,
    /// Sparse: bitmap bytes (groups of eight elements) decoded so far.
    groups: usize,
    /// Sparse: stored values used so far.
    used: usize,
    /// Sparse: the bitmap passed its checks and `data` holds `n` elements.
    bitmap_checked: bool,
    /// Sparse: a stored value was `+0.0` (not canonical).
    stored_zero: bool,
    /// Dense: elements so far that are not `+0.0`.
    stored: usize,
}

impl StreamDecoder {
    /// Starts on an encoding of `total` bytes of which `prefix` holds the
    /// first ones (all of them when `prefix.len() == total`). `Ok(None)`
    /// while the header is not all in; errors as [`HostTensor::decode`]
    /// for what the header and `total` decide.
    pub fn start(
        prefix: &[u8],
        total: usize,
        limits: DecodeLimits,
    ) -> Result<Option<StreamDecoder>, CodecError> {
        let total = total.max(prefix.len());
        let complete = prefix.len() == total;
        let Some((&first, rest)) = prefix.split_first() else {
            return if complete {
                Err(CodecError::Empty)
            } else {
                Ok(None)
            };
        };
        let sparse = first & SPARSE != 0;
        let flags = first & !SPARSE & !0x0f;
        if flags != 0 {
            return Err(CodecError::UnknownFlags(flags));
        }
        let rank = usize::from(first & 0x0f);
        let limit = limits.max_rank.min(MAX_RANK);
        if rank > limit {
            return Err(CodecError::RankTooHigh { rank, limit });
        }
        if rest.len() < 4 * rank {
            return if complete {
                Err(CodecError::HeaderTruncated {
                    rank,
                    needed: 1 + 4 * rank,
                    have: prefix.len(),
                })
            } else {
                Ok(None)
            };
        }
        let shape: Vec<usize> = rest[..4 * rank]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= limits.max_elements)
            .ok_or_else(|| CodecError::TooManyElements {
                shape: shape.clone(),
                limit: limits.max_elements,
            })?;
        let header = 1 + 4 * rank;
        let payload = total - header;
        let data = if sparse {
            let bitmap_len = n.div_ceil(8);
            if payload < bitmap_len {
                return Err(CodecError::LengthMismatch {
                    shape,
                    expected: bitmap_len,
                    have: payload,
                });
            }
            Vec::new()
        } else {
            if payload != 4 * n {
                return Err(CodecError::LengthMismatch {
                    shape,
                    expected: 4 * n,
                    have: payload,
                });
            }
            Vec::with_capacity(n)
        };
        Ok(Some(StreamDecoder {
            shape,
            n,
            header,
            total,
            sparse,
            data,
            groups: 0,
            used: 0,
            bitmap_checked: false,
            stored_zero: false,
            stored: 0,
        }))
    }

    /// The encoding's whole length, as given to [`StreamDecoder::start`].
    pub fn total(&self) -> usize {
        self.total
    }

    /// Decodes what `prefix` (the encoding's first bytes: what the last
    /// call saw and possibly more) adds.
    pub fn feed(&mut self, prefix: &[u8]) -> Result<(), CodecError> {
        let have = prefix.len().min(self.total);
        if !self.sparse {
            let upto = (have.saturating_sub(self.header) / 4).min(self.n);
            let from = self.header + 4 * self.data.len();
            let to = self.header + 4 * upto;
            if to > from {
                let start = self.data.len();
                self.data.extend(
                    prefix[from..to]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
                self.stored += count_stored(&self.data[start..]);
            }
            return Ok(());
        }
        let bitmap_len = self.n.div_ceil(8);
        let values_at = self.header + bitmap_len;
        if have < values_at {
            return Ok(());
        }
        let bitmap = &prefix[self.header..values_at];
        if !self.bitmap_checked {
            self.check_bitmap(bitmap)?;
            self.data = vec![0f32; self.n];
            self.bitmap_checked = true;
        }
        // Only stored elements are touched: a group of eight with no bit
        // set stays zero, a full group is copied whole, and the rest take
        // their set bits lowest first. The bitmap's checks make the values
        // exactly one per set bit, and leave no bit past `n`.
        let values = &prefix[values_at..have];
        let in_hand = values.len() / 4;
        let value = |i: usize| {
            let c = &values[4 * i..4 * i + 4];
            u32::from_le_bytes([c[0], c[1], c[2], c[3]])
        };
        let (mut g, mut used, mut stored_zero) = (self.groups, self.used, self.stored_zero);
        // Sixty-four elements at a time while their values are in hand:
        // each stored value takes the next set bit's place, lowest first
        // (one short loop a word, not one a group of eight).
        let words_end = (self.n / 64) * 8;
        let simd = avx2();
        while g + 8 <= words_end {
            let Ok(word) = <[u8; 8]>::try_from(&bitmap[g..g + 8]) else {
                break;
            };
            let mut bits = u64::from_le_bytes(word);
            let k = bits.count_ones() as usize;
            if used + k > in_hand {
                break;
            }
            let Ok(out) = <&mut [f32; 64]>::try_from(&mut self.data[8 * g..8 * g + 64]) else {
                break;
            };
            if let Some(zero) = unpack_word(simd, word, &values[4 * used..], out) {
                stored_zero |= zero;
                used += k;
                g += 8;
                continue;
            }
            for c in values[4 * used..4 * (used + k)].chunks_exact(4) {
                let raw = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                stored_zero |= raw == 0;
                out[bits.trailing_zeros() as usize & 63] = f32::from_bits(raw);
                bits &= bits.wrapping_sub(1);
            }
            used += k;
            g += 8;
        }
        while g < bitmap_len {
            let byte = bitmap[g];
            let k = byte.count_ones() as usize;
            if used + k > in_hand {
                break;
            }
            let end = (8 * g + 8).min(self.n);
            let chunk = &mut self.data[8 * g..end];
            if byte == 0xFF && chunk.len() == 8 {
                for (j, d) in chunk.iter_mut().enumerate() {
                    let raw = value(used + j);
                    stored_zero |= raw == 0;
                    *d = f32::from_bits(raw);
                }
            } else if let (Some(window), Ok(chunk)) = (
                values
                    .get(4 * used..4 * used + GROUP_BYTES)
                    .and_then(|w| <&[u8; GROUP_BYTES]>::try_from(w).ok()),
                <&mut [f32; 8]>::try_from(&mut *chunk),
            ) {
                // A whole group with eight values' bytes in hand: a fixed
                // window, indexed without checks the compiler cannot drop.
                let mut bits = byte;
                let mut at = 0usize;
                while bits != 0 {
                    let j = bits.trailing_zeros() as usize;
                    let a = at & (GROUP_BYTES - 4);
                    let raw = u32::from_le_bytes([
                        window[a],
                        window[a + 1],
                        window[a + 2],
                        window[a + 3],
                    ]);
                    stored_zero |= raw == 0;
                    chunk[j & 7] = f32::from_bits(raw);
                    at += 4;
                    bits &= bits - 1;
                }
            } else {
                let mut bits = byte;
                let mut i = used;
                while bits != 0 {
                    let j = bits.trailing_zeros() as usize;
                    let raw = value(i);
                    stored_zero |= raw == 0;
                    if let Some(d) = chunk.get_mut(j) {
                        *d = f32::from_bits(raw);
                    }
                    i += 1;
                    bits &= bits - 1;
                }
            }
            used += k;
            g += 1;
        }
        (self.groups, self.used, self.stored_zero) = (g, used, stored_zero);
        Ok(())
    }

    /// A sparse bitmap, once all of it is in: no bit past the last
    /// element, one stored value per set bit filling the rest of the
    /// encoding, and the sparse form the shorter one.
    fn check_bitmap(&self, bitmap: &[u8]) -> Result<(), CodecError> {
        let n = self.n;
        if !n.is_multiple_of(8) && bitmap.last().is_some_and(|&b| b >> (n % 8) != 0) {
            return Err(CodecError::BitmapOverrun { elements: n });
        }
        let stored: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
        let payload = self.total - self.header;
        if payload - bitmap.len() != 4 * stored {
            return Err(CodecError::LengthMismatch {
                shape: self.shape.clone(),
                expected: bitmap.len() + 4 * stored,
                have: payload,
            });
        }
        if !prefers_sparse(n, stored) {
            return Err(CodecError::NotCanonical {
                form: "sparse",
                other: "dense",
            });
        }
        Ok(())
    }

    /// The whole encoding (`bytes`, exactly `total` long): decodes the rest
    /// and makes the last checks.
    pub fn finish(mut self, bytes: &[u8]) -> Result<HostTensor, CodecError> {
        if bytes.len() != self.total {
            return Err(CodecError::LengthMismatch {
                shape: self.shape,
                expected: self.total - self.header,
                have: bytes.len().saturating_sub(self.header),
            });
        }
        self.feed(bytes)?;
        if self.sparse {
            if self.stored_zero {
                return Err(CodecError::StoredZero);
            }
        } else if prefers_sparse(self.n, self.stored) {
            return Err(CodecError::NotCanonical {
                form: "dense",
                other: "sparse",
            });
        }
        Ok(HostTensor {
            shape: self.shape,
            data: self.data,
        })
    }
}

/// Elements the sparse form would store: all but those that are `+0.0`.
#[inline(always)]
fn count_stored(data: &[f32]) -> usize {
    data.iter().filter(|x| x.to_bits() != 0).count()
}

/// Bytes of a group of eight elements: one bitmap byte's worth.
const GROUP_BYTES: usize = 32;

/// The sparse form's bitmap of `data`: bit `i % 8` of byte `i / 8` set
/// when element `i` is not `+0.0`.
#[inline(always)]
fn sparse_bitmap(data: &[f32]) -> Vec<u8> {
    let mut bitmap = vec![0u8; data.len().div_ceil(8)];
    let mut groups = data.chunks_exact(8);
    for (chunk, byte) in groups.by_ref().zip(bitmap.iter_mut()) {
        let mut bits = 0u8;
        for (j, x) in chunk.iter().enumerate() {
            bits |= u8::from(x.to_bits() != 0) << j;
        }
        *byte = bits;
    }
    if let Some(byte) = bitmap.get_mut(data.len() / 8) {
        let mut bits = 0u8;
        for (j, x) in groups.remainder().iter().enumerate() {
            bits |= u8::from(x.to_bits() != 0) << j;
        }
        *byte = bits;
    }
    bitmap
}

/// A tensor's encoding, written front to back in pieces of any size
/// ([`HostTensor::encoding`]). The pieces, in order, are exactly the
/// bytes [`HostTensor::encode`] gives.
#[derive(Debug)]
pub struct Encoding<'a> {
    data: &'a [f32],
    /// The rank byte and the dims.
    head: Vec<u8>,
    /// Sparse form: one bit per element.
    bitmap: Vec<u8>,
    sparse: bool,
    len: usize,
    /// Bytes written so far.
    at: usize,
    /// The next group of eight (sparse form) or element (dense form) whose
    /// bytes are not yet written or pending.
    next: usize,
    /// A group's or an element's bytes that did not fit the last piece.
    pending: [u8; GROUP_BYTES],
    pending_at: usize,
    pending_end: usize,
}

impl Encoding<'_> {
    /// The whole encoding's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the encoding is empty (never: it has at least its rank byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes not yet written.
    pub fn remaining(&self) -> usize {
        self.len - self.at
    }

    /// Writes the next bytes of the encoding into `dst`, as many as fit
    /// or remain, and returns how many.
    pub fn fill(&mut self, dst: &mut [u8]) -> usize {
        let want = dst.len().min(self.remaining());
        let mut out = 0;
        while out < want {
            let n = self.step(&mut dst[out..want]);
            if n == 0 {
                // Cannot happen (the length counts exactly the bytes the
                // tensor gives); a piece that made no progress ends the
                // write rather than looping.
                debug_assert!(false, "an encoding step wrote nothing");
                dst[out..want].fill(0);
                self.at = self.len;
                return want;
            }
            self.at += n;
            out += n;
        }
        want
    }

    /// Writes at least one byte of what comes next into `dst` (not empty,
    /// and no longer than what remains) and returns how many.
    fn step(&mut self, dst: &mut [u8]) -> usize {
        let head = self.head.len();
        if self.at < head {
            return copy_part(&self.head[self.at..], dst);
        }
        if self.pending_at < self.pending_end {
            let n = copy_part(&self.pending[self.pending_at..self.pending_end], dst);
            self.pending_at += n;
            return n;
        }
        let bitmap_end = head + self.bitmap.len();
        if self.sparse && self.at < bitmap_end {
            return copy_part(&self.bitmap[self.at - head..], dst);
        }
        let n = if self.sparse {
            self.values(dst)
        } else {
            self.dense(dst)
        };
        if n > 0 {
            return n;
        }
        // Too little room for the next group or element: its bytes wait
        // in `pending`, and the piece takes what fits.
        let mut unit = [0u8; GROUP_BYTES];
        let size = if self.sparse {
            self.values(&mut unit)
        } else {
            self.dense(&mut unit)
        };
        self.pending[..size].copy_from_slice(&unit[..size]);
        (self.pending_at, self.pending_end) = (0, size);
        let n = copy_part(&self.pending[..size], dst);
        self.pending_at = n;
        n
    }

    /// Dense form: whole elements, as many as fit `dst` (0 when not even
    /// one does).
    fn dense(&mut self, dst: &mut [u8]) -> usize {
        let from = self.next.min(self.data.len());
        let fit = (dst.len() / 4).min(self.data.len() - from);
        for (d, x) in dst.chunks_exact_mut(4).zip(&self.data[from..from + fit]) {
            d.copy_from_slice(&x.to_le_bytes());
        }
        self.next = from + fit;
        4 * fit
    }

    /// Sparse form: the stored values of whole groups of eight, as many
    /// groups as surely fit `dst` (0 when not even one does). A group
    /// takes up to [`GROUP_BYTES`].
    fn values(&mut self, dst: &mut [u8]) -> usize {
        let full = self.data.len() / 8;
        let mut g = self.next;
        let mut out = 0usize;
        // Whole groups, as many at a time as surely fit: each writes all
        // its eight elements at the next places and moves on only past
        // the stored ones (no branch per element).
        loop {
            let fit = ((dst.len() - out) / GROUP_BYTES).min(full.saturating_sub(g));
            if fit == 0 {
                break;
            }
            let groups = self.data[8 * g..8 * (g + fit)].chunks_exact(8);
            let bits = &self.bitmap[g..g + fit];
            out = pack_groups(groups, bits, dst, out);
            g += fit;
        }
        // The last, partial group, element by element.
        if g == full && g < self.bitmap.len() {
            let rest = &self.data[8 * g..];
            let need = 4 * rest.iter().filter(|x| x.to_bits() != 0).count();
            if dst.len() - out >= need {
                for x in rest.iter().filter(|x| x.to_bits() != 0) {
                    dst[out..out + 4].copy_from_slice(&x.to_bits().to_le_bytes());
                    out += 4;
                }
                g += 1;
            }
        }
        self.next = g;
        out
    }
}

/// [`Encoding::values`]' whole groups: each writes its eight elements at
/// `out` and moves `out` past the stored ones (`dst` has room for a whole
/// group per group). Through [`pack_groups_avx2`] where the CPU has AVX2.
fn pack_groups(
    groups: std::slice::ChunksExact<'_, f32>,
    bits: &[u8],
    dst: &mut [u8],
    out: usize,
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = avx2() {
        return simd.vectorize(|| pack_groups_avx2(simd, groups, bits, dst, out));
    }
    pack_groups_scalar(groups, bits, dst, out)
}

/// AVX2's token where the CPU has it (x86-64 only); asked for once per
/// message piece, not once per group.
#[cfg(target_arch = "x86_64")]
type Avx2 = pulp::x86::V3;
#[cfg(not(target_arch = "x86_64"))]
type Avx2 = std::convert::Infallible;

fn avx2() -> Option<Avx2> {
    #[cfg(target_arch = "x86_64")]
    return pulp::x86::V3::try_new();
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// [`pack_groups`] element by element, with no branch per element.
fn pack_groups_scalar(
    groups: std::slice::ChunksExact<'_, f32>,
    bits: &[u8],
    dst: &mut [u8],
    mut out: usize,
) -> usize {
    for (chunk, &byte) in groups.zip(bits) {
        if byte == 0 {
            continue;
        }
        // Each group takes at most GROUP_BYTES, so the window is
        // always there.
        let Some(window) = dst
            .get_mut(out..out + GROUP_BYTES)
            .and_then(|w| <&mut [u8; GROUP_BYTES]>::try_from(w).ok())
        else {
            continue;
        };
        if byte == 0xFF {
            for (d, x) in window.chunks_exact_mut(4).zip(chunk) {
                d.copy_from_slice(&x.to_bits().to_le_bytes());
            }
            out += GROUP_BYTES;
        } else {
            let mut w = 0usize;
            for x in chunk {
                let r = x.to_bits();
                // `w` stays below 32: the mask only tells the compiler so.
                let a = w & (GROUP_BYTES - 4);
                window[a..a + 4].copy_from_slice(&r.to_le_bytes());
                w += 4 * usize::from(r != 0);
            }
            out += w;
        }
    }
    out
}

/// For each bitmap byte, the places of its set bits, lowest first: the
/// lanes a permutation takes so that a group's stored elements come first.
#[cfg(target_arch = "x86_64")]
static PACK: [[u32; 8]; 256] = lane_tables(true);

/// [`Encoding::values`]' whole groups with AVX2: each group's stored
/// elements moved to its front by one permutation, all 32 bytes written at
/// `out`, and `out` moved past the stored ones. The caller leaves room for
/// a whole group per group. The same bytes as the scalar loop.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn pack_groups_avx2(
    simd: pulp::x86::V3,
    groups: std::slice::ChunksExact<'_, f32>,
    bits: &[u8],
    dst: &mut [u8],
    mut out: usize,
) -> usize {
    use std::arch::x86_64::{__m256, __m256i};
    for (chunk, &byte) in groups.zip(bits) {
        let (Ok(x), Some(window)) = (
            <[f32; 8]>::try_from(chunk),
            dst.get_mut(out..out + GROUP_BYTES),
        ) else {
            break;
        };
        let x: __m256 = pulp::cast(x);
        let lanes: __m256i = pulp::cast(PACK[usize::from(byte)]);
        let packed: [u8; GROUP_BYTES] = pulp::cast(simd.avx2._mm256_permutevar8x32_ps(x, lanes));
        window.copy_from_slice(&packed);
        out += 4 * byte.count_ones() as usize;
    }
    out
}

/// One bitmap word's sixty-four elements from `values` (its stored ones
/// first) into `out` with AVX2, a group of eight at a time: the group's
/// values moved to their places by one permutation and the other places
/// zeroed. Returns whether a stored value was `+0.0`, or `None` (nothing
/// written) without AVX2 (`simd`, from [`avx2`]), for a word of fewer than
/// [`UNPACK_MIN_STORED`] stored values (one short loop places those
/// sooner), or without a whole group's bytes in `values` past the word's
/// last group.
fn unpack_word(
    simd: Option<Avx2>,
    word: [u8; 8],
    values: &[u8],
    out: &mut [f32; 64],
) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) =
        simd.filter(|_| u64::from_le_bytes(word).count_ones() as usize >= UNPACK_MIN_STORED)
    {
        let last = word[..7]
            .iter()
            .map(|b| b.count_ones() as usize)
            .sum::<usize>();
        if values.len() >= 4 * last + GROUP_BYTES {
            return Some(simd.vectorize(|| unpack_word_avx2(simd, word, values, out)));
        }
    }
    let _ = (simd, word, values, out);
    None
}

/// The fewest stored values in a word that [`unpack_word`] places with
/// AVX2 (criterion on `[256, 512]`: four in five `+0.0` decoded 8% slower
/// with every word through AVX2, half `+0.0` 35% faster).
const UNPACK_MIN_STORED: usize = 12;

/// For each bitmap byte, at each set bit's place, how many set bits are
/// below it: the lane of a group's stored values that goes there.
#[cfg(target_arch = "x86_64")]
static UNPACK: [[u32; 8]; 256] = lane_tables(false);

/// [`PACK`] (`pack`: the `k`-th set bit's place at `k`) or [`UNPACK`]
/// (the number of set bits below each set bit, at its place), for every
/// bitmap byte.
#[cfg(target_arch = "x86_64")]
const fn lane_tables(pack: bool) -> [[u32; 8]; 256] {
    let mut table = [[0u32; 8]; 256];
    let mut byte = 0;
    while byte < 256 {
        let (mut j, mut k) = (0, 0);
        while j < 8 {
            if byte & (1 << j) != 0 {
                if pack {
                    table[byte][k] = j as u32;
                } else {
                    table[byte][j] = k as u32;
                }
                k += 1;
            }
            j += 1;
        }
        byte += 1;
    }
    table
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn unpack_word_avx2(
    simd: pulp::x86::V3,
    word: [u8; 8],
    values: &[u8],
    out: &mut [f32; 64],
) -> bool {
    use std::arch::x86_64::{__m256, __m256i};
    let places: __m256i = pulp::cast([1u32, 2, 4, 8, 16, 32, 64, 128]);
    let zero: __m256i = pulp::cast([0u32; 8]);
    let mut stored_zero = 0u32;
    let mut used = 0usize;
    for (byte, dst) in word.iter().zip(out.chunks_exact_mut(8)) {
        let Some(Ok(window)) = values
            .get(4 * used..4 * used + GROUP_BYTES)
            .map(<[u8; GROUP_BYTES]>::try_from)
        else {
            break;
        };
        let x: __m256 = pulp::cast(window);
        let lanes: __m256i = pulp::cast(UNPACK[usize::from(*byte)]);
        let moved: __m256i = pulp::cast(simd.avx2._mm256_permutevar8x32_ps(x, lanes));
        let set = simd
            .avx2
            ._mm256_and_si256(simd.avx._mm256_set1_epi32(i32::from(*byte)), places);
        let keep = simd.avx2._mm256_cmpeq_epi32(set, places);
        let y = simd.avx2._mm256_and_si256(moved, keep);
        let zeros = simd.avx2._mm256_cmpeq_epi32(y, zero);
        stored_zero |= simd.avx._mm256_movemask_ps(pulp::cast(zeros)) as u32 & u32::from(*byte);
        let y: [f32; 8] = pulp::cast(y);
        dst.copy_from_slice(&y);
        used += byte.count_ones() as usize;
    }
    stored_zero != 0
}

/// Copies as much of `src` as fits into `dst`; returns how much.
fn copy_part(src: &[u8], dst: &mut [u8]) -> usize {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
    n
}

/// Bytes of the elements in the form the encoder takes.
fn body_len(n: usize, stored: usize) -> usize {
    if prefers_sparse(n, stored) {
        n.div_ceil(8) + 4 * stored
    } else {
        4 * n
    }
}

/// The sparse form, exactly when it is shorter than the dense one.
fn prefers_sparse(n: usize, stored: usize) -> bool {
    n.div_ceil(8) + 4 * stored < 4 * n
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Stored values of every kind: signs, `-0.0`, the extremes, subnormals.
    const KINDS: [f32; 8] = [
        1.5,
        -0.0,
        f32::MAX,
        -2.25,
        f32::MIN_POSITIVE,
        1e-45,
        7.0,
        -8.5,
    ];

    #[test]
    fn round_trip() {
        let t =
            HostTensor::new(vec![2, 3], vec![1.0, -2.5, 0.0, f32::MAX, -0.0, 7.25]).expect("ok");
        let b = t.encode();
        assert_eq!(b.len(), t.encoded_len());
        // One of six is +0.0: the sparse form is already shorter.
        assert_eq!(b[0], 2 | SPARSE);
        assert_eq!(&b[1..5], &2u32.to_le_bytes());
        let back = HostTensor::decode(&b, DecodeLimits::default()).expect("decode");
        assert_eq!(back, t);
        let mut buf = vec![9u8];
        t.encode_into(&mut buf);
        assert_eq!(&buf[1..], &b[..]);
        let scalar = HostTensor::new(vec![], vec![3.0]).expect("ok");
        assert_eq!(
            HostTensor::decode(&scalar.encode(), DecodeLimits::default()).expect("ok"),
            scalar
        );
    }

    /// The AVX2 group packer writes what the scalar one writes, for every
    /// bitmap byte and values of every kind (where the CPU lacks AVX2,
    /// the scalar packer against itself).
    #[test]
    fn groups_pack_the_same_with_avx2_as_element_by_element() {
        let mut data = Vec::with_capacity(256 * 8);
        let mut bits = Vec::with_capacity(256);
        for byte in 0..=255u8 {
            for j in 0..8 {
                data.push(if byte & (1 << j) != 0 {
                    KINDS[(usize::from(byte) + j) % 8]
                } else {
                    0.0
                });
            }
            bits.push(byte);
        }
        let mut a = vec![0xAAu8; data.len() * 4 + 3];
        let mut b = a.clone();
        let na = pack_groups_scalar(data.chunks_exact(8), &bits, &mut a, 3);
        let nb = pack_groups(data.chunks_exact(8), &bits, &mut b, 3);
        assert_eq!(na, nb);
        assert_eq!(a[..na], b[..nb]);
        let stored = data.iter().filter(|x| x.to_bits() != 0).count();
        assert_eq!(na, 3 + 4 * stored);
    }

    /// A word unpacked with AVX2 puts each stored value at its set bit and
    /// `+0.0` elsewhere, for every bitmap byte, and tells a stored `+0.0`.
    /// Without AVX2 it leaves every word to the short loop.
    #[test]
    fn words_unpack_each_value_at_its_bit_with_avx2() {
        let simd = avx2();
        let kinds = KINDS;
        for first in 0..=255u8 {
            let word = [
                first,
                !first,
                0,
                0xFF,
                first.rotate_left(3),
                1,
                0x80,
                first ^ 0x5A,
            ];
            let mut expected = [0f32; 64];
            let mut values = Vec::new();
            for (g, byte) in word.iter().enumerate() {
                for j in 0..8 {
                    if byte & (1 << j) != 0 {
                        let v = kinds[(values.len() / 4 + j) % 8];
                        expected[8 * g + j] = v;
                        values.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            let stored = values.len() / 4;
            values.extend_from_slice(&[0x5Au8; GROUP_BYTES]);
            let mut out = [9f32; 64];
            assert_eq!(unpack_word(None, word, &values, &mut out), None);
            assert_eq!(out.map(f32::to_bits), [9f32.to_bits(); 64]);
            if simd.is_none() {
                assert_eq!(unpack_word(simd, word, &values, &mut out), None);
                continue;
            }
            assert_eq!(unpack_word(simd, word, &values, &mut out), Some(false));
            let bits = |a: &[f32; 64]| a.map(f32::to_bits);
            assert_eq!(bits(&out), bits(&expected), "word {word:?}");
            // A stored +0.0 is told apart.
            if stored > 0 {
                values[..4].copy_from_slice(&0f32.to_le_bytes());
                assert_eq!(unpack_word(simd, word, &values, &mut out), Some(true));
            }
            // Too few bytes for the last group's window: nothing written.
            let short = &values[..4 * stored];
            let mut untouched = [9f32; 64];
            if word[..7]
                .iter()
                .map(|b| b.count_ones() as usize)
                .sum::<usize>()
                * 4
                + GROUP_BYTES
                > short.len()
            {
                assert_eq!(unpack_word(simd, word, short, &mut untouched), None);
                assert_eq!(bits(&untouched), [9f32.to_bits(); 64]);
            }
        }
    }

    proptest! {
        /// The first NaN or infinity, as the element-by-element search
        /// finds it, wherever the non-finite values fall (block edges,
        /// the tail) and among the finite values nearest them.
        #[test]
        fn first_non_finite_is_the_first_nan_or_infinity(
            len in 0usize..2100,
            places in proptest::collection::vec((0usize..2100, 0usize..4), 0..4),
            seed in any::<u64>(),
        ) {
            let edge = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, -0.0, 1e-45, -1e-45];
            let mut s = seed | 1;
            let mut data: Vec<f32> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    match s % 4 {
                        0 => edge[(s >> 8) as usize % edge.len()],
                        1 => 0.0,
                        _ => f32::from_bits((s >> 32) as u32 & 0xff7f_ffff),
                    }
                })
                .collect();
            for (at, kind) in places {
                if let Some(x) = data.get_mut(at) {
                    *x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0xff80_0001)][kind];
                }
            }
            prop_assert_eq!(
                first_non_finite(&data),
                data.iter().position(|x| !x.is_finite())
            );
        }
    }

    #[test]
    fn malformed() {
        let lim = DecodeLimits::default();
        assert_eq!(HostTensor::decode(&[], lim), Err(CodecError::Empty));
        assert!(matches!(
            HostTensor::decode(&[5], lim),
            Err(CodecError::RankTooHigh { .. })
        ));
        assert!(matches!(
            HostTensor::decode(&[2, 1, 0], lim),
            Err(CodecError::HeaderTruncated { .. })
        ));
        // A header claiming 4 billion^2 elements on a tiny buffer: refused, nothing allocated.
        let mut huge = vec![2u8];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            HostTensor::decode(&huge, lim),
            Err(CodecError::TooManyElements { .. })
        ));
        let t = HostTensor::new(vec![3], vec![1.0, 2.0, 3.0]).expect("ok");
        let b = t.encode();
        assert!(matches!(
            HostTensor::decode(&b[..b.len() - 1], lim),
            Err(CodecError::LengthMismatch { .. })
        ));
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            HostTensor::decode(&longer, lim),
            Err(CodecError::LengthMismatch { .. })
        ));
        let small = DecodeLimits {
            max_rank: 1,
            max_elements: 2,
        };
        assert!(matches!(
            HostTensor::decode(&b, small),
            Err(CodecError::TooManyElements { .. })
        ));
        assert!(HostTensor::new(vec![2, 2], vec![0.0; 3]).is_err());
    }

    fn sparse_sample() -> HostTensor {
        // 3 of 20 stored, one of them -0.0: the sparse form is shorter.
        let mut data = vec![0.0f32; 20];
        data[1] = 1.5;
        data[9] = -0.0;
        data[19] = -3.0;
        HostTensor::new(vec![4, 5], data).expect("ok")
    }

    #[test]
    fn sparse_round_trip_keeps_every_bit() {
        let t = sparse_sample();
        let b = t.encode();
        assert_eq!(b[0], 2 | SPARSE);
        // header, 3 bitmap bytes, 3 stored values
        assert_eq!(b.len(), 1 + 8 + 3 + 12);
        assert_eq!(b.len(), t.encoded_len());
        assert!(b.len() < t.max_encoded_len());
        assert_eq!(&b[9..12], &[0b0000_0010, 0b0000_0010, 0b0000_1000]);
        let back = HostTensor::decode(&b, DecodeLimits::default()).expect("decode");
        let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(back.shape, t.shape);
        assert_eq!(bits(&back.data), bits(&t.data));
        // A dense tensor stays dense.
        let dense = HostTensor::new(vec![3], vec![1.0, -0.0, 2.0]).expect("ok");
        assert_eq!(dense.encode()[0], 1);
    }

    #[test]
    fn peek_reads_the_shape_and_nothing_else() {
        let t = sparse_sample();
        let b = t.encode();
        assert_eq!(
            HostTensor::peek_shape(&b).expect("peek"),
            (2, [4, 5, 0, 0], true)
        );
        // A header alone is enough, whatever follows.
        assert_eq!(
            HostTensor::peek_shape(&b[..9]).expect("peek").1[..2],
            [4, 5]
        );
        assert!(HostTensor::peek_shape(&b[..5]).is_err());
        assert!(HostTensor::peek_shape(&[]).is_err());
        assert!(HostTensor::peek_shape(&[0x25]).is_err());
        assert!(HostTensor::peek_shape(&[5]).is_err());
    }

    #[test]
    fn sparse_malformed() {
        let lim = DecodeLimits::default();
        let good = sparse_sample().encode();
        // Unknown flag bits.
        let mut b = good.clone();
        b[0] |= 0x20;
        assert_eq!(
            HostTensor::decode(&b, lim),
            Err(CodecError::UnknownFlags(0x20))
        );
        // A bitmap bit past the last element.
        let mut b = good.clone();
        b[11] |= 0x80;
        assert_eq!(
            HostTensor::decode(&b, lim),
            Err(CodecError::BitmapOverrun { elements: 20 })
        );
        // One more bitmap bit than stored values.
        let mut b = good.clone();
        b[9] |= 0x01;
        assert!(matches!(
            HostTensor::decode(&b, lim),
            Err(CodecError::LengthMismatch { .. })
        ));
        // A stored +0.0.
        let mut b = good.clone();
        b[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(HostTensor::decode(&b, lim), Err(CodecError::StoredZero));
        // Truncated bitmap.
        assert!(HostTensor::decode(&good[..10], lim).is_err());
        // The dense form of a mostly-zero tensor, and the sparse form of a
        // dense one, are refused.
        let t = sparse_sample();
        let mut dense = vec![2u8];
        dense.extend_from_slice(&4u32.to_le_bytes());
        dense.extend_from_slice(&5u32.to_le_bytes());
        for x in &t.data {
            dense.extend_from_slice(&x.to_le_bytes());
        }
        assert!(matches!(
            HostTensor::decode(&dense, lim),
            Err(CodecError::NotCanonical { form: "dense", .. })
        ));
        let mut sparse = vec![1 | SPARSE];
        sparse.extend_from_slice(&2u32.to_le_bytes());
        sparse.push(0b11);
        sparse.extend_from_slice(&1f32.to_le_bytes());
        sparse.extend_from_slice(&2f32.to_le_bytes());
        assert!(matches!(
            HostTensor::decode(&sparse, lim),
            Err(CodecError::NotCanonical { form: "sparse", .. })
        ));
    }

    /// `bytes` fed to a [`StreamDecoder`] in pieces ending at `cuts`, as a
    /// host feeds a message's cells; `None` if it never got its header.
    fn streamed(bytes: &[u8], cuts: &[usize], lim: DecodeLimits) -> Result<HostTensor, CodecError> {
        let mut dec: Option<StreamDecoder> = None;
        let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
        ends.sort_unstable();
        for end in ends {
            let prefix = &bytes[..end];
            match dec.as_mut() {
                Some(d) => d.feed(prefix)?,
                None => dec = StreamDecoder::start(prefix, bytes.len(), lim)?,
            }
        }
        match dec {
            Some(d) => d.finish(bytes),
            None => HostTensor::decode(bytes, lim),
        }
    }

    /// Tensors whose elements are `+0.0` with probability `zeros` (then
    /// sparse when mostly zero), with a `-0.0` now and then.
    fn tensor_strategy() -> impl Strategy<Value = HostTensor> {
        (1usize..40, 1usize..40, 0.0f64..1.0).prop_flat_map(|(r, c, zeros)| {
            proptest::collection::vec(
                (0.0f64..1.0, -4.0f32..4.0).prop_map(move |(u, x)| {
                    if u < zeros {
                        0.0
                    } else if u < zeros + 0.02 {
                        -0.0
                    } else {
                        x
                    }
                }),
                r * c,
            )
            .prop_map(move |data| HostTensor {
                shape: vec![r, c],
                data,
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any bytes, whole or damaged, in any pieces: the streaming
        /// decoder gives exactly what the one-shot decoder gives.
        #[test]
        fn streaming_equals_one_shot(
            t in tensor_strategy(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
            cut_len in proptest::option::of(any::<usize>()),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let lim = DecodeLimits::default();
            let mut bytes = t.encode();
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            if let Some(c) = cut_len {
                bytes.truncate(c % (bytes.len() + 1));
            }
            let cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            // Compared bit for bit, so a flip that made a NaN still
            // compares equal to itself.
            let bits = |r: Result<HostTensor, CodecError>| {
                r.map(|t| (t.shape, t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()))
            };
            let one_shot = HostTensor::decode(&bytes, lim);
            let pieces = streamed(&bytes, &cuts, lim);
            prop_assert_eq!(bits(pieces), bits(one_shot));
        }

        /// The encoder writes exactly the format's bytes: a plain,
        /// element-by-element writing of the same rules.
        #[test]
        fn encoding_is_the_plain_format(t in tensor_strategy()) {
            let n = t.data.len();
            let stored: Vec<u32> =
                t.data.iter().map(|x| x.to_bits()).filter(|&b| b != 0).collect();
            let sparse = n.div_ceil(8) + 4 * stored.len() < 4 * n;
            let mut want = vec![if sparse { 2 | SPARSE } else { 2 }];
            for &d in &t.shape {
                want.extend_from_slice(&(d as u32).to_le_bytes());
            }
            if sparse {
                let mut bitmap = vec![0u8; n.div_ceil(8)];
                for (i, x) in t.data.iter().enumerate() {
                    if x.to_bits() != 0 {
                        bitmap[i / 8] |= 1 << (i % 8);
                    }
                }
                want.extend_from_slice(&bitmap);
                for b in stored {
                    want.extend_from_slice(&b.to_le_bytes());
                }
            } else {
                for x in &t.data {
                    want.extend_from_slice(&x.to_bits().to_le_bytes());
                }
            }
            prop_assert_eq!(t.encode(), want);
        }

        /// Written in pieces of any sizes (a cell's payload, a few bytes,
        /// one), the encoding is the same bytes as written at once, and a
        /// piece past the end writes nothing.
        #[test]
        fn an_encoding_in_pieces_is_the_whole(
            t in tensor_strategy(),
            sizes in proptest::collection::vec(1usize..80, 1..12),
        ) {
            let whole = t.encode();
            let mut e = t.encoding();
            prop_assert_eq!(e.len(), whole.len());
            prop_assert_eq!(e.len(), t.encoded_len());
            let mut got = Vec::new();
            let mut i = 0;
            while e.remaining() > 0 {
                let mut piece = vec![0xA5u8; sizes[i % sizes.len()]];
                let n = e.fill(&mut piece);
                prop_assert_eq!(n, piece.len().min(whole.len() - got.len()));
                got.extend_from_slice(&piece[..n]);
                i += 1;
            }
            prop_assert_eq!(&got, &whole);
            prop_assert_eq!(e.fill(&mut [0u8; 4]), 0);
        }

        /// Undamaged encodings round-trip bit for bit, fed cell-sized or
        /// byte by byte.
        #[test]
        fn streaming_round_trips(t in tensor_strategy(), step in 1usize..300) {
            let lim = DecodeLimits::default();
            let bytes = t.encode();
            let cuts: Vec<usize> = (0..bytes.len()).step_by(step).collect();
            let back = streamed(&bytes, &cuts, lim).expect("decodes");
            prop_assert_eq!(&back.shape, &t.shape);
            let same = back.data.iter().zip(&t.data).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same);
        }
    }

    /// The sparse form's elements take memory only once its bitmap has
    /// passed: a start on a header claiming many elements allocates
    /// nothing.
    #[test]
    fn a_sparse_start_allocates_nothing_before_the_bitmap() {
        let mut head = vec![2 | SPARSE];
        head.extend_from_slice(&4096u32.to_le_bytes());
        head.extend_from_slice(&4096u32.to_le_bytes());
        let lim = DecodeLimits {
            max_rank: 2,
            max_elements: 1 << 24,
        };
        let total = head.len() + (1 << 21) + 4 * 10;
        let dec = StreamDecoder::start(&head, total, lim)
            .expect("the header is fine")
            .expect("and all in");
        assert_eq!(dec.data.capacity(), 0);
        assert_eq!(dec.total(), total);
    }
}
