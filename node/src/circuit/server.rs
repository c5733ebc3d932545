//! The hop side of circuits: accept a stream, peel the setup, then relay
//! cells as a mix or compute as a layer host.
//!
//! Per circuit there are two pumps. The downstream pump reads frames from
//! the previous hop and writes to the next; the upstream pump carries sealed
//! error reports back towards the client. Every read from a peer has a
//! timeout, every queue is the stream's own flow-control window, and who
//! may hold how many circuits is [`super::admission`]'s decision: per
//! address group of the previous hop, per identity, and with setups that
//! carry no cell kept to a quarter of the node and giving way after
//! [`Timeouts::first_cell`]. Every circuit holds its buffers in the node's
//! memory budget, and a layer host checks each message's header against
//! its slot before decoding it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::io::{AsyncReadExt, ReadHalf, WriteHalf};
use futures::lock::Mutex as AsyncMutex;
use futures::StreamExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use mixnn_crypto::cells::{
    CellKey, CellOpener, CellSealer, MessageCells, MessageReader, MessageSource, CELL_BYTES,
};
use mixnn_crypto::onion::peel_setup;
use mixnn_crypto::replay::ReplayCache;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

use super::admission::{group_of, Admit, CircuitAdmission, CircuitId, CircuitLimits};
use super::budget::{MemoryBudget, Reservation, CIRCUIT_BASE_BYTES};
use super::host::{check_message, Expect, Host, HostError, OwnerKeys, SharedSlot, Started};
use super::payload::{
    seal_error, Assignment, ControlOp, ErrorCode, HopPayload, HopRole, JobDecoder, JobMsg, MsgHead,
    StateOp, ERROR_KEY, REPORT_KEY, STATE_DOWN_KEY, STATE_UP_KEY,
};
use super::session::Kind;
use super::wire::{self, FrameKind, WireError};
use crate::metrics::Metrics;
use crate::network::{Network, PeerAddrs};
use crate::node::NodeState;
use crate::store::StoredSlot;

/// The mixnn circuit protocol on direct libp2p streams. Version 2: cells
/// of [`mixnn_crypto::cells::CELL_BYTES`] (64 KiB less 256 bytes; 64 KiB in
/// version 1), so a node of either version refuses the other's streams at
/// negotiation instead of misreading their frames.
pub const CIRCUIT_PROTOCOL: StreamProtocol = StreamProtocol::new("/mixnn/circuit/2.0.0");

/// How long a hop waits on its peers.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From stream open to a complete setup frame.
    pub setup: Duration,
    /// Opening a stream to the next hop.
    pub open: Duration,
    /// Silence on a circuit before it is torn down.
    pub idle: Duration,
    /// From stream open to the circuit's first cell: a setup older than
    /// this gives its place to a new circuit that needs it.
    pub first_cell: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            setup: Duration::from_secs(10),
            open: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            first_cell: Duration::from_secs(10),
        }
    }
}

pub use super::admission::MAX_CIRCUITS_PER_PEER;

type UpWriter = Arc<AsyncMutex<WriteHalf<Stream>>>;

/// What one hop learned when a circuit was set up through it.
#[derive(Clone, Debug)]
pub struct HopView {
    pub me: PeerId,
    /// The peer that opened the stream to us.
    pub prev: PeerId,
    pub next: PeerId,
    /// `mix` or `host`.
    pub role: &'static str,
    pub slot: Option<crate::store::SlotId>,
}

/// Observes what a hop sees, for tests that check what each hop learns.
pub trait HopTap: Send + Sync {
    fn setup(&self, view: &HopView);
    /// A cell as it arrived from the previous hop.
    fn cell_in(&self, me: PeerId, cell: &[u8]);
    /// A message a layer host decrypted.
    fn plaintext(&self, me: PeerId, msg: &[u8]);
}

/// A replay cache over sled: tags per epoch, pruned when epochs pass.
struct SledReplay<'a> {
    tree: &'a sled::Tree,
    epoch: u64,
}

impl ReplayCache for SledReplay<'_> {
    fn check_and_insert(&mut self, tag: [u8; 32]) -> bool {
        let mut key = self.epoch.to_be_bytes().to_vec();
        key.extend_from_slice(&tag);
        // Fresh only if the key was absent; a storage error refuses.
        matches!(
            self.tree
                .compare_and_swap(key, None as Option<&[u8]>, Some(&[] as &[u8])),
            Ok(Ok(()))
        )
    }
}

/// Who holds which circuit, and how to end one that must give way.
struct Admission {
    machine: CircuitAdmission,
    tokens: HashMap<CircuitId, CancellationToken>,
}

/// Serves circuits for a node.
pub struct CircuitServer {
    state: Arc<NodeState>,
    host: Option<Arc<Host>>,
    /// Finds a next hop this node has not met ([`CircuitServer::open_next`]).
    network: Network,
    control: libp2p_stream::Control,
    replay: sled::Tree,
    admission: Mutex<Admission>,
    addrs: PeerAddrs,
    budget: Arc<MemoryBudget>,
    timeouts: Timeouts,
    me: PeerId,
    tap: Option<Arc<dyn HopTap>>,
}

/// Forgets an admitted circuit when its task ends, however it ends.
struct Admitted<'a> {
    server: &'a CircuitServer,
    id: CircuitId,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.server.forget(self.id);
    }
}

/// A layer host's slot bound to a circuit: its in-memory copy is dropped
/// (the next bind reloads the last checkpoint) however the circuit ends,
/// including when its task is cancelled mid-way.
struct Bound {
    host: Arc<Host>,
    slot_id: crate::store::SlotId,
    slot: SharedSlot,
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.host.evict(&self.slot_id, &self.slot);
    }
}

/// Why a circuit ended, for logs.
#[derive(Debug)]
enum End {
    Clean,
    Refused(&'static str),
    Failed(String),
    /// Writing to the next hop failed: the client must hear it from us.
    NextHop(String),
}

impl CircuitServer {
    pub fn new(
        state: Arc<NodeState>,
        host: Option<Arc<Host>>,
        network: &Network,
        budget: Arc<MemoryBudget>,
        timeouts: Timeouts,
        tap: Option<Arc<dyn HopTap>>,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let replay = state.data.replay_tree()?;
        let limits = CircuitLimits::new(
            state.config.max_circuits,
            state.config.circuits_per_group,
            timeouts.first_cell,
        );
        Ok(Arc::new(Self {
            state,
            host,
            network: network.clone(),
            control: network.stream_control(),
            replay,
            admission: Mutex::new(Admission {
                machine: CircuitAdmission::new(limits),
                tokens: HashMap::new(),
            }),
            addrs: network.peer_addrs(),
            budget,
            timeouts,
            me: network.peer_id(),
            tap,
        }))
    }

    fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admit a stream from `peer`, ending the overdue setup it replaces.
    fn admit(&self, peer: PeerId, token: &CancellationToken) -> Result<CircuitId, &'static str> {
        let group = group_of(peer, self.addrs.ip(&peer));
        let mut a = self.admission();
        match a.machine.admit(peer, group, Instant::now()) {
            Admit::No(reason) => {
                tracing::debug!(event = "circuit_refused", from = %peer, ?group, reason);
                Err(reason)
            }
            Admit::Yes { id, preempt } => {
                if let Some(victim) = preempt {
                    if let Some(t) = a.tokens.remove(&victim) {
                        t.cancel();
                    }
                    self.metrics().circuits_preempted.inc();
                    tracing::info!(event = "circuit_preempted", for_peer = %peer, reason = "no cell in time");
                }
                a.tokens.insert(id, token.clone());
                self.metrics().circuit_setups.set(a.machine.setups() as i64);
                Ok(id)
            }
        }
    }

    /// Circuit `id` carried its first cell.
    fn moved(&self, id: CircuitId) {
        let mut a = self.admission();
        a.machine.moved(id);
        self.metrics().circuit_setups.set(a.machine.setups() as i64);
    }

    fn forget(&self, id: CircuitId) {
        let mut a = self.admission();
        a.machine.end(id);
        a.tokens.remove(&id);
        self.metrics().circuit_setups.set(a.machine.setups() as i64);
    }

    /// Accept circuit streams until `cancel` fires.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut control = self.control.clone();
        let mut incoming = match control.accept(CIRCUIT_PROTOCOL) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(event = "circuit_accept_failed", error = %e);
                return;
            }
        };
        self.prune_replay();
        loop {
            let (peer, stream) = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                next = incoming.next() => match next {
                    Some(s) => s,
                    None => break,
                },
            };
            // Dropping a refused stream closes it.
            let token = cancel.child_token();
            let id = match self.admit(peer, &token) {
                Ok(id) => id,
                Err(reason) => {
                    self.metrics().streams_refused.inc();
                    self.metrics().refuse_circuit(reason);
                    continue;
                }
            };
            let base = match self.budget.reserve(CIRCUIT_BASE_BYTES) {
                Ok(r) => r,
                Err(_) => {
                    self.forget(id);
                    self.metrics().streams_refused.inc();
                    self.metrics().refuse_circuit("memory");
                    continue;
                }
            };
            let server = self.clone();
            let stopping = cancel.clone();
            tokio::spawn(async move {
                let _base = base;
                let _admitted = Admitted {
                    server: &server,
                    id,
                };
                server.metrics().circuits_active.inc();
                let end = tokio::select! {
                    biased;
                    _ = token.cancelled() => if stopping.is_cancelled() {
                        End::Failed("the node is stopping".into())
                    } else {
                        End::Refused("preempted")
                    },
                    end = server.handle(peer, stream, token.clone(), id) => end,
                };
                server.metrics().circuits_active.dec();
                match end {
                    End::Clean => tracing::debug!(event = "circuit_closed", from = %peer),
                    End::Refused(reason) => {
                        server.metrics().refuse_circuit(reason);
                        tracing::info!(event = "circuit_refused", from = %peer, reason);
                    }
                    End::Failed(reason) => {
                        tracing::info!(event = "circuit_failed", from = %peer, %reason)
                    }
                    End::NextHop(reason) => {
                        tracing::info!(event = "circuit_failed", from = %peer, %reason, at = "next_hop")
                    }
                }
            });
        }
    }

    /// Drop replay tags of epochs older than the previous one.
    fn prune_replay(&self) {
        let keep_from = {
            let keys = self.state.onion.read().unwrap_or_else(|p| p.into_inner());
            keys.previous
                .as_ref()
                .map_or(keys.current.epoch(), |k| k.epoch())
        };
        if let Err(e) = crate::store::prune_replay(&self.replay, keep_from) {
            tracing::warn!(event = "replay_prune_failed", error = %e);
        }
    }

    async fn handle(
        self: &Arc<Self>,
        prev: PeerId,
        stream: Stream,
        cancel: CancellationToken,
        id: CircuitId,
    ) -> End {
        let (mut up_r, up_w) = stream.split();
        let up_w: UpWriter = Arc::new(AsyncMutex::new(up_w));
        let mut buf = Vec::new();
        let (cid, epoch) =
            match tokio::time::timeout(self.timeouts.setup, wire::read_frame(&mut up_r, &mut buf))
                .await
            {
                Ok(Ok((cid, FrameKind::Setup { epoch }))) => (cid, epoch),
                Ok(Ok(_)) => return End::Refused("no_setup"),
                Ok(Err(_)) => return End::Refused("bad_setup_frame"),
                Err(_) => return End::Refused("setup_timeout"),
            };

        let (peeled, my_onion_key) = {
            let keys = self.state.onion.read().unwrap_or_else(|p| p.into_inner());
            let Some(key) = keys.for_epoch(epoch) else {
                return End::Refused("unknown_epoch");
            };
            let mut replay = SledReplay {
                tree: &self.replay,
                epoch,
            };
            match peel_setup(&buf, key, &mut replay) {
                Ok(p) => (p, key.public()),
                Err(mixnn_crypto::onion::OnionError::Replay) => {
                    return End::Refused("replayed_setup")
                }
                Err(_) => return End::Refused("bad_onion"),
            }
        };
        let err_key = peeled.secrets.key(ERROR_KEY);
        let owner_keys = OwnerKeys {
            report: peeled.secrets.key(REPORT_KEY),
            state_up: peeled.secrets.key(STATE_UP_KEY),
            state_down: peeled.secrets.key(STATE_DOWN_KEY),
        };
        let report = |code: ErrorCode, detail: String| {
            let up_w = up_w.clone();
            let sealed = seal_error(&err_key, code, &detail);
            async move {
                let mut w = up_w.lock().await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    wire::write_error(&mut *w, cid, &sealed),
                )
                .await;
            }
        };

        let payload = match HopPayload::decode(&peeled.payload) {
            Ok(p) => p,
            Err(e) => {
                report(ErrorCode::BadMessage, format!("hop payload: {e}")).await;
                return End::Refused("bad_payload");
            }
        };
        let Some(next) = peeled
            .next_hop
            .as_deref()
            .and_then(|b| PeerId::from_bytes(b).ok())
        else {
            report(ErrorCode::BadMessage, "no valid next hop".into()).await;
            return End::Refused("no_next_hop");
        };

        // Admission before opening anything downstream. The slot's copy
        // goes however the circuit ends (`bound`).
        let mut bound: Option<Bound> = None;
        let hosting = match &payload.role {
            HopRole::Mix if self.state.config.mix => None,
            HopRole::Mix => {
                report(ErrorCode::SlotRefused, "this node is not a mix".into()).await;
                return End::Refused("not_a_mix");
            }
            HopRole::Host(a) => {
                let Some(host) = self.host.clone() else {
                    report(ErrorCode::SlotRefused, "this node hosts no layers".into()).await;
                    return End::Refused("not_a_host");
                };
                let a: Arc<Assignment> = Arc::new((**a).clone());
                // The guard comes out of the blocking task: if this circuit is
                // cancelled while the bind runs, dropping it drops the slot's
                // copy too.
                let bind = {
                    let host = host.clone();
                    let a = a.clone();
                    tokio::task::spawn_blocking(move || {
                        host.bind(&a, &my_onion_key).map(|(slot, created)| {
                            let guard = Bound {
                                host: host.clone(),
                                slot_id: a.body.slot_id,
                                slot,
                            };
                            (guard, created)
                        })
                    })
                    .await
                };
                match bind {
                    Ok(Ok((guard, created))) => {
                        if created {
                            self.metrics().slots_held.inc();
                            self.state.republish.notify_one();
                            tracing::info!(event = "slot_created", slot = %hex::encode(a.body.slot_id));
                        }
                        let slot = guard.slot.clone();
                        bound = Some(guard);
                        Some((host, a, slot))
                    }
                    Ok(Err(e)) => {
                        let (code, reason) = match e {
                            HostError::NoSuchSlot => (ErrorCode::NoSuchSlot, "no_such_slot"),
                            HostError::NotOwner => (ErrorCode::SlotRefused, "not_owner"),
                            _ => (ErrorCode::SlotRefused, "slot_refused"),
                        };
                        report(code, e.to_string()).await;
                        return End::Refused(reason);
                    }
                    Err(e) => {
                        report(ErrorCode::Compute, e.to_string()).await;
                        return End::Failed(e.to_string());
                    }
                }
            }
            HopRole::End { .. } => {
                report(
                    ErrorCode::BadMessage,
                    "a node is never a circuit's end".into(),
                )
                .await;
                return End::Refused("end_role");
            }
        };

        // The circuit's buffers are held in the memory budget before
        // anything is read into them.
        let _bound = bound;
        let _memory: Option<Reservation> = match &hosting {
            Some((_, a, slot)) => {
                match self.budget.reserve(Host::expect(slot, a).circuit_bytes()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        report(
                            ErrorCode::SlotRefused,
                            format!("the circuit's buffers do not fit in memory: {e}"),
                        )
                        .await;
                        return End::Refused("memory");
                    }
                }
            }
            None => None,
        };

        if let Some(tap) = &self.tap {
            tap.setup(&HopView {
                me: self.me,
                prev,
                next,
                role: if hosting.is_some() { "host" } else { "mix" },
                slot: hosting.as_ref().map(|(_, a, _)| a.body.slot_id),
            });
        }
        let down = match self.open_next(next).await {
            Ok(s) => s,
            Err(e) => {
                report(ErrorCode::NextHopFailed, e.clone()).await;
                if let Some((host, a, slot)) = &hosting {
                    host.evict(&a.body.slot_id, slot);
                }
                return End::Failed(format!("next hop {next}: {e}"));
            }
        };
        let (down_r, mut down_w) = down.split();
        let down_cid = rand::rngs::OsRng.next_u64();
        if let Err(e) = wire::write_setup(
            &mut down_w,
            down_cid,
            payload.next_epoch,
            peeled.next_packet.as_bytes(),
        )
        .await
        {
            report(
                ErrorCode::NextHopFailed,
                format!("setup to the next hop failed: {e}"),
            )
            .await;
            return End::Failed(e.to_string());
        }

        // Upstream pump: sealed errors from downstream go back unopened;
        // a broken downstream becomes our own report.
        let circuit = cancel.child_token();
        let downstream_done = CancellationToken::new();
        let up_task = {
            let up_w = up_w.clone();
            let circuit = circuit.clone();
            let done = downstream_done.clone();
            let sealed_broken = seal_error(
                &err_key,
                ErrorCode::NextHopFailed,
                "the stream to the next hop broke",
            );
            tokio::spawn(upstream_pump(
                down_r,
                up_w,
                cid,
                circuit,
                done,
                sealed_broken,
            ))
        };

        let end = match hosting {
            None => {
                self.mix_pump(&mut up_r, &mut down_w, down_cid, &circuit, &mut buf, id)
                    .await
            }
            Some((host, a, slot)) => {
                let mut storing = Storing::default();
                let end = self
                    .host_pump(
                        &mut up_r,
                        down_w,
                        down_cid,
                        &circuit,
                        &mut buf,
                        &host,
                        &a,
                        &slot,
                        owner_keys,
                        &report,
                        id,
                        &mut storing,
                    )
                    .await;
                // However the circuit ends, the slot is released or evicted
                // only once its last checkpoint is stored.
                let end = match storing.wait().await {
                    Err(e) if matches!(end, End::Clean) => {
                        report(ErrorCode::Compute, e.clone()).await;
                        End::Failed(e)
                    }
                    _ => end,
                };
                match &end {
                    End::Clean => host.release(&a.body.slot_id, &slot),
                    _ => host.evict(&a.body.slot_id, &slot),
                }
                end
            }
        };
        if let End::NextHop(reason) = &end {
            report(
                ErrorCode::NextHopFailed,
                format!("the stream to the next hop broke: {reason}"),
            )
            .await;
        }
        downstream_done.cancel();
        if !matches!(end, End::Clean) {
            circuit.cancel();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), up_task).await;
        end
    }

    /// Opens the circuit's stream to `next`, within the open timeout. The
    /// client chose the route, so this node may never have met `next`:
    /// where the stream cannot be opened with the addresses it knows, it
    /// fetches `next`'s descriptor (whose addresses become dialable) and
    /// tries once more. The error is the report for the client.
    async fn open_next(&self, next: PeerId) -> Result<Stream, String> {
        let mut control = self.control.clone();
        let open = async {
            let first = match control.open_stream(next, CIRCUIT_PROTOCOL).await {
                Ok(s) => return Ok(s),
                Err(libp2p_stream::OpenStreamError::Io(e)) => e,
                Err(e) => return Err(format!("cannot open a stream to the next hop: {e}")),
            };
            if let Err(e) = self.network.get_descriptor(next).await {
                return Err(format!(
                    "cannot open a stream to the next hop: {first}; nor find its descriptor: {e}"
                ));
            }
            control
                .open_stream(next, CIRCUIT_PROTOCOL)
                .await
                .map_err(|e| format!("cannot open a stream to the next hop: {e}"))
        };
        tokio::time::timeout(self.timeouts.open, open)
            .await
            .unwrap_or_else(|_| Err("the next hop did not answer in time".into()))
    }

    async fn mix_pump(
        &self,
        up_r: &mut ReadHalf<Stream>,
        down_w: &mut WriteHalf<Stream>,
        down_cid: u64,
        circuit: &CancellationToken,
        buf: &mut Vec<u8>,
        id: CircuitId,
    ) -> End {
        let mut first = true;
        loop {
            let frame = tokio::select! {
                biased;
                _ = circuit.cancelled() => return End::Failed("circuit cancelled".into()),
                f = tokio::time::timeout(self.timeouts.idle, wire::read_relay_frame(up_r, buf)) => f,
            };
            match frame {
                Ok(Ok((_, FrameKind::Cell))) => {
                    if std::mem::take(&mut first) {
                        self.moved(id);
                    }
                    if let Some(tap) = &self.tap {
                        tap.cell_in(self.me, wire::cell_of(buf));
                    }
                    let w = async {
                        wire::write_cell_frame(down_w, down_cid, buf).await?;
                        futures::AsyncWriteExt::flush(down_w).await?;
                        Ok::<_, WireError>(())
                    };
                    match tokio::time::timeout(self.timeouts.idle, w).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return End::NextHop(e.to_string()),
                        Err(_) => return End::NextHop("the next hop stopped reading".into()),
                    }
                    self.metrics().cells_relayed.inc();
                    self.metrics().bytes_relayed.inc_by(CELL_BYTES as u64);
                }
                Ok(Ok((_, FrameKind::Teardown))) => {
                    let _ = wire::write_teardown(down_w, down_cid).await;
                    return End::Clean;
                }
                Ok(Ok((_, kind))) => {
                    return End::Failed(format!(
                        "unexpected {} frame from the previous hop",
                        kind.name()
                    ))
                }
                Ok(Err(WireError::Closed)) => {
                    return End::Failed("the previous hop closed the circuit".into())
                }
                Ok(Err(e)) => return End::Failed(format!("reading from the previous hop: {e}")),
                Err(_) => return End::Failed("the circuit was idle too long".into()),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn host_pump<F, Fut>(
        &self,
        up_r: &mut ReadHalf<Stream>,
        down_w: WriteHalf<Stream>,
        down_cid: u64,
        circuit: &CancellationToken,
        buf: &mut Vec<u8>,
        host: &Arc<Host>,
        a: &Arc<Assignment>,
        slot: &SharedSlot,
        keys: OwnerKeys,
        report: &F,
        id: CircuitId,
        storing: &mut Storing,
    ) -> End
    where
        F: Fn(ErrorCode, String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        // Tensors of the slot's sides, or the job's state messages when
        // this circuit carries them.
        let expect: Expect = Host::expect(slot, a);
        let max_msg = expect.max_message();
        let mut first = true;
        let mut opener =
            CellOpener::with_suite(&CellKey::from_bytes(a.body.in_key), a.body.in_suite);
        let mut sealer =
            CellSealer::with_suite(&CellKey::from_bytes(a.body.out_key), a.body.out_suite);
        self.metrics().segment(a.body.in_suite);
        self.metrics().segment(a.body.out_suite);
        let mut reader = MessageReader::new(max_msg);
        let mut incoming = JobDecoder::default();
        let mut writer = CellWriter::spawn(down_w, down_cid);
        loop {
            let frame = tokio::select! {
                biased;
                _ = circuit.cancelled() => return End::Failed("circuit cancelled".into()),
                f = tokio::time::timeout(self.timeouts.idle, wire::read_frame(up_r, buf)) => f,
            };
            match frame {
                Ok(Ok((_, FrameKind::Cell))) => {
                    if std::mem::take(&mut first) {
                        self.moved(id);
                    }
                }
                Ok(Ok((_, FrameKind::Teardown))) => {
                    writer.teardown().await;
                    return End::Clean;
                }
                Ok(Ok((_, kind))) => {
                    report(
                        ErrorCode::BadMessage,
                        format!("unexpected {} frame", kind.name()),
                    )
                    .await;
                    return End::Failed("unexpected frame".into());
                }
                Ok(Err(WireError::Closed)) => {
                    return End::Failed("the previous hop closed the circuit".into())
                }
                Ok(Err(e)) => {
                    report(
                        ErrorCode::PrevHopFailed,
                        format!("reading from the previous hop: {e}"),
                    )
                    .await;
                    return End::Failed(e.to_string());
                }
                Err(_) => {
                    report(
                        ErrorCode::PrevHopFailed,
                        "no data from the previous hop in time".into(),
                    )
                    .await;
                    return End::Failed("idle".into());
                }
            }
            if let Some(tap) = &self.tap {
                tap.cell_in(self.me, buf);
            }
            let t = Instant::now();
            let pushed = reader.push(&mut opener, buf);
            self.metrics()
                .host_crypto_seconds
                .inc_by(t.elapsed().as_secs_f64());
            // The header against the slot's shapes and batch limit first:
            // a message decodes only to the size its circuit allows.
            let check = |head: &MsgHead| check_message(head, &expect);
            let msg = match pushed {
                Ok(None) => {
                    // Decode what has arrived while the next cells travel.
                    let Some((prefix, total)) = reader.partial() else {
                        continue;
                    };
                    let t = Instant::now();
                    let fed = incoming.feed(prefix, total, check);
                    self.metrics()
                        .host_codec_seconds
                        .inc_by(t.elapsed().as_secs_f64());
                    if let Err(e) = fed {
                        report(ErrorCode::BadMessage, e.to_string()).await;
                        return End::Failed(e.to_string());
                    }
                    continue;
                }
                Ok(Some(m)) => m,
                Err(e) => {
                    report(ErrorCode::BadMessage, format!("cell refused: {e}")).await;
                    return End::Failed(format!("cell refused: {e}"));
                }
            };
            if let Some(tap) = &self.tap {
                tap.plaintext(self.me, &msg);
            }
            let t = Instant::now();
            let decoded = incoming.finish(&msg, check);
            self.metrics()
                .host_codec_seconds
                .inc_by(t.elapsed().as_secs_f64());
            let job = match decoded {
                Ok(j) => j,
                Err(e) => {
                    report(ErrorCode::BadMessage, e.to_string()).await;
                    return End::Failed(e.to_string());
                }
            };
            reader.recycle(msg);
            // Everything on the forward ring waits for the backward passes
            // the client sent before it: training equals local training.
            let kind = match &job {
                JobMsg::Forward { step, .. } => Kind::Forward(*step),
                JobMsg::Backward { step, .. } => Kind::Backward(*step),
                JobMsg::State {
                    op: StateOp::Restore,
                    ..
                } => Kind::Restore,
                _ => Kind::Other,
            };
            // The last checkpoint is stored before the slot moves on.
            if let Err(e) = storing.wait().await {
                report(ErrorCode::Compute, e.clone()).await;
                return End::Failed(e);
            }
            if let Err(why) = slot.turn(kind, self.timeouts.idle).await {
                report(ErrorCode::Compute, why.into()).await;
                return End::Failed(why.into());
            }
            let finish = matches!(
                job,
                JobMsg::Control {
                    op: ControlOp::Finish,
                    ..
                }
            );
            // A step goes straight to the slot's worker thread and is
            // awaited here; anything else may touch storage and runs on a
            // blocking thread.
            let t = Instant::now();
            let mut to_store = None;
            let out = match host.start(&a.body.slot_id, slot, a, job) {
                Ok(Started::Queued(q)) => q.output().await,
                Ok(Started::Blocking(job)) => {
                    let (host, a, slot) = (host.clone(), a.clone(), slot.clone());
                    tokio::task::spawn_blocking(move || {
                        host.process(&a.body.slot_id, &slot, &a, job, &keys)
                    })
                    .await
                    .unwrap_or_else(|e| Err(HostError::Compute(e.to_string())))
                    .map(|p| {
                        to_store = p.store;
                        p.reply
                    })
                }
                Err(e) => Err(e),
            };
            self.metrics()
                .host_compute_seconds
                .inc_by(t.elapsed().as_secs_f64());
            slot.finished(kind, out.is_ok());
            let out = match out {
                Ok(m) => m,
                Err(e) => {
                    let code = match e {
                        HostError::BadMessage(_) => ErrorCode::BadMessage,
                        _ => ErrorCode::Compute,
                    };
                    report(code, e.to_string()).await;
                    return End::Failed(e.to_string());
                }
            };
            // Encoded a cell's worth at a time, straight into each cell as
            // it is sealed: the first cells travel while the rest are made.
            let codec_nanos = AtomicU64::new(0);
            let mut source = match out.encoding() {
                Ok(e) => Timed {
                    inner: e,
                    spent: &codec_nanos,
                },
                Err(e) => {
                    report(ErrorCode::Compute, e.to_string()).await;
                    return End::Failed(e.to_string());
                }
            };
            let mut message = match MessageCells::from_source(&mut sealer, &mut source) {
                Ok(m) => m,
                Err(e) => {
                    report(ErrorCode::Compute, e.to_string()).await;
                    return End::Failed(e.to_string());
                }
            };
            let total = message.total();
            while message.remaining() > 0 {
                let mut cell = writer.buffer();
                let t = Instant::now();
                let sealed = message.seal_next(wire::cell_of_mut(&mut cell));
                let encoding = Duration::from_nanos(codec_nanos.swap(0, Ordering::Relaxed));
                self.metrics()
                    .host_codec_seconds
                    .inc_by(encoding.as_secs_f64());
                self.metrics()
                    .host_crypto_seconds
                    .inc_by(t.elapsed().saturating_sub(encoding).as_secs_f64());
                if let Err(e) = sealed {
                    report(ErrorCode::Compute, e.to_string()).await;
                    return End::Failed(e.to_string());
                }
                if let Err(e) = writer.send(cell, self.timeouts.idle).await {
                    return End::NextHop(e);
                }
            }
            if let Err(e) = writer.flush(self.timeouts.idle).await {
                return End::NextHop(e);
            }
            if let Some(stored) = to_store {
                storing.start(host, stored);
            }
            self.metrics().cells_relayed.inc_by(total as u64);
            self.metrics()
                .bytes_relayed
                .inc_by((total * CELL_BYTES) as u64);
            if finish {
                tracing::info!(event = "slot_checkpointed", slot = %hex::encode(a.body.slot_id), reason = "finish");
            }
        }
    }
}

/// A checkpoint being stored on a blocking thread while its reply
/// travels on: one at a time, waited for before the slot's next message.
#[derive(Default)]
struct Storing(Option<tokio::task::JoinHandle<Result<(), HostError>>>);

impl Storing {
    fn start(&mut self, host: &Arc<Host>, stored: StoredSlot) {
        let host = host.clone();
        self.0 = Some(tokio::task::spawn_blocking(move || {
            host.store_checkpoint(&stored)
        }));
    }

    /// Waits for the checkpoint being stored, if any; its error in words.
    async fn wait(&mut self) -> Result<(), String> {
        let Some(task) = self.0.take() else {
            return Ok(());
        };
        match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("storing the slot's checkpoint: {e}")),
            Err(e) => Err(format!("storing the slot's checkpoint: {e}")),
        }
    }
}

/// A message source that adds the nanoseconds it takes to `spent`: a
/// host's encoding happens inside sealing, and the two are counted apart.
pub(crate) struct Timed<'a, S> {
    pub inner: S,
    pub spent: &'a AtomicU64,
}

impl<S: MessageSource> MessageSource for Timed<'_, S> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn fill(&mut self, dst: &mut [u8]) {
        let t = Instant::now();
        self.inner.fill(dst);
        let nanos = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.spent.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Writes cells to the next hop on its own task, so that sealing the next
/// cell overlaps with sending this one. Bounded: at most a few cells wait.
struct CellWriter {
    tx: tokio::sync::mpsc::Sender<WriterCmd>,
    spare: tokio::sync::mpsc::Receiver<Vec<u8>>,
    task: Option<tokio::task::JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
}

enum WriterCmd {
    Cell(Vec<u8>),
    Flush(tokio::sync::oneshot::Sender<()>),
    Teardown,
}

impl CellWriter {
    fn spawn(mut down_w: WriteHalf<Stream>, cid: u64) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<WriterCmd>(4);
        let (spare_tx, spare) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let error = Arc::new(Mutex::new(None));
        let err = error.clone();
        let task = tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                let r = match cmd {
                    WriterCmd::Cell(mut cell) => {
                        let r = wire::write_cell_frame(&mut down_w, cid, &mut cell).await;
                        let _ = spare_tx.try_send(cell);
                        r
                    }
                    WriterCmd::Flush(done) => {
                        let r = futures::AsyncWriteExt::flush(&mut down_w)
                            .await
                            .map_err(WireError::from);
                        let _ = done.send(());
                        r
                    }
                    WriterCmd::Teardown => {
                        let _ = wire::write_teardown(&mut down_w, cid).await;
                        return;
                    }
                };
                if let Err(e) = r {
                    *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    return;
                }
            }
        });
        Self {
            tx,
            spare,
            task: Some(task),
            error,
        }
    }

    fn failure(&self) -> String {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the writer stopped".into())
    }

    /// A cell frame's buffer (`CELL_FRAME_BYTES`), reused when one has
    /// come back.
    fn buffer(&mut self) -> Vec<u8> {
        self.spare
            .try_recv()
            .unwrap_or_else(|_| vec![0u8; wire::CELL_FRAME_BYTES])
    }

    /// Queue a cell; fails if the next hop has taken no cells for `timeout`.
    async fn send(&mut self, cell: Vec<u8>, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.tx.send(WriterCmd::Cell(cell))).await {
            Ok(r) => r.map_err(|_| self.failure()),
            Err(_) => Err("the next hop stopped reading".into()),
        }
    }

    /// Wait until every cell sent so far is written and flushed.
    async fn flush(&mut self, timeout: Duration) -> Result<(), String> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        let flushed = async move {
            tx.send(WriterCmd::Flush(done)).await.map_err(|_| ())?;
            wait.await.map_err(|_| ())
        };
        match tokio::time::timeout(timeout, flushed).await {
            Ok(Ok(())) => {}
            Ok(Err(())) => return Err(self.failure()),
            Err(_) => return Err("the next hop stopped reading".into()),
        }
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn teardown(&mut self) {
        let _ = self.tx.send(WriterCmd::Teardown).await;
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for CellWriter {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn upstream_pump(
    mut down_r: ReadHalf<Stream>,
    up_w: UpWriter,
    cid: u64,
    circuit: CancellationToken,
    downstream_done: CancellationToken,
    sealed_broken: Vec<u8>,
) {
    // Only one frame ever travels upstream: an error report (or nothing,
    // when the circuit ends).
    let mut buf = Vec::new();
    {
        let frame = tokio::select! {
            biased;
            _ = circuit.cancelled() => return,
            f = wire::read_frame(&mut down_r, &mut buf) => f,
        };
        match frame {
            Ok((_, FrameKind::Error)) => {
                let mut w = up_w.lock().await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    wire::write_error(&mut *w, cid, &buf),
                )
                .await;
                drop(w);
                circuit.cancel();
            }
            Ok(_) => {
                // Only errors travel upstream.
                circuit.cancel();
            }
            Err(_) => {
                if !downstream_done.is_cancelled() {
                    let mut w = up_w.lock().await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        wire::write_error(&mut *w, cid, &sealed_broken),
                    )
                    .await;
                    circuit.cancel();
                }
            }
        }
    }
}
