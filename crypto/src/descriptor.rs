//! The signed descriptor a peer publishes in the DHT.
//!
//! Wire format: `version (1) | body length (u16 LE) | body | signature (64)`.
//! The body is the postcard encoding of [`Descriptor`]; the signature is the
//! identity key's over a domain tag and the body. A reader checks the size,
//! the encoding, the signature, that the peer id is the identity key's, and
//! the expiry, and gets a [`DescriptorError`] naming the first that fails.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::{peer_id_bytes, verify_signature, Identity};

const VERSION: u8 = 1;
const DOMAIN: &[u8] = b"mixnn-descriptor-v1";

/// Upper bound on an encoded descriptor.
pub const MAX_DESCRIPTOR_BYTES: usize = 4096;
/// At most this many listen addresses.
pub const MAX_ADDRESSES: usize = 16;
/// At most this many bytes per address.
pub const MAX_ADDRESS_BYTES: usize = 256;
/// A descriptor may not claim to be valid for longer than this (seconds).
pub const MAX_LIFETIME_SECS: u64 = 7 * 24 * 3600;

/// What a peer offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    pub layer_host: bool,
    pub mix: bool,
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.layer_host, self.mix) {
            (true, true) => f.write_str("layer-host+mix"),
            (true, false) => f.write_str("layer-host"),
            (false, true) => f.write_str("mix"),
            (false, false) => f.write_str("none"),
        }
    }
}

/// Resources a layer host offers for the slots it has free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Largest number of parameters one slot may hold.
    pub max_params: u64,
    /// Memory the node sets aside for slots, in bytes.
    pub memory_bytes: u64,
}

/// A peer's public description of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// libp2p peer id bytes; must be those of `identity_key`.
    pub peer_id: Vec<u8>,
    pub identity_key: [u8; 32],
    /// x25519 key for circuit setup in `epoch`.
    pub onion_key: [u8; 32],
    pub epoch: u64,
    /// Unix seconds after which the descriptor is void.
    pub expires_at: u64,
    pub roles: Roles,
    pub free_slots: u32,
    pub capacity: Capacity,
    /// Multiaddrs the peer listens on, as strings.
    pub addresses: Vec<String>,
}

/// Why a descriptor was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DescriptorError {
    #[error("descriptor is {0} bytes, more than the {MAX_DESCRIPTOR_BYTES} allowed")]
    TooLarge(usize),
    #[error("descriptor is truncated or malformed")]
    Malformed,
    #[error("descriptor version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("descriptor has {0} addresses or one too long")]
    TooManyAddresses(usize),
    #[error("descriptor signature does not verify")]
    BadSignature,
    #[error("descriptor claims a peer id that is not its identity key's")]
    PeerIdMismatch,
    #[error("descriptor expired at {expires_at} (now {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error("descriptor claims a lifetime beyond the allowed maximum")]
    LifetimeTooLong,
}

/// A descriptor with its signature, as stored in the DHT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedDescriptor {
    body: Vec<u8>,
    signature: [u8; 64],
}

impl Descriptor {
    /// Encode and sign with `identity`. The caller fills `peer_id` and
    /// `identity_key` from the same identity.
    pub fn sign(&self, identity: &Identity) -> Result<SignedDescriptor, DescriptorError> {
        self.check_limits()?;
        let body = postcard::to_allocvec(self).map_err(|_| DescriptorError::Malformed)?;
        if body.len() + 67 > MAX_DESCRIPTOR_BYTES {
            return Err(DescriptorError::TooLarge(body.len() + 67));
        }
        let signature = identity.sign(&signed_message(&body));
        Ok(SignedDescriptor { body, signature })
    }

    fn check_limits(&self) -> Result<(), DescriptorError> {
        if self.addresses.len() > MAX_ADDRESSES
            || self.addresses.iter().any(|a| a.len() > MAX_ADDRESS_BYTES)
        {
            return Err(DescriptorError::TooManyAddresses(self.addresses.len()));
        }
        Ok(())
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(body);
    m
}

impl SignedDescriptor {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.body.len() + 64);
        out.push(VERSION);
        // `sign` keeps the body under MAX_DESCRIPTOR_BYTES, so it fits a u16.
        out.extend_from_slice(&(self.body.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parse the framing only; [`SignedDescriptor::verify`] checks the rest.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DescriptorError> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(DescriptorError::TooLarge(bytes.len()));
        }
        let (&version, rest) = bytes.split_first().ok_or(DescriptorError::Malformed)?;
        if version != VERSION {
            return Err(DescriptorError::UnsupportedVersion(version));
        }
        if rest.len() < 2 {
            return Err(DescriptorError::Malformed);
        }
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let rest = &rest[2..];
        if rest.len() != len + 64 {
            return Err(DescriptorError::Malformed);
        }
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&rest[len..]);
        Ok(Self {
            body: rest[..len].to_vec(),
            signature,
        })
    }

    /// Check encoding, signature, peer id and expiry at unix time `now`.
    pub fn verify(&self, now: u64) -> Result<Descriptor, DescriptorError> {
        let (d, rest): (Descriptor, _) =
            postcard::take_from_bytes(&self.body).map_err(|_| DescriptorError::Malformed)?;
        if !rest.is_empty() {
            return Err(DescriptorError::Malformed);
        }
        d.check_limits()?;
        verify_signature(
            &d.identity_key,
            &signed_message(&self.body),
            &self.signature,
        )
        .map_err(|_| DescriptorError::BadSignature)?;
        if d.peer_id != peer_id_bytes(&d.identity_key) {
            return Err(DescriptorError::PeerIdMismatch);
        }
        if d.expires_at <= now {
            return Err(DescriptorError::Expired {
                expires_at: d.expires_at,
                now,
            });
        }
        if d.expires_at - now > MAX_LIFETIME_SECS {
            return Err(DescriptorError::LifetimeTooLong);
        }
        Ok(d)
    }

    /// Decode and verify in one call.
    pub fn decode_verified(bytes: &[u8], now: u64) -> Result<Descriptor, DescriptorError> {
        Self::from_bytes(bytes)?.verify(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor_with_expiry(id: &Identity, expires_at: u64) -> Descriptor {
        Descriptor {
            expires_at,
            ..sample(id)
        }
    }

    fn sample(id: &Identity) -> Descriptor {
        Descriptor {
            peer_id: id.peer_id_bytes(),
            identity_key: id.public_key(),
            onion_key: [7; 32],
            epoch: 3,
            expires_at: 2_000,
            roles: Roles {
                layer_host: true,
                mix: true,
            },
            free_slots: 4,
            capacity: Capacity {
                max_params: 1 << 20,
                memory_bytes: 1 << 30,
            },
            addresses: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        }
    }

    #[test]
    fn round_trip_verifies() {
        let id = Identity::generate();
        let d = sample(&id);
        let bytes = d.sign(&id).expect("sign").to_bytes();
        assert_eq!(SignedDescriptor::decode_verified(&bytes, 1_000), Ok(d));
    }

    #[test]
    fn forged_descriptors_are_refused() {
        let id = Identity::generate();
        let other = Identity::generate();
        // Signed by another key than the one it names.
        let d = sample(&id);
        let forged = d.sign(&other).expect("sign").to_bytes();
        assert_eq!(
            SignedDescriptor::decode_verified(&forged, 1_000),
            Err(DescriptorError::BadSignature)
        );
        // Claims someone else's peer id.
        let mut d = sample(&id);
        d.peer_id = other.peer_id_bytes();
        let wrong = d.sign(&id).expect("sign").to_bytes();
        assert_eq!(
            SignedDescriptor::decode_verified(&wrong, 1_000),
            Err(DescriptorError::PeerIdMismatch)
        );
        // Expired.
        let bytes = sample(&id).sign(&id).expect("sign").to_bytes();
        assert!(matches!(
            SignedDescriptor::decode_verified(&bytes, 2_000),
            Err(DescriptorError::Expired { .. })
        ));
        // Valid for too long.
        let long = descriptor_with_expiry(&id, 1_000 + MAX_LIFETIME_SECS + 1);
        assert_eq!(
            SignedDescriptor::decode_verified(&long.sign(&id).expect("sign").to_bytes(), 1_000),
            Err(DescriptorError::LifetimeTooLong)
        );
        // Any flipped bit.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(
                SignedDescriptor::decode_verified(&b, 1_000).is_err(),
                "bit {i}"
            );
        }
        // Truncation.
        for n in 0..bytes.len() {
            assert!(SignedDescriptor::decode_verified(&bytes[..n], 1_000).is_err());
        }
    }

    #[test]
    fn oversize_descriptors_are_refused() {
        let id = Identity::generate();
        let mut d = sample(&id);
        d.addresses = vec!["x".repeat(200); 17];
        assert!(d.sign(&id).is_err());
        assert_eq!(
            SignedDescriptor::from_bytes(&vec![1u8; MAX_DESCRIPTOR_BYTES + 1]),
            Err(DescriptorError::TooLarge(MAX_DESCRIPTOR_BYTES + 1))
        );
    }
}
