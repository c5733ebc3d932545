//! DHT record names and checks. Pure: no swarm, no I/O.

use libp2p::kad::{self, RecordKey};
use libp2p::PeerId;
use mixnn_crypto::descriptor::MAX_DESCRIPTOR_BYTES;
use mixnn_crypto::{DescriptorError, PeerRecord, SignedDescriptor};
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
    #[error("record (sequence {offered}) is not newer than the one held (sequence {held})")]
    Stale { offered: u64, held: u64 },
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
            RecordError::Descriptor(DescriptorError::LifetimeTooLong) => "lifetime_too_long",
            RecordError::Descriptor(_) => "malformed",
            RecordError::WrongKey => "wrong_key",
            RecordError::UnknownRole => "unknown_role",
            RecordError::Stale { .. } => "stale",
        }
    }
}

/// Check a descriptor record: its key names the peer the record is about,
/// and the descriptor or withdrawal verifies at unix time `now`.
pub fn check_descriptor_record(record: &kad::Record, now: u64) -> Result<PeerRecord, RecordError> {
    let key = record.key.as_ref();
    let peer_bytes = key
        .strip_prefix(DESCRIPTOR_PREFIX)
        .ok_or(RecordError::UnknownKey)?;
    if record.value.len() > MAX_DESCRIPTOR_BYTES {
        return Err(RecordError::TooLarge(record.value.len()));
    }
    let r = SignedDescriptor::decode_record(&record.value, now)?;
    if r.peer_id() != peer_bytes {
        return Err(RecordError::WrongKey);
    }
    Ok(r)
}

/// Whether the store takes `incoming` when it holds `held` under the same
/// key, at unix time `now`: the incoming record must verify, and must
/// supersede what is held unless that no longer verifies (expired) or is
/// the very same record (republication and replication bring copies).
/// Nobody can replace a withdrawal or a newer descriptor with an older
/// record, however validly signed.
pub fn admit_descriptor_record(
    incoming: &kad::Record,
    held: Option<&kad::Record>,
    now: u64,
) -> Result<PeerRecord, RecordError> {
    let offered = check_descriptor_record(incoming, now)?;
    let held = match held {
        Some(h) if h.key == incoming.key && h.value != incoming.value => h,
        _ => return Ok(offered),
    };
    match check_descriptor_record(held, now) {
        Ok(current) if !offered.supersedes(&current) => Err(RecordError::Stale {
            offered: offered.seq(),
            held: current.seq(),
        }),
        _ => Ok(offered),
    }
}

/// Of two verified records of one peer, the one that stands.
pub fn newest(a: PeerRecord, b: PeerRecord) -> PeerRecord {
    if b.supersedes(&a) {
        b
    } else {
        a
    }
}

/// Only the role keys may carry provider records.
pub fn check_provider_record(record: &kad::ProviderRecord) -> Result<Role, RecordError> {
    Role::from_key(&record.key).ok_or(RecordError::UnknownRole)
}

/// Seconds since the unix epoch.
pub fn unix_now() -> u64 {
    unix_now_millis() / 1000
}

/// Milliseconds since the unix epoch.
pub fn unix_now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixnn_crypto::{Capacity, Descriptor, Identity, Roles, Withdrawal};

    fn descriptor(id: &Identity, expires_at: u64) -> Descriptor {
        Descriptor {
            peer_id: id.peer_id_bytes(),
            identity_key: id.public_key(),
            seq: 1,
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

    fn record(id: &Identity, value: Vec<u8>) -> kad::Record {
        kad::Record::new(descriptor_key(&peer_of(id)), value)
    }

    fn live(id: &Identity, seq: u64, expires_at: u64) -> kad::Record {
        let d = Descriptor {
            seq,
            ..descriptor(id, expires_at)
        };
        record(id, d.sign(id).expect("sign").to_bytes())
    }

    fn gone(id: &Identity, seq: u64, expires_at: u64) -> kad::Record {
        let w = Withdrawal::new(id, seq, expires_at);
        record(id, w.sign(id).expect("sign").to_bytes())
    }

    #[test]
    fn a_withdrawal_replaces_an_older_descriptor_and_nothing_older_replaces_it() {
        let id = Identity::generate();
        let old = live(&id, 10, 500);
        let withdrawal = gone(&id, 11, 500);
        // The withdrawal is taken over the descriptor it follows.
        let r = admit_descriptor_record(&withdrawal, Some(&old), 100).expect("admitted");
        assert!(r.is_withdrawn());
        // The old, validly signed descriptor replayed over it is refused.
        assert_eq!(
            admit_descriptor_record(&old, Some(&withdrawal), 100),
            Err(RecordError::Stale {
                offered: 10,
                held: 11
            })
        );
        assert_eq!(
            RecordError::Stale {
                offered: 10,
                held: 11
            }
            .label(),
            "stale"
        );
        // So is an older descriptor over a newer one.
        assert!(matches!(
            admit_descriptor_record(&live(&id, 9, 500), Some(&old), 100),
            Err(RecordError::Stale { .. })
        ));
        // The same record again (replication) is fine, and so is anything
        // valid once what is held has expired.
        assert!(admit_descriptor_record(&withdrawal, Some(&withdrawal), 100).is_ok());
        let short = gone(&id, 11, 150);
        assert!(admit_descriptor_record(&live(&id, 5, 500), Some(&short), 200).is_ok());
        // A node that comes back signs a newer descriptor, which is taken.
        assert!(admit_descriptor_record(&live(&id, 12, 500), Some(&withdrawal), 100).is_ok());
    }

    #[test]
    fn forged_withdrawals_are_refused_on_store() {
        let id = Identity::generate();
        let attacker = Identity::generate();
        let held = live(&id, 10, 500);
        // Signed by the attacker, stored under the victim's key.
        let forged = record(
            &id,
            Withdrawal::new(&id, 99, 500)
                .sign(&attacker)
                .expect("sign")
                .to_bytes(),
        );
        let e = admit_descriptor_record(&forged, Some(&held), 100).expect_err("refused");
        assert_eq!(e.label(), "bad_signature");
        // The attacker's own valid withdrawal put under the victim's key.
        let misplaced = kad::Record::new(
            descriptor_key(&peer_of(&id)),
            Withdrawal::new(&attacker, 99, 500)
                .sign(&attacker)
                .expect("sign")
                .to_bytes(),
        );
        assert_eq!(
            admit_descriptor_record(&misplaced, Some(&held), 100),
            Err(RecordError::WrongKey)
        );
        // With nothing held, the same.
        assert!(admit_descriptor_record(&forged, None, 100).is_err());
    }

    #[test]
    fn the_newest_record_wins_in_any_order() {
        let id = Identity::generate();
        let now = 100;
        let copies: Vec<PeerRecord> = [live(&id, 10, 500), gone(&id, 11, 500), live(&id, 9, 500)]
            .iter()
            .map(|r| check_descriptor_record(r, now).expect("valid"))
            .collect();
        for order in [[0, 1, 2], [1, 0, 2], [2, 1, 0], [2, 0, 1]] {
            let mut it = order.iter().map(|&i| copies[i].clone());
            let first = it.next().expect("three");
            let winner = it.fold(first, newest);
            assert!(winner.is_withdrawn(), "order {order:?}");
            assert_eq!(winner.seq(), 11);
        }
    }
}
