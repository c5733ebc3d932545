//! Helpers for multi-node tests in one process.
#![allow(dead_code)]

use std::path::Path;

use libp2p::Multiaddr;
use mixnn_node::config::NodeConfig;
use mixnn_node::network::TransportKind;
use mixnn_node::node::RunningNode;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct Roles {
    pub layers: bool,
    pub mix: bool,
}

pub const BOOTSTRAP: Roles = Roles {
    layers: false,
    mix: false,
};

pub fn config(
    dir: &Path,
    bootstrap: &[Multiaddr],
    roles: Roles,
    transport: TransportKind,
) -> NodeConfig {
    let mut c = NodeConfig::new(dir.to_path_buf());
    c.listen = vec![match transport {
        TransportKind::Memory => "/memory/0".parse().expect("addr"),
        TransportKind::Tcp => "/ip4/127.0.0.1/tcp/0".parse().expect("addr"),
    }];
    c.transport = transport;
    c.bootstrap = bootstrap.to_vec();
    c.layers = roles.layers;
    c.mix = roles.mix;
    c.slots = if roles.layers { 2 } else { 0 };
    c.republish_secs = 5;
    c
}

pub async fn start(
    dir: &Path,
    bootstrap: &[Multiaddr],
    roles: Roles,
    transport: TransportKind,
) -> RunningNode {
    // A node stopped in this process may still be letting go of its
    // database (a task finishing under load); a new process never waits.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match RunningNode::start(
            config(dir, bootstrap, roles.clone(), transport),
            CancellationToken::new(),
        )
        .await
        {
            Ok(n) => return n,
            Err(mixnn_node::node::NodeError::Store(mixnn_node::store::StoreError::Locked(_)))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("node starts: {e:?}"),
        }
    }
}

/// A bootstrap, `n` volunteers (layer hosts and mixes) and a client that has
/// discovered them all, on the memory transport.
pub struct TestNet {
    pub _dirs: Vec<tempfile::TempDir>,
    pub boot: RunningNode,
    pub nodes: Vec<RunningNode>,
    pub client: std::sync::Arc<mixnn_node::client::Client>,
    pub volunteers: Vec<mixnn_node::discovery::Volunteer>,
}

pub async fn testnet(
    n: usize,
    slots: u32,
    tap: Option<std::sync::Arc<dyn mixnn_node::circuit::server::HopTap>>,
) -> TestNet {
    testnet_with(n, slots, tap, |_| {}).await
}

/// [`testnet`] with each volunteer's config changed by `configure`.
pub async fn testnet_with(
    n: usize,
    slots: u32,
    tap: Option<std::sync::Arc<dyn mixnn_node::circuit::server::HopTap>>,
    configure: impl Fn(&mut NodeConfig),
) -> TestNet {
    let dirs: Vec<_> = (0..=n)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let boot = start(dirs[0].path(), &[], BOOTSTRAP, TransportKind::Memory).await;
    let addr = boot.full_addrs();
    let mut nodes = Vec::new();
    for d in &dirs[1..] {
        let mut c = config(
            d.path(),
            &addr,
            Roles {
                layers: true,
                mix: true,
            },
            TransportKind::Memory,
        );
        c.slots = slots;
        c.metrics = Some("127.0.0.1:0".parse().expect("addr"));
        configure(&mut c);
        nodes.push(
            RunningNode::start_with_tap(c, CancellationToken::new(), tap.clone())
                .await
                .expect("node starts"),
        );
    }
    for n in &nodes {
        assert!(
            n.wait_published(std::time::Duration::from_secs(30)).await,
            "a volunteer did not publish"
        );
    }
    let network = mixnn_node::discovery::join_as_client(
        addr,
        TransportKind::Memory,
        vec![],
        CancellationToken::new(),
    )
    .await
    .expect("client joins");
    let (volunteers, _) =
        mixnn_node::discovery::discover_at_least(&network, n, std::time::Duration::from_secs(20))
            .await;
    assert_eq!(
        volunteers.len(),
        n,
        "the client did not find every volunteer"
    );
    let client = std::sync::Arc::new(mixnn_node::client::Client::new(network).expect("client"));
    TestNet {
        _dirs: dirs,
        boot,
        nodes,
        client,
        volunteers,
    }
}

/// The volunteers as they advertise themselves now (free slots change as
/// jobs take them).
pub async fn fresh_volunteers(net: &TestNet) -> Vec<mixnn_node::discovery::Volunteer> {
    let (found, _) = mixnn_node::discovery::discover_at_least(
        net.client.network(),
        net.nodes.len(),
        std::time::Duration::from_secs(20),
    )
    .await;
    found
}

/// A training job with nothing to stop it.
pub fn job<'a>(
    cfg: &'a mixnn_model::TrainConfig,
    train: &'a mixnn_model::Split,
    test: &'a mixnn_model::Split,
    opts: &'a mixnn_node::client::JobOptions,
    map_path: &'a Path,
) -> mixnn_node::client::TrainJob<'a> {
    mixnn_node::client::TrainJob {
        cfg,
        train,
        test,
        opts,
        map_path,
        stop: CancellationToken::new(),
        trained_on: None,
    }
}

/// `GET path` on a node's metrics port: the response's status line and body.
pub async fn http_get(node: &RunningNode, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = node.metrics_addr().expect("metrics address");
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut text = String::new();
    sock.read_to_string(&mut text).await.expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}
