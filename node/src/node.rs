//! A running volunteer node: data directory, network, onion key rotation,
//! descriptor publication, metrics. `mixnn node` and `mixnn-bootstrap` both
//! run this; the bootstrap simply offers no roles.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use mixnn_crypto::{next_seq, Capacity, Descriptor, OnionKeyPair, Roles, Withdrawal};
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::circuit::admission::{self, SlotRules};
use crate::circuit::budget::MemoryBudget;
use crate::circuit::host::{Host, HostPolicy};
use crate::circuit::server::{CircuitServer, HopTap, Timeouts};
use crate::config::{ConfigError, NodeConfig};
use crate::metrics::{self, Metrics};
use crate::network::records::{unix_now, unix_now_millis, Role};
use crate::network::{Network, NetworkError};
use crate::store::{DataDir, SledStore, SlotStore, StoreError};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("could not serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("identity key could not be used by libp2p: {0}")]
    Identity(String),
    #[error(
        "the database did not flush to disk within {0:?} (is the disk full or failing?); \
         slots changed since their last checkpoint may be lost"
    )]
    FlushTimeout(Duration),
    #[error("cannot run the node on a thread of its own: {0}")]
    Thread(String),
}

/// Longest wait for the database to reach the disk at shutdown.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Run a blocking `f` on a thread of its own and wait at most `timeout`
/// for it: a disk that never answers cannot hang the caller. `None` on
/// timeout (the thread is left to finish or hang on its own).
pub async fn bounded_blocking<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("mixnn-flush".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if spawned.is_err() {
        return None;
    }
    tokio::time::timeout(timeout, rx).await.ok()?.ok()
}

/// The current and previous epoch's onion keys.
pub struct OnionKeys {
    pub current: OnionKeyPair,
    pub previous: Option<OnionKeyPair>,
}

impl OnionKeys {
    /// The key for `epoch`, if we still hold it.
    pub fn for_epoch(&self, epoch: u64) -> Option<&OnionKeyPair> {
        if self.current.epoch() == epoch {
            Some(&self.current)
        } else {
            self.previous.as_ref().filter(|k| k.epoch() == epoch)
        }
    }
}

/// Shared state of a running node that circuit code needs.
pub struct NodeState {
    pub config: NodeConfig,
    pub data: DataDir,
    pub slots: SledStore,
    pub onion: RwLock<OnionKeys>,
    pub metrics: Metrics,
    /// Wakes the publisher when something in the descriptor changed.
    pub republish: tokio::sync::Notify,
    /// Whether the descriptor and role records have been published once.
    pub published: std::sync::atomic::AtomicBool,
    /// The sequence number of the last record signed (descriptor or
    /// withdrawal); the next one is always higher.
    seq: std::sync::atomic::AtomicU64,
}

/// How long a clean shutdown waits for its withdrawal to reach the DHT.
pub const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(3);

impl NodeState {
    pub fn roles(&self) -> Roles {
        Roles {
            layer_host: self.config.layers,
            mix: self.config.mix,
        }
    }

    /// Slots offered now: free ones, and those a new claim may take over
    /// (unused past `slot_idle_secs`, or claims whose job never started).
    pub fn free_slots(&self) -> u32 {
        if !self.config.layers {
            return 0;
        }
        let metas = self.slots.list_slots().unwrap_or_default();
        let rules = SlotRules {
            idle_secs: self.config.slot_idle_secs,
        };
        admission::free_slots(&metas, self.config.slots, unix_now(), rules)
    }

    /// A sequence number for the next signed record at `now_millis`.
    fn take_seq(&self, now_millis: u64) -> u64 {
        use std::sync::atomic::Ordering;
        let mut last = self.seq.load(Ordering::Relaxed);
        loop {
            let next = next_seq(last, now_millis);
            match self
                .seq
                .compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    fn epoch_now(&self) -> u64 {
        unix_now() / self.config.epoch_secs
    }

    /// Make sure the current epoch has a key; keep the previous one.
    fn rotate_onion_keys(&self) -> Result<bool, StoreError> {
        let epoch = self.epoch_now();
        let mut keys = self.onion.write().unwrap_or_else(|p| p.into_inner());
        if keys.current.epoch() == epoch {
            return Ok(false);
        }
        let fresh = OnionKeyPair::generate(epoch, (epoch + 2) * self.config.epoch_secs);
        self.data.save_onion_key(&fresh)?;
        let old = std::mem::replace(&mut keys.current, fresh);
        if let Some(stale) = keys.previous.replace(old) {
            self.data.remove_onion_key(stale.epoch())?;
        }
        // Tags of setups under keys that are gone can never match again.
        let keep_from = keys.previous.as_ref().map_or(epoch, |k| k.epoch());
        let pruned = crate::store::prune_replay(&self.data.replay_tree()?, keep_from)?;
        tracing::info!(
            event = "onion_key_rotated",
            epoch,
            replay_tags_pruned = pruned
        );
        Ok(true)
    }
}

/// A node started in this process.
pub struct RunningNode {
    pub network: Network,
    pub state: Arc<NodeState>,
    cancel: CancellationToken,
    /// Stops everything but the network, which shutdown still needs.
    work: CancellationToken,
    net_task: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    /// The descriptor publisher, stopped first at shutdown so that nothing
    /// is published after the withdrawal.
    publisher: Option<(CancellationToken, JoinHandle<()>)>,
    listen_addrs: Vec<Multiaddr>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl RunningNode {
    pub async fn start(config: NodeConfig, cancel: CancellationToken) -> Result<Self, NodeError> {
        Self::start_with_tap(config, cancel, None).await
    }

    /// Start with an observer of what the node sees on circuits (tests).
    pub async fn start_with_tap(
        config: NodeConfig,
        cancel: CancellationToken,
        tap: Option<Arc<dyn HopTap>>,
    ) -> Result<Self, NodeError> {
        config.validate()?;
        let data = DataDir::open(&config.data_dir)?;
        let slots = data.slots()?;
        let keypair =
            libp2p::identity::Keypair::ed25519_from_bytes(data.identity().secret_bytes().to_vec())
                .map_err(|e| NodeError::Identity(e.to_string()))?;
        let metrics = Metrics::new();
        metrics.slots_held.set(slots.list_slots()?.len() as i64);

        // Onion keys: reuse what is on disk for this and the last epoch.
        let epoch = unix_now() / config.epoch_secs;
        let mut stored = data.load_onion_keys()?;
        stored.sort_by_key(|k| k.epoch());
        let mut current = None;
        let mut previous = None;
        for k in stored {
            if k.epoch() == epoch {
                current = Some(k);
            } else if k.epoch() + 1 == epoch {
                previous = Some(k);
            } else {
                data.remove_onion_key(k.epoch())?;
            }
        }
        let current = match current {
            Some(k) => k,
            None => {
                let k = OnionKeyPair::generate(epoch, (epoch + 2) * config.epoch_secs);
                data.save_onion_key(&k)?;
                k
            }
        };

        let mut tasks = Vec::new();
        let work = cancel.child_token();
        let (network, net_task) = Network::start(
            keypair,
            config.network(),
            metrics.clone(),
            cancel.child_token(),
        )
        .await?;
        let listen_addrs = network.listen_addrs().await?;

        let state = Arc::new(NodeState {
            config,
            data,
            slots,
            onion: RwLock::new(OnionKeys { current, previous }),
            metrics,
            republish: tokio::sync::Notify::new(),
            published: std::sync::atomic::AtomicBool::new(false),
            seq: std::sync::atomic::AtomicU64::new(0),
        });
        let metrics_addr = match state.config.metrics {
            Some(addr) => {
                let pages = Arc::new(NodePages {
                    state: state.clone(),
                    peer: network.peer_id(),
                    started: std::time::Instant::now(),
                });
                Some(
                    metrics::serve(addr, state.metrics.clone(), Some(pages), work.child_token())
                        .await
                        .map_err(|source| NodeError::Metrics { addr, source })?,
                )
            }
            None => None,
        };
        let mut publisher_task = None;

        let roles = state.roles();
        if roles.layer_host || roles.mix {
            let budget = MemoryBudget::new(state.config.max_memory_bytes, state.metrics.clone());
            let host = roles.layer_host.then(|| {
                Arc::new(Host::new(
                    Arc::new(state.slots.clone()),
                    HostPolicy {
                        slots: state.config.slots,
                        max_params: state.config.max_params,
                        max_lease_secs: state.config.max_lease_secs,
                        idle_secs: state.config.slot_idle_secs,
                    },
                    budget.clone(),
                    state.metrics.clone(),
                ))
            });
            if let Some(host) = &host {
                tasks.push(tokio::spawn(lease_sweeper(
                    state.clone(),
                    host.clone(),
                    work.child_token(),
                )));
            }
            let server = CircuitServer::new(
                state.clone(),
                host,
                &network,
                budget,
                Timeouts {
                    idle: Duration::from_secs(state.config.circuit_idle_secs),
                    first_cell: Duration::from_secs(state.config.first_cell_secs),
                    ..Timeouts::default()
                },
                tap,
            )?;
            tasks.push(tokio::spawn(server.run(work.child_token())));
            let stop = work.child_token();
            let handle = tokio::spawn(publisher(state.clone(), network.clone(), stop.clone()));
            publisher_task = Some((stop, handle));
        }

        if !state.config.bootstrap.is_empty() {
            tasks.push(tokio::spawn(alone_watch(
                network.clone(),
                state.config.bootstrap.clone(),
                work.child_token(),
            )));
        }
        tracing::info!(
            event = "node_started",
            peer = %network.peer_id(),
            roles = %roles,
            free_slots = state.free_slots(),
            copies = %crate::memcopy::describe(),
            heap = %crate::heap::describe(),
        );
        Ok(Self {
            network,
            state,
            cancel,
            work,
            net_task,
            tasks,
            publisher: publisher_task,
            listen_addrs,
            metrics_addr,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.network.peer_id()
    }

    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Listen addresses with `/p2p/<peer id>` appended, loopback first.
    pub fn full_addrs(&self) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> = self
            .listen_addrs
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(self.peer_id())))
            .collect();
        addrs.sort_by_key(|a| {
            !a.iter()
                .any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_loopback()))
        });
        addrs
    }

    /// Wait (at most `timeout`) until the descriptor and role records have
    /// been published once; whether they have.
    pub async fn wait_published(&self, timeout: Duration) -> bool {
        let published = || {
            self.state
                .published
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let deadline = tokio::time::Instant::now() + timeout;
        while !published() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        published()
    }

    /// Stop serving and publishing, withdraw the descriptor (waiting at
    /// most [`WITHDRAW_TIMEOUT`]), stop the network and flush the database.
    /// The withdrawal needs the network: a caller that cancelled the token
    /// given to [`RunningNode::start`] first gets a shutdown without one.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        self.work.cancel();
        let published = self.publisher.is_some();
        if let Some((stop, handle)) = self.publisher.take() {
            stop.cancel();
            handle.abort();
            let _ = handle.await;
        }
        // The withdrawal needs the network, which a cancelled token has
        // stopped already: nothing to try then.
        if published && !self.cancel.is_cancelled() {
            let withdrawn =
                tokio::time::timeout(WITHDRAW_TIMEOUT, withdraw(&self.state, &self.network)).await;
            match withdrawn {
                Ok(Ok(())) => {
                    tracing::info!(event = "descriptor_withdrawn", peer = %self.network.peer_id())
                }
                Ok(Err(e)) => {
                    tracing::warn!(event = "descriptor_withdraw_failed", error = %e)
                }
                Err(_) => tracing::warn!(
                    event = "descriptor_withdraw_failed",
                    error = "timed out",
                    timeout = ?WITHDRAW_TIMEOUT
                ),
            }
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.net_task).await;
        let flush = self.state.data.flusher();
        match bounded_blocking(FLUSH_TIMEOUT, flush).await {
            Some(r) => r?,
            None => {
                tracing::error!(event = "flush_timeout", timeout = ?FLUSH_TIMEOUT);
                return Err(NodeError::FlushTimeout(FLUSH_TIMEOUT));
            }
        }
        tracing::info!(event = "node_stopped", peer = %self.network.peer_id());
        Ok(())
    }
}

/// `/health` and `/slots` on the metrics port: what a volunteer wants to
/// know about its node, and nothing about the models beyond each slot.
struct NodePages {
    state: Arc<NodeState>,
    peer: PeerId,
    started: std::time::Instant,
}

impl NodePages {
    fn health(&self) -> serde_json::Value {
        let s = &self.state;
        let used = s.slots.list_slots().map(|l| l.len()).unwrap_or(0);
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "peer_id": self.peer.to_string(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "roles": { "layer_host": s.config.layers, "mix": s.config.mix },
            "published": s.published.load(std::sync::atomic::Ordering::Relaxed),
            "slots": {
                "used": used,
                "free": s.free_slots(),
                "offered": if s.config.layers { s.config.slots } else { 0 },
            },
            "circuits_open": s.metrics.circuits_active.get(),
            "bytes_relayed": s.metrics.bytes_relayed.get(),
            "peers_connected": s.metrics.peers_connected.get(),
        })
    }

    fn slots(&self) -> serde_json::Value {
        let now = unix_now();
        let slots = self.state.slots.list_slots().unwrap_or_default();
        let list: Vec<_> = slots
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": hex::encode(m.id),
                    "parameters": m.param_count,
                    "version": m.version,
                    "bytes": m.state_len,
                    "created": m.lease.created,
                    "last_used": m.lease.last_used,
                    "lease_until": m.lease.until,
                    "lease_secs_left": m.lease.until.saturating_sub(now),
                    "setup_completed": m.lease.confirmed,
                    "owner": owner_fingerprint(&m.owner),
                })
            })
            .collect();
        serde_json::json!({ "slots": list })
    }
}

/// A short, stable name for an owner key: tells a volunteer which slots
/// share an owner, and nothing else.
pub fn owner_fingerprint(owner: &[u8; 32]) -> String {
    let h = blake3::derive_key("mixnn owner fingerprint v1", owner);
    hex::encode(&h[..8])
}

impl metrics::Pages for NodePages {
    fn page(&self, path: &str) -> Option<String> {
        match path {
            "/health" => Some(self.health().to_string()),
            "/slots" => Some(self.slots().to_string()),
            _ => None,
        }
    }
}

/// How often a node with no peer at all says so.
pub const ALONE_WARN_EVERY: Duration = Duration::from_secs(60);

/// Warns while the node has no peer at all: every minute it tries its
/// bootstrap peers again and logs why they do not answer.
async fn alone_watch(network: Network, bootstrap: Vec<Multiaddr>, cancel: CancellationToken) {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = ALONE_WARN_EVERY;
        let alone = network.connected_peers().await.is_ok_and(|p| p.is_empty());
        if !alone {
            continue;
        }
        let cause = match crate::discovery::reach_bootstrap(
            &network,
            &bootstrap,
            crate::discovery::BOOTSTRAP_TIMEOUT,
        )
        .await
        {
            Ok(()) => continue,
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            event = "alone",
            %cause,
            "this node is alone: no peer is connected and {cause}; it keeps trying every {}s",
            ALONE_WARN_EVERY.as_secs()
        );
    }
}

/// Frees slots whose lease ended: at the earliest end of a lease, when a
/// slot's use changes, and at least every 30 seconds.
async fn lease_sweeper(state: Arc<NodeState>, host: Arc<Host>, cancel: CancellationToken) {
    const MAX_WAIT: Duration = Duration::from_secs(30);
    let mut last_held = None;
    loop {
        let now = unix_now();
        let wait = match host.sweep(now) {
            Ok(sweep) => {
                // Slots freed here or released by their owners, or created,
                // or slots that a new claim may now take over: count them
                // and advertise the change.
                if let Ok(held) = state.slots.list_slots().map(|l| l.len()) {
                    if last_held.is_some_and(|h| h != held) || sweep.offer_changed {
                        state.republish.notify_one();
                    }
                    last_held = Some(held);
                    state.metrics.slots_held.set(held as i64);
                }
                sweep
                    .next
                    .map_or(MAX_WAIT, |t| {
                        Duration::from_secs(t.saturating_sub(now).max(1))
                    })
                    .min(MAX_WAIT)
            }
            Err(e) => {
                tracing::warn!(event = "lease_sweep_failed", error = %e);
                MAX_WAIT
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = host.changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Keeps the descriptor and the role provider records in the DHT: at start
/// (retrying quickly until the first publication lands), at every epoch
/// change, when slots change, and every `republish_secs`.
async fn publisher(state: Arc<NodeState>, network: Network, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    let mut published_once = false;
    loop {
        if let Err(e) = state.rotate_onion_keys() {
            tracing::warn!(event = "onion_rotation_failed", error = %e);
        }
        let addresses = match network.listen_addrs().await {
            Ok(a) => advertised(&a),
            Err(_) => break,
        };
        let ok = publish_once(&state, &network, &addresses).await;
        let wait = if ok {
            if !published_once {
                tracing::info!(event = "descriptor_published", peer = %network.peer_id());
            }
            published_once = true;
            state
                .published
                .store(true, std::sync::atomic::Ordering::Relaxed);
            backoff = Duration::from_millis(200);
            state.config.republish_interval()
        } else {
            backoff = (backoff * 2).min(state.config.republish_interval());
            backoff
        };
        // Wake at the next epoch boundary at the latest.
        let now = unix_now();
        let next_epoch = ((now / state.config.epoch_secs) + 1) * state.config.epoch_secs;
        let wait = wait.min(Duration::from_secs(next_epoch.saturating_sub(now).max(1)));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            _ = state.republish.notified() => {}
        }
    }
}

/// The addresses worth publishing: never a wildcard, and loopback only when
/// the node has nothing else (a peer elsewhere cannot dial our loopback).
pub fn advertised(listen: &[Multiaddr]) -> Vec<String> {
    let ip = |a: &Multiaddr| {
        a.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        })
    };
    let usable: Vec<&Multiaddr> = listen
        .iter()
        .filter(|a| !ip(a).is_some_and(|ip| ip.is_unspecified()))
        .collect();
    let has_external = usable
        .iter()
        .any(|a| ip(a).is_none_or(|ip| !ip.is_loopback()));
    usable
        .into_iter()
        .filter(|a| !has_external || ip(a).is_none_or(|ip| !ip.is_loopback()))
        .take(mixnn_crypto::descriptor::MAX_ADDRESSES)
        .map(|a| a.to_string())
        .collect()
}

/// Sign our withdrawal and put it over our descriptor; stop providing roles.
async fn withdraw(state: &NodeState, network: &Network) -> Result<(), NetworkError> {
    let identity = state.data.identity();
    let seq = state.take_seq(unix_now_millis());
    // No descriptor we signed outlives this, so neither need the withdrawal.
    let expires_at = unix_now() + state.config.descriptor_ttl_secs;
    let signed = Withdrawal::new(identity, seq, expires_at)
        .sign(identity)
        .map_err(|e| NetworkError::Query(format!("signing the withdrawal: {e}")))?;
    network.withdraw(signed).await
}

/// When a descriptor signed at `now` expires: after the configured TTL, and
/// never after the onion key it carries (`key_not_after`).
pub fn descriptor_expiry(now: u64, ttl_secs: u64, key_not_after: u64) -> u64 {
    now.saturating_add(ttl_secs).min(key_not_after)
}

async fn publish_once(state: &NodeState, network: &Network, addresses: &[String]) -> bool {
    let identity = state.data.identity();
    let (onion_key, epoch, key_not_after) = {
        let keys = state.onion.read().unwrap_or_else(|p| p.into_inner());
        (
            keys.current.public(),
            keys.current.epoch(),
            keys.current.not_after(),
        )
    };
    let now_millis = unix_now_millis();
    let now = now_millis / 1000;
    let descriptor = Descriptor {
        peer_id: identity.peer_id_bytes(),
        identity_key: identity.public_key(),
        seq: state.take_seq(now_millis),
        onion_key,
        epoch,
        expires_at: descriptor_expiry(now, state.config.descriptor_ttl_secs, key_not_after),
        roles: state.roles(),
        free_slots: state.free_slots(),
        capacity: Capacity {
            max_params: state.config.max_params,
            memory_bytes: state.config.max_memory_bytes,
            aes_gcm: state.config.aes_cells,
        },
        addresses: addresses.to_vec(),
    };
    let signed = match descriptor.sign(identity) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(event = "descriptor_sign_failed", error = %e);
            return false;
        }
    };
    let mut ok = true;
    if let Err(e) = network.put_descriptor(signed).await {
        tracing::debug!(event = "descriptor_publish_failed", error = %e);
        ok = false;
    }
    let roles = state.roles();
    for (role, wanted) in [(Role::LayerHost, roles.layer_host), (Role::Mix, roles.mix)] {
        if wanted {
            if let Err(e) = network.provide(role).await {
                tracing::debug!(event = "provide_failed", ?role, error = %e);
                ok = false;
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_blocking_call_that_never_returns_is_given_up_on_time() {
        let (release, wait) = std::sync::mpsc::sync_channel::<()>(1);
        let started = std::time::Instant::now();
        let out = super::bounded_blocking(super::Duration::from_millis(200), move || {
            let _ = wait.recv();
            7
        })
        .await;
        assert_eq!(out, None);
        assert!(started.elapsed() < super::Duration::from_secs(5));
        let _ = release.send(());
        let out = super::bounded_blocking(super::Duration::from_secs(5), || 7).await;
        assert_eq!(out, Some(7));
    }

    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().expect("addr")).collect()
    }

    #[test]
    fn descriptors_expire_after_the_ttl_or_with_their_onion_key() {
        assert_eq!(descriptor_expiry(1_000, 600, 10_000), 1_600);
        assert_eq!(descriptor_expiry(1_000, 600, 1_200), 1_200);
        assert_eq!(descriptor_expiry(u64::MAX - 1, 600, u64::MAX), u64::MAX);
    }

    #[test]
    fn loopback_is_advertised_only_when_nothing_else_is() {
        let a = addrs(&[
            "/ip4/127.0.0.1/tcp/4002",
            "/ip4/172.18.0.3/tcp/4002",
            "/ip4/0.0.0.0/tcp/4002",
        ]);
        assert_eq!(advertised(&a), vec!["/ip4/172.18.0.3/tcp/4002".to_string()]);
        let a = addrs(&["/ip4/127.0.0.1/tcp/4002", "/ip4/0.0.0.0/tcp/4002"]);
        assert_eq!(advertised(&a), vec!["/ip4/127.0.0.1/tcp/4002".to_string()]);
        let a = addrs(&["/memory/1234"]);
        assert_eq!(advertised(&a), vec!["/memory/1234".to_string()]);
    }
}
