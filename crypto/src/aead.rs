//! The AEADs under every cell: ChaCha20-Poly1305 (RFC 8439) through
//! OpenSSL's libcrypto or aws-lc's assembly, whichever runs it faster on
//! the CPU, with aws-lc and then the RustCrypto implementation as
//! fallbacks; and AES-256-GCM (NIST SP 800-38D) through
//! aws-lc or ring, whichever runs it faster on the CPU, with the RustCrypto
//! implementation as the last fallback. A circuit's client picks the suite
//! of each segment ([`CellSuite`]).
//!
//! Every implementation of a suite produces the same bytes (a test in
//! `tests/cells.rs` checks each against the RustCrypto crate on random
//! keys, nonces and lengths), so which one sealed a cell never shows on the
//! wire. OpenSSL runs ChaCha20 and Poly1305 with AVX-512 where the CPU has
//! it, about 1.5 times aws-lc's stitched AVX2 code and twice the portable
//! crate on one core; where the CPU has AVX2 and not AVX-512, aws-lc's
//! stitched code beats OpenSSL's AVX2 code ([`chacha_backend`]). aws-lc
//! also serves where libcrypto refuses the cipher (a build without
//! ChaCha20, a FIPS-only provider); the portable crate only where both
//! refuse, which neither does for a 32-byte
//! key. Where the CPU has AES and carry-less multiply instructions
//! ([`aes_in_hardware`]), AES-256-GCM runs about three times faster than
//! the fastest ChaCha20-Poly1305 (10.4 against 3.3 GB/s on a 64 KiB cell
//! on an Intel Xeon with VAES and AVX-512). Which library runs it depends on
//! the CPU ([`aes_gcm_backend`]): aws-lc's 512-bit code where AVX-512 is
//! there, ring's elsewhere on x86-64, where aws-lc has only its AES-NI code
//! and ring's VAES code on 256-bit vectors runs twice as fast. ring has no
//! out-of-place calls, so `seal_to` and `open_to` copy first and then work
//! in place.
//!
//! Seal and open work in place on a caller's buffer, or from one buffer into
//! another (`seal_to`, `open_to`: the cipher reads the source and writes the
//! destination in the same pass, so a message needs no copy on its way into
//! or out of a cell), always with a detached tag, and allocate nothing. They
//! take `&mut self`: an OpenSSL context carries the nonce of the operation
//! under way.

use aes_gcm::Aes256Gcm;
use aws_lc_rs::aead::{
    Aad, LessSafeKey, Nonce as LcNonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305,
};
use chacha20poly1305::aead::consts::{U12, U16};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use serde::{Deserialize, Serialize};

/// Bytes of an AEAD tag.
pub const TAG_BYTES: usize = 16;
/// Bytes of an AEAD nonce.
pub const NONCE_BYTES: usize = 12;

/// The most bytes one message may hold under one nonce: ChaCha20's 32-bit
/// block counter runs out after 2^32 blocks of 64 bytes, less the block
/// that keys Poly1305.
const MAX_DATA_BYTES: u64 = ((1u64 << 32) - 1) * 64;

/// The most bytes one AES-256-GCM message may hold under one nonce: its
/// 32-bit block counter less the block that makes the tag's mask.
const MAX_AES_DATA_BYTES: u64 = (1u64 << 36) - 32;

/// The most bytes handed to libcrypto in one call (its lengths are `int`).
const OPENSSL_CHUNK: usize = 1 << 30;

/// The cipher suite of a segment's cells: both suites take a 32-byte key,
/// a 12-byte nonce and give a 16-byte tag, so a cell's layout is the same
/// under either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CellSuite {
    /// Every peer speaks it, and it is fast without special instructions.
    #[default]
    ChaCha20Poly1305,
    /// For a segment whose two ends both have AES instructions.
    Aes256Gcm,
}

impl CellSuite {
    /// The suite for a segment between two ends that have (`true`) or lack
    /// AES instructions: AES-256-GCM only where both have them (without
    /// them it is slower than ChaCha20-Poly1305, and not constant-time in
    /// every implementation).
    pub fn for_segment(a_aes: bool, b_aes: bool) -> Self {
        if a_aes && b_aes {
            Self::Aes256Gcm
        } else {
            Self::ChaCha20Poly1305
        }
    }

    /// The suite's name in the metrics (`mixnn_segments_total{suite}`).
    pub fn name(self) -> &'static str {
        match self {
            Self::ChaCha20Poly1305 => "chacha20-poly1305",
            Self::Aes256Gcm => "aes-256-gcm",
        }
    }
}

/// The fastest AES-256-GCM on this CPU: aws-lc where it has AVX-512 with
/// VAES and VPCLMULQDQ (aws-lc's 512-bit code runs there: 11.7 against
/// ring's 6.8 GiB/s on an Intel Xeon), ring on any other x86-64 CPU (its
/// VAES code on 256-bit vectors, or its AES-NI code, against aws-lc's
/// AES-NI code: 5.2–6.5 against 2.5–2.8 GB/s on an AMD EPYC that shows
/// VAES but not AVX-512), aws-lc elsewhere.
pub fn aes_gcm_backend() -> Backend {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq");
        if avx512 {
            Backend::Assembly
        } else {
            Backend::Ring
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Backend::Assembly
    }
}

/// The fastest ChaCha20-Poly1305 on this CPU: OpenSSL's libcrypto where
/// the CPU has AVX-512 (its ChaCha20 and Poly1305 on 512-bit vectors:
/// 2.99 against aws-lc's 1.79 GiB/s sealing 1 MiB on an Intel Xeon), and
/// aws-lc's stitched AVX2 code on any other x86-64 CPU, where OpenSSL has
/// only its AVX2 code: on an AMD EPYC with AVX2 and no AVX-512, sealing
/// 1 MiB in 64 KiB pieces, aws-lc 1.92–2.11 against OpenSSL's 1.79–1.88
/// GiB/s (medians of 400 rounds alternating the two, three runs; opening
/// alike). OpenSSL elsewhere, as before this choice.
pub fn chacha_backend() -> Backend {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            Backend::OpenSsl
        } else {
            Backend::Assembly
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Backend::OpenSsl
    }
}

/// Whether this CPU runs AES-256-GCM in hardware: AES and carry-less
/// multiply instructions (AES-NI and PCLMULQDQ on x86-64, AES and PMULL on
/// Arm).
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Which implementation seals and opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// OpenSSL's libcrypto (the default for ChaCha20-Poly1305 on x86-64
    /// CPUs with AVX-512 and off x86-64: [`chacha_backend`]).
    OpenSsl,
    /// aws-lc's assembly (the default for ChaCha20-Poly1305 on other
    /// x86-64 CPUs, and for AES-256-GCM on x86-64 CPUs with AVX-512 and
    /// off x86-64: [`aes_gcm_backend`]).
    Assembly,
    /// ring's assembly (the default for AES-256-GCM on other x86-64 CPUs).
    Ring,
    /// The RustCrypto crate (`chacha20poly1305` or `aes-gcm`).
    Portable,
}

enum Engine {
    OpenSsl(Box<OpenSslKey>),
    /// Either suite: aws-lc holds the algorithm with the key.
    Assembly(LessSafeKey),
    /// AES-256-GCM only.
    Ring(Box<ring::aead::LessSafeKey>),
    Portable(Box<ChaCha20Poly1305>),
    PortableAes(Box<Aes256Gcm>),
}

/// A cell key of one [`CellSuite`] ready to seal and open in place.
pub struct CellAead {
    engine: Engine,
}

impl CellAead {
    /// The fastest ChaCha20-Poly1305 implementation available for `key`
    /// ([`chacha_backend`]).
    pub fn new(key: &[u8; 32]) -> Self {
        Self::with_backend(key, chacha_backend())
    }

    /// The fastest implementation of `suite` available for `key`.
    pub fn for_suite(key: &[u8; 32], suite: CellSuite) -> Self {
        match suite {
            CellSuite::ChaCha20Poly1305 => Self::new(key),
            CellSuite::Aes256Gcm => Self::aes_with_backend(key, aes_gcm_backend()),
        }
    }

    /// ChaCha20-Poly1305 through `backend` for `key`, or the next one in
    /// the order OpenSSL, aws-lc, portable where it refuses the key
    /// ([`CellAead::backend`] says which one it got).
    pub fn with_backend(key: &[u8; 32], backend: Backend) -> Self {
        if backend == Backend::OpenSsl {
            if let Some(k) = OpenSslKey::new(key) {
                return Self {
                    engine: Engine::OpenSsl(Box::new(k)),
                };
            }
        }
        if backend != Backend::Portable {
            if let Ok(k) = UnboundKey::new(&CHACHA20_POLY1305, key) {
                return Self {
                    engine: Engine::Assembly(LessSafeKey::new(k)),
                };
            }
        }
        Self::portable(key)
    }

    /// AES-256-GCM through `backend` for `key`: ring (asked for by
    /// [`Backend::OpenSsl`] too), aws-lc, or the `aes-gcm` crate, each the
    /// next one's fallback where it refuses the key.
    pub fn aes_with_backend(key: &[u8; 32], backend: Backend) -> Self {
        if matches!(backend, Backend::Ring | Backend::OpenSsl) {
            if let Ok(k) = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key) {
                return Self {
                    engine: Engine::Ring(Box::new(ring::aead::LessSafeKey::new(k))),
                };
            }
        }
        if backend != Backend::Portable {
            if let Ok(k) = UnboundKey::new(&AES_256_GCM, key) {
                return Self {
                    engine: Engine::Assembly(LessSafeKey::new(k)),
                };
            }
        }
        Self {
            engine: Engine::PortableAes(Box::new(Aes256Gcm::new(key.into()))),
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
            Engine::OpenSsl(_) => Backend::OpenSsl,
            Engine::Assembly(_) => Backend::Assembly,
            Engine::Ring(_) => Backend::Ring,
            Engine::Portable(_) | Engine::PortableAes(_) => Backend::Portable,
        }
    }

    /// Which suite this key seals and opens.
    pub fn suite(&self) -> CellSuite {
        match &self.engine {
            Engine::Assembly(k) if k.algorithm() == &AES_256_GCM => CellSuite::Aes256Gcm,
            Engine::PortableAes(_) | Engine::Ring(_) => CellSuite::Aes256Gcm,
            Engine::OpenSsl(_) | Engine::Assembly(_) | Engine::Portable(_) => {
                CellSuite::ChaCha20Poly1305
            }
        }
    }

    /// The longest message the suite takes under one nonce.
    fn max_data(&self) -> u64 {
        match self.suite() {
            CellSuite::ChaCha20Poly1305 => MAX_DATA_BYTES,
            CellSuite::Aes256Gcm => MAX_AES_DATA_BYTES,
        }
    }

    /// Encrypts `data` in place under `nonce` and `aad`; returns the tag.
    /// `None` only for data beyond the cipher's limit (about 256 GiB for ChaCha20-Poly1305, 64 GiB for AES-256-GCM).
    pub fn seal_in_place(
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        data: &mut [u8],
    ) -> Option<[u8; TAG_BYTES]> {
        if data.len() as u64 > self.max_data() {
            return None;
        }
        let mut out = [0u8; TAG_BYTES];
        match &mut self.engine {
            Engine::OpenSsl(k) => return k.seal(nonce, aad, Data::InPlace(data)),
            Engine::Assembly(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        LcNonce::assume_unique_for_key(*nonce),
                        Aad::from(aad),
                        data,
                    )
                    .ok()?;
                out = tag.as_ref().try_into().ok()?;
            }
            Engine::Ring(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(*nonce),
                        ring::aead::Aad::from(aad),
                        data,
                    )
                    .ok()?;
                out = tag.as_ref().try_into().ok()?;
            }
            Engine::Portable(c) => {
                let tag = c
                    .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, data)
                    .ok()?;
                out.copy_from_slice(&tag);
            }
            Engine::PortableAes(c) => {
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
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        plain: &[u8],
        out: &mut [u8],
    ) -> Option<[u8; TAG_BYTES]> {
        if plain.len() != out.len() || plain.len() as u64 > self.max_data() {
            return None;
        }
        match &mut self.engine {
            Engine::OpenSsl(k) => k.seal(nonce, aad, Data::Apart(plain, out)),
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
            Engine::Ring(_) | Engine::Portable(_) | Engine::PortableAes(_) => {
                out.copy_from_slice(plain);
                self.seal_in_place(nonce, aad, out)
            }
        }
    }

    /// Authenticates `ciphertext` and decrypts it into `out` (exactly as
    /// long); `ciphertext` is not changed. On failure (a wrong tag or
    /// different lengths) returns false, and `out` holds unspecified bytes.
    pub fn open_to(
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_BYTES],
        out: &mut [u8],
    ) -> bool {
        if ciphertext.len() != out.len() || ciphertext.len() as u64 > self.max_data() {
            return false;
        }
        match &mut self.engine {
            Engine::OpenSsl(k) => k.open(nonce, aad, Data::Apart(ciphertext, out), tag),
            Engine::Assembly(k) => k
                .open_separate_gather(
                    LcNonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    ciphertext,
                    tag,
                    out,
                )
                .is_ok(),
            Engine::Ring(_) | Engine::Portable(_) | Engine::PortableAes(_) => {
                out.copy_from_slice(ciphertext);
                self.open_in_place(nonce, aad, out, tag)
            }
        }
    }

    /// Authenticates and decrypts `data` in place. On failure returns
    /// false, and `data` holds unspecified bytes.
    pub fn open_in_place(
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        data: &mut [u8],
        tag: &[u8; TAG_BYTES],
    ) -> bool {
        if data.len() as u64 > self.max_data() {
            return false;
        }
        match &mut self.engine {
            Engine::OpenSsl(k) => k.open(nonce, aad, Data::InPlace(data), tag),
            Engine::Assembly(k) => k
                .open_in_place_separate_tag(
                    LcNonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    tag,
                    data,
                )
                .is_ok(),
            Engine::Ring(k) => k
                .open_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(*nonce),
                    ring::aead::Aad::from(aad),
                    ring::aead::Tag::from(*tag),
                    data,
                    0..,
                )
                .is_ok(),
            Engine::Portable(c) => portable_open(&**c, nonce, aad, data, tag),
            Engine::PortableAes(c) => portable_open(&**c, nonce, aad, data, tag),
        }
    }
}

/// A RustCrypto AEAD's open in place with a detached tag.
fn portable_open<A: AeadInPlace<NonceSize = U12, TagSize = U16>>(
    cipher: &A,
    nonce: &[u8; NONCE_BYTES],
    aad: &[u8],
    data: &mut [u8],
    tag: &[u8; TAG_BYTES],
) -> bool {
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, data, Tag::from_slice(tag))
        .is_ok()
}

/// What an OpenSSL operation reads and writes.
enum Data<'a> {
    InPlace(&'a mut [u8]),
    Apart(&'a [u8], &'a mut [u8]),
}

/// A libcrypto cipher context holding the key; each operation sets its
/// nonce and direction on it.
struct OpenSslKey {
    ctx: CipherCtx,
}

impl OpenSslKey {
    /// `None` if libcrypto refuses the cipher or the key.
    fn new(key: &[u8; 32]) -> Option<Self> {
        let mut ctx = CipherCtx::new().ok()?;
        let cipher = Cipher::chacha20_poly1305();
        if cipher.key_length() != key.len() || cipher.iv_length() != NONCE_BYTES {
            return None;
        }
        ctx.encrypt_init(Some(cipher), Some(key), None).ok()?;
        Some(Self { ctx })
    }

    fn seal(
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        data: Data<'_>,
    ) -> Option<[u8; TAG_BYTES]> {
        self.ctx.encrypt_init(None, None, Some(nonce)).ok()?;
        self.update(aad, data)?;
        self.ctx.cipher_final(&mut []).ok()?;
        let mut tag = [0u8; TAG_BYTES];
        self.ctx.tag(&mut tag).ok()?;
        Some(tag)
    }

    fn open(
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        data: Data<'_>,
        tag: &[u8; TAG_BYTES],
    ) -> bool {
        let opened = (|| {
            self.ctx.decrypt_init(None, None, Some(nonce)).ok()?;
            self.ctx.set_tag(tag).ok()?;
            self.update(aad, data)?;
            // The tag is checked here.
            self.ctx.cipher_final(&mut []).ok()
        })();
        opened.is_some()
    }

    /// The associated data, then the data, in pieces libcrypto's `int`
    /// lengths can hold. A stream cipher writes exactly what it reads.
    fn update(&mut self, aad: &[u8], data: Data<'_>) -> Option<()> {
        for piece in aad.chunks(OPENSSL_CHUNK) {
            self.ctx.cipher_update(piece, None).ok()?;
        }
        match data {
            Data::InPlace(buf) => {
                for piece in buf.chunks_mut(OPENSSL_CHUNK) {
                    let n = piece.len();
                    if self.ctx.cipher_update_inplace(piece, n).ok()? != n {
                        return None;
                    }
                }
            }
            Data::Apart(input, out) => {
                for (i, o) in input
                    .chunks(OPENSSL_CHUNK)
                    .zip(out.chunks_mut(OPENSSL_CHUNK))
                {
                    if self.ctx.cipher_update(i, Some(o)).ok()? != i.len() {
                        return None;
                    }
                }
            }
        }
        Some(())
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
        for mut aead in [
            CellAead::new(&key),
            CellAead::with_backend(&key, Backend::OpenSsl),
            CellAead::with_backend(&key, Backend::Assembly),
            CellAead::portable(&key),
        ] {
            let mut data = plain.to_vec();
            let tag = aead.seal_in_place(&nonce, &aad, &mut data);
            assert_eq!(tag, Some(want_tag), "{aead:?}");
            assert_eq!(&data[..4], &[0xd3, 0x1a, 0x8d, 0x34], "{aead:?}");
            assert!(aead.open_in_place(&nonce, &aad, &mut data, &want_tag));
            assert_eq!(&data[..], &plain[..]);
        }
        assert_eq!(CellAead::new(&key).backend(), chacha_backend());
        assert_eq!(
            CellAead::with_backend(&key, Backend::OpenSsl).backend(),
            Backend::OpenSsl
        );
        assert_eq!(
            CellAead::with_backend(&key, Backend::Assembly).backend(),
            Backend::Assembly
        );
    }

    #[test]
    fn a_flipped_bit_fails_open() {
        for backend in [Backend::OpenSsl, Backend::Assembly, Backend::Portable] {
            flipped_bit_fails_open(CellAead::with_backend(&[9; 32], backend), backend);
        }
        for backend in [Backend::Ring, Backend::Assembly, Backend::Portable] {
            let aead = CellAead::aes_with_backend(&[9; 32], backend);
            assert_eq!(aead.suite(), CellSuite::Aes256Gcm);
            flipped_bit_fails_open(aead, backend);
        }
    }

    fn flipped_bit_fails_open(mut aead: CellAead, backend: Backend) {
        assert_eq!(aead.backend(), backend);
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
