//! A whole network in this process: a bootstrap and volunteers on loopback
//! (or the memory transport), each with its own data directory. `mixnn demo`
//! and `mixnn bench` run jobs through it.

use std::collections::{BTreeMap, HashMap};
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
    /// Volunteers on threads of their own ([`LocalNet::start_parties`]).
    threads: Vec<PartyThread>,
}

/// The name of the threads of volunteer `i` started by
/// [`LocalNet::start_parties`].
pub fn party_thread_name(i: usize) -> String {
    format!("mixnn-party-{i}")
}

/// A node running on a thread of its own: a current-thread runtime that
/// serves the node's tasks until stopped (its blocking threads carry the
/// same name), so its CPU time can be read per thread name.
struct PartyThread {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PartyThread {
    async fn start(
        name: String,
        c: NodeConfig,
        cancel: CancellationToken,
        tap: Option<Arc<dyn HopTap>>,
    ) -> Result<(RunningNode, PartyThread), NodeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(thread_name)
                    .build();
                let rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(NodeError::Thread(e.to_string())));
                        return;
                    }
                };
                rt.block_on(async move {
                    let node = RunningNode::start_with_tap(c, cancel, tap).await;
                    let failed = node.is_err();
                    let _ = tx.send(node);
                    if !failed {
                        stopped.cancelled().await;
                    }
                });
            })
            .map_err(|e| NodeError::Thread(format!("{name}: {e}")))?;
        let party = PartyThread {
            stop,
            thread: Some(thread),
        };
        match rx.await {
            Ok(Ok(node)) => Ok((node, party)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NodeError::Thread(format!("{name} stopped while starting"))),
        }
    }
}

impl Drop for PartyThread {
    fn drop(&mut self) {
        // The runtime ends its tasks when its thread returns; not joined
        // here, so a drop never blocks an async caller.
        self.stop.cancel();
        drop(self.thread.take());
    }
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
    // A descriptor outlives the gap between two publications (the node's
    // configuration check refuses anything else).
    c.descriptor_ttl_secs = c.descriptor_ttl_secs.max(republish_secs.saturating_mul(2));
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

    /// As [`LocalNet::start`], each volunteer on a thread of its own named
    /// [`party_thread_name`] (see [`LocalNet::party_cpu_ns`]), the
    /// bootstrap on the caller's runtime.
    pub async fn start_parties(
        volunteers: usize,
        transport: TransportKind,
    ) -> Result<Self, NodeError> {
        Self::start_inner(volunteers, transport, 5, None, true).await
    }

    /// CPU nanoseconds each volunteer's threads used, out of `used` (CPU
    /// by thread name, from [`crate::cpu::ThreadClocks::used_since`]; its
    /// slot workers' not included: see the `host_worker_cpu_seconds`
    /// metric); `None` unless started with [`LocalNet::start_parties`].
    pub fn party_cpu_ns(&self, used: &BTreeMap<String, u64>) -> Option<Vec<u64>> {
        if self.threads.len() != self.volunteers.len() {
            return None;
        }
        Some(
            (0..self.volunteers.len())
                .map(|i| used.get(&party_thread_name(i)).copied().unwrap_or(0))
                .collect(),
        )
    }

    /// As [`LocalNet::start_with`], every volunteer reporting what it sees
    /// on circuits to `tap` (`mixnn demo` shows it).
    pub async fn start_tapped(
        volunteers: usize,
        transport: TransportKind,
        republish_secs: u64,
        tap: Option<Arc<dyn HopTap>>,
    ) -> Result<Self, NodeError> {
        Self::start_inner(volunteers, transport, republish_secs, tap, false).await
    }

    async fn start_inner(
        volunteers: usize,
        transport: TransportKind,
        republish_secs: u64,
        tap: Option<Arc<dyn HopTap>>,
        own_threads: bool,
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
        let mut threads = Vec::new();
        for i in 0..volunteers {
            let c = config(
                &dir.path().join(format!("node-{i}")),
                &addrs,
                transport,
                true,
                republish_secs,
            );
            if own_threads {
                let (node, thread) =
                    PartyThread::start(party_thread_name(i), c, cancel.child_token(), tap.clone())
                        .await?;
                nodes.push(node);
                threads.push(thread);
            } else {
                nodes
                    .push(RunningNode::start_with_tap(c, cancel.child_token(), tap.clone()).await?);
            }
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
            threads,
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
        self.stop(true).await;
    }

    /// Stop every node without withdrawing descriptors: for a network
    /// thrown away whole (the discovery simulation), where no one is left
    /// to read a withdrawal and hundreds of them would only time out.
    pub async fn discard(self) {
        self.stop(false).await;
    }

    async fn stop(self, withdraw: bool) {
        if !withdraw {
            // A node whose token is cancelled shuts down without the network.
            self.cancel.cancel();
        }
        for n in self.volunteers {
            let _ = n.shutdown().await;
        }
        let _ = self.bootstrap.shutdown().await;
        self.cancel.cancel();
        for mut t in self.threads {
            t.stop.cancel();
            if let Some(thread) = t.thread.take() {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
        }
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
            // A hop's two circuits may have the same neighbours (the
            // backward ring drew the same mixes around it): each ring's
            // place is given once.
            let (mut fwd_left, mut bwd_left) = (fwd.clone(), bwd.clone());
            let circuits = s
                .circuits
                .iter()
                .map(|v| {
                    let matches = |t: &(PeerId, PeerId, PeerId, Option<usize>)| {
                        t.0 == v.me && t.1 == v.prev && t.2 == v.next
                    };
                    let ring = if let Some(i) = fwd_left.iter().position(matches) {
                        fwd_left.remove(i);
                        "forward"
                    } else if let Some(i) = bwd_left.iter().position(matches) {
                        bwd_left.remove(i);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The backward ring may draw, around a layer host, the mixes the
    /// forward ring has there in the same order: the host's two circuits
    /// then have the same neighbours, and each ring still gets one.
    #[test]
    fn a_hop_whose_rings_share_its_neighbours_shows_both_rings() {
        let [client, m1, host, m2] = [(); 4].map(|_| PeerId::random());
        let hop = |peer, stage| RouteHop { peer, stage };
        // Forward: client -> m1 -> host -> m2 -> client; backward drew the
        // same mixes, so the host sees m1 before it and m2 after it twice.
        let rings = RingRoutes {
            forward: vec![hop(m1, None), hop(host, Some(0)), hop(m2, None)],
            backward: vec![hop(m1, None), hop(host, Some(0)), hop(m2, None)],
        };
        let view = |me, role| HopView {
            me,
            prev: m1,
            next: m2,
            role,
            slot: None,
        };
        let seen = HashMap::from([(
            host,
            Seen {
                circuits: vec![view(host, "host"), view(host, "host")],
                cells: 4,
                bytes: 400,
                plaintexts: 2,
            },
        )]);
        let out = volunteers_seen(&rings, client, &seen);
        assert_eq!(out.len(), 1);
        let rings: Vec<&str> = out[0].circuits.iter().map(|c| c.ring).collect();
        assert_eq!(rings, vec!["forward", "backward"]);
    }
}
