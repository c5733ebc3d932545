//! The slots a layer host serves: admission, owner checks, computation and
//! checkpoints.
//!
//! A slot lives in sled between jobs and in memory while circuits use it.
//! The forward and backward circuits of one job share the in-memory slot.
//! A circuit that breaks evicts it, so the next job starts again from the
//! last checkpoint, never from half-applied steps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mixnn_model::{DecodeLimits, HostTensor, InputGrad, Slot, SlotWorker};
use thiserror::Error;

use super::payload::{
    open_state, seal_slot_report, seal_state, Assignment, ControlOp, Direction, JobMsg, SlotReport,
    StateOp,
};
use crate::store::{SlotId, SlotStore, StoreError, StoredSlot};

/// Hard cap on the rows of one batch, whatever the client asks.
pub const MAX_BATCH: u32 = 16_384;
/// Hard cap on one tensor message (elements).
pub const MAX_TENSOR_ELEMENTS: usize = 64 << 20;

#[derive(Debug, Error)]
pub enum HostError {
    #[error("slot refused: {0}")]
    Refused(String),
    #[error("message refused: {0}")]
    BadMessage(String),
    #[error("computation failed: {0}")]
    Compute(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A slot in memory with what the host knows about it.
pub struct HostedSlot {
    /// The slot on its own compute thread (it keeps dfdx's tape from a
    /// forward pass to its backward pass).
    pub slot: SlotWorker,
    /// Training steps whose backward pass has not run yet.
    pub pending: std::collections::BTreeSet<u64>,
    pub owner: [u8; 32],
    pub version: u64,
}

/// A slot shared by the circuits of one run of a job (one session).
pub struct SlotCell {
    state: Mutex<HostedSlot>,
    /// Signalled after every backward pass.
    settled: tokio::sync::Notify,
    /// The run whose circuits bound this copy.
    session: [u8; 16],
    /// Set when a later run took the slot over: this copy then refuses
    /// every message, so a circuit of a broken run can never touch the
    /// slot again.
    retired: AtomicBool,
}

impl SlotCell {
    fn new(s: HostedSlot, session: [u8; 16]) -> Self {
        Self {
            state: Mutex::new(s),
            settled: tokio::sync::Notify::new(),
            session,
            retired: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, HostedSlot> {
        lock(&self.state)
    }

    /// Whether a later run took this slot over.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn retire(&self) {
        // Under the slot's lock: a message being processed finishes first,
        // and none starts after.
        let _g = self.lock();
        self.retired.store(true, Ordering::Release);
    }

    fn is_settled(&self) -> bool {
        match self.state.try_lock() {
            Ok(g) => g.pending.is_empty(),
            Err(_) => false,
        }
    }

    /// Wait until no training step is waiting for its backward pass, so a
    /// forward pass, an evaluation or a checkpoint sees the parameters after
    /// every update the client sent before it. False on timeout.
    pub async fn settled(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_settled() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // The backward pass signals; the short sleep covers a compute
            // that held the lock when we looked.
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(2)) => {}
            }
        }
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
}

/// All slots this host serves right now.
pub struct Host {
    store: Arc<dyn SlotStore>,
    policy: HostPolicy,
    live: Mutex<HashMap<SlotId, SharedSlot>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Host {
    pub fn new(store: Arc<dyn SlotStore>, policy: HostPolicy) -> Self {
        Self {
            store,
            policy,
            live: Mutex::new(HashMap::new()),
        }
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
        let mut live = lock(&self.live);
        if let Some(s) = live.get(&body.slot_id) {
            if s.lock().owner != body.owner {
                return Err(HostError::Refused(
                    "the slot belongs to another owner".into(),
                ));
            }
            // Inference reads whatever copy is live; circuits of one run
            // share it; a new run retires the circuits of the old one and
            // starts again from the last checkpoint.
            if body.infer_only || s.session == body.session {
                return Ok((s.clone(), false));
            }
            s.retire();
            live.remove(&body.slot_id);
        }
        if let Some(stored) = self.store.get_slot(&body.slot_id)? {
            if stored.owner != body.owner {
                return Err(HostError::Refused(
                    "the slot belongs to another owner".into(),
                ));
            }
            let slot = Slot::from_bytes(&stored.state)
                .and_then(SlotWorker::spawn)
                .map_err(|e| HostError::Refused(format!("stored slot is unreadable: {e}")))?;
            let shared = Arc::new(SlotCell::new(
                HostedSlot {
                    slot,
                    pending: Default::default(),
                    owner: stored.owner,
                    version: stored.version,
                },
                body.session,
            ));
            live.insert(body.slot_id, shared.clone());
            return Ok((shared, false));
        }
        let Some(create) = &body.create else {
            return Err(HostError::Refused("no such slot on this host".into()));
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
        let held = self.store.list_slots()?.len() as u32;
        if held >= self.policy.slots {
            return Err(HostError::Refused(format!(
                "all {} slots are taken",
                self.policy.slots
            )));
        }
        let slot = Slot::new(&create.stage, create.init, create.optimizer)
            .and_then(SlotWorker::spawn)
            .map_err(|e| HostError::Refused(format!("cannot create the slot: {e}")))?;
        let hosted = HostedSlot {
            slot,
            pending: Default::default(),
            owner: body.owner,
            version: 0,
        };
        // Claim the slot on disk at once, so a restart keeps it.
        let state = hosted
            .slot
            .to_bytes()
            .map_err(|e| HostError::Compute(e.to_string()))?;
        self.persist(&body.slot_id, &hosted, state)?;
        let shared = Arc::new(SlotCell::new(hosted, body.session));
        live.insert(body.slot_id, shared.clone());
        Ok((shared, true))
    }

    fn persist(&self, id: &SlotId, s: &HostedSlot, state: Vec<u8>) -> Result<(), HostError> {
        self.store.put_slot(&StoredSlot {
            id: *id,
            owner: s.owner,
            version: s.version,
            param_count: s.slot.spec().param_count() as u64,
            state,
        })?;
        Ok(())
    }

    /// Persist the slot's current state as a new version.
    fn checkpoint(&self, id: &SlotId, s: &mut HostedSlot) -> Result<Vec<u8>, HostError> {
        let state = s
            .slot
            .to_bytes()
            .map_err(|e| HostError::Compute(e.to_string()))?;
        s.version += 1;
        self.persist(id, s, state.clone())?;
        Ok(state)
    }

    /// Forget the in-memory copy `slot` (if it is still the live one): the
    /// next bind reloads the last checkpoint.
    pub fn evict(&self, id: &SlotId, slot: &SharedSlot) {
        let mut live = lock(&self.live);
        if live.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            live.remove(id);
        }
    }

    /// Drop the in-memory copy after a clean end of the job.
    pub fn release(&self, id: &SlotId, slot: &SharedSlot) {
        self.evict(id, slot)
    }

    /// Run one message through the slot. Returns the message for the next
    /// hop. Blocking (dfdx computes on this thread).
    pub fn process(
        &self,
        slot_id: &SlotId,
        shared: &SharedSlot,
        a: &Assignment,
        msg: JobMsg,
        keys: &OwnerKeys,
    ) -> Result<JobMsg, HostError> {
        let body = &a.body;
        let mut s = shared.lock();
        if shared.is_retired() {
            return Err(HostError::Refused(
                "a later run of the job took this slot over".into(),
            ));
        }
        let check_rows = |t: &HostTensor, want: usize| -> Result<(), HostError> {
            let rows = t.shape.first().copied().unwrap_or(0);
            if t.shape.len() != 2
                || t.shape[1] != want
                || rows == 0
                || rows > body.max_batch as usize
            {
                return Err(HostError::BadMessage(format!(
                    "tensor of shape {:?} where [1..={}, {want}] was expected",
                    t.shape, body.max_batch
                )));
            }
            Ok(())
        };
        match (msg, body.direction) {
            (JobMsg::Forward { step, tensor }, Direction::Forward) if !body.infer_only => {
                check_rows(&tensor, s.slot.input_dim())?;
                let out = s
                    .slot
                    .forward_owned(step, tensor)
                    .map_err(|e| HostError::Compute(e.to_string()))?;
                s.pending.insert(step);
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
                let input_grad = if body.skip_zero_inputs {
                    InputGrad::SkipZeroInputs
                } else {
                    InputGrad::Full
                };
                let grad_in = s
                    .slot
                    .backward_owned(step, tensor, input_grad)
                    .map_err(|e| HostError::Compute(e.to_string()))?;
                s.pending.remove(&step);
                drop(s);
                shared.settled.notify_waiters();
                if body.first {
                    Ok(JobMsg::Ack { step })
                } else {
                    Ok(JobMsg::Backward {
                        step,
                        tensor: grad_in,
                    })
                }
            }
            (JobMsg::Control { op, mut reports }, Direction::Forward) => {
                if op != ControlOp::Digest && !body.infer_only {
                    self.checkpoint(slot_id, &mut s)?;
                }
                reports.push(seal_slot_report(
                    &keys.report,
                    &SlotReport {
                        slot_id: *slot_id,
                        version: s.version,
                        steps_applied: s
                            .slot
                            .steps_applied()
                            .map_err(|e| HostError::Compute(e.to_string()))?,
                        params_digest: s
                            .slot
                            .params_digest()
                            .map_err(|e| HostError::Compute(e.to_string()))?,
                    },
                ));
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
                        let state = self.checkpoint(slot_id, &mut s)?;
                        seal_state(&keys.state_up, &state, &mut blob[range])
                            .map_err(|e| HostError::Compute(e.to_string()))?;
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
                        s.pending.clear();
                        self.checkpoint(slot_id, &mut s)?;
                        shared.settled.notify_waiters();
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
        }
    }

    /// Decode limits for messages into `slot`: rows times its widest side.
    pub fn limits(slot: &SharedSlot, max_batch: u32) -> DecodeLimits {
        let s = slot.lock();
        let width = s.slot.input_dim().max(s.slot.output_dim());
        DecodeLimits {
            max_rank: 2,
            max_elements: (max_batch as usize * width).min(MAX_TENSOR_ELEMENTS),
        }
    }
}
