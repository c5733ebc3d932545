//! Parameter digests.
//!
//! A stage's digest is blake3 over its parameters as little-endian `f32`:
//! the weight (`[outputs, inputs]`, row-major), then the bias. A model's
//! digest is blake3 over its stages' digests in stage order.

/// blake3 over the per-stage digests, in stage order.
pub fn model_digest(stage_digests: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for d in stage_digests {
        h.update(d);
    }
    *h.finalize().as_bytes()
}

/// Lowercase hex of a digest.
pub fn to_hex(digest: &[u8; 32]) -> String {
    hex::encode(digest)
}

/// Feeds `xs` to `h` as little-endian bytes, in chunks (the same hash as
/// one `update` per element, at blake3's bulk speed).
pub fn hash_f32s(h: &mut blake3::Hasher, xs: &[f32]) {
    let mut buf = [0u8; 4096];
    for chunk in xs.chunks(buf.len() / 4) {
        for (dst, x) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_matches_spec() {
        let xs: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mut h = blake3::Hasher::new();
        hash_f32s(&mut h, &xs);
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(h.finalize(), blake3::hash(&bytes));
        let d = [[1u8; 32], [2u8; 32]];
        assert_eq!(
            model_digest(&d),
            *blake3::hash(&[[1u8; 32], [2u8; 32]].concat()).as_bytes()
        );
        assert_eq!(to_hex(&[0xab; 32]).len(), 64);
    }
}
