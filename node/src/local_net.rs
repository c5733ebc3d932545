//! A whole network in this process: a bootstrap and volunteers on loopback
//! (or the memory transport), each with its own data directory. `mixnn demo`
//! and `mixnn bench` run jobs through it.

use std::path::Path;

use libp2p::Multiaddr;
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use crate::client::ring::RingError;
use crate::client::Client;
use crate::config::NodeConfig;
use crate::discovery::{discover_at_least, join_as_client, Volunteer};
use crate::network::NetworkError;
use crate::network::TransportKind;
use crate::node::{NodeError, RunningNode};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Client(#[from] RingError),
    #[error("the client found only {found} of {want} volunteers")]
    TooFew { found: usize, want: usize },
}

pub struct LocalNet {
    pub bootstrap: RunningNode,
    pub volunteers: Vec<RunningNode>,
    _dir: tempfile::TempDir,
    cancel: CancellationToken,
}

fn config(
    dir: &Path,
    bootstrap: &[Multiaddr],
    transport: TransportKind,
    volunteer: bool,
    republish_secs: u64,
) -> NodeConfig {
    let mut c = NodeConfig::new(dir.to_path_buf());
    c.listen = vec![match transport {
        TransportKind::Memory => "/memory/0".parse().expect("static multiaddr"),
        TransportKind::Tcp => "/ip4/127.0.0.1/tcp/0".parse().expect("static multiaddr"),
    }];
    c.transport = transport;
    c.bootstrap = bootstrap.to_vec();
    c.layers = volunteer;
    c.mix = volunteer;
    c.slots = if volunteer { 4 } else { 0 };
    c.republish_secs = republish_secs;
    c
}

impl LocalNet {
    /// Start a bootstrap and `volunteers` nodes that are layer hosts and mixes.
    pub async fn start(volunteers: usize, transport: TransportKind) -> Result<Self, NodeError> {
        Self::start_with(volunteers, transport, 5).await
    }

    /// As [`LocalNet::start`], publishing descriptors every `republish_secs`
    /// (large networks in one process want a slow pace).
    pub async fn start_with(
        volunteers: usize,
        transport: TransportKind,
        republish_secs: u64,
    ) -> Result<Self, NodeError> {
        let dir = tempfile::Builder::new()
            .prefix("mixnn-local-net-")
            .tempdir()
            .map_err(|source| {
                NodeError::Store(crate::store::StoreError::DataDir {
                    path: std::env::temp_dir(),
                    source,
                })
            })?;
        let cancel = CancellationToken::new();
        let bootstrap = RunningNode::start(
            config(
                &dir.path().join("bootstrap"),
                &[],
                transport,
                false,
                republish_secs,
            ),
            cancel.child_token(),
        )
        .await?;
        let addrs = bootstrap.full_addrs();
        let mut nodes = Vec::with_capacity(volunteers);
        for i in 0..volunteers {
            let c = config(
                &dir.path().join(format!("node-{i}")),
                &addrs,
                transport,
                true,
                republish_secs,
            );
            nodes.push(RunningNode::start(c, cancel.child_token()).await?);
        }
        // Discovery gives up once its walks settle: let every volunteer
        // publish first.
        for n in &nodes {
            n.wait_published(Duration::from_secs(30)).await;
        }
        Ok(Self {
            bootstrap,
            volunteers: nodes,
            _dir: dir,
            cancel,
        })
    }

    pub fn bootstrap_addrs(&self) -> Vec<Multiaddr> {
        self.bootstrap.full_addrs()
    }

    /// Join as a client and discover every volunteer (within 30 s). The
    /// client's network stops with `cancel`.
    pub async fn join(
        &self,
        transport: TransportKind,
        cancel: CancellationToken,
    ) -> Result<(Client, Vec<Volunteer>), JoinError> {
        let want = self.volunteers.len();
        let network = join_as_client(self.bootstrap_addrs(), transport, vec![], cancel).await?;
        let (found, _) = discover_at_least(&network, want, Duration::from_secs(30)).await;
        if found.len() < want {
            return Err(JoinError::TooFew {
                found: found.len(),
                want,
            });
        }
        Ok((Client::new(network)?, found))
    }

    /// Stop every node cleanly (each withdraws its descriptor), then the rest.
    pub async fn shutdown(self) {
        for n in self.volunteers {
            let _ = n.shutdown().await;
        }
        let _ = self.bootstrap.shutdown().await;
        self.cancel.cancel();
    }
}
