//! Link security: our nodes secure their connections with TLS 1.3 and the
//! cipher their CPU runs fastest, and peers that speak only Noise, or only
//! libp2p's own TLS, still connect, identify and ping, both ways.

use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity::Keypair, ping, Multiaddr, PeerId, Swarm, SwarmBuilder};
use mixnn_node::metrics::Metrics;
use mixnn_node::network::link::aes_in_hardware;
use mixnn_node::network::{Network, NetworkConfig, TransportKind, IDENTIFY_VERSION};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn loopback() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("addr")
}

/// One of our nodes on loopback TCP, with the metrics it counts links in.
async fn our_node(bootstrap: Vec<Multiaddr>) -> (Network, Metrics, Multiaddr) {
    let metrics = Metrics::new();
    let cfg = NetworkConfig {
        listen: vec![loopback()],
        bootstrap,
        server: true,
        transport: TransportKind::Tcp,
        ..NetworkConfig::default()
    };
    let (net, _task) = Network::start(
        Keypair::generate_ed25519(),
        cfg,
        metrics.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("node starts");
    let addr = net
        .listen_addrs()
        .await
        .expect("listen addrs")
        .into_iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .expect("a TCP address");
    let full = addr.with(libp2p::multiaddr::Protocol::P2p(net.peer_id()));
    (net, metrics, full)
}

fn fast_suite() -> &'static str {
    if aes_in_hardware() {
        "TLS13_AES_256_GCM_SHA384"
    } else {
        "TLS13_CHACHA20_POLY1305_SHA256"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_nodes_secure_links_with_tls_and_the_cpus_fastest_cipher() {
    let (_a, a_metrics, a_addr) = our_node(vec![]).await;
    let (b, b_metrics, _) = our_node(vec![a_addr]).await;
    b.wait_for_peers(1, WAIT).await.expect("b connects to a");

    for (who, m) in [("dialer", &b_metrics), ("listener", &a_metrics)] {
        assert!(
            m.links_secured_with(fast_suite()) >= 1,
            "the {who} counts its link under {}: {}",
            fast_suite(),
            m.links_secured_with(fast_suite())
        );
        assert_eq!(m.links_secured_with("noise"), 0, "the {who} used Noise");
    }
}

#[derive(NetworkBehaviour)]
struct Bare {
    ping: ping::Behaviour,
    identify: identify::Behaviour,
}

fn bare_behaviour(key: &Keypair) -> Bare {
    Bare {
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_millis(200))),
        identify: identify::Behaviour::new(identify::Config::new(
            IDENTIFY_VERSION.into(),
            key.public(),
        )),
    }
}

/// A plain libp2p peer on TCP and yamux, securing its links with
/// `$security` only.
macro_rules! bare_peer {
    ($security:expr) => {
        SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                $security,
                libp2p::yamux::Config::default,
            )
            .expect("tcp")
            .with_behaviour(bare_behaviour)
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(WAIT))
            .build()
    };
}

/// A plain libp2p peer that secures its links with Noise only.
fn noise_only_peer() -> Swarm<Bare> {
    bare_peer!(libp2p::noise::Config::new)
}

/// A plain libp2p peer that secures its links with libp2p's own TLS only,
/// which offers ChaCha20-Poly1305 first.
fn stock_tls_only_peer() -> Swarm<Bare> {
    bare_peer!(libp2p::tls::Config::new)
}

/// Drives `peer` until a node it did not dial has connected and been
/// pinged and identified.
async fn pings_and_identifies_inbound(peer: &mut Swarm<Bare>) {
    let node = loop {
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = peer.select_next_some().await {
            break peer_id;
        }
    };
    pings_and_identifies(peer, node).await;
}

/// Drives `peer` until it has both pinged `node` and identified it.
async fn pings_and_identifies(peer: &mut Swarm<Bare>, node: PeerId) {
    let (mut pinged, mut identified) = (false, false);
    let run = async {
        while !(pinged && identified) {
            match peer.select_next_some().await {
                SwarmEvent::Behaviour(BareEvent::Ping(ping::Event {
                    peer,
                    result: Ok(_),
                    ..
                })) if peer == node => pinged = true,
                SwarmEvent::Behaviour(BareEvent::Identify(identify::Event::Received {
                    peer_id,
                    info,
                    ..
                })) if peer_id == node => {
                    assert_eq!(info.protocol_version, IDENTIFY_VERSION);
                    identified = true;
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    panic!("the peer could not reach our node: {error}")
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, run)
        .await
        .expect("ping and identify in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noise_only_peer_reaches_our_node_and_our_node_reaches_it() {
    // It dials us.
    let (node, metrics, addr) = our_node(vec![]).await;
    let mut peer = noise_only_peer();
    peer.dial(addr).expect("dial");
    pings_and_identifies(&mut peer, node.peer_id()).await;
    assert!(metrics.links_secured_with("noise") >= 1);

    // We dial it.
    let mut peer = noise_only_peer();
    peer.listen_on(loopback()).expect("listen");
    let listening = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = peer.select_next_some().await {
            break address;
        }
    };
    // As a bootstrap peer, it is dialled at start.
    let peer_id = *peer.local_peer_id();
    let bootstrap = listening.with(libp2p::multiaddr::Protocol::P2p(peer_id));
    let (start, ()) = tokio::join!(
        our_node(vec![bootstrap]),
        pings_and_identifies_inbound(&mut peer)
    );
    let (node, metrics, _) = start;
    let dialled = node.connect(peer_id, WAIT).await;
    dialled.expect("our node connects to a Noise-only peer");
    assert!(metrics.links_secured_with("noise") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_libp2ps_own_tls_reaches_our_node_on_its_cipher() {
    let (node, metrics, addr) = our_node(vec![]).await;
    let mut peer = stock_tls_only_peer();
    peer.dial(addr).expect("dial");
    pings_and_identifies(&mut peer, node.peer_id()).await;
    // The listener follows the dialer's order, and libp2p's TLS offers
    // ChaCha20-Poly1305 first.
    assert!(metrics.links_secured_with("TLS13_CHACHA20_POLY1305_SHA256") >= 1);
    assert_eq!(metrics.links_secured_with("noise"), 0);
}
