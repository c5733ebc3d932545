//! The slots a layer host serves: admission, owner checks, computation and
//! checkpoints.
//!
//! A slot lives in sled between jobs and in memory while circuits use it.
//! The forward and backward circuits of one job share the in-memory slot.
//! A circuit that breaks evicts it, so the next job starts again from the
//! last checkpoint, never from half-applied steps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mixnn_model::{DecodeLimits, HostTensor, InputGrad, ModelError, Slot, SlotOp, SlotWorker};
use thiserror::Error;
use tokio::sync::oneshot;

use super::admission::{choose_victim, SlotRules};
use super::budget::{self, MemoryBudget, OverBudget, Reservation};
use super::payload::{
    open_state, seal_slot_report, seal_state, Assignment, ControlOp, Direction, JobMsg, MsgHead,
    MsgKind, PayloadError, SlotReport, StateOp,
};
use super::session::{self, Action, Kind, SlotSession, Ticket};
use crate::metrics::Metrics;
use crate::store::{unix_now, Lease, SlotId, SlotMeta, SlotStore, StoreError, StoredSlot};

/// Hard cap on the rows of one batch, whatever the client asks.
pub const MAX_BATCH: u32 = 16_384;
/// Hard cap on one tensor message (elements).
pub const MAX_TENSOR_ELEMENTS: usize = 64 << 20;

#[derive(Debug, Error)]
pub enum HostError {
    #[error("slot refused: {0}")]
    Refused(String),
    #[error("this host holds no such slot (it was never created here, or its lease ended, or it was released)")]
    NoSuchSlot,
    #[error("the slot belongs to another owner")]
    NotOwner,
    #[error("message refused: {0}")]
    BadMessage(String),
    #[error("computation failed: {0}")]
    Compute(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<PayloadError> for HostError {
    fn from(e: PayloadError) -> Self {
        HostError::BadMessage(e.to_string())
    }
}

/// A tensor's shape against `[1..=max_batch, want]`.
fn check_rows(t: &HostTensor, want: usize, max_batch: u32) -> Result<(), HostError> {
    if batch_rows(&t.shape, want, max_batch).is_none() {
        return Err(HostError::BadMessage(format!(
            "tensor of shape {:?} where 1..={max_batch} rows of {want} values were expected",
            t.shape
        )));
    }
    Ok(())
}

/// A message's reply from [`Host::process`].
pub struct Processed {
    pub reply: JobMsg,
    /// A checkpoint's new version of the slot, to store with
    /// [`Host::store_checkpoint`] after the reply is sent and before the
    /// slot's next message.
    pub store: Option<StoredSlot>,
}

/// The slot `s` at its current version, holding `state`, as stored.
fn stored(id: &SlotId, s: &HostedSlot, state: Vec<u8>) -> StoredSlot {
    StoredSlot {
        id: *id,
        owner: s.owner,
        version: s.version,
        param_count: s.slot.spec().param_count() as u64,
        lease: s.lease,
        state,
    }
}

/// What [`Host::start`] did with a message.
pub enum Started {
    /// On the slot's worker; [`Queued::output`] waits for it.
    Queued(Queued),
    /// Not a step: run it with [`Host::process`] on a blocking thread.
    Blocking(JobMsg),
}

/// A step on its way through the slot's worker.
pub struct Queued {
    rx: oneshot::Receiver<Result<HostTensor, ModelError>>,
    then: Then,
}

enum Then {
    Forward(u64),
    Infer(u64),
    Backward { step: u64, first: bool },
}

impl Queued {
    /// The message for the next hop, once the worker has computed it.
    pub async fn output(self) -> Result<JobMsg, HostError> {
        let out = self
            .rx
            .await
            .map_err(|_| HostError::Compute("the slot worker stopped".into()))?
            .map_err(|e| HostError::Compute(e.to_string()))?;
        Ok(match self.then {
            Then::Forward(step) => JobMsg::Forward { step, tensor: out },
            Then::Infer(step) => JobMsg::Infer { step, tensor: out },
            Then::Backward { step, first: true } => JobMsg::Ack { step },
            Then::Backward { step, first: false } => JobMsg::Backward { step, tensor: out },
        })
    }
}

/// CPU time a slot's worker threads spent, read on the worker thread each
/// time it answers (the CPU it used since its previous answer).
#[derive(Default)]
pub struct WorkerCpu {
    /// The thread's CPU clock at its last answer, nanoseconds.
    last: std::sync::atomic::AtomicU64,
    /// CPU time between answers, nanoseconds, summed.
    total: std::sync::atomic::AtomicU64,
}

impl WorkerCpu {
    /// Called on the worker thread as it answers: the nanoseconds it used
    /// since its previous answer.
    fn record(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(now) = crate::cpu::thread_cpu_ns() else {
            return 0;
        };
        let last = self.last.swap(now, Relaxed);
        // A new worker thread (after a restore) starts its clock again.
        let used = if now >= last { now - last } else { now };
        self.total.fetch_add(used, Relaxed);
        used
    }

    /// Seconds of CPU the worker threads used for the steps so far.
    pub fn seconds(&self) -> f64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
    }
}

/// A slot in memory with what the host knows about it.
pub struct HostedSlot {
    /// The slot on its own compute thread (it keeps dfdx's tape from a
    /// forward pass to its backward pass).
    pub slot: SlotWorker,
    pub owner: [u8; 32],
    pub version: u64,
    pub lease: Lease,
}

/// A slot's order of service and the messages waiting their turn.
struct Order {
    session: SlotSession,
    waiting: HashMap<Ticket, oneshot::Sender<Result<(), &'static str>>>,
}

impl Order {
    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Wake(t) => {
                    if let Some(tx) = self.waiting.remove(&t) {
                        let _ = tx.send(Ok(()));
                    }
                }
                Action::Fail(t, why) => {
                    if let Some(tx) = self.waiting.remove(&t) {
                        let _ = tx.send(Err(why));
                    }
                }
                Action::Run | Action::Wait(_) | Action::Refuse(_) => {}
            }
        }
    }
}

/// A slot shared by the circuits of one run of a job (one session): the
/// slot itself, and its [`SlotSession`] deciding when each message runs.
pub struct SlotCell {
    state: Mutex<HostedSlot>,
    order: Mutex<Order>,
    /// The run whose circuits bound this copy.
    session: [u8; 16],
    /// What this copy holds in the node's memory budget, and the largest
    /// batch that covers; returned when the copy is dropped.
    memory: Mutex<(Reservation, u32)>,
    /// CPU its worker used on steps started with [`Host::start`].
    pub worker_cpu: Arc<WorkerCpu>,
}

impl SlotCell {
    fn new(s: HostedSlot, session: [u8; 16], memory: Reservation, batch: u32) -> Self {
        Self {
            state: Mutex::new(s),
            order: Mutex::new(Order {
                session: SlotSession::new(),
                waiting: HashMap::new(),
            }),
            session,
            memory: Mutex::new((memory, batch)),
            worker_cpu: Arc::default(),
        }
    }

    /// Make the copy's reservation cover batches of `max_batch` rows (a
    /// circuit that asks for more than the ones before it).
    fn cover(&self, hosted: &HostedSlot, max_batch: u32) -> Result<(), OverBudget> {
        let mut m = lock(&self.memory);
        if max_batch > m.1 {
            let need = budget::slot_bytes(&hosted.slot.spec(), &hosted.slot.optimizer(), max_batch);
            m.0.grow_to(need)?;
            m.1 = max_batch;
        }
        Ok(())
    }

    /// Bytes this copy holds in the memory budget.
    pub fn reserved(&self) -> u64 {
        lock(&self.memory).0.bytes()
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, HostedSlot> {
        lock(&self.state)
    }

    /// Whether a later run took this slot over (or its owner released it).
    pub fn is_retired(&self) -> bool {
        lock(&self.order).session.is_retired()
    }

    /// Retire the copy while its slot lock is held by the caller.
    fn retire_locked(&self) {
        let mut o = lock(&self.order);
        let actions = o.session.retire();
        o.apply(actions);
    }

    fn retire(&self) {
        // Under the slot's lock: a message being processed finishes first,
        // and none starts after.
        let _g = self.lock();
        self.retire_locked();
    }

    /// Wait for the turn of a message of `kind` (at most `timeout`): a
    /// forward pass, an evaluation or a checkpoint runs once every training
    /// step that went forward has come back. The error says why it may not
    /// run.
    pub async fn turn(&self, kind: Kind, timeout: Duration) -> Result<(), &'static str> {
        let deadline = std::time::Instant::now() + timeout;
        let (ticket, rx) = {
            let mut o = lock(&self.order);
            match o.session.arrive(kind, deadline) {
                Action::Run => return Ok(()),
                Action::Refuse(why) => return Err(why),
                Action::Wait(t) => {
                    let (tx, rx) = oneshot::channel();
                    o.waiting.insert(t, tx);
                    (t, rx)
                }
                Action::Wake(_) | Action::Fail(..) => return Err(session::RETIRED),
            }
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(session::RETIRED),
            Err(_) => {
                let mut o = lock(&self.order);
                o.session.cancel(ticket);
                o.waiting.remove(&ticket);
                let actions = o.session.tick(std::time::Instant::now());
                o.apply(actions);
                Err(session::NEVER_SETTLED)
            }
        }
    }

    /// A message of `kind` finished running; call it before its output
    /// leaves, so the next step's messages find the slot's order current.
    pub fn finished(&self, kind: Kind, ok: bool) {
        let mut o = lock(&self.order);
        let actions = o.session.finished(kind, ok);
        o.apply(actions);
    }
}

pub type SharedSlot = Arc<SlotCell>;

/// Keys a host shares with the owner on one circuit.
#[derive(Clone, Copy)]
pub struct OwnerKeys {
    /// Seals slot reports.
    pub report: [u8; 32],
    /// Seals this host's state to the owner (checkpoints).
    pub state_up: [u8; 32],
    /// Opens states the owner sealed to this host (restores).
    pub state_down: [u8; 32],
}

/// Admission policy of this host.
#[derive(Clone, Copy, Debug)]
pub struct HostPolicy {
    pub slots: u32,
    pub max_params: u64,
    /// The longest lease this host grants, in seconds.
    pub max_lease_secs: u64,
    /// A slot its owner has not used for this long may go to a newcomer.
    pub idle_secs: u64,
}

impl HostPolicy {
    pub fn rules(&self) -> SlotRules {
        SlotRules {
            idle_secs: self.idle_secs,
        }
    }
}

/// All slots this host serves right now.
pub struct Host {
    store: Arc<dyn SlotStore>,
    policy: HostPolicy,
    live: Mutex<HashMap<SlotId, SharedSlot>>,
    budget: Arc<MemoryBudget>,
    metrics: Metrics,
    /// The slots on offer at the last sweep.
    last_offer: std::sync::atomic::AtomicU32,
    /// Signalled when a slot's lease or use changed: the lease sweeper
    /// looks again.
    pub changed: tokio::sync::Notify,
}

/// What the host tells the owner about a slot.
fn slot_report(id: &SlotId, s: &HostedSlot) -> Result<SlotReport, HostError> {
    let compute = |e: mixnn_model::ModelError| HostError::Compute(e.to_string());
    Ok(SlotReport {
        slot_id: *id,
        version: s.version,
        steps_applied: s.slot.steps_applied().map_err(compute)?,
        params_digest: s.slot.params_digest().map_err(compute)?,
        lease_until: s.lease.until,
    })
}

/// A lease within this of what a use asks is not written again.
const TOUCH_EVERY_SECS: u64 = 60;

/// What a sweep of the leases decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Slots to free now, with whether their setup ever completed.
    pub expired: Vec<(SlotId, bool)>,
    /// The earliest end of a lease still running among the slots not in
    /// use (unix seconds); [`Host::sweep`] also counts the next time a
    /// slot may go to a newcomer.
    pub next: Option<u64>,
    /// The slots on offer changed since the last sweep (some may now go to
    /// a newcomer): the descriptor should say so.
    pub offer_changed: bool,
}

/// Which slots to free at `now`: those whose lease ended and that no
/// circuit uses. Pure.
pub fn plan_sweep(metas: &[SlotMeta], in_use: impl Fn(&SlotId) -> bool, now: u64) -> Sweep {
    let mut sweep = Sweep::default();
    for m in metas.iter().filter(|m| !in_use(&m.id)) {
        if m.lease.expired(now) {
            sweep.expired.push((m.id, m.lease.confirmed));
        } else {
            sweep.next = Some(
                sweep
                    .next
                    .map_or(m.lease.until, |n: u64| n.min(m.lease.until)),
            );
        }
    }
    sweep
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Host {
    pub fn new(
        store: Arc<dyn SlotStore>,
        policy: HostPolicy,
        budget: Arc<MemoryBudget>,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            policy,
            live: Mutex::new(HashMap::new()),
            budget,
            metrics,
            last_offer: std::sync::atomic::AtomicU32::new(u32::MAX),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The lease a use asks for, capped by this host's maximum.
    fn lease_secs(&self, body: &super::payload::AssignmentBody) -> u64 {
        body.lease_secs.min(self.policy.max_lease_secs)
    }

    /// Free every slot whose lease ended at `now` and that no circuit
    /// uses. Returns what was freed and when to look again.
    pub fn sweep(&self, now: u64) -> Result<Sweep, HostError> {
        let mut sweep = {
            // Under the live lock: no bind loads a slot while it is removed.
            let live = lock(&self.live);
            let metas = self.store.list_slots()?;
            let mut sweep = plan_sweep(&metas, |id| live.contains_key(id), now);
            for (id, confirmed) in &sweep.expired {
                if self.store.remove_slot(id)? {
                    let reason = if *confirmed { "expired" } else { "setup" };
                    self.metrics.slot_freed(reason);
                    tracing::info!(event = "slot_freed", slot = %hex::encode(id), reason);
                }
            }
            if let Some(t) = super::admission::next_reclaim(&metas, now, self.policy.rules()) {
                sweep.next = Some(sweep.next.map_or(t, |n| n.min(t)));
            }
            sweep
        };
        let offer = self.free_slots(now)?;
        sweep.offer_changed = self
            .last_offer
            .swap(offer, std::sync::atomic::Ordering::Relaxed)
            != offer;
        Ok(sweep)
    }

    /// Free a slot at its owner's request (the caller checked the owner).
    fn free(&self, id: &SlotId, cell: &SharedSlot) -> Result<bool, HostError> {
        let mut live = lock(&self.live);
        if live.get(id).is_some_and(|s| Arc::ptr_eq(s, cell)) {
            live.remove(id);
        }
        let freed = self.store.remove_slot(id)?;
        // The sweeper counts the slots again and advertises the free one.
        self.changed.notify_one();
        if freed {
            self.metrics.slot_freed("released");
            tracing::info!(event = "slot_freed", slot = %hex::encode(id), reason = "released");
        }
        Ok(freed)
    }

    /// Record the owner's use of the slot at `now`: the lease grows to
    /// what the use asks, and a new slot's setup counts as completed.
    fn touch(
        &self,
        id: &SlotId,
        s: &mut HostedSlot,
        lease_secs: u64,
        now: u64,
    ) -> Result<(), HostError> {
        // At most one write a minute while a slot is in use: when its
        // lease should grow, or its last use is a minute old.
        let wanted = now.saturating_add(lease_secs);
        let grows = !s.lease.confirmed || s.lease.until.saturating_add(TOUCH_EVERY_SECS) < wanted;
        let stale = now >= s.lease.last_used.saturating_add(TOUCH_EVERY_SECS);
        if lease_secs == 0 || !(grows || stale) {
            return Ok(());
        }
        s.lease = s.lease.extended(now, lease_secs);
        self.store.set_lease(id, s.lease)?;
        Ok(())
    }

    fn no_memory(&self, max_batch: u32, e: OverBudget) -> HostError {
        tracing::info!(
            event = "slot_refused",
            reason = "memory",
            max_batch,
            needed = e.needed,
            free = e.free
        );
        HostError::Refused(format!(
            "the slot does not fit in memory at batches of {max_batch}: {e}"
        ))
    }

    /// The node's memory budget.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    /// The slots this host offers at `now`: free ones and those a newcomer
    /// may take over (none that a circuit uses).
    pub fn free_slots(&self, now: u64) -> Result<u32, HostError> {
        let live = lock(&self.live);
        let metas = self.store.list_slots()?;
        let kept = metas
            .iter()
            .filter(|m| {
                live.contains_key(&m.id)
                    || !super::admission::reclaimable(m, now, self.policy.rules())
            })
            .count() as u32;
        Ok(self.policy.slots.saturating_sub(kept))
    }

    fn not_owner(&self) -> HostError {
        self.metrics.slot_owner_refused.inc();
        HostError::NotOwner
    }

    pub fn store(&self) -> &Arc<dyn SlotStore> {
        &self.store
    }

    /// Bind a circuit to the slot its assignment names, creating the slot
    /// if the assignment asks and the host has room. Returns the slot and
    /// whether it was created.
    pub fn bind(
        &self,
        a: &Assignment,
        hop_onion_key: &[u8; 32],
    ) -> Result<(SharedSlot, bool), HostError> {
        a.verify(hop_onion_key)
            .map_err(|e| HostError::Refused(e.to_string()))?;
        let body = &a.body;
        if body.max_batch == 0 || body.max_batch > MAX_BATCH {
            return Err(HostError::Refused(format!(
                "max batch {} outside 1..={MAX_BATCH}",
                body.max_batch
            )));
        }
        let now = unix_now();
        let lease_secs = self.lease_secs(body);
        let mut live = lock(&self.live);
        if let Some(s) = live.get(&body.slot_id) {
            let mut hosted = s.lock();
            if hosted.owner != body.owner {
                return Err(self.not_owner());
            }
            // Inference reads whatever copy is live; circuits of one run
            // share it; a new run retires the circuits of the old one and
            // starts again from the last checkpoint.
            if body.infer_only || s.session == body.session {
                s.cover(&hosted, body.max_batch)
                    .map_err(|e| self.no_memory(body.max_batch, e))?;
                if hosted.lease.confirmed {
                    self.touch(&body.slot_id, &mut hosted, lease_secs, now)?;
                }
                drop(hosted);
                return Ok((s.clone(), false));
            }
            drop(hosted);
            s.retire();
            live.remove(&body.slot_id);
        }
        if let Some(meta) = self.store.get_meta(&body.slot_id)? {
            if meta.owner != body.owner {
                return Err(self.not_owner());
            }
            // Room to read it (its state twice, its parameters four times)
            // before reading it; then exactly what it costs at this batch.
            let mut memory = self
                .budget
                .reserve(budget::slot_resident_bytes(
                    meta.param_count,
                    0,
                    meta.state_len,
                ))
                .map_err(|e| self.no_memory(body.max_batch, e))?;
            let stored = self.store.get_slot(&body.slot_id).inspect_err(|e| {
                if matches!(e, StoreError::Corrupt { .. }) {
                    self.metrics.slots_corrupt.inc();
                    tracing::error!(event = "slot_corrupt", slot = %hex::encode(body.slot_id), error = %e);
                }
            })?;
            let Some(stored) = stored else {
                return Err(HostError::NoSuchSlot);
            };
            if stored.owner != body.owner {
                return Err(self.not_owner());
            }
            let slot = Slot::from_bytes(&stored.state)
                .map_err(|e| HostError::Refused(format!("stored slot is unreadable: {e}")))?;
            memory
                .set(budget::slot_bytes(
                    slot.spec(),
                    slot.optimizer(),
                    body.max_batch,
                ))
                .map_err(|e| self.no_memory(body.max_batch, e))?;
            let slot = SlotWorker::spawn(slot)
                .map_err(|e| HostError::Refused(format!("stored slot is unreadable: {e}")))?;
            let shared = Arc::new(SlotCell::new(
                HostedSlot {
                    slot,
                    owner: stored.owner,
                    version: stored.version,
                    lease: stored.lease,
                },
                body.session,
                memory,
                body.max_batch,
            ));
            {
                let mut hosted = shared.lock();
                if hosted.lease.confirmed {
                    self.touch(&body.slot_id, &mut hosted, lease_secs, now)?;
                }
            }
            live.insert(body.slot_id, shared.clone());
            return Ok((shared, false));
        }
        let Some(create) = &body.create else {
            return Err(HostError::NoSuchSlot);
        };
        if body.infer_only || body.direction != Direction::Forward {
            return Err(HostError::Refused(
                "a slot is created by a training forward circuit".into(),
            ));
        }
        create
            .stage
            .validate()
            .map_err(|e| HostError::Refused(format!("invalid stage: {e}")))?;
        let params = create.stage.param_count() as u64;
        if params > self.policy.max_params {
            return Err(HostError::Refused(format!(
                "the layer has {params} parameters, more than the {} this host accepts",
                self.policy.max_params
            )));
        }
        if !body.has_work(hop_onion_key) {
            return Err(HostError::Refused(format!(
                "the claim does not carry its proof of work ({} bits for this slot's size)",
                body.work_bits()
            )));
        }
        // Memory first: a claim that cannot be served takes no one's place.
        let memory = self
            .budget
            .reserve(budget::slot_bytes(
                &create.stage,
                &create.optimizer,
                body.max_batch,
            ))
            .map_err(|e| self.no_memory(body.max_batch, e))?;
        let mut metas = self.store.list_slots()?;
        while metas.len() as u32 >= self.policy.slots {
            let victim =
                choose_victim(&metas, |id| live.contains_key(id), now, self.policy.rules());
            let Some(victim) = victim else {
                return Err(HostError::Refused(format!(
                    "all {} slots are taken and in use",
                    self.policy.slots
                )));
            };
            if self.store.remove_slot(&victim)? {
                self.metrics.slot_freed("evicted");
                tracing::info!(event = "slot_freed", slot = %hex::encode(victim), reason = "evicted");
            }
            metas.retain(|m| m.id != victim);
        }
        let slot = Slot::new(&create.stage, create.init, create.optimizer)
            .and_then(SlotWorker::spawn)
            .map_err(|e| HostError::Refused(format!("cannot create the slot: {e}")))?;
        let hosted = HostedSlot {
            slot,
            owner: body.owner,
            version: 0,
            // Short until the job's first message: a setup that never
            // completes frees the slot within a minute.
            lease: Lease::provisional(now),
        };
        // Claim the slot on disk at once, so a restart keeps it.
        let state = hosted
            .slot
            .to_bytes()
            .map_err(|e| HostError::Compute(e.to_string()))?;
        self.persist(&body.slot_id, &hosted, state)?;
        let shared = Arc::new(SlotCell::new(hosted, body.session, memory, body.max_batch));
        live.insert(body.slot_id, shared.clone());
        self.changed.notify_one();
        Ok((shared, true))
    }

    /// Store `state` as the slot's current version; gives it back.
    fn persist(&self, id: &SlotId, s: &HostedSlot, state: Vec<u8>) -> Result<Vec<u8>, HostError> {
        let stored = stored(id, s, state);
        self.store.put_slot(&stored)?;
        Ok(stored.state)
    }

    /// Store a checkpoint that [`Host::process`] left to be stored once
    /// its reply is on its way ([`Processed::store`]). Blocking.
    pub fn store_checkpoint(&self, slot: &StoredSlot) -> Result<(), HostError> {
        self.store.put_slot(slot)?;
        Ok(())
    }

    /// Persist the slot's current state as a new version.
    fn checkpoint(&self, id: &SlotId, s: &mut HostedSlot) -> Result<Vec<u8>, HostError> {
        let state = s
            .slot
            .to_bytes()
            .map_err(|e| HostError::Compute(e.to_string()))?;
        s.version += 1;
        self.persist(id, s, state)
    }

    /// Forget the in-memory copy `slot` (if it is still the live one): the
    /// next bind reloads the last checkpoint.
    pub fn evict(&self, id: &SlotId, slot: &SharedSlot) {
        let mut live = lock(&self.live);
        if live.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            live.remove(id);
            self.changed.notify_one();
        }
    }

    /// Drop the in-memory copy after a clean end of the job.
    pub fn release(&self, id: &SlotId, slot: &SharedSlot) {
        self.evict(id, slot)
    }

    /// Start one message on the slot without blocking: a training step or
    /// an inference goes to the slot's worker thread at once (with the same
    /// checks, under the same lock, as in [`Host::process`]) and its result
    /// comes back on a channel; every other message is handed back for
    /// [`Host::process`] on a blocking thread (it may touch storage).
    pub fn start(
        &self,
        slot_id: &SlotId,
        shared: &SharedSlot,
        a: &Assignment,
        msg: JobMsg,
    ) -> Result<Started, HostError> {
        let body = &a.body;
        let (op, then) = match (msg, body.direction) {
            (JobMsg::Forward { step, tensor }, Direction::Forward) if !body.infer_only => (
                SlotOp::Forward {
                    step,
                    input: tensor,
                },
                Then::Forward(step),
            ),
            (JobMsg::Infer { step, tensor }, Direction::Forward) => {
                (SlotOp::Infer { input: tensor }, Then::Infer(step))
            }
            (JobMsg::Backward { step, tensor }, Direction::Backward) if !body.infer_only => (
                SlotOp::Backward {
                    step,
                    grad_out: tensor,
                    input_grad: if body.first {
                        // The first stage answers with an ack, not a gradient.
                        InputGrad::None
                    } else if body.skip_zero_inputs {
                        InputGrad::SkipZeroInputs
                    } else {
                        InputGrad::Full
                    },
                },
                Then::Backward {
                    step,
                    first: body.first,
                },
            ),
            (m, _) => return Ok(Started::Blocking(m)),
        };
        let mut s = shared.lock();
        if shared.is_retired() {
            return Err(HostError::Refused(
                "a later run of the job took this slot over".into(),
            ));
        }
        self.touch(slot_id, &mut s, self.lease_secs(body), unix_now())?;
        let (tensor, want) = match &op {
            SlotOp::Forward { input, .. } | SlotOp::Infer { input } => (input, s.slot.input_dim()),
            SlotOp::Backward { grad_out, .. } => (grad_out, s.slot.output_dim()),
        };
        check_rows(tensor, want, body.max_batch)?;
        let (tx, rx) = oneshot::channel();
        let cpu = shared.worker_cpu.clone();
        let cpu_metric = self.metrics.host_worker_cpu_seconds.clone();
        s.slot
            .submit(op, move |r| {
                cpu_metric.inc_by(cpu.record() as f64 / 1e9);
                let _ = tx.send(r);
            })
            .map_err(|e| HostError::Compute(e.to_string()))?;
        Ok(Started::Queued(Queued { rx, then }))
    }

    /// Run one message through the slot. Returns the message for the next
    /// hop. Blocking (dfdx computes on this thread).
    ///
    /// A checkpoint's state is sealed into the reply at once, and the new
    /// version is left in [`Processed::store`] for the caller to store
    /// once the reply is on its way: the job's client holds the
    /// checkpoint as soon as the reply reaches it, and the host's copy
    /// is stored meanwhile, before the slot takes its next message.
    pub fn process(
        &self,
        slot_id: &SlotId,
        shared: &SharedSlot,
        a: &Assignment,
        msg: JobMsg,
        keys: &OwnerKeys,
    ) -> Result<Processed, HostError> {
        let mut store = None;
        let body = &a.body;
        let mut s = shared.lock();
        if shared.is_retired() {
            return Err(HostError::Refused(
                "a later run of the job took this slot over".into(),
            ));
        }
        // Any message of the owner's job counts as a use; status and
        // release do not extend the lease.
        let uses = !matches!(
            msg,
            JobMsg::Control {
                op: ControlOp::Digest | ControlOp::Release,
                ..
            }
        );
        if uses {
            self.touch(slot_id, &mut s, self.lease_secs(body), unix_now())?;
        }
        let check_rows = |t: &HostTensor, want: usize| check_rows(t, want, body.max_batch);
        let reply = match (msg, body.direction) {
            (JobMsg::Forward { step, tensor }, Direction::Forward) if !body.infer_only => {
                check_rows(&tensor, s.slot.input_dim())?;
                let out = s
                    .slot
                    .forward_owned(step, tensor)
                    .map_err(|e| HostError::Compute(e.to_string()))?;
                Ok(JobMsg::Forward { step, tensor: out })
            }
            (JobMsg::Infer { step, tensor }, Direction::Forward) => {
                check_rows(&tensor, s.slot.input_dim())?;
                let out = s
                    .slot
                    .infer_owned(tensor)
                    .map_err(|e| HostError::Compute(e.to_string()))?;
                Ok(JobMsg::Infer { step, tensor: out })
            }
            (JobMsg::Backward { step, tensor }, Direction::Backward) if !body.infer_only => {
                check_rows(&tensor, s.slot.output_dim())?;
                let input_grad = if body.first {
                    // The first stage answers with an ack, not a gradient.
                    InputGrad::None
                } else if body.skip_zero_inputs {
                    InputGrad::SkipZeroInputs
                } else {
                    InputGrad::Full
                };
                let grad_in = s
                    .slot
                    .backward_owned(step, tensor, input_grad)
                    .map_err(|e| HostError::Compute(e.to_string()))?;
                if body.first {
                    Ok(JobMsg::Ack { step })
                } else {
                    Ok(JobMsg::Backward {
                        step,
                        tensor: grad_in,
                    })
                }
            }
            (
                JobMsg::Control {
                    op: ControlOp::Release,
                    mut reports,
                },
                Direction::Forward,
            ) => {
                let report = SlotReport {
                    lease_until: 0,
                    ..slot_report(slot_id, &s)?
                };
                // Retired under its own lock: no message touches it again.
                shared.retire_locked();
                drop(s);
                self.free(slot_id, shared)?;
                reports.push(seal_slot_report(&keys.report, &report));
                Ok(JobMsg::Control {
                    op: ControlOp::Release,
                    reports,
                })
            }
            (JobMsg::Control { op, mut reports }, Direction::Forward) => {
                if op != ControlOp::Digest && !body.infer_only {
                    self.checkpoint(slot_id, &mut s)?;
                }
                reports.push(seal_slot_report(&keys.report, &slot_report(slot_id, &s)?));
                Ok(JobMsg::Control { op, reports })
            }
            (JobMsg::State { op, step, mut blob }, Direction::Forward) if !body.infer_only => {
                let window = body
                    .state
                    .and_then(|w| w.range().map(|r| (w, r)))
                    .filter(|(w, _)| blob.len() == w.total as usize);
                let Some((_, range)) = window else {
                    return Err(HostError::BadMessage(format!(
                        "a state message of {} bytes that does not match this circuit's state window",
                        blob.len()
                    )));
                };
                match op {
                    StateOp::Checkpoint => {
                        let applied = s
                            .slot
                            .steps_applied()
                            .map_err(|e| HostError::Compute(e.to_string()))?;
                        if applied != step {
                            return Err(HostError::Compute(format!(
                                "a checkpoint for step {step} of a slot that has applied {applied} steps"
                            )));
                        }
                        let state = s
                            .slot
                            .to_bytes()
                            .map_err(|e| HostError::Compute(e.to_string()))?;
                        seal_state(&keys.state_up, &state, &mut blob[range])
                            .map_err(|e| HostError::Compute(e.to_string()))?;
                        s.version += 1;
                        store = Some(stored(slot_id, &s, state));
                    }
                    StateOp::Restore => {
                        let state = open_state(&keys.state_down, &blob[range]).map_err(|_| {
                            HostError::BadMessage("the restored state does not open".into())
                        })?;
                        let slot = Slot::from_bytes(&state)
                            .map_err(|e| HostError::BadMessage(format!("restored state: {e}")))?;
                        if slot.spec() != &s.slot.spec()
                            || *slot.optimizer() != s.slot.optimizer()
                            || slot.steps_applied() != step
                        {
                            return Err(HostError::BadMessage(format!(
                                "the restored state is not this slot's state after step {step}"
                            )));
                        }
                        s.slot = SlotWorker::spawn(slot)
                            .map_err(|e| HostError::Compute(e.to_string()))?;
                        self.checkpoint(slot_id, &mut s)?;
                    }
                }
                Ok(JobMsg::State { op, step, blob })
            }
            (m, d) => Err(HostError::BadMessage(format!(
                "a {} message on a {:?} circuit{}",
                m.name(),
                d,
                if body.infer_only {
                    " for inference"
                } else {
                    ""
                }
            ))),
        }?;
        Ok(Processed { reply, store })
    }

    /// What messages on a circuit bound to `slot` by `a` may be.
    pub fn expect(slot: &SharedSlot, a: &Assignment) -> Expect {
        let s = slot.lock();
        let b = &a.body;
        Expect {
            inputs: s.slot.input_dim(),
            outputs: s.slot.output_dim(),
            max_batch: b.max_batch,
            direction: b.direction,
            infer_only: b.infer_only,
            state_total: b
                .state
                .filter(|w| w.range().is_some())
                .map(|w| w.total as usize),
        }
    }
}

/// What the messages of one layer host's circuit may be: tensors of the
/// slot's own sides and at most `max_batch` rows, the state message of the
/// circuit's window, control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    pub inputs: usize,
    pub outputs: usize,
    pub max_batch: u32,
    pub direction: Direction,
    pub infer_only: bool,
    /// The job's state message size, on a circuit that carries them.
    pub state_total: Option<usize>,
}

impl Expect {
    pub fn widest(&self) -> usize {
        self.inputs.max(self.outputs)
    }

    /// The longest message the circuit accepts.
    pub fn max_message(&self) -> usize {
        budget::max_message_bytes(self.widest(), self.max_batch, self.state_total.unwrap_or(0))
    }

    /// What the circuit costs in the memory budget.
    pub fn circuit_bytes(&self) -> u64 {
        budget::host_circuit_bytes(
            self.max_message(),
            self.widest(),
            self.max_batch,
            self.state_total.unwrap_or(0),
        )
    }
}

/// The rows of a tensor shaped `shape` when it holds 1..=`max_batch`
/// rows of `want` values each: `[rows, want]`, or `[rows, c, h, w]` with
/// `c·h·w = want` (a batch of images), rank 2 to 4.
pub fn batch_rows(shape: &[usize], want: usize, max_batch: u32) -> Option<usize> {
    let (&rows, rest) = shape.split_first()?;
    let per_row = rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let ok = (1..=3).contains(&rest.len())
        && per_row == want
        && (1..=max_batch as usize).contains(&rows);
    ok.then_some(rows)
}

/// Check a message's header against what its circuit may carry, before
/// anything is decoded or computed, and give the decode limits for exactly
/// that message (a sparse tensor decodes to `rows × columns` elements,
/// never more). Pure.
pub fn check_message(head: &MsgHead, e: &Expect) -> Result<DecodeLimits, HostError> {
    let tensor = |want: usize| -> Result<DecodeLimits, HostError> {
        let ok = match head.shape {
            Some((rank, dims)) if rank <= dims.len() => {
                batch_rows(&dims[..rank], want, e.max_batch).map(|rows| (rank, rows * want))
            }
            _ => None,
        };
        let Some((rank, n)) = ok.filter(|&(_, n)| n <= MAX_TENSOR_ELEMENTS) else {
            let shape = head.shape.map(|(r, d)| d[..r.min(d.len())].to_vec());
            return Err(HostError::BadMessage(format!(
                "a {} tensor of shape {:?} where 1..={} rows of {want} values were expected",
                head.kind.name(),
                shape.unwrap_or_default(),
                e.max_batch
            )));
        };
        Ok(DecodeLimits {
            max_rank: rank,
            max_elements: n,
        })
    };
    let nothing = DecodeLimits {
        max_rank: 0,
        max_elements: 0,
    };
    match (head.kind, e.direction) {
        (MsgKind::Forward, Direction::Forward) if !e.infer_only => tensor(e.inputs),
        (MsgKind::Infer, Direction::Forward) => tensor(e.inputs),
        (MsgKind::Backward, Direction::Backward) if !e.infer_only => tensor(e.outputs),
        (MsgKind::Control, Direction::Forward) => Ok(nothing),
        (MsgKind::State, Direction::Forward) if !e.infer_only => match e.state_total {
            Some(t) if head.body_len == t + 1 => Ok(nothing),
            _ => Err(HostError::BadMessage(format!(
                "a state message of {} bytes that does not match this circuit's state window",
                head.body_len.saturating_sub(1)
            ))),
        },
        (k, d) => Err(HostError::BadMessage(format!(
            "a {} message on a {:?} circuit{}",
            k.name(),
            d,
            if e.infer_only { " for inference" } else { "" }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit::payload::{AssignmentBody, SlotCreate};
    use crate::store::MemoryStore;
    use mixnn_crypto::Identity;
    use mixnn_model::{Arch, InitSpec, OptimizerSpec};

    const ONION: [u8; 32] = [8; 32];

    fn host(store: Arc<MemoryStore>) -> Host {
        Host::new(
            store,
            HostPolicy {
                slots: 4,
                max_params: 1 << 20,
                max_lease_secs: 3600,
                idle_secs: 600,
            },
            MemoryBudget::new(1 << 30, Metrics::new()),
            Metrics::new(),
        )
    }

    fn assignment(owner: &Identity, id: u8, lease_secs: u64, create: bool) -> Assignment {
        assignment_with(owner, id, lease_secs, create, None)
    }

    fn assignment_with(
        owner: &Identity,
        id: u8,
        lease_secs: u64,
        create: bool,
        state: Option<crate::circuit::payload::StateWindow>,
    ) -> Assignment {
        let stage = Arch::parse("mlp:4-3-2").expect("arch").stages().remove(0);
        let body = AssignmentBody {
            slot_id: [id; 16],
            owner: owner.public_key(),
            direction: Direction::Forward,
            infer_only: false,
            create: create.then_some(SlotCreate {
                stage,
                init: InitSpec {
                    seed: 1,
                    stage_index: 0,
                },
                optimizer: OptimizerSpec::Sgd { lr: 0.1 },
            }),
            in_key: [1; 32],
            out_key: [2; 32],
            in_suite: Default::default(),
            out_suite: Default::default(),
            first: true,
            skip_zero_inputs: false,
            max_batch: 4,
            session: [id; 16],
            state,
            lease_secs,
            nonce: rand::random(),
        };
        Assignment::sign(body, owner, &ONION).expect("sign")
    }

    fn keys() -> OwnerKeys {
        OwnerKeys {
            report: [3; 32],
            state_up: [4; 32],
            state_down: [5; 32],
        }
    }

    fn forward(step: u64) -> JobMsg {
        JobMsg::Forward {
            step,
            tensor: HostTensor {
                shape: vec![1, 4],
                data: vec![0.5; 4],
            },
        }
    }

    #[test]
    fn a_setup_that_never_ran_is_freed_after_its_grace() {
        let store = Arc::new(MemoryStore::default());
        let h = host(store.clone());
        let owner = Identity::generate();
        let (slot, created) = h
            .bind(&assignment(&owner, 1, 600, true), &ONION)
            .expect("bind");
        assert!(created);
        let now = unix_now();
        // In use: never freed, whatever the time.
        assert!(h.sweep(now + 3600).expect("sweep").expired.is_empty());
        h.evict(&[1; 16], &slot);
        let s = h.sweep(now).expect("sweep");
        assert!(s.expired.is_empty());
        assert!(s
            .next
            .is_some_and(|t| t <= now + crate::store::SETUP_GRACE_SECS + 1));
        let s = h
            .sweep(now + crate::store::SETUP_GRACE_SECS + 2)
            .expect("sweep");
        assert_eq!(s.expired, vec![([1; 16], false)]);
        assert!(store.list_slots().expect("list").is_empty());
    }

    #[test]
    fn a_used_slot_lives_out_its_capped_lease() {
        let store = Arc::new(MemoryStore::default());
        let h = host(store.clone());
        let owner = Identity::generate();
        // Asks for a day; this host grants an hour at most.
        let a = assignment(&owner, 2, 86_400, true);
        let (slot, _) = h.bind(&a, &ONION).expect("bind");
        h.process(&[2; 16], &slot, &a, forward(0), &keys())
            .expect("forward");
        h.evict(&[2; 16], &slot);
        let now = unix_now();
        let meta = store.get_meta(&[2; 16]).expect("meta").expect("slot");
        assert!(meta.lease.confirmed);
        assert!(meta.lease.until >= now + 3590 && meta.lease.until <= now + 3600);
        assert!(h.sweep(now + 3000).expect("sweep").expired.is_empty());
        assert_eq!(
            h.sweep(now + 3601).expect("sweep").expired,
            vec![([2; 16], true)]
        );
    }

    /// A checkpoint's reply carries the slot's sealed state at once; the
    /// new version comes back to be stored once the reply is on its way,
    /// and until then the store keeps the version before it.
    #[test]
    fn a_checkpoint_is_sealed_into_its_reply_and_stored_after_it() {
        let store = Arc::new(MemoryStore::default());
        let h = host(store.clone());
        let owner = Identity::generate();
        let window = crate::circuit::payload::StateWindow {
            offset: 0,
            len: 1024,
            total: 1024,
        };
        let a = assignment_with(&owner, 6, 600, true, Some(window));
        let (slot, created) = h.bind(&a, &ONION).expect("bind");
        assert!(created);
        let version = |store: &MemoryStore| {
            store
                .get_meta(&[6; 16])
                .expect("meta")
                .expect("slot")
                .version
        };
        let before = version(&store);
        let msg = JobMsg::State {
            op: StateOp::Checkpoint,
            step: 0,
            blob: vec![0; 1024],
        };
        let done = h
            .process(&[6; 16], &slot, &a, msg, &keys())
            .expect("checkpoint");
        let JobMsg::State { blob, .. } = done.reply else {
            panic!("not a state reply");
        };
        let state = open_state(&keys().state_up, &blob).expect("the sealed state opens");
        let stored = done.store.expect("a version to store");
        assert_eq!(stored.version, before + 1);
        assert_eq!(stored.state, state);
        assert_eq!(version(&store), before, "stored before the reply went");
        h.store_checkpoint(&stored).expect("store");
        let now = store.get_slot(&[6; 16]).expect("get").expect("slot");
        assert_eq!((now.version, &now.state), (before + 1, &state));
        // A step that is not a checkpoint leaves nothing to store.
        let done = h
            .process(&[6; 16], &slot, &a, forward(0), &keys())
            .expect("forward");
        assert!(done.store.is_none());
    }

    #[test]
    fn another_owner_is_refused_and_a_corrupt_slot_is_never_served() {
        let store = Arc::new(MemoryStore::default());
        let h = host(store.clone());
        let owner = Identity::generate();
        let a = assignment(&owner, 3, 600, true);
        let (slot, _) = h.bind(&a, &ONION).expect("bind");
        h.evict(&[3; 16], &slot);
        let stranger = Identity::generate();
        assert!(matches!(
            h.bind(&assignment(&stranger, 3, 600, false), &ONION),
            Err(HostError::NotOwner)
        ));
        assert!(h
            .metrics
            .render()
            .contains("mixnn_slot_owner_refused_total 1"));
        let mut bytes = store.get_slot(&[3; 16]).expect("get").expect("slot").state;
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        store.corrupt_state(&[3; 16], bytes);
        assert!(matches!(
            h.bind(&assignment(&owner, 3, 600, false), &ONION),
            Err(HostError::Store(StoreError::Corrupt { .. }))
        ));
        assert!(h.metrics.render().contains("mixnn_slots_corrupt_total 1"));
        assert!(matches!(
            h.bind(&assignment(&owner, 9, 600, false), &ONION),
            Err(HostError::NoSuchSlot)
        ));
    }

    fn host_with(store: Arc<MemoryStore>, slots: u32, budget: u64) -> Host {
        Host::new(
            store,
            HostPolicy {
                slots,
                max_params: 1 << 20,
                max_lease_secs: 3600,
                idle_secs: 600,
            },
            MemoryBudget::new(budget, Metrics::new()),
            Metrics::new(),
        )
    }

    #[test]
    fn a_full_host_gives_an_unused_slot_to_a_new_claim() {
        let store = Arc::new(MemoryStore::default());
        let h = host_with(store.clone(), 2, 1 << 30);
        let owner = Identity::generate();
        for id in [1u8, 2] {
            let a = assignment(&owner, id, 600, true);
            let (slot, _) = h.bind(&a, &ONION).expect("bind");
            h.process(&[id; 16], &slot, &a, forward(0), &keys())
                .expect("forward");
            h.evict(&[id; 16], &slot);
        }
        // Both used just now: a third claim finds no room.
        match h.bind(&assignment(&owner, 3, 600, true), &ONION) {
            Err(HostError::Refused(m)) => assert!(m.contains("taken and in use"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(h.free_slots(unix_now()).expect("free"), 0);
        // Slot 1 unused past the grace: offered, and taken by the claim.
        let mut lease = store.get_meta(&[1; 16]).expect("meta").expect("slot").lease;
        lease.last_used -= 601;
        store.set_lease(&[1; 16], lease).expect("lease");
        assert_eq!(h.free_slots(unix_now()).expect("free"), 1);
        let (slot, created) = h
            .bind(&assignment(&owner, 3, 600, true), &ONION)
            .expect("the claim takes the unused slot's place");
        assert!(created);
        assert!(store.get_meta(&[1; 16]).expect("meta").is_none());
        assert!(store.get_meta(&[2; 16]).expect("meta").is_some());
        assert!(h
            .metrics
            .render()
            .contains("mixnn_slots_freed_total{reason=\"evicted\"} 1"));
        // A slot a circuit is bound to is never taken, however old.
        let mut lease = store.get_meta(&[3; 16]).expect("meta").expect("slot").lease;
        lease.created -= 3600;
        lease.last_used -= 3600;
        store.set_lease(&[3; 16], lease).expect("lease");
        let mut lease = store.get_meta(&[2; 16]).expect("meta").expect("slot").lease;
        lease.last_used = 0;
        store.set_lease(&[2; 16], lease).expect("lease");
        h.bind(&assignment(&owner, 4, 600, true), &ONION)
            .expect("slot 2 goes");
        assert!(store.get_meta(&[3; 16]).expect("meta").is_some());
        drop(slot);
    }

    #[test]
    fn claims_without_work_or_room_are_refused_before_anything_is_made() {
        let store = Arc::new(MemoryStore::default());
        let owner = Identity::generate();
        // No proof of work.
        let h = host_with(store.clone(), 4, 1 << 30);
        let mut body = assignment(&owner, 1, 600, true).body;
        while body.has_work(&ONION) {
            body.nonce = rand::random();
        }
        let unworked = Assignment::sign_as_is(body, &owner, &ONION).expect("sign");
        match h.bind(&unworked, &ONION) {
            Err(HostError::Refused(m)) => assert!(m.contains("proof of work"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        // No room in memory: 4 -> 3 needs about 65 KiB at 4 rows.
        let small = host_with(store.clone(), 4, 32 << 10);
        match small.bind(&assignment(&owner, 2, 600, true), &ONION) {
            Err(HostError::Refused(m)) => {
                assert!(m.contains("does not fit in memory at batches of 4"), "{m}")
            }
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(small.budget().used(), 0);
        assert!(store.list_slots().expect("list").is_empty());
        // With room, the slot holds its reservation until its copy goes.
        let (slot, _) = h
            .bind(&assignment(&owner, 3, 600, true), &ONION)
            .expect("bind");
        let held = h.budget().used();
        assert!(held > 64 << 10 && held == slot.reserved(), "{held}");
        h.evict(&[3; 16], &slot);
        drop(slot);
        assert_eq!(h.budget().used(), 0);
    }

    #[test]
    fn messages_are_checked_from_their_header_before_decoding() {
        let e = Expect {
            inputs: 784,
            outputs: 16_384,
            max_batch: 16,
            direction: Direction::Forward,
            infer_only: false,
            state_total: Some(1000),
        };
        let check = |m: JobMsg, e: &Expect| {
            check_message(
                &JobMsg::peek(&m.encode().expect("encode")).expect("peek"),
                e,
            )
        };
        let t = |rows: usize, cols: usize| HostTensor::zeros(vec![rows, cols]);
        let ok = check(
            JobMsg::Forward {
                step: 0,
                tensor: t(16, 784),
            },
            &e,
        )
        .expect("fits");
        assert_eq!(ok.max_elements, 16 * 784);
        // A batch of images with the slot's values per row fits too, and
        // decodes at its own rank.
        let images = check(
            JobMsg::Forward {
                step: 0,
                tensor: HostTensor::zeros(vec![16, 1, 28, 28]),
            },
            &e,
        )
        .expect("images fit");
        assert_eq!((images.max_rank, images.max_elements), (4, 16 * 784));
        assert_eq!(batch_rows(&[3, 4, 14, 14], 784, 16), Some(3));
        assert_eq!(batch_rows(&[3, 4, 14, 15], 784, 16), None);
        assert_eq!(batch_rows(&[3, 1, 1, 1, 784], 784, 16), None);
        assert_eq!(batch_rows(&[0, 784], 784, 16), None);
        assert_eq!(batch_rows(&[2, usize::MAX, 2], 784, 16), None);
        for bad in [
            JobMsg::Forward {
                step: 0,
                tensor: t(17, 784),
            },
            JobMsg::Forward {
                step: 0,
                tensor: t(16, 16_384),
            },
            JobMsg::Forward {
                step: 0,
                tensor: HostTensor::zeros(vec![784]),
            },
            JobMsg::Backward {
                step: 0,
                tensor: t(1, 16_384),
            },
            JobMsg::State {
                op: StateOp::Restore,
                step: 0,
                blob: vec![1; 999],
            },
            JobMsg::Ack { step: 0 },
        ] {
            let name = bad.name();
            assert!(
                matches!(check(bad, &e), Err(HostError::BadMessage(_))),
                "{name}"
            );
        }
        assert!(check(
            JobMsg::State {
                op: StateOp::Restore,
                step: 0,
                blob: vec![1; 1000],
            },
            &e
        )
        .is_ok());
        let back = Expect {
            direction: Direction::Backward,
            ..e
        };
        assert!(check(
            JobMsg::Backward {
                step: 0,
                tensor: t(16, 16_384)
            },
            &back
        )
        .is_ok());
        let infer = Expect {
            infer_only: true,
            ..e
        };
        assert!(check(
            JobMsg::Forward {
                step: 0,
                tensor: t(1, 784)
            },
            &infer
        )
        .is_err());
        assert!(check(
            JobMsg::Infer {
                step: 0,
                tensor: t(1, 784)
            },
            &infer
        )
        .is_ok());
    }
}
