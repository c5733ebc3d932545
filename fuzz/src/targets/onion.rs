//! The setup onion: `peel_setup` on raw packets, on packets whose first
//! layer seals routing info of the fuzzer's choosing, and on whole routes
//! built by `build_setup` (round trip, and any flipped bit refused).

use mixnn_crypto::fuzzing::{routing_info, seal_first_layer, REST_BYTES};
use mixnn_crypto::onion::{
    build_setup, peel_setup, HopSpec, OnionError, HOP_PAYLOAD_BYTES, MAX_HOPS, MAX_NEXT_HOP_BYTES,
    ROUTING_BYTES, SETUP_PACKET_BYTES,
};
use mixnn_crypto::replay::MemoryReplayCache;

use super::onion_keys;
use crate::input::{seed, Input};
use crate::Target;

pub const TARGET: Target = Target {
    name: "setup_packet",
    run,
    seeds,
    max_len: SETUP_PACKET_BYTES + 64,
};

const RAW: u8 = 0;
const ROUTING: u8 = 1;
const ROUTE: u8 = 2;

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        RAW => raw(input.rest()),
        ROUTING => routing(input),
        _ => route(input),
    }
}

fn raw(packet: &[u8]) {
    let key = &onion_keys()[0];
    let r = peel_setup(packet, key, &mut MemoryReplayCache::new(4));
    if packet.len() != SETUP_PACKET_BYTES {
        assert!(matches!(r, Err(OnionError::Length { .. })), "{r:?}");
    }
}

/// A layer that authenticates: only the routing decoder can refuse it,
/// and what it accepts is exactly what the builder writes.
fn routing(mut input: Input<'_>) {
    let key = &onion_keys()[0];
    let eph = input.array::<32>();
    let routing = input.array::<ROUTING_BYTES>();
    let mut rest = [0u8; REST_BYTES];
    let tail = input.rest();
    rest[..tail.len().min(REST_BYTES)].copy_from_slice(&tail[..tail.len().min(REST_BYTES)]);
    let Some(packet) = seal_first_layer(&key.public(), eph, &routing, &rest) else {
        return;
    };
    match peel_setup(packet.as_bytes(), key, &mut MemoryReplayCache::new(4)) {
        Ok(p) => {
            let again = routing_info(p.next_hop.as_deref(), &p.payload);
            assert_eq!(again, Some(routing), "accepted routing info is canonical");
        }
        Err(e) => assert!(matches!(e, OnionError::Malformed(_)), "{e:?}"),
    }
}

/// A route of the fuzzer's shape, built and peeled hop by hop.
fn route(mut input: Input<'_>) {
    let n = 1 + usize::from(input.u8()) % MAX_HOPS;
    let flip = input
        .bool()
        .then(|| input.u32() as usize % (SETUP_PACKET_BYTES * 8));
    let keys = onion_keys();
    let hops: Vec<HopSpec> = (0..n)
        .map(|i| {
            let next_len = 1 + usize::from(input.u8()) % MAX_NEXT_HOP_BYTES;
            let payload_len = usize::from(input.u16()) % (HOP_PAYLOAD_BYTES + 1);
            let mut payload = input.bytes(payload_len).to_vec();
            payload.resize(payload_len, 0);
            HopSpec {
                onion_key: keys[i].public(),
                next_hop: (i + 1 < n).then(|| vec![i as u8 + 1; next_len]),
                payload,
            }
        })
        .collect();
    let (packet, secrets) = build_setup(&hops).expect("a well-formed route builds");
    let mut bytes = packet.as_bytes().to_vec();
    if let Some(bit) = flip {
        bytes[bit / 8] ^= 1 << (bit % 8);
        let r = peel_setup(&bytes, &keys[0], &mut MemoryReplayCache::new(4));
        assert!(r.is_err(), "a packet with bit {bit} flipped was accepted");
        return;
    }
    for (i, hop) in hops.iter().enumerate() {
        let mut cache = MemoryReplayCache::new(4);
        let p = peel_setup(&bytes, &keys[i], &mut cache).expect("each hop peels its layer");
        assert_eq!(p.next_hop, hop.next_hop, "hop {i}");
        assert_eq!(p.payload, hop.payload, "hop {i}");
        assert_eq!(p.secrets.tag(), secrets[i].tag(), "hop {i}");
        assert_eq!(p.secrets.key("k"), secrets[i].key("k"), "hop {i}");
        assert_eq!(
            peel_setup(&bytes, &keys[i], &mut cache).err(),
            Some(OnionError::Replay),
            "hop {i} peels a packet once"
        );
        bytes = p.next_packet.as_bytes().to_vec();
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let keys = onion_keys();
    let hops = vec![
        HopSpec {
            onion_key: keys[0].public(),
            next_hop: Some(b"next".to_vec()),
            payload: vec![7; 100],
        },
        HopSpec {
            onion_key: keys[1].public(),
            next_hop: None,
            payload: vec![],
        },
    ];
    let (packet, _) = build_setup(&hops).expect("seed route");
    let relay = routing_info(Some(b"peer-id"), b"payload").expect("fits");
    let exit = routing_info(None, &[1; HOP_PAYLOAD_BYTES]).expect("fits");
    vec![
        seed(&[&[RAW], packet.as_bytes()]),
        seed(&[&[ROUTING], &[5; 32], &relay]),
        seed(&[&[ROUTING], &[6; 32], &exit]),
        seed(&[&[ROUTE, 2, 0, 3, 10, 0, 0, 0, 0, 0], &[9; 10]]),
        seed(&[&[ROUTE, 0, 1, 0, 0, 0, 0, 0]]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_peel() {
        let s = seeds();
        let key = &onion_keys()[0];
        assert!(peel_setup(&s[0][1..], key, &mut MemoryReplayCache::new(4)).is_ok());
        for routing in &s[1..3] {
            let mut input = Input::new(&routing[1..]);
            let eph = input.array::<32>();
            let r = input.array::<ROUTING_BYTES>();
            let p = seal_first_layer(&key.public(), eph, &r, &[0; REST_BYTES]).expect("seals");
            assert!(peel_setup(p.as_bytes(), key, &mut MemoryReplayCache::new(4)).is_ok());
        }
    }
}
