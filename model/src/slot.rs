//! A volunteer's slot: one stage's parameters and optimizer state, and the
//! forward and backward passes it serves.

use std::collections::BTreeMap;

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::optim::{OptimizerSpec, OptimizerState};
use crate::spec::StageSpec;
use crate::stage::{backprop, Mat, StageCore};
use crate::tensor::HostTensor;
use crate::ModelError;

/// Forward passes a slot keeps for their backward pass, by default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

const MAGIC: &[u8; 6] = b"MXSLOT";
const VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 32;

/// How a slot's parameters are initialized: the owner's seed and the stage's
/// position in the model. The same pair always gives the same parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitSpec {
    pub seed: u64,
    pub stage_index: u32,
}

/// One stage held by a volunteer.
///
/// `forward` keeps the stage's input for `step` until `backward` for that
/// step arrives (at most [`Slot::max_in_flight`] steps at once); `backward`
/// recomputes the stage with a gradient tape, backpropagates, applies the
/// optimizer and returns the gradient for the previous stage. Recomputing
/// (rather than keeping dfdx's tape, which is not `Send`) keeps `Slot`
/// `Send` and costs one extra forward pass of this stage;
/// [`crate::SlotWorker`] avoids that cost by keeping the tape on a thread of
/// its own.
///
/// Equivalence with local training holds when every step's backward comes
/// before the next step's forward, as `LocalModel` does it.
#[derive(Debug)]
pub struct Slot {
    core: StageCore,
    pending: BTreeMap<u64, Mat>,
    max_in_flight: usize,
}

#[derive(Serialize, Deserialize)]
struct SlotRecordV1 {
    spec: StageSpec,
    optimizer: OptimizerSpec,
    optimizer_state: OptimizerState,
    steps_applied: u64,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Slot {
    /// A fresh slot with deterministic initial parameters.
    pub fn new(stage: &StageSpec, init: InitSpec, opt: OptimizerSpec) -> Result<Slot, ModelError> {
        let core = StageCore::init(stage, init.seed, init.stage_index, opt)?;
        Ok(Slot::from_core(core))
    }

    /// A slot holding the given parameters (weight `[outputs, inputs]`
    /// row-major, then bias) with no steps applied and a zero optimizer
    /// state: the starting point of a job from given weights.
    pub fn from_params(
        stage: &StageSpec,
        weight: Vec<f32>,
        bias: Vec<f32>,
        opt: OptimizerSpec,
    ) -> Result<Slot, ModelError> {
        let state = OptimizerState::new(&opt, &[weight.len(), bias.len()]);
        let core = StageCore::from_parts(stage.clone(), weight, bias, opt, state, 0)?;
        Ok(Slot::from_core(core))
    }

    /// The stage this slot runs, taken out (for [`crate::LocalModel`]).
    pub(crate) fn into_core(self) -> StageCore {
        self.core
    }

    fn from_core(core: StageCore) -> Slot {
        Slot::from_parts(core, BTreeMap::new(), DEFAULT_MAX_IN_FLIGHT)
    }

    /// A slot from its parts (for [`crate::SlotWorker`]).
    pub(crate) fn from_parts(
        core: StageCore,
        pending: BTreeMap<u64, Mat>,
        max_in_flight: usize,
    ) -> Slot {
        Slot {
            core,
            pending,
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// The slot's parts: stage, inputs kept for steps in flight, and the
    /// in-flight limit (for [`crate::SlotWorker`]).
    pub(crate) fn into_parts(self) -> (StageCore, BTreeMap<u64, Mat>, usize) {
        (self.core, self.pending, self.max_in_flight)
    }

    /// Sets how many forward passes may wait for their backward (at least 1).
    pub fn set_max_in_flight(&mut self, n: usize) {
        self.max_in_flight = n.max(1);
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Steps whose forward pass is kept, waiting for backward.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Drops what was kept for `step` (an aborted job); true if there was any.
    pub fn cancel(&mut self, step: u64) -> bool {
        self.pending.remove(&step).is_some()
    }

    /// Drops everything kept for steps in flight.
    pub fn cancel_all(&mut self) {
        self.pending.clear();
    }

    /// Training forward pass for `step`; keeps the input for `backward`.
    ///
    /// `input` is `[batch, ...]` with `input_dim` features per example.
    pub fn forward(&mut self, step: u64, input: &HostTensor) -> Result<HostTensor, ModelError> {
        if self.pending.contains_key(&step) {
            return Err(ModelError::DuplicateStep(step));
        }
        if self.pending.len() >= self.max_in_flight {
            return Err(ModelError::TooManyInFlight {
                limit: self.max_in_flight,
            });
        }
        let x = self.core.upload_input(input)?;
        let out = self.run(x.clone());
        self.pending.insert(step, x);
        Ok(out)
    }

    /// Backward pass for `step`: applies this slot's optimizer step and
    /// returns the gradient with respect to the step's input (shaped
    /// `[batch, input_dim]`).
    ///
    /// `grad_out` must have the shape of the forward output. On a shape
    /// error the step stays in flight.
    pub fn backward(&mut self, step: u64, grad_out: &HostTensor) -> Result<HostTensor, ModelError> {
        let x = self
            .pending
            .get(&step)
            .ok_or(ModelError::UnknownStep(step))?;
        let batch = x.shape().0;
        check_grad_out(&self.core, grad_out, batch)?;
        let g = self.core.upload(grad_out, batch, self.core.outputs())?;
        let x = self
            .pending
            .remove(&step)
            .ok_or(ModelError::UnknownStep(step))?;
        let out = self.core.forward(x.trace(Gradients::leaky()));
        let mut grads = backprop(out, g);
        let grad_in = crate::conv::values(&grads.get(&x));
        self.core.apply_grads(&mut grads);
        Ok(HostTensor {
            shape: self.core.input_shape(batch),
            data: grad_in,
        })
    }

    /// Inference: forward only, keeps nothing.
    pub fn infer(&self, input: &HostTensor) -> Result<HostTensor, ModelError> {
        let x = self.core.upload_input(input)?;
        Ok(self.run(x))
    }

    fn run(&self, x: Mat) -> HostTensor {
        to_host(&self.core, &self.core.forward(x))
    }

    /// Digest of this stage's parameters (see [`crate::digest`]).
    pub fn params_digest(&self) -> [u8; 32] {
        self.core.digest()
    }

    /// Optimizer steps applied so far (saturating at `u64::MAX`).
    pub fn steps_applied(&self) -> u64 {
        self.core.steps()
    }

    pub fn spec(&self) -> &StageSpec {
        self.core.spec()
    }

    pub fn optimizer(&self) -> &OptimizerSpec {
        self.core.optimizer()
    }

    pub fn input_dim(&self) -> usize {
        self.core.inputs()
    }

    pub fn output_dim(&self) -> usize {
        self.core.outputs()
    }

    /// Weight, `[outputs, inputs]` row-major.
    pub fn weight(&self) -> &[f32] {
        self.core.weight()
    }

    pub fn bias(&self) -> &[f32] {
        self.core.bias()
    }

    /// Serializes spec, parameters, optimizer state and step counter (not
    /// the steps in flight): `MXSLOT`, version byte, postcard record, blake3
    /// checksum of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        core_to_bytes(&self.core)
    }

    /// Restores a slot written by [`Slot::to_bytes`]. Truncated, corrupt or
    /// inconsistent bytes are an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Slot, ModelError> {
        let bad = |m: &str| ModelError::SlotBytes(m.to_string());
        if bytes.len() < MAGIC.len() + 1 + CHECKSUM_LEN {
            return Err(bad("too short"));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("not a slot (bad magic)"));
        }
        let version = bytes[MAGIC.len()];
        if version != VERSION {
            return Err(ModelError::SlotBytes(format!(
                "unsupported version {version} (expected {VERSION})"
            )));
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch (truncated or corrupt)"));
        }
        let (record, rest): (SlotRecordV1, _) = postcard::take_from_bytes(&body[MAGIC.len() + 1..])
            .map_err(|e| ModelError::SlotBytes(format!("record: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the record"));
        }
        let core = StageCore::from_parts(
            record.spec,
            record.weight,
            record.bias,
            record.optimizer,
            record.optimizer_state,
            record.steps_applied,
        )?;
        Ok(Slot::from_core(core))
    }
}

/// The most bytes [`Slot::to_bytes`] can take for a slot of `stage` trained
/// with `opt`, at any step (parameters and optimizer state are fixed in
/// size; only varint counters grow).
pub fn max_state_bytes(stage: &StageSpec, opt: &OptimizerSpec) -> usize {
    let sizes = [stage.weight_len(), stage.bias_len()];
    let empty = OptimizerState::new(opt, &[0, 0]);
    let buffers = match &empty {
        OptimizerState::Sgd => 0,
        OptimizerState::Momentum { .. } => 1,
        OptimizerState::Adam { .. } => 2,
    };
    let empty = match empty {
        OptimizerState::Adam { m, v, .. } => OptimizerState::Adam { t: u64::MAX, m, v },
        other => other,
    };
    let skeleton = SlotRecordV1 {
        spec: stage.clone(),
        optimizer: *opt,
        optimizer_state: empty,
        steps_applied: u64::MAX,
        weight: vec![],
        bias: vec![],
    };
    let base = postcard::to_allocvec(&skeleton).map_or(1024, |v| v.len());
    let floats: usize = sizes.iter().sum::<usize>() * (1 + buffers);
    // Magic, version, checksum; up to 9 more bytes per vector length.
    MAGIC.len() + 1 + CHECKSUM_LEN + base + 4 * floats + 9 * 2 * (1 + buffers)
}

/// A batch coming out of `core`, shaped `[rows, ...]` as the stage's
/// output is (`[rows, channels, height, width]` for an image).
pub(crate) fn to_host(core: &StageCore, y: &Mat) -> HostTensor {
    HostTensor {
        shape: core.output_shape(y.shape().0),
        data: crate::conv::values(y),
    }
}

/// Checks that `grad_out` fits the output of a `batch`-row step: `batch`
/// rows of the stage's output values, in any shape that has them
/// (`[batch, 400]` and `[batch, 16, 5, 5]` both fit a 16×5×5 output).
pub(crate) fn check_grad_out(
    core: &StageCore,
    grad_out: &HostTensor,
    batch: usize,
) -> Result<(), ModelError> {
    let fits = crate::stage::check_batch(grad_out, core.outputs(), "output gradient")
        .is_ok_and(|rows| rows == batch);
    if fits {
        Ok(())
    } else {
        Err(ModelError::Shape {
            what: "output gradient",
            expected: format!("{:?}", core.output_shape(batch)),
            got: grad_out.shape.clone(),
        })
    }
}

/// [`Slot::to_bytes`] of a slot holding `core` (also used by
/// [`crate::SlotWorker::to_bytes`], so both write the same format).
pub(crate) fn core_to_bytes(core: &StageCore) -> Vec<u8> {
    let record = SlotRecordV1 {
        spec: core.spec().clone(),
        optimizer: *core.optimizer(),
        optimizer_state: core.optimizer_state().clone(),
        steps_applied: core.steps(),
        weight: core.weight().to_vec(),
        bias: core.bias().to_vec(),
    };
    let mut out = Vec::with_capacity(64 + 4 * 3 * (record.weight.len() + record.bias.len()));
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    // Serializing plain data to a Vec cannot fail.
    out = postcard::to_extend(&record, out).unwrap_or_default();
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

// A slot moves between threads (the node's slot workers): keep it Send + Sync.
const _: fn() = || {
    fn is_send<T: Send + Sync>() {}
    is_send::<Slot>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Arch;

    /// Found by fuzzing (fuzz target slot_bytes): slot bytes claiming
    /// u64::MAX steps restored, then the next backward pass overflowed the
    /// count (a panic in a host's slot worker).
    #[test]
    fn a_slot_restored_at_the_last_step_count_still_trains() {
        let stage = Arch::parse("mlp:4-3").expect("arch").stages().remove(0);
        let opt = OptimizerSpec::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let state = OptimizerState::new(&opt, &[12, 3]);
        let core = StageCore::from_parts(stage, vec![0.5; 12], vec![0.0; 3], opt, state, u64::MAX)
            .expect("core");
        let mut slot = Slot::from_bytes(&core_to_bytes(&core)).expect("restores");
        let x = HostTensor::new(vec![1, 4], vec![1.0, 2.0, 3.0, 4.0]).expect("x");
        slot.forward(1, &x).expect("forward");
        let g = HostTensor::new(vec![1, 3], vec![0.1, 0.2, 0.3]).expect("g");
        slot.backward(1, &g).expect("backward");
        assert_eq!(slot.steps_applied(), u64::MAX);
    }

    #[test]
    fn max_state_bytes_bounds_every_state() {
        let arch = Arch::parse("mlp:784-64-10").expect("arch");
        for opt in [
            OptimizerSpec::Sgd { lr: 0.1 },
            OptimizerSpec::Momentum {
                lr: 0.1,
                momentum: 0.9,
            },
            OptimizerSpec::Adam {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        ] {
            for (i, stage) in arch.stages().iter().enumerate() {
                let mut slot = Slot::new(
                    stage,
                    InitSpec {
                        seed: 1,
                        stage_index: i as u32,
                    },
                    opt,
                )
                .expect("slot");
                let bound = max_state_bytes(stage, &opt);
                let fresh = slot.to_bytes().len();
                assert!(fresh <= bound && bound < fresh + 128, "{fresh} vs {bound}");
                let x = HostTensor::zeros(vec![2, stage.input_dim()]);
                slot.forward(1, &x).expect("forward");
                let g = HostTensor::zeros(vec![2, stage.output_dim()]);
                slot.backward(1, &g).expect("backward");
                assert!(slot.to_bytes().len() <= bound);
            }
        }
    }
}
