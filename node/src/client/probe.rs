//! Checking that peers answer before a client commits a route to them.
//!
//! A descriptor only says what a peer claimed when it signed it: the peer
//! may have left since, or never have been reachable at the addresses it
//! gives (anyone can publish a valid descriptor with a dead address). A
//! probe dials each peer, a bounded number at once, and keeps the ones that
//! connect within the timeout.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;

use crate::network::Network;

/// Dials in flight at once.
pub const PROBE_CONCURRENCY: usize = 16;

/// The peers among `peers` that can be connected to within `timeout` each.
/// Their addresses must be known to `network` (fetching a peer's descriptor
/// makes them so); a peer with none, a refused or silent address, or a
/// different identity behind it is left out. Returns within about
/// `timeout` times `peers.len() / PROBE_CONCURRENCY` rounded up.
pub async fn reachable(network: &Network, peers: &[PeerId], timeout: Duration) -> HashSet<PeerId> {
    let unique: HashSet<PeerId> = peers.iter().copied().collect();
    futures::stream::iter(unique)
        .map(|peer| async move {
            // `connect` bounds its own wait; the outer timeout also covers
            // a network task too busy to answer.
            let r = tokio::time::timeout(timeout, network.connect(peer, timeout)).await;
            match r {
                Ok(Ok(())) => Some(peer),
                Ok(Err(e)) => {
                    tracing::debug!(event = "probe_failed", %peer, error = %e);
                    None
                }
                Err(_) => {
                    tracing::debug!(event = "probe_failed", %peer, error = "timed out");
                    None
                }
            }
        })
        .buffer_unordered(PROBE_CONCURRENCY)
        .filter_map(|p| async move { p })
        .collect()
        .await
}
