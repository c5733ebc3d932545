//! Random padding at the cipher's pace: megabytes that no one can tell
//! from random, for the parts of a job's state message that no host has
//! filled yet.

use aws_lc_rs::cipher::{EncryptingKey, UnboundCipherKey, AES_256};
use rand::RngCore;
use thiserror::Error;

#[derive(Debug, Error)]
#[error("the padding cipher failed")]
pub struct PaddingError;

/// `len` bytes of padding: AES-256 in counter mode over zeros, under a key
/// and an initial counter drawn from the operating system's generator for
/// this call alone. A general-purpose generator (ChaCha12 by `rand`) fills
/// at well under 1 GB/s; counter mode runs at the AES instructions' pace.
pub fn padding(len: usize) -> Result<Vec<u8>, PaddingError> {
    let mut out = vec![0u8; len];
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let key = UnboundCipherKey::new(&AES_256, &key).map_err(|_| PaddingError)?;
    // The initial counter is random too (drawn by the cipher's context).
    EncryptingKey::ctr(key)
        .and_then(|k| k.encrypt(&mut out))
        .map_err(|_| PaddingError)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padding is the length asked for, differs between calls, and its
    /// bytes are spread as random bytes are (not zeros, not one key's
    /// stream twice).
    #[test]
    fn padding_is_fresh_and_looks_random() {
        let a = padding(1 << 20).expect("padding");
        let b = padding(1 << 20).expect("padding");
        assert_eq!(a.len(), 1 << 20);
        assert_ne!(a, b);
        assert!(padding(0).expect("empty").is_empty());
        assert_eq!(padding(17).expect("odd length").len(), 17);
        // Each byte value about 4096 times in 1 MiB; a chi-squared over
        // 255 degrees of freedom stays far below 400 for random bytes.
        let mut counts = [0u64; 256];
        for &x in &a {
            counts[x as usize] += 1;
        }
        let expected = a.len() as f64 / 256.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 400.0, "chi-squared {chi2}");
    }
}
