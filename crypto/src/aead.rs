//! The AEAD under every cell: ChaCha20-Poly1305 (RFC 8439) through aws-lc's
//! assembly, the RustCrypto implementation as the portable fallback.
//!
//! Both produce the same bytes (a test in `tests/cells.rs` checks the
//! assembly against the `chacha20poly1305` crate on random keys, nonces and
//! lengths), so which one sealed a cell never shows on the wire. aws-lc
//! stitches ChaCha20 and Poly1305 into one pass over the data with AVX2 on
//! x86-64 (NEON on aarch64), about twice the speed of the portable crate on
//! one core; the portable one is used only if aws-lc refuses a key, which it
//! does not do for a 32-byte key.
//!
//! Seal and open work in place on a caller's buffer, or from one buffer into
//! another (`seal_to`, `open_to`: the cipher reads the source and writes the
//! destination in the same pass, so a message needs no copy on its way into
//! or out of a cell), always with a detached tag, and allocate nothing.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce as LcNonce, UnboundKey, CHACHA20_POLY1305};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};

/// Bytes of an AEAD tag.
pub const TAG_BYTES: usize = 16;
/// Bytes of an AEAD nonce.
pub const NONCE_BYTES: usize = 12;

/// Which implementation seals and opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// aws-lc's assembly (the default).
    Assembly,
    /// The `chacha20poly1305` crate.
    Portable,
}

enum Engine {
    Assembly(LessSafeKey),
    Portable(Box<ChaCha20Poly1305>),
}

/// A ChaCha20-Poly1305 key ready to seal and open in place.
pub struct CellAead {
    engine: Engine,
}

impl CellAead {
    /// The fastest implementation available for `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        match UnboundKey::new(&CHACHA20_POLY1305, key) {
            Ok(k) => Self {
                engine: Engine::Assembly(LessSafeKey::new(k)),
            },
            Err(_) => Self::portable(key),
        }
    }

    /// The `chacha20poly1305` crate for `key` (for comparisons).
    pub fn portable(key: &[u8; 32]) -> Self {
        Self {
            engine: Engine::Portable(Box::new(ChaCha20Poly1305::new(key.into()))),
        }
    }

    /// Which implementation this key uses.
    pub fn backend(&self) -> Backend {
        match self.engine {
            Engine::Assembly(_) => Backend::Assembly,
            Engine::Portable(_) => Backend::Portable,
        }
    }

    /// Encrypts `data` in place under `nonce` and `aad`; returns the tag.
    /// `None` only for data beyond the cipher's limit (about 256 GiB).
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        data: &mut [u8],
    ) -> Option<[u8; TAG_BYTES]> {
        let mut out = [0u8; TAG_BYTES];
        match &self.engine {
            Engine::Assembly(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        LcNonce::assume_unique_for_key(*nonce),
                        Aad::from(aad),
                        data,
                    )
                    .ok()?;
                let tag = tag.as_ref();
                if tag.len() != TAG_BYTES {
                    return None;
                }
                out.copy_from_slice(tag);
            }
            Engine::Portable(c) => {
                let tag = c
                    .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, data)
                    .ok()?;
                out.copy_from_slice(&tag);
            }
        }
        Some(out)
    }

    /// Encrypts `plain` into `out` (exactly as long) under `nonce` and
    /// `aad` and returns the tag; `plain` is not changed. `None` if the
    /// lengths differ or beyond the cipher's limit.
    pub fn seal_to(
        &self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        plain: &[u8],
        out: &mut [u8],
    ) -> Option<[u8; TAG_BYTES]> {
        if plain.len() != out.len() {
            return None;
        }
        match &self.engine {
            Engine::Assembly(k) => {
                let mut tag = [0u8; TAG_BYTES];
                k.seal_out_of_place_scatter(
                    LcNonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    plain,
                    out,
                    &[],
                    &mut tag,
                )
                .ok()?;
                Some(tag)
            }
            Engine::Portable(_) => {
                out.copy_from_slice(plain);
                self.seal_in_place(nonce, aad, out)
            }
        }
    }

    /// Authenticates `ciphertext` and decrypts it into `out` (exactly as
    /// long); `ciphertext` is not changed. On failure (a wrong tag or
    /// different lengths) returns false, and `out` holds unspecified bytes.
    pub fn open_to(
        &self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_BYTES],
        out: &mut [u8],
    ) -> bool {
        if ciphertext.len() != out.len() {
            return false;
        }
        match &self.engine {
            Engine::Assembly(k) => k
                .open_separate_gather(
                    LcNonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    ciphertext,
                    tag,
                    out,
                )
                .is_ok(),
            Engine::Portable(_) => {
                out.copy_from_slice(ciphertext);
                self.open_in_place(nonce, aad, out, tag)
            }
        }
    }

    /// Authenticates and decrypts `data` in place. On failure returns
    /// false, and `data` holds unspecified bytes.
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        data: &mut [u8],
        tag: &[u8; TAG_BYTES],
    ) -> bool {
        match &self.engine {
            Engine::Assembly(k) => k
                .open_in_place_separate_tag(
                    LcNonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    tag,
                    data,
                )
                .is_ok(),
            Engine::Portable(c) => c
                .decrypt_in_place_detached(
                    Nonce::from_slice(nonce),
                    aad,
                    data,
                    Tag::from_slice(tag),
                )
                .is_ok(),
        }
    }
}

impl std::fmt::Debug for CellAead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CellAead({:?})", self.backend())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8439 section 2.8.2.
    #[test]
    fn rfc8439_vector() {
        let key: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
        let nonce = [
            0x07, 0, 0, 0, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47,
        ];
        let aad = [
            0x50, 0x51, 0x52, 0x53, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7,
        ];
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let want_tag = [
            0x1a, 0xe1, 0x0b, 0x59, 0x4f, 0x09, 0xe2, 0x6a, 0x7e, 0x90, 0x2e, 0xcb, 0xd0, 0x60,
            0x06, 0x91,
        ];
        for aead in [CellAead::new(&key), CellAead::portable(&key)] {
            let mut data = plain.to_vec();
            let tag = aead.seal_in_place(&nonce, &aad, &mut data);
            assert_eq!(tag, Some(want_tag), "{aead:?}");
            assert_eq!(&data[..4], &[0xd3, 0x1a, 0x8d, 0x34], "{aead:?}");
            assert!(aead.open_in_place(&nonce, &aad, &mut data, &want_tag));
            assert_eq!(&data[..], &plain[..]);
        }
        assert_eq!(CellAead::new(&key).backend(), Backend::Assembly);
    }

    #[test]
    fn a_flipped_bit_fails_open() {
        let aead = CellAead::new(&[9; 32]);
        let nonce = [1; NONCE_BYTES];
        let mut data = vec![0x33u8; 1000];
        let tag = aead.seal_in_place(&nonce, &[], &mut data);
        let Some(tag) = tag else {
            panic!("seal failed")
        };
        let mut bad = data.clone();
        bad[500] ^= 1;
        assert!(!aead.open_in_place(&nonce, &[], &mut bad, &tag));
        let mut bad_tag = tag;
        bad_tag[0] ^= 0x80;
        let mut copy = data.clone();
        assert!(!aead.open_in_place(&nonce, &[], &mut copy, &bad_tag));
        assert!(!aead.open_in_place(&[2; NONCE_BYTES], &[], &mut data.clone(), &tag));
        assert!(aead.open_in_place(&nonce, &[], &mut data, &tag));
        assert!(data.iter().all(|&b| b == 0x33));
    }
}
