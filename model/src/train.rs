//! The whole-model reference trainer: all stages in one process, one
//! gradient tape through the whole model per step.

use std::time::Instant;

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Split};
use crate::digest::{model_digest, to_hex};
use crate::loss::{correct, softmax_cross_entropy};
use crate::optim::OptimizerSpec;
use crate::slot::{core_to_bytes, Slot};
use crate::spec::Arch;
use crate::stage::{backprop, check_batch, StageCore};
use crate::tensor::HostTensor;
use crate::ModelError;

/// A whole model held locally. Stage `i` is initialized exactly as
/// `Slot::new(&arch.stages()[i], InitSpec { seed, stage_index: i }, opt)`.
#[derive(Debug, Clone)]
pub struct LocalModel {
    arch: Arch,
    stages: Vec<StageCore>,
    steps: u64,
}

impl LocalModel {
    pub fn new(arch: &Arch, seed: u64, opt: OptimizerSpec) -> Result<LocalModel, ModelError> {
        let stages = arch
            .stages()
            .iter()
            .enumerate()
            .map(|(i, s)| StageCore::init(s, seed, i as u32, opt))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LocalModel::with_stages(arch, stages, 0))
    }

    /// A model from its stages' states ([`Slot::to_bytes`], in stage
    /// order), for example given weights read from a file or an owner's
    /// checkpoint. Every stage must fit `arch` and have applied the same
    /// number of steps.
    pub fn from_states(arch: &Arch, states: &[Vec<u8>]) -> Result<LocalModel, ModelError> {
        let specs = arch.stages();
        if states.len() != specs.len() {
            return Err(ModelError::Config(format!(
                "{} stage states for {arch}, which has {} stages",
                states.len(),
                specs.len()
            )));
        }
        let mut stages = Vec::with_capacity(specs.len());
        let mut steps = None;
        for (i, (bytes, spec)) in states.iter().zip(&specs).enumerate() {
            let slot = Slot::from_bytes(bytes)?;
            if slot.spec() != spec {
                return Err(ModelError::Config(format!(
                    "stage {i} state is {:?}, {arch} needs {:?}",
                    slot.spec().layers,
                    spec.layers
                )));
            }
            match steps {
                None => steps = Some(slot.steps_applied()),
                Some(s) if s != slot.steps_applied() => {
                    return Err(ModelError::Config(format!(
                        "stage {i} has applied {} steps, stage 0 {s}",
                        slot.steps_applied()
                    )))
                }
                Some(_) => {}
            }
            stages.push(slot.into_core());
        }
        Ok(LocalModel::with_stages(arch, stages, steps.unwrap_or(0)))
    }

    fn with_stages(arch: &Arch, stages: Vec<StageCore>, steps: u64) -> LocalModel {
        // Nothing reads the gradient with respect to the model's input.
        if let Some(first) = stages.first() {
            first.set_skip_input_grad(true);
        }
        LocalModel {
            arch: arch.clone(),
            stages,
            steps,
        }
    }

    /// Each stage's state, in the format of [`Slot::to_bytes`].
    pub fn stage_states(&self) -> Vec<Vec<u8>> {
        self.stages.iter().map(core_to_bytes).collect()
    }

    /// Each stage's `(weight, bias)`; the weight is `[outputs, inputs]`
    /// row-major.
    pub fn stage_params(&self) -> Vec<(&[f32], &[f32])> {
        self.stages.iter().map(|s| (s.weight(), s.bias())).collect()
    }

    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// Training steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One training step on a batch; returns the batch's mean loss.
    ///
    /// A first stage that is linear runs its backward pass by hand, as a
    /// slot worker runs it for the network's first stage: the values the
    /// tape would give, without the gradient at the data, which nothing
    /// reads. The tape then starts at its output.
    pub fn train_step(&mut self, x: &HostTensor, labels: &[u8]) -> Result<f32, ModelError> {
        let first = &self.stages[0];
        let x = first.upload_input(x)?;
        let by_hand = first.is_linear() && self.stages.len() > 1;
        let (h, taped) = if by_hand {
            (first.forward(x.clone()), 1)
        } else {
            (x.clone(), 0)
        };
        let mut y = h.clone().trace(Gradients::leaky());
        for stage in &self.stages[taped..] {
            y = stage.forward(y);
        }
        let (logits, tape) = y.split_tape();
        let (batch, classes) = *logits.shape();
        let host = HostTensor {
            shape: vec![batch, classes],
            data: crate::conv::values(&logits),
        };
        let (loss, grad) = softmax_cross_entropy(&host, labels)?;
        let g = x
            .device()
            .try_tensor_from_vec(grad.data, (batch, classes))?;
        let mut grads = backprop(logits.put_tape(tape), g);
        for stage in &mut self.stages[taped..] {
            stage.apply_grads(&mut grads);
        }
        if by_hand {
            let first = &mut self.stages[0];
            let mut g_h = crate::conv::values(&grads.get(&h));
            drop(grads);
            let bias = first.linear_pre_grad(&mut g_h, &crate::conv::values(&h));
            let g_pre = first
                .device()
                .try_tensor_from_vec(g_h, (batch, first.outputs()))?;
            first.apply_linear_grads(&x, g_pre, &bias)?;
        }
        // Saturating: the count may come from states of any count.
        self.steps = self.steps.saturating_add(1);
        Ok(loss)
    }

    /// Forward pass through all stages (logits).
    pub fn infer(&self, x: &HostTensor) -> Result<HostTensor, ModelError> {
        check_batch(x, self.arch.input_dim(), "model input")?;
        let mut y = self.stages[0].upload_input(x)?;
        for stage in &self.stages {
            y = stage.forward(y);
        }
        let (batch, classes) = *y.shape();
        Ok(HostTensor {
            shape: vec![batch, classes],
            data: crate::conv::values(&y),
        })
    }

    /// Accuracy over `split`, in order, `batch` examples at a time.
    pub fn evaluate(&self, split: &Split, batch: usize) -> f32 {
        let batch = batch.max(1);
        let mut hits = 0usize;
        let mut start = 0;
        while start < split.len() {
            let (x, labels) = split.slice(start, batch);
            hits += self
                .infer(&x)
                .ok()
                .and_then(|l| correct(&l, labels))
                .unwrap_or(0);
            start += batch;
        }
        if split.is_empty() {
            0.0
        } else {
            hits as f32 / split.len() as f32
        }
    }

    /// Per-stage parameter digests, in stage order.
    pub fn stage_digests(&self) -> Vec<[u8; 32]> {
        self.stages.iter().map(StageCore::digest).collect()
    }

    /// The model digest over [`LocalModel::stage_digests`].
    pub fn params_digest(&self) -> [u8; 32] {
        model_digest(&self.stage_digests())
    }
}

/// Batch size of evaluation passes; the network client uses the same, so
/// both compute the test accuracy with the same arithmetic.
pub const EVAL_BATCH: usize = 1000;

/// What [`train_local`] trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub arch: Arch,
    pub epochs: u32,
    pub batch: usize,
    pub optimizer: OptimizerSpec,
    /// Seeds parameter init and the batch order.
    pub seed: u64,
    /// Train on the first `limit` training examples only.
    pub limit: Option<usize>,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        self.optimizer.validate()?;
        if self.epochs == 0 {
            return Err(ModelError::Config("epochs must be at least 1".into()));
        }
        if self.batch == 0 || self.batch > 1 << 16 {
            return Err(ModelError::Config(format!(
                "batch {} is out of range 1..=65536",
                self.batch
            )));
        }
        Ok(())
    }
}

/// Progress after one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepInfo {
    pub step: u64,
    pub epoch: u32,
    pub loss: f32,
    pub examples_done: u64,
    pub examples_total: u64,
}

/// The mean of each epoch's batch losses, given every step's loss in
/// order and `steps_per_epoch` steps an epoch (a last, partial epoch has
/// its own mean). Summed in `f64`, in step order, so local and network
/// runs of one job give the same values.
pub fn epoch_losses(losses: &[f32], steps_per_epoch: usize) -> Vec<f32> {
    losses
        .chunks(steps_per_epoch.max(1))
        .map(|epoch| {
            let sum: f64 = epoch.iter().map(|&l| f64::from(l)).sum();
            (sum / epoch.len() as f64) as f32
        })
        .collect()
}

/// Summary of a [`train_local`] run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    pub steps: u64,
    /// The mean batch loss of the last epoch.
    pub final_loss: f32,
    /// Each step's batch loss.
    pub losses: Vec<f32>,
    /// The mean batch loss of each epoch ([`epoch_losses`]).
    pub epoch_losses: Vec<f32>,
    pub test_accuracy: f32,
    pub seconds: f64,
    pub params_digest_hex: String,
}

/// Trains `cfg.arch` locally on `data.train` (batches from
/// `Split::batches(cfg.batch, epoch, cfg.seed)`), then evaluates on `data.test`.
pub fn train_local(
    cfg: &TrainConfig,
    data: &Dataset,
    on_step: &mut dyn FnMut(StepInfo),
) -> Result<TrainReport, ModelError> {
    train_local_model(cfg, data, None, on_step).map(|(report, _)| report)
}

/// [`train_local`] that also returns the trained model, starting from the
/// seeded initialisation or, with `init`, from given stage states
/// ([`Slot::to_bytes`], no steps applied, `cfg.optimizer`), as
/// `mixnn_node::client::train_network_from` does through the network.
pub fn train_local_model(
    cfg: &TrainConfig,
    data: &Dataset,
    init: Option<&[Vec<u8>]>,
    on_step: &mut dyn FnMut(StepInfo),
) -> Result<(TrainReport, LocalModel), ModelError> {
    cfg.validate()?;
    if data.train.features != cfg.arch.input_dim() {
        return Err(ModelError::Config(format!(
            "dataset has {} features, {} takes {}",
            data.train.features,
            cfg.arch,
            cfg.arch.input_dim()
        )));
    }
    let started = Instant::now();
    let limited;
    let train = match cfg.limit {
        Some(n) if n < data.train.len() => {
            limited = data.train.clone().limit(n);
            &limited
        }
        _ => &data.train,
    };
    if train.is_empty() {
        return Err(ModelError::Config("no training examples".into()));
    }
    let mut model = match init {
        None => LocalModel::new(&cfg.arch, cfg.seed, cfg.optimizer)?,
        Some(states) => {
            let model = LocalModel::from_states(&cfg.arch, states)?;
            for (i, bytes) in states.iter().enumerate() {
                let slot = Slot::from_bytes(bytes)?;
                if *slot.optimizer() != cfg.optimizer || slot.steps_applied() != 0 {
                    return Err(ModelError::Config(format!(
                        "the initial state of stage {i} is not a fresh {} stage with this optimizer",
                        cfg.arch
                    )));
                }
            }
            model
        }
    };
    let examples_total = u64::from(cfg.epochs) * train.len() as u64;
    let mut losses = Vec::with_capacity(cfg.epochs as usize * train.num_batches(cfg.batch));
    let mut examples_done = 0u64;
    for epoch in 0..cfg.epochs {
        for (x, labels) in train.batches(cfg.batch, epoch, cfg.seed) {
            let loss = model.train_step(&x, &labels)?;
            losses.push(loss);
            examples_done += labels.len() as u64;
            on_step(StepInfo {
                step: model.steps(),
                epoch,
                loss,
                examples_done,
                examples_total,
            });
        }
    }
    let test_accuracy = model.evaluate(&data.test, EVAL_BATCH);
    let epoch_losses = epoch_losses(&losses, train.num_batches(cfg.batch));
    let report = TrainReport {
        steps: model.steps(),
        final_loss: epoch_losses.last().copied().unwrap_or(f32::NAN),
        losses,
        epoch_losses,
        test_accuracy,
        seconds: started.elapsed().as_secs_f64(),
        params_digest_hex: to_hex(&model.params_digest()),
    };
    Ok((report, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_losses_are_per_epoch_means() {
        let losses = [1.0, 3.0, 2.0, 4.0, 0.5];
        assert_eq!(epoch_losses(&losses, 2), vec![2.0, 3.0, 0.5]);
        assert_eq!(epoch_losses(&losses, 5), vec![2.1]);
        assert!(epoch_losses(&[], 3).is_empty());
        // A zero step count is taken as one step an epoch, never a panic.
        assert_eq!(epoch_losses(&[1.0, 2.0], 0), vec![1.0, 2.0]);
    }

    /// Found by fuzzing (fuzz target slot_bytes): states claiming
    /// u64::MAX steps made the next step overflow the count.
    #[test]
    fn states_at_the_last_step_count_still_train() {
        let arch = Arch::parse("mlp:4-3-2").expect("arch");
        let opt = OptimizerSpec::Sgd { lr: 0.1 };
        let states: Vec<Vec<u8>> = arch
            .stages()
            .iter()
            .map(|spec| {
                let core = StageCore::from_parts(
                    spec.clone(),
                    vec![0.5; spec.param_count() - spec.output_dim()],
                    vec![0.0; spec.output_dim()],
                    opt,
                    crate::OptimizerState::new(
                        &opt,
                        &[spec.param_count() - spec.output_dim(), spec.output_dim()],
                    ),
                    u64::MAX,
                )
                .expect("core");
                core_to_bytes(&core)
            })
            .collect();
        let mut model = LocalModel::from_states(&arch, &states).expect("model");
        let x = HostTensor::new(vec![1, 4], vec![1.0, 0.0, -1.0, 2.0]).expect("x");
        model.train_step(&x, &[1]).expect("step");
        assert_eq!(model.steps(), u64::MAX);
        assert!(model
            .stage_states()
            .iter()
            .all(|s| Slot::from_bytes(s).map(|s| s.steps_applied()).ok() == Some(u64::MAX)));
    }

    #[test]
    fn the_report_gives_each_epochs_mean_and_the_last_as_final_loss() {
        let data = crate::synthetic(3, 96, 32);
        let cfg = TrainConfig {
            arch: Arch::parse("mlp:784-16-10").expect("arch"),
            epochs: 3,
            batch: 32,
            optimizer: OptimizerSpec::Sgd { lr: 0.1 },
            seed: 1,
            limit: None,
        };
        let r = train_local(&cfg, &data, &mut |_| {}).expect("train");
        assert_eq!(r.losses.len(), 9);
        assert_eq!(r.epoch_losses.len(), 3);
        for (e, mean) in r.epoch_losses.iter().enumerate() {
            let want = r.losses[e * 3..e * 3 + 3]
                .iter()
                .map(|&l| f64::from(l))
                .sum::<f64>()
                / 3.0;
            assert_eq!(*mean, want as f32, "epoch {e}");
        }
        assert_eq!(r.final_loss, r.epoch_losses[2]);
        assert_ne!(r.final_loss, *r.losses.last().expect("a step"));
    }
}
