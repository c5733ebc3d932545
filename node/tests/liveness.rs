//! Churn in discovery: a volunteer that stops cleanly withdraws its
//! descriptor and drops out of discovery at once; an old descriptor replayed
//! after that does not bring it back; forged withdrawals are refused; a
//! probe tells live peers from dead addresses; a network with too few
//! volunteers says so without waiting for the deadline.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use libp2p::{kad, Multiaddr, PeerId};
use mixnn_crypto::{Capacity, Descriptor, Identity, Roles, Withdrawal};
use mixnn_node::client::probe;
use mixnn_node::discovery::{discover, discover_at_least, join_as_client};
use mixnn_node::network::records::{descriptor_key, unix_now, Role};
use mixnn_node::network::{Network, NetworkConfig, NetworkError, TransportKind};
use mixnn_node::node::RunningNode;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn peer_of(id: &Identity) -> PeerId {
    PeerId::from_bytes(&id.peer_id_bytes()).expect("peer id")
}

fn listen_addr(transport: TransportKind) -> Multiaddr {
    match transport {
        TransportKind::Memory => "/memory/0".parse().expect("addr"),
        TransportKind::Tcp => "/ip4/127.0.0.1/tcp/0".parse().expect("addr"),
    }
}

/// A DHT server with a throwaway identity that puts whatever record it is
/// given, unchecked (an attacker, or a peer replaying an old record).
async fn rogue(bootstrap: &[Multiaddr], transport: TransportKind) -> Network {
    let cfg = NetworkConfig {
        listen: vec![listen_addr(transport)],
        bootstrap: bootstrap.to_vec(),
        server: true,
        transport,
        ..NetworkConfig::default()
    };
    let (net, _task) = Network::start(
        libp2p::identity::Keypair::generate_ed25519(),
        cfg,
        Default::default(),
        CancellationToken::new(),
    )
    .await
    .expect("rogue peer starts");
    net.wait_for_peers(1, Duration::from_secs(10))
        .await
        .expect("rogue peer connects");
    net
}

struct Net {
    _dirs: Vec<tempfile::TempDir>,
    boot: RunningNode,
    nodes: Vec<RunningNode>,
}

/// A bootstrap and `n` volunteers that have all published.
async fn volunteers(n: usize, transport: TransportKind) -> Net {
    let dirs: Vec<_> = (0..=n)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let boot = common::start(dirs[0].path(), &[], common::BOOTSTRAP, transport).await;
    let addr = boot.full_addrs();
    let mut nodes = Vec::new();
    for d in &dirs[1..] {
        let roles = common::Roles {
            layers: true,
            mix: true,
        };
        nodes.push(common::start(d.path(), &addr, roles, transport).await);
    }
    for (i, n) in nodes.iter().enumerate() {
        assert!(
            n.wait_published(Duration::from_secs(20)).await,
            "volunteer {i} never published"
        );
    }
    Net {
        _dirs: dirs,
        boot,
        nodes,
    }
}

async fn client(net: &Net, transport: TransportKind) -> Network {
    join_as_client(
        net.boot.full_addrs(),
        transport,
        vec![],
        CancellationToken::new(),
    )
    .await
    .expect("client joins")
}

fn ids(found: &[mixnn_node::discovery::Volunteer]) -> HashSet<PeerId> {
    found.iter().map(|v| v.peer_id).collect()
}

fn copy_of(id: &Identity) -> Identity {
    Identity::from_secret(&id.secret_bytes())
}

fn refused(nodes: &[&RunningNode], reason: &str) -> u64 {
    let line = format!("mixnn_records_refused_total{{reason=\"{reason}\"}} ");
    nodes
        .iter()
        .map(|n| {
            n.state
                .metrics
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(&line).and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0u64)
        })
        .sum()
}

/// Wait (at most `limit`) until `victim` is withdrawn and the others are
/// all still found; panics with what was seen last otherwise.
async fn until_withdrawn(
    client: &Network,
    victim: PeerId,
    others: &HashSet<PeerId>,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let read = client.get_descriptor(victim).await;
        let (found, stats) = discover(client, Duration::from_secs(2)).await;
        let found = ids(&found);
        let gone = matches!(read, Err(NetworkError::Withdrawn(p)) if p == victim);
        if gone && !found.contains(&victim) && found == *others {
            assert!(stats.descriptors_withdrawn >= 1, "{stats:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {limit:?}: get_descriptor gave {read:?}, discovery found {} of {} others, victim listed: {}",
            found.intersection(others).count(),
            others.len(),
            found.contains(&victim)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volunteer_that_stops_cleanly_is_gone_from_discovery_and_stays_gone() {
    let mut net = volunteers(4, TransportKind::Memory).await;
    let client = client(&net, TransportKind::Memory).await;
    let (found, _) = discover_at_least(&client, 4, Duration::from_secs(30)).await;
    assert_eq!(found.len(), 4, "every volunteer is found at first");

    let leaving = net.nodes.remove(0);
    let victim = leaving.peer_id();
    let victim_id = copy_of(leaving.state.data.identity());
    let others: HashSet<PeerId> = net.nodes.iter().map(|n| n.peer_id()).collect();
    // The descriptor it had published, exactly as it was signed.
    let old = client.get_descriptor(victim).await.expect("descriptor");
    let old_bytes = old.sign(&victim_id).expect("sign").to_bytes();

    leaving.shutdown().await.expect("shutdown");
    until_withdrawn(&client, victim, &others, Duration::from_secs(5)).await;

    // Someone puts the old, validly signed descriptor back.
    let replayer = rogue(&net.boot.full_addrs(), TransportKind::Memory).await;
    replayer
        .wait_for_peers(net.nodes.len() + 1, Duration::from_secs(10))
        .await
        .ok();
    let holders: Vec<&RunningNode> = net.nodes.iter().chain([&net.boot]).collect();
    let stale_before = refused(&holders, "stale");
    replayer
        .put_raw_record_for_tests(kad::Record::new(descriptor_key(&victim), old_bytes))
        .await
        .ok();
    // The peers holding the withdrawal refuse it as stale.
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&holders, "stale") == stale_before {
        assert!(
            Instant::now() < deadline,
            "no peer refused the replayed descriptor"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And readers, even with the replayer's own copy among the answers,
    // still see the withdrawal.
    for _ in 0..3 {
        let read = client.get_descriptor(victim).await;
        assert!(
            matches!(read, Err(NetworkError::Withdrawn(p)) if p == victim),
            "the replay brought the peer back: {read:?}"
        );
        let (found, _) = discover(&client, Duration::from_secs(2)).await;
        assert_eq!(ids(&found), others);
    }

    for n in net.nodes {
        n.shutdown().await.expect("shutdown");
    }
    net.boot.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_withdrawals_are_refused_and_counted() {
    let net = volunteers(3, TransportKind::Memory).await;
    let client = client(&net, TransportKind::Memory).await;
    let target = net.nodes[0].peer_id();
    let target_id = copy_of(net.nodes[0].state.data.identity());
    let holders: Vec<&RunningNode> = net.nodes.iter().chain([&net.boot]).collect();
    let before = refused(&holders, "bad_signature") + refused(&holders, "wrong_key");

    let attacker = Identity::generate();
    let rogue = rogue(&net.boot.full_addrs(), TransportKind::Memory).await;
    rogue
        .wait_for_peers(net.nodes.len() + 1, Duration::from_secs(10))
        .await
        .ok();
    let far = unix_now() + 600;
    // The target's withdrawal with a huge sequence number, signed by the
    // attacker; and the attacker's own withdrawal filed under the target.
    let forged = Withdrawal::new(&target_id, u64::MAX, far)
        .sign(&attacker)
        .expect("sign")
        .to_bytes();
    let misfiled = Withdrawal::new(&attacker, u64::MAX, far)
        .sign(&attacker)
        .expect("sign")
        .to_bytes();
    for value in [forged, misfiled] {
        rogue
            .put_raw_record_for_tests(kad::Record::new(descriptor_key(&target), value))
            .await
            .ok();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let bad = refused(&holders, "bad_signature");
        let wrong = refused(&holders, "wrong_key");
        if bad + wrong >= before + 2 && bad > 0 && wrong > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "forged withdrawals were not refused on store (bad_signature {bad}, wrong_key {wrong})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The target is still there for everyone.
    for _ in 0..3 {
        let d = client
            .get_descriptor(target)
            .await
            .expect("still a live descriptor");
        assert_eq!(d.peer_id, target.to_bytes());
    }
    let (found, _) = discover_at_least(&client, 3, Duration::from_secs(20)).await;
    assert!(ids(&found).contains(&target));
    assert_eq!(found.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_tells_a_live_volunteer_from_a_dead_address() {
    let net = volunteers(1, TransportKind::Tcp).await;
    let client = client(&net, TransportKind::Tcp).await;
    let live = net.nodes[0].peer_id();

    // A valid, self-signed descriptor whose only address answers nothing.
    let dead_id = Identity::generate();
    let dead = peer_of(&dead_id);
    let d = Descriptor {
        peer_id: dead_id.peer_id_bytes(),
        identity_key: dead_id.public_key(),
        seq: 1,
        onion_key: [9; 32],
        epoch: 1,
        expires_at: unix_now() + 600,
        roles: Roles {
            layer_host: true,
            mix: true,
        },
        free_slots: 4,
        capacity: Capacity::default(),
        addresses: vec!["/ip4/127.0.0.1/tcp/1".into()],
    };
    let rogue = rogue(&net.boot.full_addrs(), TransportKind::Tcp).await;
    rogue
        .put_raw_record_for_tests(kad::Record::new(
            descriptor_key(&dead),
            d.sign(&dead_id).expect("sign").to_bytes(),
        ))
        .await
        .ok();
    rogue.provide(Role::LayerHost).await.ok();

    // Discovery lists it (the descriptor is valid), as a client would see it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get_descriptor(dead).await {
            Ok(got) => {
                assert_eq!(got.addresses, d.addresses);
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "the dead peer's descriptor never became readable: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.get_descriptor(live).await.expect("live descriptor");

    let nobody = PeerId::random();
    let timeout = Duration::from_secs(2);
    let started = Instant::now();
    let up = probe::reachable(&client, &[live, dead, nobody, live], timeout).await;
    let took = started.elapsed();
    assert_eq!(up, HashSet::from([live]), "only the live volunteer answers");
    // Bounded by the timeout (generously: the dials run in parallel).
    assert!(took < timeout * 3, "the probe took {took:?}");
    assert!(probe::reachable(&client, &[], timeout).await.is_empty());

    drop(rogue);
    for n in net.nodes {
        n.shutdown().await.expect("shutdown");
    }
    net.boot.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_volunteers_are_reported_well_before_the_deadline() {
    let net = volunteers(2, TransportKind::Memory).await;
    let client = client(&net, TransportKind::Memory).await;
    let deadline = Duration::from_secs(120);
    let started = Instant::now();
    let (found, stats) = discover_at_least(&client, 5, deadline).await;
    let took = started.elapsed();
    assert_eq!(found.len(), 2, "{stats:?}");
    assert!(stats.walks >= 2, "settling takes two walks: {stats:?}");
    // The walks settle after about two seconds; a busy machine may need
    // more, but nowhere near the deadline.
    assert!(
        took < deadline / 4,
        "discovery waited {took:?} for volunteers that do not exist"
    );
    for n in net.nodes {
        n.shutdown().await.expect("shutdown");
    }
    net.boot.shutdown().await.expect("shutdown");
}
