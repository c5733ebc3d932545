//! [`HostTensor`] and its wire codec.
//!
//! Layout: `rank: u8`, then `rank` dims as `u32` little-endian, then the
//! elements as `f32` little-endian, row-major. Nothing else, no padding.

use serde::{Deserialize, Serialize};

/// Highest rank the codec accepts.
pub const MAX_RANK: usize = 4;

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
        1 + 4 * self.shape.len() + 4 * self.data.len()
    }

    /// Encodes to a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoding to `out`.
    ///
    /// The tensor must be well formed (rank ≤ 255, dims ≤ `u32::MAX`, data
    /// matching the shape); a malformed one encodes to bytes that `decode`
    /// rejects.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(u8::try_from(self.shape.len()).unwrap_or(u8::MAX));
        for &d in &self.shape {
            out.extend_from_slice(&u32::try_from(d).unwrap_or(u32::MAX).to_le_bytes());
        }
        for &x in &self.data {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }

    /// Decodes untrusted bytes. Checks rank, element count and exact length
    /// before allocating anything.
    pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<HostTensor, CodecError> {
        let (&rank, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
        let rank = usize::from(rank);
        let limit = limits.max_rank.min(MAX_RANK);
        if rank > limit {
            return Err(CodecError::RankTooHigh { rank, limit });
        }
        if rest.len() < 4 * rank {
            return Err(CodecError::HeaderTruncated {
                rank,
                needed: 1 + 4 * rank,
                have: bytes.len(),
            });
        }
        let (header, payload) = rest.split_at(4 * rank);
        let mut shape = [0usize; MAX_RANK];
        for (slot, chunk) in shape.iter_mut().zip(header.chunks_exact(4)) {
            *slot = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
        }
        let shape = &shape[..rank];
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= limits.max_elements)
            .ok_or_else(|| CodecError::TooManyElements {
                shape: shape.to_vec(),
                limit: limits.max_elements,
            })?;
        if payload.len() != 4 * n {
            return Err(CodecError::LengthMismatch {
                shape: shape.to_vec(),
                expected: 4 * n,
                have: payload.len(),
            });
        }
        let data = payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t =
            HostTensor::new(vec![2, 3], vec![1.0, -2.5, 0.0, f32::MAX, -0.0, 7.25]).expect("ok");
        let b = t.encode();
        assert_eq!(b.len(), t.encoded_len());
        assert_eq!(b[0], 2);
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
}
