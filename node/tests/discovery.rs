//! Discovery through the DHT: many nodes in one process, forged records,
//! restarts.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use libp2p::kad;
use libp2p::PeerId;
use mixnn_crypto::{Capacity, Descriptor, Identity, Roles};
use mixnn_node::discovery::{discover_at_least, discover_for_route, join_as_client};
use mixnn_node::network::records::{descriptor_key, unix_now, Role};
use mixnn_node::network::{Network, NetworkConfig, TransportKind};
use mixnn_node::store::{Lease, SlotStore, StoredSlot};
use tokio_util::sync::CancellationToken;

fn descriptor_for(id: &Identity, expires_at: u64) -> Descriptor {
    Descriptor {
        peer_id: id.peer_id_bytes(),
        identity_key: id.public_key(),
        seq: 1,
        onion_key: [5; 32],
        epoch: 1,
        expires_at,
        roles: Roles {
            layer_host: true,
            mix: true,
        },
        free_slots: 9,
        capacity: Capacity::default(),
        addresses: vec![],
    }
}

/// A peer that joins as a DHT server, announces the layer-host role and
/// publishes whatever record it is given, unchecked.
async fn forger(bootstrap: &[libp2p::Multiaddr], id: &Identity) -> Network {
    let kp = libp2p::identity::Keypair::ed25519_from_bytes(id.secret_bytes().to_vec()).expect("kp");
    let cfg = NetworkConfig {
        listen: vec!["/memory/0".parse().expect("addr")],
        bootstrap: bootstrap.to_vec(),
        server: true,
        transport: TransportKind::Memory,
        max_record_bytes: 32 * 1024,
        ..NetworkConfig::default()
    };
    let (net, _task) = Network::start(kp, cfg, Default::default(), CancellationToken::new())
        .await
        .expect("forger starts");
    net.wait_for_peers(1, Duration::from_secs(5))
        .await
        .expect("forger connects");
    net
}

fn peer_of(id: &Identity) -> PeerId {
    PeerId::from_bytes(&id.peer_id_bytes()).expect("peer id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_are_found_and_forgeries_are_not() {
    let dirs: Vec<_> = (0..21)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let boot = common::start(
        dirs[0].path(),
        &[],
        common::BOOTSTRAP,
        TransportKind::Memory,
    )
    .await;
    let boot_addr = boot.full_addrs();
    let mut nodes = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        let roles = match i % 3 {
            0 => common::Roles {
                layers: true,
                mix: false,
            },
            1 => common::Roles {
                layers: false,
                mix: true,
            },
            _ => common::Roles {
                layers: true,
                mix: true,
            },
        };
        nodes.push(common::start(d.path(), &boot_addr, roles, TransportKind::Memory).await);
    }

    // Three forgers: a bad signature, someone else's peer id, an expired
    // descriptor. Each announces the role so a client will try to read it.
    let now = unix_now();
    let (fa, fb, fc, victim) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let bad_sig = descriptor_for(&fa, now + 600)
        .sign(&victim)
        .expect("sign")
        .to_bytes();
    let wrong_peer = descriptor_for(&victim, now + 600)
        .sign(&victim)
        .expect("sign")
        .to_bytes();
    let expired = descriptor_for(&fc, now.saturating_sub(1))
        .sign(&fc)
        .expect("sign")
        .to_bytes();
    let mut forgers = Vec::new();
    for (id, value) in [(&fa, bad_sig), (&fb, wrong_peer), (&fc, expired)] {
        let f = forger(&boot_addr, id).await;
        f.put_raw_record_for_tests(kad::Record::new(descriptor_key(&peer_of(id)), value))
            .await
            .ok();
        f.provide(Role::LayerHost)
            .await
            .expect("the forger announces the role");
        forgers.push(f);
    }

    let client = join_as_client(
        boot_addr.clone(),
        TransportKind::Memory,
        vec![],
        CancellationToken::new(),
    )
    .await
    .expect("client joins");
    let (found, stats) = discover_at_least(&client, 20, Duration::from_secs(30)).await;
    let found_ids: HashSet<PeerId> = found.iter().map(|v| v.peer_id).collect();
    for (i, n) in nodes.iter().enumerate() {
        assert!(
            found_ids.contains(&n.peer_id()),
            "node {i} was not discovered"
        );
        let v = found
            .iter()
            .find(|v| v.peer_id == n.peer_id())
            .expect("found");
        assert_eq!(
            v.descriptor.roles.layer_host,
            i % 3 != 1,
            "node {i} layer role"
        );
        assert_eq!(v.descriptor.roles.mix, i % 3 != 0, "node {i} mix role");
    }
    for id in [&fa, &fb, &fc] {
        assert!(
            !found_ids.contains(&peer_of(id)),
            "a forged descriptor was returned"
        );
    }
    assert!(
        !found_ids.contains(&boot.peer_id()),
        "the bootstrap offers no roles"
    );
    assert_eq!(found.len(), 20);

    let refused: u64 = nodes
        .iter()
        .map(|n| n.state.metrics.records_refused_total())
        .sum::<u64>()
        + boot.state.metrics.records_refused_total();
    assert!(
        refused >= 3,
        "forged records were not refused on store (refused {refused})"
    );
    // The client saw the forgers announce the role, and kept none of their
    // descriptors: whatever forged copy reached it was refused on read.
    assert_eq!(
        stats.providers_found, 23,
        "20 volunteers and 3 forgers provide a role: {stats:?}"
    );
    assert_eq!(stats.descriptors_verified, 20, "{stats:?}");
    assert_eq!(
        stats.descriptors_missing, 3,
        "each forger's descriptor must be refused: {stats:?}"
    );
    assert_eq!(stats.descriptors_withdrawn, 0, "{stats:?}");

    // A client's route discovery (train's and the bench's) samples: it
    // verifies what a route of 7 needs and a third more, never a forger,
    // with fewer DHT requests than the walk over everyone.
    let before = client.metrics().dht_requests.get();
    let _ = discover_at_least(&client, 20, Duration::from_secs(30)).await;
    let full = client.metrics().dht_requests.get() - before;
    let before = client.metrics().dht_requests.get();
    let (route, route_stats) = discover_for_route(&client, 7, Duration::from_secs(30)).await;
    let sampled = client.metrics().dht_requests.get() - before;
    assert_eq!(route.len(), 10, "7 and 3 to spare: {route_stats:?}");
    let volunteers: HashSet<PeerId> = nodes.iter().map(|n| n.peer_id()).collect();
    assert!(route.iter().all(|v| volunteers.contains(&v.peer_id)));
    assert!(
        sampled < full,
        "sampling sent {sampled} DHT requests, the full walk {full}"
    );

    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
    boot.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_records_are_refused_and_counted() {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let boot = common::start(
        dirs[0].path(),
        &[],
        common::BOOTSTRAP,
        TransportKind::Memory,
    )
    .await;
    let addr = boot.full_addrs();
    let a = common::start(
        dirs[1].path(),
        &addr,
        common::Roles {
            layers: true,
            mix: true,
        },
        TransportKind::Memory,
    )
    .await;
    let b = common::start(
        dirs[2].path(),
        &addr,
        common::Roles {
            layers: true,
            mix: false,
        },
        TransportKind::Memory,
    )
    .await;
    let id = Identity::generate();
    let f = forger(&addr, &id).await;
    f.wait_for_peers(3, Duration::from_secs(10)).await.ok();
    let key = descriptor_key(&peer_of(&id));
    let before: u64 = [&boot, &a, &b]
        .iter()
        .map(|n| n.state.metrics.records_refused_total())
        .sum();
    f.put_raw_record_for_tests(kad::Record::new(key.clone(), vec![0xAB; 200]))
        .await
        .ok();
    f.put_raw_record_for_tests(kad::Record::new(key, vec![1; 20_000]))
        .await
        .ok();
    f.put_raw_record_for_tests(kad::Record::new(
        kad::RecordKey::new(&"/not/ours"),
        vec![1; 10],
    ))
    .await
    .ok();
    // Each kind of bad record is refused (by every node it reaches) and
    // counted under its reason.
    let render =
        || boot.state.metrics.render() + &a.state.metrics.render() + &b.state.metrics.render();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reasons = [
        "reason=\"malformed\"",
        "reason=\"too_large\"",
        "reason=\"unknown_key\"",
    ];
    while tokio::time::Instant::now() < deadline && !reasons.iter().all(|r| render().contains(r)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = render();
    for r in reasons {
        assert!(text.contains(r), "{r} missing: {text}");
    }
    let after: u64 = [&boot, &a, &b]
        .iter()
        .map(|n| n.state.metrics.records_refused_total())
        .sum();
    assert!(
        after >= before + 3,
        "expected at least 3 refusals, saw {}",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_peer_id_and_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = || common::Roles {
        layers: true,
        mix: false,
    };
    let node = common::start(dir.path(), &[], roles(), TransportKind::Memory).await;
    let peer = node.peer_id();
    let slot = StoredSlot {
        id: [3; 16],
        owner: [4; 32],
        version: 7,
        param_count: 10,
        lease: Lease::provisional(unix_now()).extended(unix_now(), 3600),
        state: vec![1, 2, 3],
    };
    node.state.slots.put_slot(&slot).expect("put");
    assert_eq!(node.state.free_slots(), 1);
    node.shutdown().await.expect("shutdown");

    let node = common::start(dir.path(), &[], roles(), TransportKind::Memory).await;
    assert_eq!(node.peer_id(), peer);
    assert_eq!(
        node.state.slots.get_slot(&[3; 16]).expect("get"),
        Some(slot)
    );
    assert_eq!(node.state.free_slots(), 1);
    node.shutdown().await.expect("shutdown");
}
