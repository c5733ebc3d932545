//! Helpers for multi-node tests in one process.
#![allow(dead_code)]

use std::path::Path;

use libp2p::Multiaddr;
use mixnn_node::config::NodeConfig;
use mixnn_node::network::TransportKind;
use mixnn_node::node::RunningNode;
use tokio_util::sync::CancellationToken;

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
    RunningNode::start(
        config(dir, bootstrap, roles, transport),
        CancellationToken::new(),
    )
    .await
    .expect("node starts")
}
