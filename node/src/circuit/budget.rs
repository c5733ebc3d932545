//! The node's memory budget (`--max-memory`) and what each thing a peer
//! asks for costs in it.
//!
//! Everything a peer can make the node hold is reserved here before it is
//! allocated: a slot in memory (parameters, their copies and gradients,
//! optimizer state, the activations of its largest allowed batch), and
//! every circuit's buffers (its stream windows, the message being
//! assembled, the decoded message at its decoded size — a sparse tensor
//! counts as dense —, the encoded answer). A reservation that does not fit
//! is refused with what it needed and what was free; nothing is allocated
//! for it. The node's own base (libp2p, sled's cache, the runtime: tens of
//! MiB) comes on top.
//!
//! The cost model is pure and errs high: the figures below are upper
//! bounds of what dfdx and the codec allocate for a linear stage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mixnn_crypto::cells::CELL_BYTES;
use mixnn_model::{LayerSpec, OptimizerSpec, StageSpec};
use thiserror::Error;

use crate::metrics::Metrics;

/// A reservation that does not fit.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error(
    "it needs {} of memory and {} of this node's {} budget are free",
    human(*needed),
    human(*free),
    human(*limit)
)]
pub struct OverBudget {
    pub needed: u64,
    pub free: u64,
    pub limit: u64,
}

/// Bytes in binary units, for messages.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The node's memory budget: bytes reserved, never more than the limit.
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
    metrics: Metrics,
}

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("limit", &self.limit)
            .field("used", &self.used())
            .field("peak", &self.peak())
            .finish()
    }
}

impl MemoryBudget {
    pub fn new(limit: u64, metrics: Metrics) -> Arc<Self> {
        metrics.memory_budget_bytes.set(limit as i64);
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            metrics,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The most ever reserved at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// Take `bytes` more, if they fit.
    fn take(&self, bytes: u64) -> Result<(), OverBudget> {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let next = used.checked_add(bytes).filter(|&n| n <= self.limit);
            let Some(next) = next else {
                self.metrics.memory_refused.inc();
                return Err(OverBudget {
                    needed: bytes,
                    free: self.limit.saturating_sub(used),
                    limit: self.limit,
                });
            };
            match self
                .used
                .compare_exchange(used, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::AcqRel);
                    self.metrics.memory_reserved_bytes.set(next as i64);
                    self.metrics
                        .memory_reserved_peak_bytes
                        .set(self.peak() as i64);
                    return Ok(());
                }
                Err(seen) => used = seen,
            }
        }
    }

    fn give(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.metrics
            .memory_reserved_bytes
            .set(before.saturating_sub(bytes) as i64);
    }

    /// Reserve `bytes`; they return to the budget when the reservation
    /// drops.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, OverBudget> {
        self.take(bytes)?;
        Ok(Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

/// Bytes held in a [`MemoryBudget`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Hold `bytes` in all, if the difference fits (never shrinks).
    pub fn grow_to(&mut self, bytes: u64) -> Result<(), OverBudget> {
        if bytes > self.bytes {
            self.budget.take(bytes - self.bytes)?;
            self.bytes = bytes;
        }
        Ok(())
    }

    /// Hold exactly `bytes`: give back the difference, or take it if it
    /// fits.
    pub fn set(&mut self, bytes: u64) -> Result<(), OverBudget> {
        if bytes < self.bytes {
            self.budget.give(self.bytes - bytes);
            self.bytes = bytes;
            Ok(())
        } else {
            self.grow_to(bytes)
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// What one circuit costs before it carries anything: the stream windows
/// of its two streams, a frame buffer and a few cells in flight.
pub const CIRCUIT_BASE_BYTES: u64 = 512 * 1024;

/// Optimizer buffers per parameter (momentum: 1, Adam: 2).
pub fn optimizer_buffers(opt: &OptimizerSpec) -> u64 {
    match opt {
        OptimizerSpec::Sgd { .. } => 0,
        OptimizerSpec::Momentum { .. } => 1,
        OptimizerSpec::Adam { .. } => 2,
    }
}

/// A slot in memory without its activations, from its parameter count,
/// optimizer buffers and stored size: the parameters on the device, their
/// host copy, the gradient scratch and the tape's gradient (4 copies), the
/// optimizer state, and two copies of the stored state while it is read or
/// written (a load, a checkpoint, a restore).
pub fn slot_resident_bytes(params: u64, buffers: u64, state_bytes: u64) -> u64 {
    params
        .saturating_mul(4)
        .saturating_mul(4 + buffers)
        .saturating_add(state_bytes.saturating_mul(2))
        .saturating_add(64 * 1024)
}

/// One training step's activations at `batch` rows, from a forward pass
/// to the end of its backward pass: the input and its gradient, their
/// host copies, and each intermediate of the linear map or convolution
/// (with its unfolded input) and of the layers after it, with its gradient.
pub fn step_bytes(stage: &StageSpec, batch: u32) -> u64 {
    let (inputs, outputs) = (stage.input_dim(), stage.output_dim());
    let acts = stage
        .layers
        .iter()
        .filter(|l| matches!(l, LayerSpec::Relu | LayerSpec::Tanh))
        .count() as u64;
    let per_row = if stage.is_conv() {
        // Each layer's output and its gradient, the unfolded input and
        // its gradient, the output gradient laid out by channel, and the
        // input with its gradient and host copies.
        4 * (inputs + outputs) as u64 + 3 * stage.work_per_example() as u64
    } else {
        4 * inputs as u64 + (6 + 2 * acts) * outputs as u64
    };
    4u64.saturating_mul(batch as u64).saturating_mul(per_row)
}

/// A slot in memory, serving batches of up to `max_batch` rows.
pub fn slot_bytes(stage: &StageSpec, opt: &OptimizerSpec, max_batch: u32) -> u64 {
    let params = stage.param_count() as u64;
    let state = mixnn_model::max_state_bytes(stage, opt) as u64;
    slot_resident_bytes(params, optimizer_buffers(opt), state)
        .saturating_add(step_bytes(stage, max_batch))
}

/// Longest message a layer host's circuit accepts: a tensor of `max_batch`
/// rows of its widest side, or the job's state message.
pub fn max_message_bytes(widest: usize, max_batch: u32, state_total: usize) -> usize {
    (4 * max_batch as usize * widest).max(state_total) + 64 * 1024
}

/// A layer host's circuit on top of [`CIRCUIT_BASE_BYTES`]: the message
/// being assembled and the last one's buffer (`2 × max_message`), the
/// decoded message and the encoded answer (each at most a dense tensor of
/// the widest side, or the state message), and the cells being sealed.
pub fn host_circuit_bytes(max_message: usize, widest: usize, max_batch: u32, state: usize) -> u64 {
    let tensor = (4 * max_batch as u64 * widest as u64).max(state as u64) + 64;
    CIRCUIT_BASE_BYTES + 2 * max_message as u64 + 2 * tensor + 16 * CELL_BYTES as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixnn_model::Arch;

    #[test]
    fn reservations_never_pass_the_limit_and_come_back() {
        let b = MemoryBudget::new(1000, Metrics::new());
        let r1 = b.reserve(600).expect("fits");
        let e = b.reserve(500).expect_err("does not fit");
        assert_eq!(
            e,
            OverBudget {
                needed: 500,
                free: 400,
                limit: 1000
            }
        );
        let mut r2 = b.reserve(300).expect("fits");
        assert!(r2.grow_to(500).is_err());
        r2.grow_to(400).expect("fits exactly");
        assert_eq!(b.used(), 1000);
        r2.set(100).expect("shrinks");
        assert_eq!(b.used(), 700);
        r2.set(400).expect("grows back");
        drop(r1);
        assert_eq!(b.used(), 400);
        drop(r2);
        assert_eq!((b.used(), b.peak()), (0, 1000));
        assert!(b.reserve(u64::MAX).is_err());
        assert!(e.to_string().contains("500 B"), "{e}");
    }

    #[test]
    fn the_amplifying_slot_costs_what_it_would_allocate() {
        // The slot of issue 12: 784 -> 16384 with a ReLU, at 16384 rows.
        let stage = Arch::parse("mlp:784-16384-10")
            .expect("arch")
            .stages()
            .remove(0);
        let sgd = OptimizerSpec::Sgd { lr: 0.1 };
        let step = step_bytes(&stage, 16_384);
        // Its output alone is 1 GiB; forward and backward hold several.
        assert!(step > 8 << 30, "{}", human(step));
        let small = slot_bytes(&stage, &sgd, 16);
        assert!(small > 200 << 20 && small < 400 << 20, "{}", human(small));
        // A 50-million-parameter layer with momentum: about 1.8 GB.
        let big = Arch::parse("mlp:5000-10000")
            .expect("arch")
            .stages()
            .remove(0);
        let m = OptimizerSpec::Momentum {
            lr: 0.1,
            momentum: 0.9,
        };
        let b = slot_bytes(&big, &m, 1);
        assert!(b > 1_500_000_000 && b < 2_000_000_000, "{}", human(b));
    }
}
