//! Circuit setup onion: round trips for every route length, tampering,
//! malformed input, wrong keys and replays.

use mixnn_crypto::onion::{
    build_setup, peel_setup, HopSecrets, HopSpec, OnionError, SetupPacket, HOP_PAYLOAD_BYTES,
    MAX_HOPS, MAX_NEXT_HOP_BYTES, SETUP_PACKET_BYTES, SLOT_BYTES,
};
use mixnn_crypto::replay::{MemoryReplayCache, ReplayCache};
use mixnn_crypto::OnionKeyPair;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn keys(n: usize) -> Vec<OnionKeyPair> {
    (0..n).map(|_| OnionKeyPair::generate(7, 8)).collect()
}

/// A route over `keys` with per-hop next hops and payloads drawn from `seed`.
fn route(keys: &[OnionKeyPair], seed: u64) -> Vec<HopSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = keys.len();
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            let next_hop = (i + 1 < n).then(|| {
                let len = rng.gen_range(1..=MAX_NEXT_HOP_BYTES);
                (0..len).map(|_| rng.gen()).collect()
            });
            let len = rng.gen_range(0..=HOP_PAYLOAD_BYTES);
            HopSpec {
                onion_key: k.public(),
                next_hop,
                payload: (0..len).map(|_| rng.gen()).collect(),
            }
        })
        .collect()
}

fn cache() -> MemoryReplayCache {
    MemoryReplayCache::new(64)
}

/// Peels `packet` through every hop, checking what each learns.
fn walk(keys: &[OnionKeyPair], hops: &[HopSpec], packet: &SetupPacket, client: &[HopSecrets]) {
    assert_eq!(client.len(), hops.len());
    let mut bytes = packet.as_bytes().to_vec();
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(bytes.len(), SETUP_PACKET_BYTES);
        let p = peel_setup(&bytes, key, &mut cache())
            .unwrap_or_else(|e| panic!("hop {i} of {}: {e}", hops.len()));
        assert_eq!(p.next_hop, hops[i].next_hop, "hop {i} next hop");
        assert_eq!(p.payload, hops[i].payload, "hop {i} payload");
        assert_eq!(p.secrets.tag(), client[i].tag(), "hop {i} tag");
        for label in ["forward", "backward", "slot"] {
            assert_eq!(
                p.secrets.key(label),
                client[i].key(label),
                "hop {i} {label}"
            );
        }
        bytes = p.next_packet.as_bytes().to_vec();
    }
}

#[test]
fn every_route_length_round_trips() {
    let all = keys(MAX_HOPS);
    for n in 1..=MAX_HOPS {
        let hops = route(&all[..n], n as u64);
        let (packet, client) = build_setup(&hops).expect("build");
        assert_eq!(packet.as_bytes().len(), SETUP_PACKET_BYTES);
        walk(&all[..n], &hops, &packet, &client);
    }
}

#[test]
fn full_payloads_and_empty_payloads() {
    let ks = keys(4);
    let mut hops = route(&ks, 1);
    hops[0].payload = vec![0xFF; HOP_PAYLOAD_BYTES];
    hops[1].payload = vec![];
    hops[1].next_hop = Some(vec![0xEE; MAX_NEXT_HOP_BYTES]);
    hops[3].payload = vec![0; HOP_PAYLOAD_BYTES];
    let (packet, client) = build_setup(&hops).expect("build");
    walk(&ks, &hops, &packet, &client);
}

#[test]
fn keys_and_tags_differ_between_hops_and_builds() {
    let ks = keys(3);
    let hops = route(&ks, 3);
    let (_, a) = build_setup(&hops).expect("build");
    let (_, b) = build_setup(&hops).expect("build");
    let mut tags: Vec<_> = a.iter().chain(b.iter()).map(|s| s.tag()).collect();
    tags.sort();
    tags.dedup();
    assert_eq!(tags.len(), 6, "every layer of every build has its own tag");
    assert_ne!(a[0].key("forward"), a[1].key("forward"));
    assert_ne!(a[0].key("forward"), b[0].key("forward"));
    assert_ne!(a[0].key("forward"), a[0].tag());
}

fn equal_fraction(a: &[u8], b: &[u8]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().min(b.len()) as f64
}

#[test]
fn packet_bytes_change_at_every_hop() {
    let ks = keys(6);
    let hops = route(&ks, 6);
    let (packet, _) = build_setup(&hops).expect("build");
    let mut seen = vec![packet.as_bytes().to_vec()];
    for k in &ks[..5] {
        let p = peel_setup(seen.last().expect("packet"), k, &mut cache()).expect("peel");
        seen.push(p.next_packet.as_bytes().to_vec());
    }
    for i in 0..seen.len() {
        for j in i + 1..seen.len() {
            // Aligned, and shifted by the slots dropped in between.
            let shift = (j - i) * SLOT_BYTES;
            assert!(equal_fraction(&seen[i], &seen[j]) < 0.02, "{i} vs {j}");
            assert!(
                equal_fraction(&seen[i][shift..], &seen[j]) < 0.02,
                "{i} vs {j} shifted"
            );
        }
    }
}

#[test]
fn wrong_onion_key_fails_auth() {
    let ks = keys(2);
    let hops = route(&ks, 2);
    let (packet, _) = build_setup(&hops).expect("build");
    let other = OnionKeyPair::generate(7, 8);
    assert_eq!(
        peel_setup(packet.as_bytes(), &other, &mut cache()).err(),
        Some(OnionError::Auth)
    );
    // Hop 1's key cannot open hop 0's layer either.
    assert_eq!(
        peel_setup(packet.as_bytes(), &ks[1], &mut cache()).err(),
        Some(OnionError::Auth)
    );
}

#[test]
fn replayed_setup_is_refused_but_forgeries_do_not_poison_the_cache() {
    let ks = keys(3);
    let hops = route(&ks, 9);
    let (packet, _) = build_setup(&hops).expect("build");
    let mut c = cache();

    // A tampered copy arriving first fails AEAD and must not record the tag.
    let mut forged = packet.as_bytes().to_vec();
    forged[SETUP_PACKET_BYTES - 1] ^= 1;
    assert_eq!(
        peel_setup(&forged, &ks[0], &mut c).err(),
        Some(OnionError::Auth)
    );

    let first = peel_setup(packet.as_bytes(), &ks[0], &mut c).expect("first");
    assert_eq!(
        peel_setup(packet.as_bytes(), &ks[0], &mut c).err(),
        Some(OnionError::Replay)
    );
    // The next hop also refuses a replay of what it was sent.
    let mut c1 = cache();
    let next = first.next_packet.as_bytes();
    peel_setup(next, &ks[1], &mut c1).expect("hop 1");
    assert_eq!(
        peel_setup(next, &ks[1], &mut c1).err(),
        Some(OnionError::Replay)
    );
    // And a trait object works as the cache.
    let mut boxed: Box<dyn ReplayCache> = Box::new(cache());
    peel_setup(next, &ks[1], boxed.as_mut()).expect("fresh cache");
    assert_eq!(
        peel_setup(next, &ks[1], boxed.as_mut()).err(),
        Some(OnionError::Replay)
    );
}

#[test]
fn route_validation() {
    let ks = keys(MAX_HOPS + 1);
    assert_eq!(build_setup(&[]).err(), Some(OnionError::NoHops));
    let too_long = route(&ks, 1);
    assert_eq!(
        build_setup(&too_long).err(),
        Some(OnionError::TooManyHops {
            hops: MAX_HOPS + 1,
            max: MAX_HOPS
        })
    );

    let base = route(&ks[..3], 2);
    let mut h = base.clone();
    h[1].payload = vec![0; HOP_PAYLOAD_BYTES + 1];
    assert_eq!(
        build_setup(&h).err(),
        Some(OnionError::PayloadTooLarge {
            hop: 1,
            len: HOP_PAYLOAD_BYTES + 1,
            max: HOP_PAYLOAD_BYTES
        })
    );
    let mut h = base.clone();
    h[0].next_hop = Some(vec![1; MAX_NEXT_HOP_BYTES + 1]);
    assert!(matches!(
        build_setup(&h),
        Err(OnionError::NextHopTooLarge { hop: 0, .. })
    ));
    let mut h = base.clone();
    h[2].next_hop = Some(vec![1]);
    assert!(matches!(
        build_setup(&h),
        Err(OnionError::InvalidRoute { hop: 2, .. })
    ));
    let mut h = base.clone();
    h[1].next_hop = None;
    assert!(matches!(
        build_setup(&h),
        Err(OnionError::InvalidRoute { hop: 1, .. })
    ));
    let mut h = base;
    h[0].next_hop = Some(vec![]);
    assert!(matches!(
        build_setup(&h),
        Err(OnionError::InvalidRoute { hop: 0, .. })
    ));
}

#[test]
fn wrong_lengths_are_errors() {
    let ks = keys(1);
    let hops = route(&ks, 4);
    let (packet, _) = build_setup(&hops).expect("build");
    let bytes = packet.as_bytes().to_vec();
    for len in [0, 1, SLOT_BYTES, SETUP_PACKET_BYTES - 1] {
        assert_eq!(
            peel_setup(&bytes[..len], &ks[0], &mut cache()).err(),
            Some(OnionError::Length {
                expected: SETUP_PACKET_BYTES,
                got: len
            })
        );
        assert!(SetupPacket::from_bytes(&bytes[..len]).is_err());
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(peel_setup(&long, &ks[0], &mut cache()).is_err());
    assert!(SetupPacket::from_bytes(&long).is_err());
    let again = SetupPacket::from_bytes(&bytes).expect("exact length");
    assert_eq!(again, packet);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_routes_round_trip(n in 1..=MAX_HOPS, seed in any::<u64>()) {
        let ks = keys(n);
        let hops = route(&ks, seed);
        let (packet, client) = build_setup(&hops).expect("build");
        walk(&ks, &hops, &packet, &client);
    }

    /// Any single flipped bit, anywhere in the packet, is caught by the hop
    /// that receives it (the AEAD covers the whole packet), at the first hop
    /// or at a later one.
    #[test]
    fn flipped_bit_is_caught_by_the_receiving_hop(
        n in 1..=4usize,
        at_hop in 0..4usize,
        bit in 0..SETUP_PACKET_BYTES * 8,
        seed in any::<u64>(),
    ) {
        let at_hop = at_hop % n;
        let ks = keys(n);
        let hops = route(&ks, seed);
        let (packet, _) = build_setup(&hops).expect("build");
        let mut bytes = packet.as_bytes().to_vec();
        for k in &ks[..at_hop] {
            bytes = peel_setup(&bytes, k, &mut cache()).expect("honest hop").next_packet.as_bytes().to_vec();
        }
        bytes[bit / 8] ^= 1 << (bit % 8);
        let r = peel_setup(&bytes, &ks[at_hop], &mut cache());
        prop_assert!(
            matches!(r, Err(OnionError::Auth) | Err(OnionError::LowOrderKey)),
            "bit {} at hop {}: {:?}", bit, at_hop, r.map(|p| p.payload.len())
        );
    }

    #[test]
    fn random_bytes_are_an_error(bytes in proptest::collection::vec(any::<u8>(), SETUP_PACKET_BYTES..=SETUP_PACKET_BYTES)) {
        let k = OnionKeyPair::generate(1, 2);
        prop_assert!(peel_setup(&bytes, &k, &mut cache()).is_err());
    }

    #[test]
    fn any_length_but_the_right_one_is_an_error(len in 0..SETUP_PACKET_BYTES * 2, fill in any::<u8>()) {
        prop_assume!(len != SETUP_PACKET_BYTES);
        let k = OnionKeyPair::generate(1, 2);
        let bytes = vec![fill; len];
        prop_assert_eq!(
            peel_setup(&bytes, &k, &mut cache()).err(),
            Some(OnionError::Length { expected: SETUP_PACKET_BYTES, got: len })
        );
    }
}
