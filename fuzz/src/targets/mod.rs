//! The targets, a module per decoder family.

pub mod cells;
pub mod descriptor;
pub mod files;
pub mod onion;
pub mod payload;
pub mod slot;
pub mod tensor;
pub mod wire;

use std::sync::OnceLock;

use mixnn_crypto::{Identity, OnionKeyPair};

/// Fixed keys, so an input means the same thing on every run.
pub(crate) fn onion_keys() -> &'static [OnionKeyPair] {
    static KEYS: OnceLock<Vec<OnionKeyPair>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..mixnn_crypto::onion::MAX_HOPS)
            .map(|i| {
                // The storage form of a key: magic, epoch, expiry, secret.
                let mut bytes = OnionKeyPair::generate(1, u64::MAX).to_bytes();
                bytes[24..56].fill(i as u8 + 1);
                OnionKeyPair::from_bytes(&bytes).expect("an onion key's own bytes")
            })
            .collect()
    })
}

pub(crate) fn identity(n: u8) -> Identity {
    Identity::from_secret(&[n; 32])
}
