//! Finding volunteers: walk the role keys, fetch and verify descriptors.
//! This is what `mixnn peers` prints and what a client builds routes from.
//! A volunteer is listed only with a valid, unexpired descriptor that no
//! newer withdrawal of its own supersedes; provider records alone count
//! for nothing (they may outlive the peer).

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use mixnn_crypto::Descriptor;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::network::records::Role;
use crate::network::{split_peer_addr, Network, NetworkConfig, NetworkError, TransportKind};

/// Descriptor fetches in flight at once.
const FETCH_CONCURRENCY: usize = 16;
/// Pause between two walks of [`discover_at_least`].
const WALK_PAUSE: Duration = Duration::from_millis(300);
/// [`discover_at_least`] gives up early, short of what it wants, once walks
/// this far apart have found the same volunteers.
pub const SETTLE_AFTER: Duration = Duration::from_secs(2);

/// A volunteer with a verified descriptor.
#[derive(Clone, Debug)]
pub struct Volunteer {
    pub peer_id: PeerId,
    pub descriptor: Descriptor,
}

/// What `mixnn peers --json` prints per volunteer.
#[derive(Clone, Debug, Serialize)]
pub struct VolunteerSummary {
    pub peer_id: String,
    pub roles: Vec<&'static str>,
    pub free_slots: u32,
    pub max_params: u64,
    pub memory_bytes: u64,
    /// The peer offers AES-256-GCM cells (ChaCha20-Poly1305 always).
    pub aes_gcm: bool,
    pub epoch: u64,
    pub expires_at: u64,
    pub addresses: Vec<String>,
}

impl From<&Volunteer> for VolunteerSummary {
    fn from(v: &Volunteer) -> Self {
        let mut roles = Vec::new();
        if v.descriptor.roles.layer_host {
            roles.push("layer-host");
        }
        if v.descriptor.roles.mix {
            roles.push("mix");
        }
        Self {
            peer_id: v.peer_id.to_string(),
            roles,
            free_slots: v.descriptor.free_slots,
            max_params: v.descriptor.capacity.max_params,
            memory_bytes: v.descriptor.capacity.memory_bytes,
            aes_gcm: v.descriptor.capacity.aes_gcm,
            epoch: v.descriptor.epoch,
            expires_at: v.descriptor.expires_at,
            addresses: v.descriptor.addresses.clone(),
        }
    }
}

/// Statistics of one discovery walk.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiscoveryStats {
    pub providers_found: usize,
    pub descriptors_verified: usize,
    /// Providers with no valid descriptor (none found, forged, expired).
    pub descriptors_missing: usize,
    /// Providers whose newest record is their withdrawal.
    pub descriptors_withdrawn: usize,
    /// Walks made ([`discover_at_least`] may make several).
    pub walks: usize,
}

/// Peers that announce a role: all of them, or about `enough` per role.
async fn role_providers(network: &Network, enough: Option<usize>) -> HashSet<PeerId> {
    let mut peers: HashSet<PeerId> = HashSet::new();
    for role in Role::ALL {
        let found = match enough {
            Some(n) => network.find_some_providers(role, n).await,
            None => network.find_providers(role).await,
        };
        match found {
            Ok(found) => peers.extend(found),
            Err(e) => tracing::warn!(event = "providers_lookup_failed", ?role, error = %e),
        }
    }
    peers.remove(&network.peer_id());
    peers
}

/// Fetch and verify the descriptors of `peers`, a few at a time.
async fn fetch_descriptors(
    network: &Network,
    peers: Vec<PeerId>,
    per_fetch: Duration,
    stats: &mut DiscoveryStats,
) -> Vec<Volunteer> {
    let results: Vec<_> = futures::stream::iter(peers)
        .map(|peer| async move {
            (
                peer,
                tokio::time::timeout(per_fetch, network.get_descriptor(peer)).await,
            )
        })
        .buffer_unordered(FETCH_CONCURRENCY)
        .collect()
        .await;
    let mut volunteers = Vec::new();
    for (peer, r) in results {
        match r {
            Ok(Ok(descriptor)) => volunteers.push(Volunteer {
                peer_id: peer,
                descriptor,
            }),
            Ok(Err(NetworkError::Withdrawn(_))) => {
                stats.descriptors_withdrawn += 1;
                tracing::debug!(event = "descriptor_withdrawn", %peer);
            }
            Ok(Err(e)) => {
                stats.descriptors_missing += 1;
                tracing::debug!(event = "descriptor_unavailable", %peer, error = %e);
            }
            Err(_) => {
                stats.descriptors_missing += 1;
                tracing::debug!(event = "descriptor_timeout", %peer);
            }
        }
    }
    volunteers
}

/// Every volunteer the DHT knows under the role keys, with a verified
/// descriptor, sorted by peer id.
pub async fn discover(network: &Network, per_fetch: Duration) -> (Vec<Volunteer>, DiscoveryStats) {
    let peers = role_providers(network, None).await;
    let mut stats = DiscoveryStats {
        providers_found: peers.len(),
        walks: 1,
        ..Default::default()
    };
    let mut volunteers =
        fetch_descriptors(network, peers.into_iter().collect(), per_fetch, &mut stats).await;
    stats.descriptors_verified = volunteers.len();
    volunteers.sort_by_key(|v| v.peer_id.to_bytes());
    (volunteers, stats)
}

/// Enough volunteers for a route, cheaply: providers of both roles (two DHT
/// queries that stop once they know twice `want`), then descriptors of a
/// random sample of them until `want` verify. Costs O(want · log N) DHT
/// requests rather than O(N).
pub async fn discover_sample(
    network: &Network,
    want: usize,
    per_fetch: Duration,
) -> (Vec<Volunteer>, DiscoveryStats) {
    use rand::seq::SliceRandom;
    // Twice what is needed per role leaves room for dead peers and choice.
    let mut pool: Vec<PeerId> = role_providers(network, Some(want * 2))
        .await
        .into_iter()
        .collect();
    let mut stats = DiscoveryStats {
        providers_found: pool.len(),
        walks: 1,
        ..Default::default()
    };
    pool.shuffle(&mut rand::thread_rng());
    let mut volunteers = Vec::new();
    while volunteers.len() < want && !pool.is_empty() {
        let wave: Vec<PeerId> = pool
            .drain(..(want - volunteers.len()).min(pool.len()))
            .collect();
        volunteers.extend(fetch_descriptors(network, wave, per_fetch, &mut stats).await);
    }
    stats.descriptors_verified = volunteers.len();
    volunteers.sort_by_key(|v| v.peer_id.to_bytes());
    (volunteers, stats)
}

/// Join the network as a DHT client with a throwaway identity.
pub async fn join_as_client(
    bootstrap: Vec<Multiaddr>,
    transport: TransportKind,
    listen: Vec<Multiaddr>,
    cancel: CancellationToken,
) -> Result<Network, NetworkError> {
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let bootstrap_list = bootstrap.clone();
    let cfg = NetworkConfig {
        listen,
        bootstrap,
        server: false,
        transport,
        ..NetworkConfig::default()
    };
    let (network, _task) = Network::start(keypair, cfg, Metrics::new(), cancel).await?;
    if !bootstrap_list.is_empty() {
        reach_bootstrap(&network, &bootstrap_list, BOOTSTRAP_TIMEOUT).await?;
    }
    network.wait_for_peers(1, Duration::from_secs(10)).await?;
    Ok(network)
}

/// Longest wait for a bootstrap peer to answer.
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Dial every bootstrap peer at once; fine if one answers, otherwise an
/// error that names each one's cause.
pub async fn reach_bootstrap(
    network: &Network,
    bootstrap: &[Multiaddr],
    timeout: Duration,
) -> Result<(), NetworkError> {
    let peers: Vec<(Multiaddr, PeerId)> = bootstrap
        .iter()
        .filter_map(|a| split_peer_addr(a).map(|(p, _)| (a.clone(), p)))
        .filter(|(_, p)| *p != network.peer_id())
        .collect();
    if peers.is_empty() {
        return Ok(());
    }
    let tries = peers.iter().map(|(_, p)| network.connect(*p, timeout));
    let results = futures::future::join_all(tries).await;
    if results.iter().any(|r| r.is_ok()) {
        return Ok(());
    }
    let causes: Vec<String> = peers
        .iter()
        .zip(results)
        .map(|((addr, _), r)| {
            let reason = r.err().map(|e| e.to_string()).unwrap_or_default();
            format!("{addr}: {}", bootstrap_cause(&reason))
        })
        .collect();
    Err(NetworkError::BootstrapUnreachable(causes.join("; ")))
}

/// What a failed dial to a bootstrap peer means, in words a person can act
/// on. Pure: libp2p's error text in.
pub fn bootstrap_cause(reason: &str) -> String {
    let r = reason.to_ascii_lowercase();
    let cause = if r.contains("connection refused") {
        "connection refused: nothing listens on that port (is the bootstrap running, and is the port right?)"
    } else if r.contains("unexpected peer id") || r.contains("wrongpeerid") {
        "a different peer answers at that address: the /p2p/ peer id is wrong, or the bootstrap's identity changed"
    } else if r.contains("dns") || r.contains("lookup") || r.contains("resolve") {
        "the host name does not resolve (DNS)"
    } else if r.contains("unreachable") || r.contains("no route") {
        "the address is unreachable from here (network or firewall)"
    } else if r.contains("timed out") || r.contains("timeout") {
        "no answer in time (a firewall dropping packets, or the host is down)"
    } else {
        return format!("cannot connect: {reason}");
    };
    cause.to_string()
}

/// Discover until at least `want` volunteers are found, the walks settle
/// short of it (two walks [`SETTLE_AFTER`] apart find the same volunteers),
/// or `deadline` passes; the caller compares the count with `want`.
pub async fn discover_at_least(
    network: &Network,
    want: usize,
    deadline: Duration,
) -> (Vec<Volunteer>, DiscoveryStats) {
    discover_settling(network, want, deadline, SETTLE_AFTER).await
}

/// Volunteers for a client's route, as `mixnn train`, `infer` and the
/// bench find them: [`discover_sample`] walks (O(want · log N) DHT
/// requests, not O(N)) for `want` volunteers and a third more to choose
/// among and to spare for peers that fail their liveness check, repeated
/// as in [`discover_at_least`] until at least `want` verify, the walks
/// settle short of it, or `deadline` passes.
pub async fn discover_for_route(
    network: &Network,
    want: usize,
    deadline: Duration,
) -> (Vec<Volunteer>, DiscoveryStats) {
    let start = tokio::time::Instant::now();
    let with_spares = want + want.div_ceil(3).max(1);
    let mut walks = Walks::new(want, start + deadline, SETTLE_AFTER);
    let mut total = DiscoveryStats::default();
    loop {
        let (found, stats) = discover_sample(network, with_spares, Duration::from_secs(5)).await;
        total.providers_found = stats.providers_found;
        total.descriptors_verified = stats.descriptors_verified;
        total.descriptors_missing += stats.descriptors_missing;
        total.descriptors_withdrawn += stats.descriptors_withdrawn;
        let ids: HashSet<PeerId> = found.iter().map(|v| v.peer_id).collect();
        let verdict = walks.after_walk(ids, tokio::time::Instant::now());
        total.walks = walks.count;
        match verdict {
            WalkVerdict::Again => tokio::time::sleep(WALK_PAUSE).await,
            WalkVerdict::Enough | WalkVerdict::Settled | WalkVerdict::OutOfTime => {
                return (found, total)
            }
        }
    }
}

/// [`discover_at_least`] with the settling time given: how long the set
/// found must stay the same before a short result is final.
pub async fn discover_settling(
    network: &Network,
    want: usize,
    deadline: Duration,
    settle_after: Duration,
) -> (Vec<Volunteer>, DiscoveryStats) {
    let start = tokio::time::Instant::now();
    let mut walks = Walks::new(want, start + deadline, settle_after);
    loop {
        let (found, mut stats) = discover(network, Duration::from_secs(5)).await;
        let ids: HashSet<PeerId> = found.iter().map(|v| v.peer_id).collect();
        let verdict = walks.after_walk(ids, tokio::time::Instant::now());
        stats.walks = walks.count;
        match verdict {
            WalkVerdict::Again => tokio::time::sleep(WALK_PAUSE).await,
            WalkVerdict::Settled => {
                tracing::info!(
                    event = "discovery_settled",
                    want,
                    found = found.len(),
                    walks = walks.count
                );
                return (found, stats);
            }
            WalkVerdict::Enough | WalkVerdict::OutOfTime => return (found, stats),
        }
    }
}

/// What [`Walks::after_walk`] decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkVerdict {
    /// At least as many volunteers as wanted.
    Enough,
    /// Short, and walks far enough apart found the same set: stop now.
    Settled,
    /// Short, and the deadline has passed.
    OutOfTime,
    /// Short: walk again.
    Again,
}

/// The stopping rule of [`discover_at_least`], apart from any I/O: feed it
/// each walk's result and the time the walk ended.
#[derive(Debug)]
pub struct Walks {
    want: usize,
    deadline: tokio::time::Instant,
    settle_after: Duration,
    /// The set the last walk found, and when a walk first found it.
    last: Option<(HashSet<PeerId>, tokio::time::Instant)>,
    /// Walks made so far.
    pub count: usize,
}

impl Walks {
    pub fn new(want: usize, deadline: tokio::time::Instant, settle_after: Duration) -> Self {
        Self {
            want,
            deadline,
            settle_after,
            last: None,
            count: 0,
        }
    }

    pub fn after_walk(&mut self, found: HashSet<PeerId>, now: tokio::time::Instant) -> WalkVerdict {
        self.count += 1;
        if found.len() >= self.want {
            return WalkVerdict::Enough;
        }
        let settled = match &self.last {
            Some((set, since)) if *set == found => {
                now.saturating_duration_since(*since) >= self.settle_after
            }
            _ => {
                self.last = Some((found, now));
                false
            }
        };
        if settled {
            WalkVerdict::Settled
        } else if now >= self.deadline {
            WalkVerdict::OutOfTime
        } else {
            WalkVerdict::Again
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bootstrap_failures_are_named_by_their_cause() {
        use super::bootstrap_cause;
        assert!(bootstrap_cause(
            "Failed to negotiate transport protocol(s): [(/ip4/127.0.0.1/tcp/1: : Connection refused (os error 111))]"
        )
        .starts_with("connection refused"));
        assert!(
            bootstrap_cause("Dial error: Unexpected peer ID 12D3Koo at Dialer")
                .contains("peer id is wrong")
        );
        assert!(
            bootstrap_cause("failed to lookup address information: Name or service not known")
                .contains("DNS")
        );
        assert!(bootstrap_cause("Network is unreachable (os error 101)").contains("unreachable"));
        assert!(
            bootstrap_cause("timed out after 10s waiting for a connection").contains("in time")
        );
        assert_eq!(bootstrap_cause("odd"), "cannot connect: odd");
    }

    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn set(p: &[PeerId]) -> HashSet<PeerId> {
        p.iter().copied().collect()
    }

    #[test]
    fn enough_volunteers_end_the_walks_at_once() {
        let p = peers(3);
        let t0 = tokio::time::Instant::now();
        let mut w = Walks::new(3, t0 + Duration::from_secs(30), SETTLE_AFTER);
        assert_eq!(w.after_walk(set(&p), t0), WalkVerdict::Enough);
        let mut w = Walks::new(0, t0, SETTLE_AFTER);
        assert_eq!(w.after_walk(HashSet::new(), t0), WalkVerdict::Enough);
    }

    #[test]
    fn a_short_set_that_stays_the_same_settles_long_before_the_deadline() {
        let p = peers(3);
        let t0 = tokio::time::Instant::now();
        let s = Duration::from_millis;
        let mut w = Walks::new(5, t0 + Duration::from_secs(30), SETTLE_AFTER);
        assert_eq!(w.after_walk(set(&p[..2]), t0), WalkVerdict::Again);
        // The same set soon after is not yet settled.
        assert_eq!(w.after_walk(set(&p[..2]), t0 + s(500)), WalkVerdict::Again);
        // A change starts the clock again.
        assert_eq!(w.after_walk(set(&p), t0 + s(1_000)), WalkVerdict::Again);
        assert_eq!(w.after_walk(set(&p), t0 + s(2_900)), WalkVerdict::Again);
        assert_eq!(w.after_walk(set(&p), t0 + s(3_000)), WalkVerdict::Settled);
        assert_eq!(w.count, 5);
    }

    #[test]
    fn a_set_that_keeps_changing_runs_to_the_deadline() {
        let p = peers(12);
        let t0 = tokio::time::Instant::now();
        let deadline = t0 + Duration::from_secs(10);
        let mut w = Walks::new(20, deadline, SETTLE_AFTER);
        for (i, at) in (0..10u64).map(|i| (i as usize, Duration::from_millis(i * 1_100))) {
            let verdict = w.after_walk(set(&p[..i + 1]), t0 + at);
            assert_eq!(verdict, WalkVerdict::Again, "walk {i}");
        }
        assert_eq!(
            w.after_walk(set(&p[..11]), deadline),
            WalkVerdict::OutOfTime
        );
    }
}
