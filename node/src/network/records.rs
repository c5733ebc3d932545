//! DHT record names and checks. Pure: no swarm, no I/O.

use libp2p::kad::{self, RecordKey};
use libp2p::PeerId;
use mixnn_crypto::descriptor::MAX_DESCRIPTOR_BYTES;
use mixnn_crypto::{Descriptor, DescriptorError, SignedDescriptor};
use thiserror::Error;

const DESCRIPTOR_PREFIX: &[u8] = b"/mixnn/desc/1/";

/// A role a peer provides under a well-known DHT key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    LayerHost,
    Mix,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::LayerHost, Role::Mix];

    pub fn key(self) -> RecordKey {
        RecordKey::new(&match self {
            Role::LayerHost => "/mixnn/role/1/layer-host",
            Role::Mix => "/mixnn/role/1/mix",
        })
    }

    pub fn from_key(key: &RecordKey) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.key() == *key)
    }
}

/// The DHT key of `peer`'s descriptor.
pub fn descriptor_key(peer: &PeerId) -> RecordKey {
    let mut k = DESCRIPTOR_PREFIX.to_vec();
    k.extend_from_slice(&peer.to_bytes());
    RecordKey::new(&k)
}

/// Why a record from the DHT was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record key is not a MixNN descriptor key")]
    UnknownKey,
    #[error("record value of {0} bytes is too large")]
    TooLarge(usize),
    #[error("descriptor refused: {0}")]
    Descriptor(#[from] DescriptorError),
    #[error("descriptor is stored under another peer's key")]
    WrongKey,
    #[error("provider record for an unknown key")]
    UnknownRole,
}

impl RecordError {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RecordError::UnknownKey => "unknown_key",
            RecordError::TooLarge(_) => "too_large",
            RecordError::Descriptor(DescriptorError::BadSignature) => "bad_signature",
            RecordError::Descriptor(DescriptorError::PeerIdMismatch) => "peer_id_mismatch",
            RecordError::Descriptor(DescriptorError::Expired { .. }) => "expired",
            RecordError::Descriptor(_) => "malformed",
            RecordError::WrongKey => "wrong_key",
            RecordError::UnknownRole => "unknown_role",
        }
    }
}

/// Check a descriptor record: its key names the peer the descriptor
/// describes, and the descriptor verifies at unix time `now`.
pub fn check_descriptor_record(record: &kad::Record, now: u64) -> Result<Descriptor, RecordError> {
    let key = record.key.as_ref();
    let peer_bytes = key
        .strip_prefix(DESCRIPTOR_PREFIX)
        .ok_or(RecordError::UnknownKey)?;
    if record.value.len() > MAX_DESCRIPTOR_BYTES {
        return Err(RecordError::TooLarge(record.value.len()));
    }
    let descriptor = SignedDescriptor::decode_verified(&record.value, now)?;
    if descriptor.peer_id != peer_bytes {
        return Err(RecordError::WrongKey);
    }
    Ok(descriptor)
}

/// Only the role keys may carry provider records.
pub fn check_provider_record(record: &kad::ProviderRecord) -> Result<Role, RecordError> {
    Role::from_key(&record.key).ok_or(RecordError::UnknownRole)
}

/// Seconds since the unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixnn_crypto::{Capacity, Identity, Roles};

    fn descriptor(id: &Identity, expires_at: u64) -> Descriptor {
        Descriptor {
            peer_id: id.peer_id_bytes(),
            identity_key: id.public_key(),
            onion_key: [1; 32],
            epoch: 1,
            expires_at,
            roles: Roles {
                layer_host: true,
                mix: false,
            },
            free_slots: 2,
            capacity: Capacity::default(),
            addresses: vec![],
        }
    }

    fn peer_of(id: &Identity) -> PeerId {
        PeerId::from_bytes(&id.peer_id_bytes()).expect("peer id")
    }

    #[test]
    fn crypto_peer_id_matches_libp2p() {
        let id = Identity::generate();
        let kp = libp2p::identity::Keypair::ed25519_from_bytes(id.secret_bytes().to_vec())
            .expect("keypair");
        assert_eq!(kp.public().to_peer_id(), peer_of(&id));
    }

    #[test]
    fn records_are_checked() {
        let id = Identity::generate();
        let other = Identity::generate();
        let value = descriptor(&id, 500).sign(&id).expect("sign").to_bytes();
        let good = kad::Record::new(descriptor_key(&peer_of(&id)), value.clone());
        assert!(check_descriptor_record(&good, 100).is_ok());
        assert!(matches!(
            check_descriptor_record(&good, 600),
            Err(RecordError::Descriptor(DescriptorError::Expired { .. }))
        ));
        let wrong = kad::Record::new(descriptor_key(&peer_of(&other)), value.clone());
        assert_eq!(
            check_descriptor_record(&wrong, 100),
            Err(RecordError::WrongKey)
        );
        let odd = kad::Record::new(RecordKey::new(&"elsewhere"), value);
        assert_eq!(
            check_descriptor_record(&odd, 100),
            Err(RecordError::UnknownKey)
        );
        let big = kad::Record::new(descriptor_key(&peer_of(&id)), vec![0; 10_000]);
        assert_eq!(
            check_descriptor_record(&big, 100),
            Err(RecordError::TooLarge(10_000))
        );
    }
}
