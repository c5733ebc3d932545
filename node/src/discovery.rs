//! Finding volunteers: walk the role keys, fetch and verify descriptors.
//! This is what `mixnn peers` prints and what a client builds routes from.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use mixnn_crypto::Descriptor;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::network::records::Role;
use crate::network::{Network, NetworkConfig, NetworkError, TransportKind};

/// Descriptor fetches in flight at once.
const FETCH_CONCURRENCY: usize = 16;

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
    pub descriptors_missing: usize,
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
    let cfg = NetworkConfig {
        listen,
        bootstrap,
        server: false,
        transport,
        ..NetworkConfig::default()
    };
    let (network, _task) = Network::start(keypair, cfg, Metrics::new(), cancel).await?;
    network.wait_for_peers(1, Duration::from_secs(10)).await?;
    Ok(network)
}

/// Discover until at least `want` volunteers are found or `deadline` passes.
pub async fn discover_at_least(
    network: &Network,
    want: usize,
    deadline: Duration,
) -> (Vec<Volunteer>, DiscoveryStats) {
    let start = tokio::time::Instant::now();
    loop {
        let (found, stats) = discover(network, Duration::from_secs(5)).await;
        if found.len() >= want || start.elapsed() >= deadline {
            return (found, stats);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
