//! The libp2p side of a node.
//!
//! One [`EventLoop`] task owns the `Swarm`. Everything else holds a
//! [`Network`] handle: cheap to clone, it sends [`Command`]s over a bounded
//! channel, each carrying a oneshot for its reply; replies in flight wait in
//! maps keyed by Kademlia query id. Direct streams for circuits go through
//! the `libp2p-stream` control, which needs no trip through the loop.

pub mod link;
pub mod mux;
pub mod records;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, MemoryTransport, OrTransport};
use libp2p::core::upgrade;
use libp2p::kad::{self, store::MemoryStore, QueryId, QueryResult, StoreInserts};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    connection_limits, identify, identity::Keypair, ping, Multiaddr, PeerId, StreamProtocol, Swarm,
    Transport,
};
use mixnn_crypto::descriptor::MAX_DESCRIPTOR_BYTES;
use mixnn_crypto::{Descriptor, PeerRecord, SignedDescriptor};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use records::{
    admit_descriptor_record, check_descriptor_record, check_provider_record, descriptor_key,
    newest, unix_now, Role,
};

/// A descriptor lookup stops once it holds this many valid copies (or the
/// query ends), and returns the newest of them.
const DESCRIPTOR_COPIES: usize = 3;

/// Kademlia runs under our own protocol name, apart from any public DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mixnn/kad/1.0.0");
/// Identify's protocol version string.
pub const IDENTIFY_VERSION: &str = "/mixnn/id/1.0.0";

/// How peers reach each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP and QUIC (with DNS names), for real deployments and loopback.
    Tcp,
    /// libp2p's in-process memory transport, for simulations and tests.
    Memory,
}

#[derive(Clone, Debug)]
pub struct NetworkConfig {
    pub listen: Vec<Multiaddr>,
    /// Entry points, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Kademlia server mode (reachable nodes) or client mode (jobs, `peers`).
    pub server: bool,
    pub transport: TransportKind,
    /// Limit on each DHT query.
    pub query_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// DHT queries in flight at once; more are refused with `Busy`.
    pub max_queries: usize,
    /// How often the routing table is refreshed.
    pub bootstrap_interval: Duration,
    /// Largest record value the local store takes.
    pub max_record_bytes: usize,
    /// How long the DHT keeps a descriptor record; a descriptor's own
    /// expiry bounds it too. Provider records live one `republish`
    /// longer, but nothing depends on them: clients check descriptors.
    pub record_ttl: Duration,
    /// How often records are replicated and provider records announced
    /// again (the node's publisher republishes its descriptor itself).
    pub republish: Duration,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: vec![],
            bootstrap: vec![],
            server: true,
            transport: TransportKind::Tcp,
            query_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(120),
            max_connections: 512,
            max_connections_per_peer: 2,
            max_queries: 64,
            bootstrap_interval: Duration::from_secs(60),
            max_record_bytes: MAX_DESCRIPTOR_BYTES,
            record_ttl: Duration::from_secs(600),
            republish: Duration::from_secs(180),
        }
    }
}

#[derive(Debug, Error)]
pub enum NetworkError {
    #[error("could not set up the transport: {0}")]
    Transport(String),
    #[error("could not listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("bootstrap address {0} must end in /p2p/<peer id>")]
    BootstrapWithoutPeerId(Multiaddr),
    #[error("could not dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("the network task has stopped")]
    Stopped,
    #[error("too many DHT queries in flight")]
    Busy,
    #[error("DHT query failed: {0}")]
    Query(String),
    #[error("no descriptor found for {0}")]
    NoDescriptor(PeerId),
    #[error("{0} has withdrawn its descriptor (it left the network)")]
    Withdrawn(PeerId),
    #[error("could not connect to {peer}: {reason}")]
    Connect { peer: PeerId, reason: String },
    #[error("no bootstrap peer answered: {0}")]
    BootstrapUnreachable(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

/// What the network tells the rest of the node. libp2p's own events stop
/// at the event loop; subscribers see these (a bounded broadcast: a
/// subscriber that falls behind loses the oldest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkEvent {
    Listening(Multiaddr),
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
    /// A DHT record failed our checks, on store (`from` the sender) or on read.
    RecordRefused {
        from: Option<PeerId>,
        reason: &'static str,
    },
}

const EVENT_BUFFER: usize = 256;

/// Most peers [`PeerAddrs::assign`] keeps an address for.
const MAX_ASSIGNED: usize = 4096;

/// The IP address each connected peer's connections come from, as the
/// event loop sees them open and close (bounded by the connection limits).
/// Circuit admission groups peers by it. Cheap to clone; reads never wait
/// on the event loop.
#[derive(Clone, Default)]
pub struct PeerAddrs {
    inner: Arc<Mutex<AddrTable>>,
}

#[derive(Default)]
struct AddrTable {
    connections: HashMap<PeerId, Vec<(ConnectionId, Option<IpAddr>)>>,
    assigned: HashMap<PeerId, IpAddr>,
}

impl PeerAddrs {
    fn table(&self) -> std::sync::MutexGuard<'_, AddrTable> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The IP address `peer` connects from (its first open connection's),
    /// or the one assigned to it; `None` for a peer with no IP address.
    pub fn ip(&self, peer: &PeerId) -> Option<IpAddr> {
        let t = self.table();
        t.assigned.get(peer).copied().or_else(|| {
            t.connections
                .get(peer)
                .and_then(|c| c.iter().find_map(|(_, ip)| *ip))
        })
    }

    /// Treat `peer` as connecting from `ip`, whatever its connections say:
    /// for simulations on the memory transport, where peers have no IP
    /// address. False once [`MAX_ASSIGNED`] peers have one.
    pub fn assign(&self, peer: PeerId, ip: IpAddr) -> bool {
        let mut t = self.table();
        if t.assigned.len() >= MAX_ASSIGNED && !t.assigned.contains_key(&peer) {
            return false;
        }
        t.assigned.insert(peer, ip);
        true
    }

    fn opened(&self, peer: PeerId, id: ConnectionId, remote: &Multiaddr) {
        self.table()
            .connections
            .entry(peer)
            .or_default()
            .push((id, ip_of(remote)));
    }

    fn closed(&self, peer: PeerId, id: ConnectionId) {
        let mut t = self.table();
        if let Some(c) = t.connections.get_mut(&peer) {
            c.retain(|(i, _)| *i != id);
            if c.is_empty() {
                t.connections.remove(&peer);
            }
        }
    }
}

/// The IP address in `addr`, if it has one.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    use libp2p::multiaddr::Protocol;
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
}

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    PutDescriptor(SignedDescriptor, oneshot::Sender<Result<(), NetworkError>>),
    Provide(Role, oneshot::Sender<Result<(), NetworkError>>),
    /// Providers of a role; with a limit the query ends once that many are known.
    FindProviders(
        Role,
        Option<usize>,
        oneshot::Sender<Result<HashSet<PeerId>, NetworkError>>,
    ),
    GetDescriptor(PeerId, oneshot::Sender<Result<Descriptor, NetworkError>>),
    /// Stop providing every role here and put our signed withdrawal.
    Withdraw(SignedDescriptor, oneshot::Sender<Result<(), NetworkError>>),
    AddAddress(PeerId, Multiaddr),
    Connect(PeerId, oneshot::Sender<Result<(), NetworkError>>),
    /// Store a record locally without checks (tests that play a forger).
    #[doc(hidden)]
    PutRawRecord(kad::Record, oneshot::Sender<Result<(), NetworkError>>),
}

/// A cloneable handle on the running network.
#[derive(Clone)]
pub struct Network {
    tx: mpsc::Sender<Command>,
    events: tokio::sync::broadcast::Sender<NetworkEvent>,
    control: libp2p_stream::Control,
    peer_id: PeerId,
    metrics: Metrics,
    addrs: PeerAddrs,
}

fn build_transport(
    key: &Keypair,
    kind: TransportKind,
    metrics: &Metrics,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetworkError> {
    let security = link::LinkSecurity::new(key, metrics.clone())
        .map_err(|e| NetworkError::Transport(e.to_string()))?;
    let yamux = mux::Yamux::new(256);
    Ok(match kind {
        TransportKind::Memory => MemoryTransport::default()
            .upgrade(upgrade::Version::V1)
            .authenticate(security.clone())
            .multiplex(yamux)
            .timeout(Duration::from_secs(20))
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        TransportKind::Tcp => {
            let tcp =
                libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default().nodelay(true))
                    .upgrade(upgrade::Version::V1)
                    .authenticate(security.clone())
                    .multiplex(yamux)
                    .timeout(Duration::from_secs(20));
            let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key));
            let both = OrTransport::new(quic, tcp).map(|either, _| match either {
                futures::future::Either::Left((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
                futures::future::Either::Right((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
            });
            match libp2p::dns::tokio::Transport::system(both) {
                Ok(dns) => dns.boxed(),
                Err(e) => return Err(NetworkError::Transport(format!("DNS resolver: {e}"))),
            }
        }
    })
}

fn build_swarm(
    key: &Keypair,
    cfg: &NetworkConfig,
    metrics: &Metrics,
) -> Result<Swarm<Behaviour>, NetworkError> {
    let peer_id = key.public().to_peer_id();
    let transport = build_transport(key, cfg.transport, metrics)?;

    let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
    kad_cfg
        .set_query_timeout(cfg.query_timeout)
        .disjoint_query_paths(true)
        .set_record_filtering(StoreInserts::FilterBoth)
        .set_max_packet_size(64 * 1024)
        .set_record_ttl(Some(cfg.record_ttl))
        // The publisher signs a fresh descriptor every `republish`; putting
        // the old bytes again would add nothing.
        .set_publication_interval(None)
        .set_replication_interval(Some(cfg.republish))
        .set_provider_record_ttl(Some(cfg.record_ttl + cfg.republish))
        .set_provider_publication_interval(Some(cfg.republish))
        .set_periodic_bootstrap_interval(Some(cfg.bootstrap_interval));
    let store = MemoryStore::with_config(
        peer_id,
        kad::store::MemoryStoreConfig {
            max_records: 4096,
            max_value_bytes: cfg.max_record_bytes,
            max_providers_per_key: 1024,
            max_provided_keys: 16,
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
    kad.set_mode(Some(if cfg.server {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));

    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(cfg.max_connections))
        .with_max_established_per_peer(Some(cfg.max_connections_per_peer))
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(64));

    let behaviour = Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        kad,
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_VERSION.into(), key.public())
                .with_agent_version(format!("mixnn/{}", env!("CARGO_PKG_VERSION")))
                .with_cache_size(256),
        ),
        ping: ping::Behaviour::new(ping::Config::new()),
        stream: libp2p_stream::Behaviour::new(),
    };
    Ok(Swarm::new(
        transport,
        behaviour,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor().with_idle_connection_timeout(cfg.idle_timeout),
    ))
}

/// Split `/…/p2p/<id>` into the peer id and the address before it.
pub fn split_peer_addr(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut a = addr.clone();
    match a.pop()? {
        libp2p::multiaddr::Protocol::P2p(peer) => Some((peer, a)),
        _ => None,
    }
}

/// Refuse a fixed TCP port that another process listens on. libp2p sets
/// `SO_REUSEPORT` on its listeners, so a second node on the same port
/// would bind it too and take half of the first one's connections; a plain
/// bind (no `SO_REUSEPORT`) fails on such a port.
fn port_free(addr: &Multiaddr) -> Result<(), NetworkError> {
    use libp2p::multiaddr::Protocol;
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    let (Some(ip), Some(port)) = (ip, port) else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind((ip, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(NetworkError::Listen {
            addr: addr.clone(),
            reason: format!(
                "port {port} is already in use (another mixnn node?); give each node its own --listen port"
            ),
        }),
        // Anything else (an address this machine does not have): libp2p
        // reports it with its own words.
        Err(_) => Ok(()),
    }
}

impl Network {
    /// Build the swarm, listen, dial the bootstrap peers and spawn the event
    /// loop. Returns once every listener has an address.
    pub async fn start(
        key: Keypair,
        cfg: NetworkConfig,
        metrics: Metrics,
        cancel: CancellationToken,
    ) -> Result<(Network, tokio::task::JoinHandle<()>), NetworkError> {
        for addr in &cfg.listen {
            port_free(addr)?;
        }
        let mut swarm = build_swarm(&key, &cfg, &metrics)?;
        let control = swarm.behaviour().stream.new_control();
        let mut listeners = HashSet::new();
        for addr in &cfg.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| NetworkError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            listeners.insert(id);
        }
        // Wait until each listener reports its first address.
        let wait = async {
            while !listeners.is_empty() {
                match swarm.select_next_some().await {
                    SwarmEvent::NewListenAddr {
                        listener_id,
                        address,
                    } => {
                        tracing::info!(event = "listening", %address);
                        listeners.remove(&listener_id);
                    }
                    SwarmEvent::ListenerError { error, .. }
                    | SwarmEvent::ListenerClosed {
                        reason: Err(error), ..
                    } => {
                        return Err(NetworkError::Listen {
                            addr: cfg.listen.first().cloned().unwrap_or_else(Multiaddr::empty),
                            reason: error.to_string(),
                        });
                    }
                    _ => {}
                }
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .map_err(|_| NetworkError::Timeout(Duration::from_secs(10), "listen addresses"))??;
        // A wildcard listener reports one address per interface: collect the
        // ones that follow the first for a moment.
        let wildcard = cfg.listen.iter().any(|a| {
            a.iter().any(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_unspecified(),
                libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_unspecified(),
                _ => false,
            })
        });
        let settle = tokio::time::sleep(Duration::from_millis(if wildcard { 250 } else { 0 }));
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                e = swarm.select_next_some() => {
                    if let SwarmEvent::NewListenAddr { address, .. } = e {
                        tracing::info!(event = "listening", %address);
                    }
                }
            }
        }

        for addr in &cfg.bootstrap {
            let (peer, base) = split_peer_addr(addr)
                .ok_or_else(|| NetworkError::BootstrapWithoutPeerId(addr.clone()))?;
            if peer == *swarm.local_peer_id() {
                continue;
            }
            swarm.behaviour_mut().kad.add_address(&peer, base);
            swarm.dial(addr.clone()).map_err(|e| NetworkError::Dial {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        }
        if !cfg.bootstrap.is_empty() {
            // Fails only when no peer is known, which the dials above rule out.
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }

        let (tx, rx) = mpsc::channel(256);
        let (events, _) = tokio::sync::broadcast::channel(EVENT_BUFFER);
        let peer_id = *swarm.local_peer_id();
        let addrs = PeerAddrs::default();
        let event_loop = EventLoop {
            addrs: addrs.clone(),
            events: events.clone(),
            swarm,
            rx,
            metrics: metrics.clone(),
            max_queries: cfg.max_queries,
            providers: HashMap::new(),
            descriptors: HashMap::new(),
            puts: HashMap::new(),
            dials: HashMap::new(),
        };
        let handle = tokio::spawn(event_loop.run(cancel));
        Ok((
            Network {
                tx,
                events,
                control,
                peer_id,
                metrics,
                addrs,
            },
            handle,
        ))
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The node's network events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<NetworkEvent> {
        self.events.subscribe()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where each connected peer connects from.
    pub fn peer_addrs(&self) -> PeerAddrs {
        self.addrs.clone()
    }

    /// A control for opening and accepting direct streams.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| NetworkError::Stopped)?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// The addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetworkError> {
        self.ask(Command::ListenAddrs).await
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetworkError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Publish our signed descriptor under our descriptor key.
    pub async fn put_descriptor(&self, d: SignedDescriptor) -> Result<(), NetworkError> {
        self.ask(|r| Command::PutDescriptor(d, r)).await?
    }

    /// Announce that we serve `role`.
    pub async fn provide(&self, role: Role) -> Result<(), NetworkError> {
        self.ask(|r| Command::Provide(role, r)).await?
    }

    /// All peers that announce `role`.
    pub async fn find_providers(&self, role: Role) -> Result<HashSet<PeerId>, NetworkError> {
        self.ask(|r| Command::FindProviders(role, None, r)).await?
    }

    /// Peers that announce `role`, stopping the search once `enough` are known.
    pub async fn find_some_providers(
        &self,
        role: Role,
        enough: usize,
    ) -> Result<HashSet<PeerId>, NetworkError> {
        self.ask(|r| Command::FindProviders(role, Some(enough), r))
            .await?
    }

    /// Fetch and verify `peer`'s descriptor; its addresses become dialable.
    /// Of the copies found the newest stands: [`NetworkError::Withdrawn`]
    /// when that is the peer's withdrawal.
    pub async fn get_descriptor(&self, peer: PeerId) -> Result<Descriptor, NetworkError> {
        self.ask(|r| Command::GetDescriptor(peer, r)).await?
    }

    /// Leave: stop providing every role from this node and put `withdrawal`
    /// (our signed withdrawal) under our descriptor key, on every one of the
    /// closest peers that answers. Callers bound the wait.
    pub async fn withdraw(&self, withdrawal: SignedDescriptor) -> Result<(), NetworkError> {
        self.ask(|r| Command::Withdraw(withdrawal, r)).await?
    }

    /// Make sure a connection to `peer` is open (dialing its known addresses).
    pub async fn connect(&self, peer: PeerId, timeout: Duration) -> Result<(), NetworkError> {
        tokio::time::timeout(timeout, self.ask(|r| Command::Connect(peer, r)))
            .await
            .map_err(|_| NetworkError::Timeout(timeout, "a connection"))??
    }

    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), NetworkError> {
        self.tx
            .send(Command::AddAddress(peer, addr))
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    /// Wait until at least `n` peers are connected.
    pub async fn wait_for_peers(&self, n: usize, timeout: Duration) -> Result<(), NetworkError> {
        let poll = async {
            loop {
                if self.connected_peers().await?.len() >= n {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(timeout, poll)
            .await
            .map_err(|_| NetworkError::Timeout(timeout, "peers to connect"))?
    }

    #[doc(hidden)]
    pub async fn put_raw_record_for_tests(&self, record: kad::Record) -> Result<(), NetworkError> {
        self.ask(|r| Command::PutRawRecord(record, r)).await?
    }
}

/// A provider lookup in flight: found so far, the limit, the reply.
type ProviderLookup = (
    HashSet<PeerId>,
    Option<usize>,
    oneshot::Sender<Result<HashSet<PeerId>, NetworkError>>,
);

/// A descriptor lookup in flight.
struct DescriptorLookup {
    peer: PeerId,
    /// The newest valid record so far.
    best: Option<PeerRecord>,
    copies: usize,
    reply: oneshot::Sender<Result<Descriptor, NetworkError>>,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    addrs: PeerAddrs,
    events: tokio::sync::broadcast::Sender<NetworkEvent>,
    rx: mpsc::Receiver<Command>,
    metrics: Metrics,
    max_queries: usize,
    providers: HashMap<QueryId, ProviderLookup>,
    descriptors: HashMap<QueryId, DescriptorLookup>,
    puts: HashMap<QueryId, oneshot::Sender<Result<(), NetworkError>>>,
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NetworkError>>>>,
}

impl EventLoop {
    async fn run(mut self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
            }
        }
        tracing::debug!(event = "network_stopped");
    }

    fn in_flight(&self) -> usize {
        self.providers.len() + self.descriptors.len() + self.puts.len()
    }

    fn on_command(&mut self, cmd: Command) {
        let busy = self.in_flight() >= self.max_queries;
        let kad = &mut self.swarm.behaviour_mut().kad;
        match cmd {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::AddAddress(peer, addr) => {
                self.swarm.add_peer_address(peer, addr);
            }
            Command::Connect(peer, reply) => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                if self.dials.len() >= self.max_queries && !self.dials.contains_key(&peer) {
                    let _ = reply.send(Err(NetworkError::Busy));
                    return;
                }
                let first = !self.dials.contains_key(&peer);
                self.dials.entry(peer).or_default().push(reply);
                if first {
                    match self.swarm.dial(peer) {
                        // A dial already under way (the bootstrap's, at
                        // start) ends in an event that answers us too.
                        Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                        Err(e) => {
                            for r in self.dials.remove(&peer).unwrap_or_default() {
                                let _ = r.send(Err(NetworkError::Connect {
                                    peer,
                                    reason: e.to_string(),
                                }));
                            }
                        }
                    }
                }
            }
            Command::PutDescriptor(d, reply) => {
                if busy {
                    let _ = reply.send(Err(NetworkError::Busy));
                    return;
                }
                let key = descriptor_key(self.swarm.local_peer_id());
                let mut record = kad::Record::new(key, d.to_bytes());
                record.publisher = Some(*self.swarm.local_peer_id());
                let kad = &mut self.swarm.behaviour_mut().kad;
                match kad.put_record(record, kad::Quorum::One) {
                    Ok(id) => {
                        self.puts.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetworkError::Query(e.to_string())));
                    }
                }
            }
            Command::PutRawRecord(record, reply) => {
                let r = kad
                    .put_record(record, kad::Quorum::One)
                    .map(|_| ())
                    .map_err(|e| NetworkError::Query(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Provide(role, reply) => {
                if busy {
                    let _ = reply.send(Err(NetworkError::Busy));
                    return;
                }
                match kad.start_providing(role.key()) {
                    Ok(id) => {
                        self.puts.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetworkError::Query(e.to_string())));
                    }
                }
            }
            Command::FindProviders(role, limit, reply) => {
                if busy {
                    let _ = reply.send(Err(NetworkError::Busy));
                    return;
                }
                let id = kad.get_providers(role.key());
                self.providers.insert(id, (HashSet::new(), limit, reply));
            }
            Command::GetDescriptor(peer, reply) => {
                if busy {
                    let _ = reply.send(Err(NetworkError::Busy));
                    return;
                }
                let id = kad.get_record(descriptor_key(&peer));
                self.descriptors.insert(
                    id,
                    DescriptorLookup {
                        peer,
                        best: None,
                        copies: 0,
                        reply,
                    },
                );
            }
            Command::Withdraw(withdrawal, reply) => {
                for role in Role::ALL {
                    kad.stop_providing(&role.key());
                }
                let key = descriptor_key(self.swarm.local_peer_id());
                let mut record = kad::Record::new(key, withdrawal.to_bytes());
                record.publisher = Some(*self.swarm.local_peer_id());
                let kad = &mut self.swarm.behaviour_mut().kad;
                // Every close peer should hear it, not just the first.
                match kad.put_record(record, kad::Quorum::All) {
                    Ok(id) => {
                        self.puts.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetworkError::Query(e.to_string())));
                    }
                }
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                for addr in info.listen_addrs {
                    if is_dialable(&addr) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.addrs
                    .opened(peer_id, connection_id, endpoint.get_remote_address());
                for r in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = r.send(Ok(()));
                }
                if num_established.get() == 1 {
                    let _ = self.events.send(NetworkEvent::PeerConnected(peer_id));
                    self.metrics.peers_connected.inc();
                    tracing::debug!(event = "peer_connected", peer = %peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.addrs.closed(peer_id, connection_id);
                if num_established == 0 {
                    let _ = self.events.send(NetworkEvent::PeerDisconnected(peer_id));
                    self.metrics.peers_connected.dec();
                    tracing::debug!(event = "peer_disconnected", peer = %peer_id);
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(event = "listening", %address);
                let _ = self.events.send(NetworkEvent::Listening(address));
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(event = "dial_failed", peer = ?peer_id, %error);
                if let Some(peer) = peer_id {
                    for r in self.dials.remove(&peer).unwrap_or_default() {
                        let _ = r.send(Err(NetworkError::Connect {
                            peer,
                            reason: error.to_string(),
                        }));
                    }
                }
            }
            _ => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest { request } => self.on_inbound(request),
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => {
                if step.last {
                    self.metrics
                        .dht_requests
                        .inc_by(u64::from(stats.num_requests()));
                }
                match result {
                    QueryResult::GetProviders(res) => {
                        let Some((found, limit, _)) = self.providers.get_mut(&id) else {
                            return;
                        };
                        match res {
                            Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                                found.extend(providers);
                                if limit.is_some_and(|l| found.len() >= l) {
                                    if let Some(mut q) =
                                        self.swarm.behaviour_mut().kad.query_mut(&id)
                                    {
                                        q.finish();
                                    }
                                }
                            }
                            Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                            Err(e) => {
                                // A timeout still leaves what was found so far.
                                tracing::debug!(event = "providers_query_ended", error = %e);
                            }
                        }
                        if step.last {
                            if let Some((found, _, reply)) = self.providers.remove(&id) {
                                let _ = reply.send(Ok(found));
                            }
                        }
                    }
                    QueryResult::GetRecord(res) => {
                        let Some(lookup) = self.descriptors.get_mut(&id) else {
                            return;
                        };
                        if let Ok(kad::GetRecordOk::FoundRecord(peer_record)) = &res {
                            match check_descriptor_record(&peer_record.record, unix_now()) {
                                Ok(r) if r.peer_id() == lookup.peer.to_bytes() => {
                                    lookup.copies += 1;
                                    lookup.best = Some(match lookup.best.take() {
                                        Some(best) => newest(best, r),
                                        None => r,
                                    });
                                }
                                Ok(_) => self.metrics.refuse_record("wrong_key"),
                                Err(e) => {
                                    tracing::debug!(
                                        event = "record_refused",
                                        on = "read",
                                        reason = e.label()
                                    );
                                    self.metrics.refuse_record(e.label());
                                    let _ = self.events.send(NetworkEvent::RecordRefused {
                                        from: None,
                                        reason: e.label(),
                                    });
                                }
                            }
                            // A few good copies are enough: a stale one
                            // (a peer that missed a withdrawal) loses to
                            // the newest among them.
                            if lookup.copies >= DESCRIPTOR_COPIES {
                                if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                                    q.finish();
                                }
                            }
                        }
                        if step.last {
                            if let Some(lookup) = self.descriptors.remove(&id) {
                                let peer = lookup.peer;
                                let r = match lookup.best {
                                    Some(PeerRecord::Live(d)) => {
                                        for a in &d.addresses {
                                            if let Ok(addr) = a.parse::<Multiaddr>() {
                                                self.swarm.add_peer_address(peer, addr);
                                            }
                                        }
                                        Ok(d)
                                    }
                                    Some(PeerRecord::Withdrawn(_)) => {
                                        Err(NetworkError::Withdrawn(peer))
                                    }
                                    None => Err(NetworkError::NoDescriptor(peer)),
                                };
                                let _ = lookup.reply.send(r);
                            }
                        }
                    }
                    QueryResult::PutRecord(res) => {
                        if let Some(reply) = self.puts.remove(&id) {
                            let r = match res {
                                Ok(_) => Ok(()),
                                // `Quorum::All` asks for the replication
                                // factor (20); a smaller network cannot
                                // give that, and every peer that took the
                                // record still has it.
                                Err(kad::PutRecordError::QuorumFailed { success, .. })
                                    if !success.is_empty() =>
                                {
                                    Ok(())
                                }
                                Err(e) => Err(NetworkError::Query(e.to_string())),
                            };
                            let _ = reply.send(r);
                        }
                    }
                    QueryResult::StartProviding(res) => {
                        if let Some(reply) = self.puts.remove(&id) {
                            let _ = reply.send(
                                res.map(|_| ())
                                    .map_err(|e| NetworkError::Query(e.to_string())),
                            );
                        }
                    }
                    _ => {}
                }
            }
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                ..
            } => {
                tracing::debug!(event = "routing_updated", %peer);
            }
            _ => {}
        }
    }

    /// With `StoreInserts::FilterBoth`, inbound records land here and only
    /// the ones that pass our checks are stored.
    fn on_inbound(&mut self, request: kad::InboundRequest) {
        match request {
            kad::InboundRequest::PutRecord {
                source,
                record: Some(mut record),
                ..
            } => {
                let now = unix_now();
                let store = self.swarm.behaviour_mut().kad.store_mut();
                let held = kad::store::RecordStore::get(store, &record.key).map(|r| r.into_owned());
                match admit_descriptor_record(&record, held.as_ref(), now) {
                    Ok(r) => {
                        // Never keep a record past its own expiry.
                        let until = std::time::Instant::now()
                            + Duration::from_secs(r.expires_at().saturating_sub(now));
                        record.expires = Some(record.expires.map_or(until, |e| e.min(until)));
                        match kad::store::RecordStore::put(store, record) {
                            Ok(()) => {
                                self.metrics.records_stored.inc();
                            }
                            Err(e) => {
                                tracing::debug!(event = "record_refused", on = "store", reason = %e);
                                self.metrics.refuse_record("store_full");
                            }
                        }
                    }
                    Err(e) => {
                        if matches!(e, records::RecordError::Stale { .. }) {
                            // Also what replication of a superseded copy looks like.
                            tracing::debug!(event = "record_refused", on = "store", from = %source, reason = e.label());
                        } else {
                            tracing::info!(event = "record_refused", on = "store", from = %source, reason = e.label());
                        }
                        self.metrics.refuse_record(e.label());
                        let _ = self.events.send(NetworkEvent::RecordRefused {
                            from: Some(source),
                            reason: e.label(),
                        });
                    }
                }
            }
            kad::InboundRequest::AddProvider {
                record: Some(provider),
            } => match check_provider_record(&provider) {
                Ok(_) => {
                    let store = self.swarm.behaviour_mut().kad.store_mut();
                    match kad::store::RecordStore::add_provider(store, provider) {
                        Ok(()) => {
                            self.metrics.records_stored.inc();
                        }
                        Err(_) => self.metrics.refuse_record("store_full"),
                    }
                }
                Err(e) => {
                    tracing::info!(
                        event = "record_refused",
                        on = "store",
                        kind = "provider",
                        reason = e.label()
                    );
                    self.metrics.refuse_record(e.label());
                    let _ = self.events.send(NetworkEvent::RecordRefused {
                        from: None,
                        reason: e.label(),
                    });
                }
            },
            _ => {}
        }
    }
}

/// Addresses worth giving the DHT: not unspecified, not empty.
fn is_dialable(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        Some(_) => true,
        None => false,
    }
}
