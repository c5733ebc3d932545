//! A whole network in this process: a bootstrap and volunteers on loopback
//! (or the memory transport), each with its own data directory. `mixnn demo`
//! and `mixnn bench` run jobs through it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::circuit::server::{HopTap, HopView};
use crate::client::job::{RingRoutes, RouteHop};
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
        Self::start_tapped(volunteers, transport, republish_secs, None).await
    }

    /// As [`LocalNet::start_with`], every volunteer reporting what it sees
    /// on circuits to `tap` (`mixnn demo` shows it).
    pub async fn start_tapped(
        volunteers: usize,
        transport: TransportKind,
        republish_secs: u64,
        tap: Option<Arc<dyn HopTap>>,
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
            nodes.push(RunningNode::start_with_tap(c, cancel.child_token(), tap.clone()).await?);
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

/// What one volunteer saw on the circuits through it.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// One view per circuit set up through it.
    pub circuits: Vec<HopView>,
    /// Cells that arrived from previous hops, and their bytes.
    pub cells: u64,
    pub bytes: u64,
    /// Messages it decrypted (layer hosts only: mixes never can).
    pub plaintexts: u64,
}

/// A [`HopTap`] that keeps what each volunteer saw.
#[derive(Default)]
pub struct HopLog {
    seen: Mutex<HashMap<PeerId, Seen>>,
}

impl HopLog {
    fn with<R>(&self, me: PeerId, f: impl FnOnce(&mut Seen) -> R) -> R {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        f(seen.entry(me).or_default())
    }

    /// Everything seen so far; the log starts again empty.
    pub fn take(&self) -> HashMap<PeerId, Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl HopTap for HopLog {
    fn setup(&self, view: &HopView) {
        self.with(view.me, |s| s.circuits.push(view.clone()));
    }

    fn cell_in(&self, me: PeerId, cell: &[u8]) {
        self.with(me, |s| {
            s.cells += 1;
            s.bytes += cell.len() as u64;
        });
    }

    fn plaintext(&self, me: PeerId, _msg: &[u8]) {
        self.with(me, |s| s.plaintexts += 1);
    }
}

/// `…` and the last six characters of a peer id (they all begin alike).
pub fn short_peer(peer: &PeerId) -> String {
    let s = peer.to_string();
    let tail = s.len().saturating_sub(6);
    format!("…{}", &s[tail..])
}

/// A hop's name in a route: `mix` or `L1`, `L2`, … (layer host of stage 0, 1, …).
pub fn hop_name(stage: Option<usize>) -> String {
    match stage {
        Some(i) => format!("L{}", i + 1),
        None => "mix".into(),
    }
}

/// `client → mix …abc123 → L1 …def456 → … → client`.
pub fn route_line(hops: &[RouteHop]) -> String {
    let mut parts = vec!["client".to_string()];
    parts.extend(
        hops.iter()
            .map(|h| format!("{} {}", hop_name(h.stage), short_peer(&h.peer))),
    );
    parts.push("client".into());
    parts.join(" → ")
}

/// One circuit through a volunteer, as it saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CircuitSeen {
    /// `forward` or `backward` (training rings), or `other` (an earlier
    /// run, an inference ring).
    pub ring: &'static str,
    /// `mix`, or the layer it holds (`L1`, …).
    pub role: String,
    /// The previous and next hop: a short peer id, or `client`.
    pub prev: String,
    pub next: String,
}

/// What one volunteer of a job saw: its circuits, the cells and bytes that
/// reached it, and whether it ever read plaintext.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolunteerSeen {
    pub peer: String,
    pub circuits: Vec<CircuitSeen>,
    pub cells: u64,
    pub bytes: u64,
    pub plaintext: bool,
}

/// Per volunteer that took part, in the order of the forward ring (then
/// the backward ring's own mixes), what it saw: `seen` from a [`HopLog`],
/// `rings` from the job's report, `client` the client's peer id.
pub fn volunteers_seen(
    rings: &RingRoutes,
    client: PeerId,
    seen: &HashMap<PeerId, Seen>,
) -> Vec<VolunteerSeen> {
    let name = |p: &PeerId| {
        if *p == client {
            "client".to_string()
        } else {
            short_peer(p)
        }
    };
    // (me, prev, next) of every hop of a ring.
    let triples = |hops: &[RouteHop]| -> Vec<(PeerId, PeerId, PeerId, Option<usize>)> {
        (0..hops.len())
            .map(|i| {
                let prev = if i == 0 { client } else { hops[i - 1].peer };
                let next = hops.get(i + 1).map_or(client, |h| h.peer);
                (hops[i].peer, prev, next, hops[i].stage)
            })
            .collect()
    };
    let fwd = triples(&rings.forward);
    let bwd = triples(&rings.backward);
    let mut order: Vec<PeerId> = Vec::new();
    for h in rings.forward.iter().chain(&rings.backward) {
        if !order.contains(&h.peer) {
            order.push(h.peer);
        }
    }
    let mut rest: Vec<&PeerId> = seen.keys().filter(|p| !order.contains(p)).collect();
    rest.sort();
    order.extend(rest.into_iter().copied());
    let stage_of = |p: &PeerId| {
        rings
            .forward
            .iter()
            .chain(&rings.backward)
            .find(|h| h.peer == *p)
            .and_then(|h| h.stage)
    };
    order
        .iter()
        .filter_map(|peer| {
            let s = seen.get(peer)?;
            let circuits = s
                .circuits
                .iter()
                .map(|v| {
                    let matches = |t: &(PeerId, PeerId, PeerId, Option<usize>)| {
                        t.0 == v.me && t.1 == v.prev && t.2 == v.next
                    };
                    let ring = if fwd.iter().any(matches) {
                        "forward"
                    } else if bwd.iter().any(matches) {
                        "backward"
                    } else {
                        "other"
                    };
                    let role = if v.role == "host" {
                        stage_of(peer)
                            .map_or_else(|| "layer host".to_string(), |i| hop_name(Some(i)))
                    } else {
                        "mix".to_string()
                    };
                    CircuitSeen {
                        ring,
                        role,
                        prev: name(&v.prev),
                        next: name(&v.next),
                    }
                })
                .collect();
            Some(VolunteerSeen {
                peer: short_peer(peer),
                circuits,
                cells: s.cells,
                bytes: s.bytes,
                plaintext: s.plaintexts > 0,
            })
        })
        .collect()
}
