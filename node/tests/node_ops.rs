//! Operating a node: metrics over HTTP, network events, onion key rotation.

mod common;

use std::time::Duration;

use mixnn_model::DecodeLimits;
use mixnn_node::circuit::payload::HopRole;
use mixnn_node::client::ring::{Ring, RingHop, RingKeys};
use mixnn_node::client::Client;
use mixnn_node::discovery::join_as_client;
use mixnn_node::network::records::{descriptor_key, Role};
use mixnn_node::network::{NetworkEvent, TransportKind};
use mixnn_node::node::RunningNode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_text_and_events_are_published() {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut c = common::config(
        dirs[0].path(),
        &[],
        common::BOOTSTRAP,
        TransportKind::Memory,
    );
    c.metrics = Some("127.0.0.1:0".parse().expect("addr"));
    let boot = RunningNode::start(c, CancellationToken::new())
        .await
        .expect("boot");
    let mut events = boot.network.subscribe();
    let node = common::start(
        dirs[1].path(),
        &boot.full_addrs(),
        common::Roles {
            layers: true,
            mix: true,
        },
        TransportKind::Memory,
    )
    .await;

    // The node connects: the bootstrap's subscribers hear of it.
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(NetworkEvent::PeerConnected(p)) = events.recv().await {
                if p == node.peer_id() {
                    return;
                }
            }
        }
    })
    .await;
    assert!(connected.is_ok(), "no PeerConnected event for the node");

    // A bad record stored at the bootstrap is refused, counted and announced.
    let forger = join_as_client(
        boot.full_addrs(),
        TransportKind::Memory,
        vec![],
        CancellationToken::new(),
    )
    .await
    .expect("joins");
    let key = descriptor_key(&forger.peer_id());
    forger
        .put_raw_record_for_tests(libp2p::kad::Record::new(key, vec![7; 50]))
        .await
        .ok();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(NetworkEvent::RecordRefused { from, reason }) = events.recv().await {
                return (from, reason);
            }
        }
    })
    .await
    .expect("a RecordRefused event");
    assert_eq!(refused, (Some(forger.peer_id()), "malformed"));

    let addr = boot.metrics_addr().expect("metrics address");
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    sock.read_to_string(&mut text).await.expect("read");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for m in [
        "mixnn_peers_connected",
        "mixnn_records_refused_total{reason=\"malformed\"} 1",
        "mixnn_slots_held",
        "mixnn_bytes_relayed_total",
    ] {
        assert!(text.contains(m), "{m} missing from:\n{text}");
    }
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(b"GET /nothing HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    sock.read_to_string(&mut text).await.expect("read");
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onion_keys_rotate_each_epoch_and_the_previous_key_still_works() {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let boot = common::start(
        dirs[0].path(),
        &[],
        common::BOOTSTRAP,
        TransportKind::Memory,
    )
    .await;
    let mut c = common::config(
        dirs[1].path(),
        &boot.full_addrs(),
        common::Roles {
            layers: false,
            mix: true,
        },
        TransportKind::Memory,
    );
    c.epoch_secs = 10;
    c.republish_secs = 2;
    let node = RunningNode::start(c, CancellationToken::new())
        .await
        .expect("node");
    let network = join_as_client(
        boot.full_addrs(),
        TransportKind::Memory,
        vec![],
        CancellationToken::new(),
    )
    .await
    .expect("joins");
    // Wait for the role record, then read the descriptor of this epoch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !network
        .find_providers(Role::Mix)
        .await
        .expect("providers")
        .contains(&node.peer_id())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never announced itself"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = network
        .get_descriptor(node.peer_id())
        .await
        .expect("descriptor");
    // Within the next epoch and a republication, the descriptor moves on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let second = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let d = network
            .get_descriptor(node.peer_id())
            .await
            .expect("descriptor");
        if d.epoch > first.epoch {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the onion key did not rotate"
        );
    };
    assert_eq!(second.epoch, first.epoch + 1);
    assert_ne!(second.onion_key, first.onion_key);

    // A client still holding the old descriptor can set up a circuit with it.
    let client = Client::new(network).expect("client");
    let hop = RingHop {
        peer: node.peer_id(),
        onion_key: first.onion_key,
        epoch: first.epoch,
        label: "mix".into(),
        role: HopRole::Mix,
    };
    let ring = Ring::open(
        client.network(),
        client.listener(),
        vec![hop],
        RingKeys {
            first_segment: [1; 32],
            last_segment: [1; 32],
            first_suite: Default::default(),
            last_suite: Default::default(),
        },
        DecodeLimits::default(),
        1 << 20,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        ring.is_ok(),
        "the previous epoch's key was refused: {:?}",
        ring.err()
    );

    // That setup left a replay tag of the first epoch; once its key is
    // gone (two rotations later) the tag goes too, without a restart.
    let replay = node.state.data.replay_tree().expect("replay tree");
    let tags_of = |epoch: u64| replay.scan_prefix(epoch.to_be_bytes()).count();
    assert!(tags_of(first.epoch) >= 1, "the setup left no replay tag");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tags_of(first.epoch) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay tags of a gone epoch were kept"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_a_taken_port_fails_at_start_and_says_why() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let addr: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr");
    let mut c = common::config(dirs[0].path(), &[], common::BOOTSTRAP, TransportKind::Tcp);
    c.listen = vec![addr.clone()];
    let first = RunningNode::start(c, CancellationToken::new())
        .await
        .expect("the first node starts");
    let mut c = common::config(dirs[1].path(), &[], common::BOOTSTRAP, TransportKind::Tcp);
    c.listen = vec![addr];
    match RunningNode::start(c, CancellationToken::new()).await {
        Ok(_) => panic!("a second node bound a port that was taken"),
        Err(e) => assert!(e.to_string().contains("already in use"), "{e}"),
    }
    first.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bootstrap_fails_fast_with_its_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = common::config(dir.path(), &[], common::BOOTSTRAP, TransportKind::Tcp);
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    let boot = RunningNode::start(c, CancellationToken::new())
        .await
        .expect("boot");
    let real = boot
        .full_addrs()
        .into_iter()
        .find(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/"))
        .expect("a loopback address");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let closed: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", boot.peer_id())
        .parse()
        .expect("addr");
    // The right address under another peer id.
    let base = real.to_string();
    let base = base.rsplit_once("/p2p/").expect("peer id").0;
    let wrong: libp2p::Multiaddr = format!("{base}/p2p/{}", libp2p::PeerId::random())
        .parse()
        .expect("addr");
    for (addr, cause) in [(closed, "connection refused"), (wrong, "peer id is wrong")] {
        let started = std::time::Instant::now();
        let err = match join_as_client(
            vec![addr],
            TransportKind::Tcp,
            vec![],
            CancellationToken::new(),
        )
        .await
        {
            Ok(_) => panic!("joined through a bootstrap that is not there"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(cause), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
    boot.shutdown().await.expect("shutdown");
}
