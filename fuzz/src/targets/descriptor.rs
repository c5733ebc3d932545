//! Descriptor records: the framing on raw bytes, bodies of the fuzzer's
//! choosing signed with a fixed identity (so the record decoder and the
//! checks behind the signature see them), and the DHT store's admission
//! of one record over another.

use libp2p::kad::{Record, RecordKey};
use libp2p::PeerId;
use mixnn_crypto::descriptor::MAX_DESCRIPTOR_BYTES;
use mixnn_crypto::fuzzing::sign_descriptor_body;
use mixnn_crypto::{Capacity, Descriptor, Identity, Roles, SignedDescriptor, Withdrawal};
use mixnn_node::network::records::{
    admit_descriptor_record, check_descriptor_record, descriptor_key,
};

use super::identity;
use crate::input::{seed, Input};
use crate::Target;

pub const TARGET: Target = Target {
    name: "descriptor",
    run,
    seeds,
    max_len: MAX_DESCRIPTOR_BYTES + 64,
};

/// Unix time the records are checked at.
const NOW: u64 = 1_700_000_000;

const RAW: u8 = 0;
const BODY: u8 = 1;
const ADMIT: u8 = 2;

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let id = identity(1);
    match input.u8() % 3 {
        RAW => raw(input.rest()),
        BODY => body(&id, input.rest()),
        _ => admit(&id, input),
    }
}

fn raw(bytes: &[u8]) {
    if let Ok(sd) = SignedDescriptor::from_bytes(bytes) {
        assert!(sd.to_bytes() == bytes, "the framing has one encoding");
        let _ = sd.verify_record(NOW);
    }
}

fn record(id: &Identity, value: Vec<u8>) -> Record {
    let peer = PeerId::from_bytes(&id.peer_id_bytes()).expect("a peer id");
    Record::new(descriptor_key(&peer), value)
}

fn body(id: &Identity, body: &[u8]) {
    let bytes = sign_descriptor_body(id, body).to_bytes();
    let decoded = SignedDescriptor::decode_record(&bytes, NOW);
    let checked = check_descriptor_record(&record(id, bytes), NOW);
    let Ok(r) = decoded else {
        assert!(checked.is_err());
        return;
    };
    // Only the key that signed can be the record's identity.
    assert_eq!(*r.identity_key(), id.public_key());
    assert_eq!(checked.ok().as_ref(), Some(&r), "the DHT check agrees");
    let again = r.sign(id).expect("a record that verified signs again");
    assert_eq!(
        SignedDescriptor::decode_record(&again.to_bytes(), NOW).ok(),
        Some(r),
        "round trip"
    );
}

/// Two signed records under one key (or the first under a key of the
/// fuzzer's choosing): what the store keeps.
fn admit(id: &Identity, mut input: Input<'_>) {
    let own_key = input.bool();
    let key_len = usize::from(input.u8()) % 80;
    let key = input.bytes(key_len).to_vec();
    let first = usize::from(input.u16());
    let incoming = input.bytes(first).to_vec();
    let held = input.rest();
    let mut incoming = record(id, sign_descriptor_body(id, &incoming).to_bytes());
    if !own_key {
        incoming.key = RecordKey::new(&key);
    }
    let held = record(id, sign_descriptor_body(id, held).to_bytes());
    let r = admit_descriptor_record(&incoming, Some(&held), NOW);
    if let Ok(r) = r {
        assert_eq!(check_descriptor_record(&incoming, NOW).ok(), Some(r));
    }
}

fn descriptor(id: &Identity) -> Descriptor {
    Descriptor {
        peer_id: id.peer_id_bytes(),
        identity_key: id.public_key(),
        seq: 5,
        onion_key: [4; 32],
        epoch: 2,
        expires_at: NOW + 3600,
        roles: Roles {
            mix: true,
            layer_host: true,
        },
        free_slots: 3,
        capacity: Capacity {
            max_params: 1 << 20,
            memory_bytes: 1 << 30,
            aes_gcm: false,
        },
        addresses: vec!["/ip4/127.0.0.1/tcp/4001".into()],
    }
}

/// The body of a signed record: what follows the version and length.
fn body_of(sd: &SignedDescriptor) -> Vec<u8> {
    let b = sd.to_bytes();
    b[3..b.len() - 64].to_vec()
}

fn seeds() -> Vec<Vec<u8>> {
    let id = identity(1);
    let live = descriptor(&id).sign(&id).expect("sign");
    let gone = Withdrawal::new(&id, 6, NOW + 60).sign(&id).expect("sign");
    let live_body = body_of(&live);
    let gone_body = body_of(&gone);
    vec![
        seed(&[&[RAW], &live.to_bytes()]),
        seed(&[&[BODY], &live_body]),
        seed(&[&[BODY], &gone_body]),
        seed(&[
            &[ADMIT, 1, 0],
            &(live_body.len() as u16).to_le_bytes(),
            &live_body,
            &gone_body,
        ]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_verify() {
        let id = identity(1);
        let s = seeds();
        assert!(SignedDescriptor::decode_record(&s[0][1..], NOW).is_ok());
        for body in &s[1..3] {
            let bytes = sign_descriptor_body(&id, &body[1..]).to_bytes();
            assert!(SignedDescriptor::decode_record(&bytes, NOW).is_ok());
        }
    }
}
