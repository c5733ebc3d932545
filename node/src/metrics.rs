//! The node's counters and gauges, exported in Prometheus text format.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Security {
    pub security: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Suite {
    pub suite: String,
}

/// All metrics of one node. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub peers_connected: Gauge,
    pub records_stored: Counter,
    pub records_refused: Family<Reason, Counter>,
    pub slots_held: Gauge,
    pub bytes_relayed: Counter,
    pub cells_relayed: Counter,
    pub circuits_active: Gauge,
    pub circuits_refused: Family<Reason, Counter>,
    pub streams_refused: Counter,
    /// Seconds layer hosts spent computing, sealing/opening cells, and
    /// encoding/decoding messages.
    pub host_compute_seconds: Counter<f64, AtomicU64>,
    pub host_crypto_seconds: Counter<f64, AtomicU64>,
    pub host_codec_seconds: Counter<f64, AtomicU64>,
    /// CPU seconds the slot workers' threads used on training steps and
    /// inference (Linux only; zero elsewhere).
    pub host_worker_cpu_seconds: Counter<f64, AtomicU64>,
    /// Kademlia requests sent by this node's own queries.
    pub dht_requests: Counter,
    /// Slots freed, by reason (expired, released, setup).
    pub slots_freed: Family<Reason, Counter>,
    /// Assignments refused because they name another owner's slot (a
    /// release, status or job that was not the owner's).
    pub slot_owner_refused: Counter,
    /// Slots whose stored bytes did not match their digest.
    pub slots_corrupt: Counter,
    /// The memory budget (`--max-memory`), what is reserved in it now and
    /// at most so far, and reservations refused for want of room.
    pub memory_budget_bytes: Gauge,
    pub memory_reserved_bytes: Gauge,
    pub memory_reserved_peak_bytes: Gauge,
    pub memory_refused: Counter,
    /// Circuits that have not carried a cell yet.
    pub circuit_setups: Gauge,
    /// Overdue setups ended to make room for a new circuit.
    pub circuits_preempted: Counter,
    /// Connections secured, by what secures them: a TLS 1.3 cipher suite
    /// or Noise.
    pub links_secured: Family<Security, Counter>,
    /// A layer host's cell streams (each circuit's incoming and outgoing
    /// segment), by the cipher suite the client chose for them.
    pub segments: Family<Suite, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mixnn");
        let peers_connected = Gauge::default();
        let records_stored = Counter::default();
        let records_refused = Family::<Reason, Counter>::default();
        let slots_held = Gauge::default();
        let bytes_relayed = Counter::default();
        let cells_relayed = Counter::default();
        let circuits_active = Gauge::default();
        let circuits_refused = Family::<Reason, Counter>::default();
        let streams_refused = Counter::default();
        let host_compute_seconds = Counter::<f64, AtomicU64>::default();
        let host_crypto_seconds = Counter::<f64, AtomicU64>::default();
        let host_codec_seconds = Counter::<f64, AtomicU64>::default();
        let host_worker_cpu_seconds = Counter::<f64, AtomicU64>::default();
        let dht_requests = Counter::default();
        let slots_freed = Family::<Reason, Counter>::default();
        let slot_owner_refused = Counter::default();
        let slots_corrupt = Counter::default();
        let memory_budget_bytes = Gauge::default();
        let memory_reserved_bytes = Gauge::default();
        let memory_reserved_peak_bytes = Gauge::default();
        let memory_refused = Counter::default();
        let circuit_setups = Gauge::default();
        let circuits_preempted = Counter::default();
        let links_secured = Family::<Security, Counter>::default();
        let segments = Family::<Suite, Counter>::default();
        registry.register(
            "segments",
            "A layer host's cell streams (in and out of each circuit), by cipher suite",
            segments.clone(),
        );
        registry.register(
            "links_secured",
            "Connections secured, by TLS 1.3 cipher suite or Noise",
            links_secured.clone(),
        );
        registry.register(
            "memory_budget_bytes",
            "The node's memory budget for what peers ask of it (--max-memory)",
            memory_budget_bytes.clone(),
        );
        registry.register(
            "memory_reserved_bytes",
            "Bytes reserved in the memory budget now (slots in memory, circuits)",
            memory_reserved_bytes.clone(),
        );
        registry.register(
            "memory_reserved_peak_bytes",
            "The most bytes ever reserved in the memory budget at once",
            memory_reserved_peak_bytes.clone(),
        );
        registry.register(
            "memory_refused",
            "Reservations refused because the memory budget had no room",
            memory_refused.clone(),
        );
        registry.register(
            "circuit_setups",
            "Circuits that have not carried a cell yet",
            circuit_setups.clone(),
        );
        registry.register(
            "circuits_preempted",
            "Setups that carried no cell in time, ended to make room for a new circuit",
            circuits_preempted.clone(),
        );
        registry.register(
            "slots_freed",
            "Layer slots freed, by reason: expired lease, released by the owner, setup never completed, evicted (unused, for a newcomer)",
            slots_freed.clone(),
        );
        registry.register(
            "slot_owner_refused",
            "Slot assignments refused because the slot belongs to another owner",
            slot_owner_refused.clone(),
        );
        registry.register(
            "slots_corrupt",
            "Slots refused because their stored bytes do not match their digest",
            slots_corrupt.clone(),
        );
        registry.register(
            "host_compute_seconds",
            "Seconds spent in layer computations",
            host_compute_seconds.clone(),
        );
        registry.register(
            "host_worker_cpu_seconds",
            "CPU seconds of slot worker threads on steps and inference",
            host_worker_cpu_seconds.clone(),
        );
        registry.register(
            "host_crypto_seconds",
            "Seconds spent sealing and opening cells as a layer host",
            host_crypto_seconds.clone(),
        );
        registry.register(
            "host_codec_seconds",
            "Seconds spent encoding and decoding messages as a layer host",
            host_codec_seconds.clone(),
        );
        registry.register(
            "dht_requests",
            "Kademlia requests sent by this node's queries",
            dht_requests.clone(),
        );
        registry.register(
            "peers_connected",
            "Peers with an open connection",
            peers_connected.clone(),
        );
        registry.register(
            "records_stored",
            "DHT records and provider records accepted into the local store",
            records_stored.clone(),
        );
        registry.register(
            "records_refused",
            "DHT records refused on store or on read, by reason",
            records_refused.clone(),
        );
        registry.register("slots_held", "Layer slots held", slots_held.clone());
        registry.register(
            "bytes_relayed",
            "Cell bytes forwarded or served on circuits",
            bytes_relayed.clone(),
        );
        registry.register(
            "cells_relayed",
            "Cells forwarded or served on circuits",
            cells_relayed.clone(),
        );
        registry.register(
            "circuits_active",
            "Circuits currently open through this node",
            circuits_active.clone(),
        );
        registry.register(
            "circuits_refused",
            "Circuit setups refused, by reason",
            circuits_refused.clone(),
        );
        registry.register(
            "streams_refused",
            "Inbound streams refused because the node was at its limit",
            streams_refused.clone(),
        );
        Self {
            registry: Arc::new(registry),
            peers_connected,
            records_stored,
            records_refused,
            slots_held,
            bytes_relayed,
            cells_relayed,
            circuits_active,
            circuits_refused,
            streams_refused,
            host_compute_seconds,
            host_crypto_seconds,
            host_codec_seconds,
            host_worker_cpu_seconds,
            dht_requests,
            slots_freed,
            slot_owner_refused,
            slots_corrupt,
            memory_budget_bytes,
            memory_reserved_bytes,
            memory_reserved_peak_bytes,
            memory_refused,
            circuit_setups,
            circuits_preempted,
            links_secured,
            segments,
        }
    }

    /// Count one cell stream sealed or opened with `suite`.
    pub fn segment(&self, suite: mixnn_crypto::cells::CellSuite) {
        self.segments
            .get_or_create(&Suite {
                suite: suite.name().into(),
            })
            .inc();
    }

    /// Cell streams so far under `suite`.
    pub fn segments_with(&self, suite: mixnn_crypto::cells::CellSuite) -> u64 {
        self.segments
            .get_or_create(&Suite {
                suite: suite.name().into(),
            })
            .get()
    }

    pub fn link_secured(&self, security: &str) {
        self.links_secured
            .get_or_create(&Security {
                security: security.into(),
            })
            .inc();
    }

    /// Connections secured so far with `security` (a TLS cipher suite's
    /// name such as `TLS13_AES_256_GCM_SHA384`, or `noise`).
    pub fn links_secured_with(&self, security: &str) -> u64 {
        self.links_secured
            .get_or_create(&Security {
                security: security.into(),
            })
            .get()
    }

    pub fn slot_freed(&self, reason: &str) {
        self.slots_freed
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn refuse_record(&self, reason: &str) {
        self.records_refused
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn refuse_circuit(&self, reason: &str) {
        self.circuits_refused
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    /// Total records refused, all reasons.
    pub fn records_refused_total(&self) -> u64 {
        let mut text = String::new();
        // Family has no iterator; read the encoded text back.
        if encode(&mut text, &self.registry).is_err() {
            return 0;
        }
        text.lines()
            .filter(|l| l.starts_with("mixnn_records_refused_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Pages besides `/metrics` that the node serves on its metrics port
/// (`/health`, `/slots`): a path in, a JSON body out.
pub trait Pages: Send + Sync + 'static {
    fn page(&self, path: &str) -> Option<String>;
}

/// The path of a `GET` request's first line.
fn request_path(req: &str) -> Option<&str> {
    let line = req.lines().next()?;
    let mut parts = line.split(' ');
    (parts.next()? == "GET").then_some(())?;
    let target = parts.next()?;
    Some(target.split('?').next().unwrap_or(target))
}

/// Serve `GET /metrics` (and the `pages`) on `addr` until `cancel` fires.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    pages: Option<Arc<dyn Pages>>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(_) => continue,
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue; // at the limit: drop the connection
            };
            let metrics = metrics.clone();
            let pages = pages.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut buf = [0u8; 4096];
                let read = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await;
                let Ok(Ok(n)) = read else { return };
                let req = String::from_utf8_lossy(&buf[..n]);
                let page = |path: &str| pages.as_ref().and_then(|p| p.page(path));
                let (status, kind, body) = match request_path(&req) {
                    Some("/metrics" | "/") => {
                        ("200 OK", "text/plain; version=0.0.4", metrics.render())
                    }
                    Some(path) => match page(path) {
                        Some(json) => ("200 OK", "application/json", json),
                        None => ("404 Not Found", "text/plain", "not found\n".to_string()),
                    },
                    None => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), sock.write_all(resp.as_bytes()))
                        .await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_are_read_from_the_first_line() {
        assert_eq!(
            request_path("GET /health HTTP/1.1\r\nhost: x\r\n"),
            Some("/health")
        );
        assert_eq!(request_path("GET /slots?x=1 HTTP/1.1\r\n"), Some("/slots"));
        assert_eq!(request_path("POST /health HTTP/1.1\r\n"), None);
        assert_eq!(request_path(""), None);
    }
}
