//! The signed record a peer publishes in the DHT under its descriptor key:
//! either its descriptor or, when it leaves, a withdrawal of it.
//!
//! Wire format: `version (1) | body length (u16 LE) | body | signature (64)`.
//! The body is the postcard encoding of a [`PeerRecord`]; the signature is
//! the identity key's over a domain tag and the body. A reader checks the
//! size, the encoding, the signature, that the peer id is the identity
//! key's, and the expiry, and gets a [`DescriptorError`] naming the first
//! that fails.
//!
//! Every record carries a sequence number `seq` (the signer's unix time in
//! milliseconds, kept strictly increasing by the signer, see [`next_seq`]).
//! Of two valid records of one peer the one with the higher `seq` wins; at
//! equal `seq` a withdrawal wins ([`PeerRecord::supersedes`]). So a
//! withdrawal replaces the descriptors signed before it, and nobody can
//! bring a withdrawn peer back by replaying one of its old descriptors.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::{peer_id_bytes, verify_signature, Identity};

const VERSION: u8 = 2;
const DOMAIN: &[u8] = b"mixnn-descriptor-v2";
/// Version byte, length and signature around the body.
const FRAMING_BYTES: usize = 1 + 2 + 64;

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
    /// The node seals and opens cells with AES-256-GCM in hardware
    /// ([`crate::aead::aes_in_hardware`]): a client uses that suite for a
    /// segment between two such ends ([`crate::aead::CellSuite::for_segment`]).
    pub aes_gcm: bool,
}

/// A peer's public description of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// libp2p peer id bytes; must be those of `identity_key`.
    pub peer_id: Vec<u8>,
    pub identity_key: [u8; 32],
    /// Orders this peer's records: higher supersedes lower (see [`next_seq`]).
    pub seq: u64,
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

/// A peer's signed statement that it has left: it supersedes every
/// descriptor it signed with a lower `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawal {
    /// libp2p peer id bytes; must be those of `identity_key`.
    pub peer_id: Vec<u8>,
    pub identity_key: [u8; 32],
    pub seq: u64,
    /// Unix seconds after which the withdrawal may be forgotten: no
    /// descriptor it supersedes is valid past it.
    pub expires_at: u64,
}

/// What a peer's descriptor key holds: a live descriptor or a withdrawal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRecord {
    Live(Descriptor),
    Withdrawn(Withdrawal),
}

impl PeerRecord {
    pub fn peer_id(&self) -> &[u8] {
        match self {
            PeerRecord::Live(d) => &d.peer_id,
            PeerRecord::Withdrawn(w) => &w.peer_id,
        }
    }

    pub fn identity_key(&self) -> &[u8; 32] {
        match self {
            PeerRecord::Live(d) => &d.identity_key,
            PeerRecord::Withdrawn(w) => &w.identity_key,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            PeerRecord::Live(d) => d.seq,
            PeerRecord::Withdrawn(w) => w.seq,
        }
    }

    pub fn expires_at(&self) -> u64 {
        match self {
            PeerRecord::Live(d) => d.expires_at,
            PeerRecord::Withdrawn(w) => w.expires_at,
        }
    }

    pub fn is_withdrawn(&self) -> bool {
        matches!(self, PeerRecord::Withdrawn(_))
    }

    /// Whether `self` replaces `other`, two records of the same peer: a
    /// higher `seq` wins, and at equal `seq` a withdrawal beats a
    /// descriptor. Never true of a record and itself, so a replayed copy
    /// changes nothing.
    pub fn supersedes(&self, other: &PeerRecord) -> bool {
        match self.seq().cmp(&other.seq()) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self.is_withdrawn() && !other.is_withdrawn(),
        }
    }

    /// Encode and sign with `identity`. The caller fills `peer_id` and
    /// `identity_key` from the same identity.
    pub fn sign(&self, identity: &Identity) -> Result<SignedDescriptor, DescriptorError> {
        self.check_limits()?;
        let body = postcard::to_allocvec(self).map_err(|_| DescriptorError::Malformed)?;
        if body.len() + FRAMING_BYTES > MAX_DESCRIPTOR_BYTES {
            return Err(DescriptorError::TooLarge(body.len() + FRAMING_BYTES));
        }
        Ok(SignedDescriptor::sign_body(identity, body))
    }

    fn check_limits(&self) -> Result<(), DescriptorError> {
        match self {
            PeerRecord::Live(d) => d.check_limits(),
            PeerRecord::Withdrawn(_) => Ok(()),
        }
    }
}

impl Withdrawal {
    /// The withdrawal of `identity`'s descriptors with sequence number
    /// `seq`, to be kept until `expires_at`.
    pub fn new(identity: &Identity, seq: u64, expires_at: u64) -> Self {
        Self {
            peer_id: identity.peer_id_bytes(),
            identity_key: identity.public_key(),
            seq,
            expires_at,
        }
    }

    pub fn sign(&self, identity: &Identity) -> Result<SignedDescriptor, DescriptorError> {
        PeerRecord::Withdrawn(self.clone()).sign(identity)
    }
}

/// The next sequence number for a signer whose last one was `last`, at unix
/// time `now_millis`: the clock when it moves forward, `last + 1` when it
/// does not, so a signer's records stay strictly ordered.
pub fn next_seq(last: u64, now_millis: u64) -> u64 {
    now_millis.max(last.saturating_add(1))
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
    #[error("the peer withdrew its descriptor (sequence {seq})")]
    Withdrawn { seq: u64 },
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
        PeerRecord::Live(self.clone()).sign(identity)
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
    /// Signs `body` as it is; [`PeerRecord::sign`] checks it first.
    pub(crate) fn sign_body(identity: &Identity, body: Vec<u8>) -> Self {
        let signature = identity.sign(&signed_message(&body));
        Self { body, signature }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAMING_BYTES + self.body.len());
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

    /// Check encoding, signature, peer id and expiry at unix time `now`;
    /// a descriptor or a withdrawal.
    pub fn verify_record(&self, now: u64) -> Result<PeerRecord, DescriptorError> {
        let (r, rest): (PeerRecord, _) =
            postcard::take_from_bytes(&self.body).map_err(|_| DescriptorError::Malformed)?;
        if !rest.is_empty() {
            return Err(DescriptorError::Malformed);
        }
        r.check_limits()?;
        verify_signature(
            r.identity_key(),
            &signed_message(&self.body),
            &self.signature,
        )
        .map_err(|_| DescriptorError::BadSignature)?;
        if r.peer_id() != peer_id_bytes(r.identity_key()) {
            return Err(DescriptorError::PeerIdMismatch);
        }
        let expires_at = r.expires_at();
        if expires_at <= now {
            return Err(DescriptorError::Expired { expires_at, now });
        }
        if expires_at - now > MAX_LIFETIME_SECS {
            return Err(DescriptorError::LifetimeTooLong);
        }
        Ok(r)
    }

    /// As [`SignedDescriptor::verify_record`], for a live descriptor: a
    /// valid withdrawal is [`DescriptorError::Withdrawn`].
    pub fn verify(&self, now: u64) -> Result<Descriptor, DescriptorError> {
        match self.verify_record(now)? {
            PeerRecord::Live(d) => Ok(d),
            PeerRecord::Withdrawn(w) => Err(DescriptorError::Withdrawn { seq: w.seq }),
        }
    }

    /// Decode and verify a descriptor or a withdrawal in one call.
    pub fn decode_record(bytes: &[u8], now: u64) -> Result<PeerRecord, DescriptorError> {
        Self::from_bytes(bytes)?.verify_record(now)
    }

    /// Decode and verify a live descriptor in one call.
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
            seq: 10,
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
                aes_gcm: true,
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
    #[test]
    fn withdrawals_round_trip_and_are_not_descriptors() {
        let id = Identity::generate();
        let w = Withdrawal::new(&id, 11, 1_500);
        let bytes = w.sign(&id).expect("sign").to_bytes();
        assert!(bytes.len() < 200, "a withdrawal is small: {}", bytes.len());
        assert_eq!(
            SignedDescriptor::decode_record(&bytes, 1_000),
            Ok(PeerRecord::Withdrawn(w))
        );
        assert_eq!(
            SignedDescriptor::decode_verified(&bytes, 1_000),
            Err(DescriptorError::Withdrawn { seq: 11 })
        );
        // A withdrawal expires like a descriptor.
        assert!(matches!(
            SignedDescriptor::decode_record(&bytes, 1_500),
            Err(DescriptorError::Expired { .. })
        ));
        // Records of the previous format are refused, not misread.
        let mut v1 = bytes.clone();
        v1[0] = 1;
        assert_eq!(
            SignedDescriptor::decode_record(&v1, 1_000),
            Err(DescriptorError::UnsupportedVersion(1))
        );
    }

    #[test]
    fn forged_withdrawals_are_refused() {
        let id = Identity::generate();
        let attacker = Identity::generate();
        // The victim's withdrawal signed by another key.
        let forged = Withdrawal::new(&id, 99, 1_500)
            .sign(&attacker)
            .expect("sign")
            .to_bytes();
        assert_eq!(
            SignedDescriptor::decode_record(&forged, 1_000),
            Err(DescriptorError::BadSignature)
        );
        // The attacker's own key, the victim's peer id.
        let mut w = Withdrawal::new(&attacker, 99, 1_500);
        w.peer_id = id.peer_id_bytes();
        let wrong = w.sign(&attacker).expect("sign").to_bytes();
        assert_eq!(
            SignedDescriptor::decode_record(&wrong, 1_000),
            Err(DescriptorError::PeerIdMismatch)
        );
        // Kept for too long.
        let long = Withdrawal::new(&id, 1, 1_000 + MAX_LIFETIME_SECS + 1)
            .sign(&id)
            .expect("sign")
            .to_bytes();
        assert_eq!(
            SignedDescriptor::decode_record(&long, 1_000),
            Err(DescriptorError::LifetimeTooLong)
        );
        // Any flipped bit, any truncation.
        let good = Withdrawal::new(&id, 99, 1_500)
            .sign(&id)
            .expect("sign")
            .to_bytes();
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                assert!(
                    SignedDescriptor::decode_record(&b, 1_000).is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
        for n in 0..good.len() {
            assert!(SignedDescriptor::decode_record(&good[..n], 1_000).is_err());
        }
    }

    #[test]
    fn newer_records_supersede_older_ones() {
        let id = Identity::generate();
        let live = |seq| PeerRecord::Live(Descriptor { seq, ..sample(&id) });
        let gone = |seq| PeerRecord::Withdrawn(Withdrawal::new(&id, seq, 1_500));
        // A withdrawal replaces the descriptors before it.
        assert!(gone(11).supersedes(&live(10)));
        assert!(!live(10).supersedes(&gone(11)));
        // At the same sequence number the withdrawal wins.
        assert!(gone(10).supersedes(&live(10)));
        assert!(!live(10).supersedes(&gone(10)));
        // A node that comes back publishes a newer descriptor.
        assert!(live(12).supersedes(&gone(11)));
        assert!(!gone(11).supersedes(&live(12)));
        // A copy never replaces itself; an older copy never a newer one.
        for r in [live(10), gone(10)] {
            assert!(!r.supersedes(&r.clone()));
        }
        assert!(!live(9).supersedes(&live(10)));
        assert!(!gone(9).supersedes(&gone(10)));
    }

    #[test]
    fn sequence_numbers_only_go_up() {
        assert_eq!(next_seq(0, 5_000), 5_000);
        assert_eq!(next_seq(5_000, 5_000), 5_001);
        // The clock went back: still after the last one.
        assert_eq!(next_seq(9_000, 5_000), 9_001);
        assert_eq!(next_seq(u64::MAX, 5_000), u64::MAX);
        let mut last = 0;
        for now in [10, 10, 9, 11, 11, 3, 100] {
            let next = next_seq(last, now);
            assert!(next > last);
            last = next;
        }
    }
}
