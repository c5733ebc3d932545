//! Ways past a tag or a signature for the fuzz targets in `fuzz/`, so that
//! a fuzzer reaches the decoders behind them with bytes of its choosing.
//! Built only with the `fuzzing` feature; nothing in the node uses them.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::Nonce;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::descriptor::SignedDescriptor;
use crate::identity::Identity;
use crate::onion::{
    encode_routing, HopSecrets, HopSpec, SetupPacket, EPH_BYTES, HOP_PAYLOAD_BYTES,
    MAX_NEXT_HOP_BYTES, ROUTING_BYTES, SETUP_PACKET_BYTES, SLOT_BYTES,
};

/// Bytes after a packet's first slot.
pub const REST_BYTES: usize = SETUP_PACKET_BYTES - SLOT_BYTES;

/// A setup packet whose first layer, for the hop with x25519 public key
/// `onion_key`, seals the plaintext routing info `routing` (any bytes, not
/// only what [`crate::onion::build_setup`] writes) over `rest`, with the
/// ephemeral secret `ephemeral`. `None` when the agreement is low order.
pub fn seal_first_layer(
    onion_key: &[u8; 32],
    ephemeral: [u8; 32],
    routing: &[u8; ROUTING_BYTES],
    rest: &[u8; REST_BYTES],
) -> Option<SetupPacket> {
    let eph = StaticSecret::from(ephemeral);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*onion_key));
    if !shared.was_contributory() {
        return None;
    }
    let secrets = HopSecrets::derive(shared.as_bytes(), &eph_pub);
    let mut packet = vec![0u8; SETUP_PACKET_BYTES];
    let (slot, tail) = packet.split_at_mut(SLOT_BYTES);
    tail.copy_from_slice(rest);
    slot[..EPH_BYTES].copy_from_slice(&eph_pub);
    let (sealed, tag) = slot[EPH_BYTES..].split_at_mut(ROUTING_BYTES);
    sealed.copy_from_slice(routing);
    let t = secrets
        .aead()
        .encrypt_in_place_detached(&Nonce::default(), tail, sealed)
        .ok()?;
    tag.copy_from_slice(&t);
    SetupPacket::from_bytes(&packet).ok()
}

/// The routing info a hop is sent for `next_hop` and `payload`, as the
/// builder writes it; `None` when either is too long.
pub fn routing_info(next_hop: Option<&[u8]>, payload: &[u8]) -> Option<[u8; ROUTING_BYTES]> {
    if payload.len() > HOP_PAYLOAD_BYTES || next_hop.is_some_and(|n| n.len() > MAX_NEXT_HOP_BYTES) {
        return None;
    }
    let hop = HopSpec {
        onion_key: [0; 32],
        next_hop: next_hop.map(<[u8]>::to_vec),
        payload: payload.to_vec(),
    };
    let mut out = [0u8; ROUTING_BYTES];
    encode_routing(&hop, &mut out);
    Some(out)
}

/// `body` signed by `identity` as a descriptor record, whatever it holds.
pub fn sign_descriptor_body(identity: &Identity, body: &[u8]) -> SignedDescriptor {
    SignedDescriptor::sign_body(identity, body.to_vec())
}
