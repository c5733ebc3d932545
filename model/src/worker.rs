//! [`SlotWorker`]: a slot on an OS thread of its own, which keeps dfdx's
//! gradient tape from a step's forward pass to its backward pass.
//!
//! dfdx's tape is not `Send`, so [`Slot`] keeps only a step's input and
//! recomputes the stage with a tape in `backward`. A `SlotWorker` instead
//! moves the slot onto a dedicated thread (`mixnn-slot`) that owns a
//! tape-keeping stage; the handle is `Send + Sync` and talks to the thread
//! over a bounded command channel, blocking for each reply. Backward then
//! runs only the tape, not the forward pass again.
//!
//! The worker's thread takes part in its own matrix products: it is the
//! first thread of a rayon pool of its own ([`COMPUTE_THREAD_PREFIX`]
//! names the others), so a product starts on it at once and only its other
//! share waits for a helper to wake, where a product sent to the global
//! pool would wake a thread to start it and the worker again to go on.
//!
//! A backward pass that returns an input gradient sends it first and then
//! applies the step's update on a second pool of the worker's, whose
//! threads run at a lower priority ([`UPDATE_NICENESS`]): where parties
//! share cores, the update then takes only what the job's critical path
//! leaves over, and is done before the slot's next forward pass, which
//! waits for it.
//!
//! Both run the same [`StageCore`] operations in the same order, so a chain
//! of workers trains bit for bit like [`crate::LocalModel`] and like a chain
//! of [`Slot`]s when every step's backward comes before the next step's
//! forward. (With several steps in flight the two differ: a worker's
//! backward uses the parameters its forward saw, a [`Slot`]'s uses the
//! current ones.)

use std::any::Any;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use dfdx::prelude::*;

use crate::optim::OptimizerSpec;
use crate::slot::{check_grad_out, core_to_bytes, to_host, Slot};
use crate::spec::StageSpec;
use crate::stage::{backprop, Mat, StageCore};
use crate::tensor::HostTensor;
use crate::ModelError;

/// Name of a worker's thread.
pub const THREAD_NAME: &str = "mixnn-slot";

/// How the names of a worker's helper threads begin (the threads that
/// share its matrix products; `mixnn-compute-1` and on).
pub const COMPUTE_THREAD_PREFIX: &str = "mixnn-compute";

/// A rayon pool whose first thread is the calling one, with one helper per
/// further core; `None` on one core (or if no thread can start: the
/// products then run on the global pool, with the same results).
///
/// dfdx splits a product by `rayon::current_num_threads()`, which on this
/// thread is the pool's size; the split changes which thread computes a
/// block of the result, never the order of a sum, so every result is the
/// same bit for bit. The pool must outlive every product the thread
/// starts: the worker keeps it until its thread ends.
fn own_pool() -> Option<rayon::ThreadPool> {
    one_per_core()?
        .use_current_thread()
        .thread_name(|i| format!("{COMPUTE_THREAD_PREFIX}-{i}"))
        .exit_handler(|_| crate::cpu::record_end())
        .build()
        .ok()
}

/// A pool of one thread per core; `None` on one core.
fn one_per_core() -> Option<rayon::ThreadPoolBuilder> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    (threads >= 2).then(|| rayon::ThreadPoolBuilder::new().num_threads(threads))
}

/// How the names of a worker's update threads begin (`mixnn-update-0`
/// and on): they apply a step's parameter gradients and optimizer step
/// once its input gradient is on its way.
pub const UPDATE_THREAD_PREFIX: &str = "mixnn-update";

/// The niceness of a worker's update threads: below every other thread of
/// the process, so that the update only takes CPU that the sends, the
/// relays and the matrix products on the job's critical path leave over.
pub const UPDATE_NICENESS: i32 = 10;

/// A pool for the work a backward pass defers until its input gradient is
/// out: as many threads as [`own_pool`], each lowering its own priority to
/// [`UPDATE_NICENESS`] as it starts. `None` where [`own_pool`] is (the
/// update then runs on the worker, as before). The split of a product
/// across its threads is the same as on the worker's own pool, so the
/// parameters are the same bit for bit.
///
/// Why: on a machine whose cores the job shares (a laptop running a mix
/// and a slot, or every party on one host), an update at full priority
/// takes every core while the input gradient it must not delay waits to
/// be sealed and sent. The update has until the step's next forward pass
/// to finish, and nothing on the job's path waits for it before then.
fn update_pool() -> Option<rayon::ThreadPool> {
    one_per_core()?
        .thread_name(|i| format!("{UPDATE_THREAD_PREFIX}-{i}"))
        .start_handler(|_| lower_priority())
        .exit_handler(|_| crate::cpu::record_end())
        .build()
        .ok()
}

/// Lowers the calling thread's priority to [`UPDATE_NICENESS`]. Lowering
/// one's own priority needs no privilege; where it fails, or off Linux
/// (where niceness is the whole process's), the update runs at the usual
/// priority, with the same results.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let me = rustix::thread::gettid();
        let _ = rustix::process::setpriority_process(Some(me), UPDATE_NICENESS);
    }
}

/// Commands that may wait in a worker's queue. Every caller blocks for its
/// reply, so the queue never holds more than one command per caller thread.
const QUEUE: usize = 16;

/// What one step's forward pass keeps for its backward pass.
struct Kept {
    /// The input (its id names the input gradient in the tape's gradients).
    x: Mat,
    /// The output, without its tape.
    out: Mat,
    /// `None` for a linear stage ([`StageCore::is_linear`]): its backward
    /// pass runs by hand from `x` and `out`.
    tape: Option<OwnedTape<f32, Cpu>>,
}

/// What a backward pass does once its input gradient is out.
enum Rest {
    /// Apply the tape's parameter gradients.
    Tape(Gradients<f32, Cpu>),
    /// A linear stage: its weight's gradient from the step's input and the
    /// gradient at `x·Wᵀ + b`, then the optimizer step with the bias's
    /// gradient.
    Linear { x: Mat, g_pre: Mat, bias: Vec<f32> },
}

/// A stage that keeps each step's tape; lives on the worker thread only
/// (the tapes are not `Send`).
struct TapedStage {
    core: StageCore,
    pending: BTreeMap<u64, Kept>,
    max_in_flight: usize,
    /// Set (before the reply goes out) when a command panicked; the worker
    /// then stops.
    death: Arc<OnceLock<String>>,
    /// A step's input values, reused from step to step.
    input_values: Vec<f32>,
    /// A step's output values, reused from step to step.
    output_values: Vec<f32>,
    /// Where a backward pass's update runs once its input gradient is out
    /// ([`update_pool`]).
    update: Option<rayon::ThreadPool>,
}

impl TapedStage {
    /// Takes over `slot`; the inputs it kept for steps in flight are traced
    /// now, with the current parameters (as `Slot::backward` would do it if
    /// no other backward came first).
    fn from_slot(slot: Slot, death: Arc<OnceLock<String>>) -> TapedStage {
        let (core, inputs, max_in_flight) = slot.into_parts();
        let pending = inputs
            .into_iter()
            .map(|(step, x)| (step, trace(&core, x)))
            .collect();
        TapedStage {
            core,
            pending,
            max_in_flight,
            death,
            input_values: Vec::new(),
            output_values: Vec::new(),
            update: None,
        }
    }

    /// Back to a [`Slot`]; steps in flight keep their inputs, their tapes
    /// are dropped.
    fn into_slot(self) -> Slot {
        let inputs = self
            .pending
            .into_iter()
            .map(|(step, kept)| (step, kept.x))
            .collect();
        Slot::from_parts(self.core, inputs, self.max_in_flight)
    }

    /// Same checks, in the same order, as [`Slot::forward`].
    fn forward(&mut self, step: u64, input: HostTensor) -> Result<HostTensor, ModelError> {
        if self.pending.contains_key(&step) {
            return Err(ModelError::DuplicateStep(step));
        }
        if self.pending.len() >= self.max_in_flight {
            return Err(ModelError::TooManyInFlight {
                limit: self.max_in_flight,
            });
        }
        let x = self.core.upload_input_owned(input)?;
        let kept = trace(&self.core, x);
        let out = to_host(&self.core, &kept.out);
        self.pending.insert(step, kept);
        Ok(out)
    }

    /// Same checks, in the same order, as [`Slot::backward`]; on an error
    /// the step stays in flight.
    fn backward(
        &mut self,
        step: u64,
        grad_out: HostTensor,
        input_grad: InputGrad,
    ) -> Result<HostTensor, ModelError> {
        let (grad_in, rest) = self.gradients(step, grad_out, input_grad)?;
        self.finish(rest)?;
        Ok(grad_in)
    }

    /// What [`TapedStage::gradients`] left: the parameter gradients and
    /// the optimizer step.
    fn finish(&mut self, rest: Rest) -> Result<(), ModelError> {
        apply(&mut self.core, rest)
    }

    /// [`TapedStage::finish`] after the input gradient went out: on the
    /// update pool, at its lower priority, where there is one. The worker
    /// waits for it, so the next command still sees the step applied.
    fn finish_deferred(&mut self, rest: Rest) -> Result<(), ModelError> {
        let TapedStage { core, update, .. } = self;
        match update {
            Some(pool) => pool.install(|| apply(core, rest)),
            None => apply(core, rest),
        }
    }

    /// [`TapedStage::backward`] up to the parameter gradients: the input
    /// gradient to send on, and what [`TapedStage::finish`] does after.
    /// A linear stage computes only its input gradient here (by hand, the
    /// values the tape would give; none at all for the model's first
    /// stage), and its weight's gradient in `finish`, while the input
    /// gradient is on its way. The step is no longer in flight.
    fn gradients(
        &mut self,
        step: u64,
        grad_out: HostTensor,
        input_grad: InputGrad,
    ) -> Result<(HostTensor, Rest), ModelError> {
        let kept = self
            .pending
            .get(&step)
            .ok_or(ModelError::UnknownStep(step))?;
        let batch = kept.x.shape().0;
        let outputs = self.core.outputs();
        check_grad_out(&self.core, &grad_out, batch)?;
        crate::stage::check_finite(&grad_out.data, "tensor")?;
        let Kept { x, out, tape } = self
            .pending
            .remove(&step)
            .ok_or(ModelError::UnknownStep(step))?;
        let Some(tape) = tape else {
            return self.linear_gradients(x, &out, grad_out.data, input_grad);
        };
        let g = self
            .core
            .device()
            .try_tensor_from_vec(grad_out.data, (batch, outputs))?;
        if input_grad == InputGrad::None {
            self.core.set_skip_input_grad(true);
            let grads = backprop(out.put_tape(tape), g);
            self.core.set_skip_input_grad(false);
            return Ok((
                HostTensor::zeros(self.core.input_shape(batch)),
                Rest::Tape(grads),
            ));
        }
        let mut grads = backprop(out.put_tape(tape), g);
        // The input gradient's buffer leaves the gradients without a copy
        // (only the parameters' gradients are read after this).
        let numel = x.shape().0 * x.shape().1;
        let mut grad_in = match grads.get_or_alloc_mut(&x) {
            Ok(buf) if buf.len() == numel => std::mem::take(&mut **buf),
            _ => crate::conv::values(&grads.get(&x)),
        };
        if input_grad == InputGrad::SkipZeroInputs {
            self.skip_zero_inputs(&x, &mut grad_in);
        }
        let grad_in = HostTensor {
            shape: self.core.input_shape(batch),
            data: grad_in,
        };
        Ok((grad_in, Rest::Tape(grads)))
    }

    /// [`TapedStage::gradients`] of a linear stage, kept without a tape:
    /// `grad` is the checked gradient at its output `out`. With
    /// [`InputGrad::None`] the input gradient is not computed at all
    /// (zeros stand for it).
    fn linear_gradients(
        &mut self,
        x: Mat,
        out: &Mat,
        mut grad: Vec<f32>,
        input_grad: InputGrad,
    ) -> Result<(HostTensor, Rest), ModelError> {
        let batch = x.shape().0;
        self.output_values.resize(grad.len(), 0.0);
        out.copy_into(&mut self.output_values);
        let bias = self.core.linear_pre_grad(&mut grad, &self.output_values);
        let g_pre = self
            .core
            .device()
            .try_tensor_from_vec(grad, (batch, self.core.outputs()))?;
        let shape = self.core.input_shape(batch);
        let grad_in = match input_grad {
            InputGrad::None => HostTensor::zeros(shape),
            InputGrad::Full | InputGrad::SkipZeroInputs => {
                let mut data = self.core.linear_input_grad(&g_pre)?;
                if input_grad == InputGrad::SkipZeroInputs {
                    self.skip_zero_inputs(&x, &mut data);
                }
                HostTensor { shape, data }
            }
        };
        Ok((grad_in, Rest::Linear { x, g_pre, bias }))
    }

    /// [`skip_zero_inputs`] against the step's input `x`.
    fn skip_zero_inputs(&mut self, x: &Mat, grad_in: &mut [f32]) {
        self.input_values.resize(grad_in.len(), 0.0);
        x.copy_into(&mut self.input_values);
        skip_zero_inputs(grad_in, &self.input_values);
    }

    fn infer(&self, input: HostTensor) -> Result<HostTensor, ModelError> {
        let x = self.core.upload_input_owned(input)?;
        Ok(to_host(&self.core, &self.core.forward(x)))
    }
}

/// Applies what [`TapedStage::gradients`] left: the parameter gradients
/// and the optimizer step.
fn apply(core: &mut StageCore, rest: Rest) -> Result<(), ModelError> {
    match rest {
        Rest::Tape(mut grads) => {
            core.apply_grads(&mut grads);
            Ok(())
        }
        Rest::Linear { x, g_pre, bias } => core.apply_linear_grads(&x, g_pre, &bias),
    }
}

/// Which gradient with respect to its input a backward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputGrad {
    /// Every element, as the tape computed it.
    Full,
    /// `+0.0` wherever the input was `+0.0`. Exact for a stage whose input
    /// comes out of a ReLU ([`crate::StageSpec::ends_with_relu`]): there
    /// the ReLU was inactive, and its backward pass turns any gradient into
    /// `+0.0` anyway. The gradient then has the input's zeros and encodes
    /// at a fraction of its dense size.
    SkipZeroInputs,
    /// None at all: the model's first stage, whose input is the data. The
    /// backward pass returns zeros and skips what only that gradient needs.
    None,
}

impl InputGrad {
    /// What a stage's backward pass may return, given the stage before it
    /// (`None` for the first stage): [`InputGrad::SkipZeroInputs`] exactly
    /// when that stage ends with a ReLU.
    pub fn after(previous: Option<&StageSpec>) -> InputGrad {
        match previous {
            Some(p) if p.ends_with_relu() => InputGrad::SkipZeroInputs,
            _ => InputGrad::Full,
        }
    }
}

/// Sets `grad[i]` to `+0.0` wherever `input[i]` is `+0.0`.
pub fn skip_zero_inputs(grad: &mut [f32], input: &[f32]) {
    // A mask, not a branch: zeros fall at random places, and the loop
    // vectorises.
    for (g, x) in grad.iter_mut().zip(input) {
        let keep = 0u32.wrapping_sub(u32::from(x.to_bits() != 0));
        *g = f32::from_bits(g.to_bits() & keep);
    }
}

/// The stage's forward pass on `x`, kept for backward: with a fresh tape,
/// or without one for a linear stage, whose backward pass runs by hand
/// (its output and input are all that pass needs, and the untaped pass
/// works in place instead of allocating each intermediate result).
fn trace(core: &StageCore, x: Mat) -> Kept {
    if core.is_linear() {
        let out = core.forward(x.clone());
        return Kept { x, out, tape: None };
    }
    let (out, tape) = core.forward(x.trace(Gradients::leaky())).split_tape();
    Kept {
        x,
        out,
        tape: Some(tape),
    }
}

type Job = Box<dyn FnOnce(&mut TapedStage) + Send>;

enum Command {
    Run(Job),
    /// Stop and hand the slot back.
    Finish(SyncSender<Slot>),
}

/// A [`Slot`] running on its own thread, keeping each step's gradient tape
/// from `forward` to `backward` (no recomputation).
///
/// The handle is `Send + Sync`; every method sends one command to the
/// worker thread and blocks until it answers, so calls from several threads
/// are served one at a time, in arrival order. If the thread is gone (a
/// command panicked), every method returns [`ModelError::WorkerGone`].
/// Dropping the handle stops the thread and joins it; steps in flight are
/// lost.
#[derive(Debug)]
pub struct SlotWorker {
    tx: Option<SyncSender<Command>>,
    thread: Option<JoinHandle<()>>,
    death: Arc<OnceLock<String>>,
    spec: StageSpec,
    optimizer: OptimizerSpec,
    input_dim: usize,
    output_dim: usize,
    max_in_flight: usize,
}

impl SlotWorker {
    /// Starts a worker thread that takes over `slot`: parameters, optimizer
    /// state, steps applied, in-flight limit, and its steps in flight (their
    /// kept inputs are traced on the worker right away).
    pub fn spawn(slot: Slot) -> Result<SlotWorker, ModelError> {
        let spec = slot.spec().clone();
        let optimizer = *slot.optimizer();
        let input_dim = slot.input_dim();
        let output_dim = slot.output_dim();
        let max_in_flight = slot.max_in_flight();
        let death = Arc::new(OnceLock::new());
        let (tx, rx) = sync_channel(QUEUE);
        let thread_death = Arc::clone(&death);
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || serve(slot, rx, thread_death))
            .map_err(|e| ModelError::WorkerGone(format!("cannot start the worker thread: {e}")))?;
        Ok(SlotWorker {
            tx: Some(tx),
            thread: Some(thread),
            death,
            spec,
            optimizer,
            input_dim,
            output_dim,
            max_in_flight,
        })
    }

    /// Training forward pass for `step` (see [`Slot::forward`]); the
    /// worker keeps the step's tape until [`SlotWorker::backward`].
    pub fn forward(&self, step: u64, input: &HostTensor) -> Result<HostTensor, ModelError> {
        self.forward_owned(step, input.clone())
    }

    /// [`SlotWorker::forward`] taking the input by value (no copy).
    pub fn forward_owned(&self, step: u64, input: HostTensor) -> Result<HostTensor, ModelError> {
        self.call(move |st| st.forward(step, input))?
    }

    /// Backward pass for `step` through its kept tape (see
    /// [`Slot::backward`]): applies the optimizer step and returns the
    /// gradient with respect to the step's input. On a shape or value error
    /// the step stays in flight.
    pub fn backward(&self, step: u64, grad_out: &HostTensor) -> Result<HostTensor, ModelError> {
        self.backward_owned(step, grad_out.clone(), InputGrad::Full)
    }

    /// [`SlotWorker::backward`] taking the gradient by value (no copy), and
    /// saying which input gradient to return.
    pub fn backward_owned(
        &self,
        step: u64,
        grad_out: HostTensor,
        input_grad: InputGrad,
    ) -> Result<HostTensor, ModelError> {
        self.call(move |st| st.backward(step, grad_out, input_grad))?
    }

    /// Inference: forward only, keeps nothing.
    pub fn infer(&self, input: &HostTensor) -> Result<HostTensor, ModelError> {
        self.infer_owned(input.clone())
    }

    /// [`SlotWorker::infer`] taking the input by value (no copy).
    pub fn infer_owned(&self, input: HostTensor) -> Result<HostTensor, ModelError> {
        self.call(move |st| st.infer(input))?
    }

    /// Digest of the stage's parameters (see [`Slot::params_digest`]).
    pub fn params_digest(&self) -> Result<[u8; 32], ModelError> {
        self.call(|st| st.core.digest())
    }

    /// Optimizer steps applied so far.
    pub fn steps_applied(&self) -> Result<u64, ModelError> {
        self.call(|st| st.core.steps())
    }

    /// Steps whose forward pass is kept, waiting for backward.
    pub fn in_flight(&self) -> Result<usize, ModelError> {
        self.call(|st| st.pending.len())
    }

    /// Drops what was kept for `step`; true if there was any.
    pub fn cancel(&self, step: u64) -> Result<bool, ModelError> {
        self.call(move |st| st.pending.remove(&step).is_some())
    }

    /// Drops everything kept for steps in flight.
    pub fn cancel_all(&self) -> Result<(), ModelError> {
        self.call(|st| st.pending.clear())
    }

    /// Exactly [`Slot::to_bytes`] of the slot the worker holds, so
    /// [`Slot::from_bytes`] reads it.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        self.call(|st| core_to_bytes(&st.core))
    }

    /// Stops the worker and returns its slot, with the inputs of the steps
    /// in flight (their tapes are dropped; [`Slot::backward`] recomputes).
    pub fn into_slot(mut self) -> Result<Slot, ModelError> {
        let tx = self.tx.take().ok_or_else(|| self.gone())?;
        let (reply_tx, reply_rx) = sync_channel(1);
        let sent = tx.send(Command::Finish(reply_tx));
        drop(tx);
        let slot = match sent {
            Ok(()) => reply_rx.recv().map_err(|_| self.gone()),
            Err(_) => Err(self.gone()),
        };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        slot
    }

    /// The stage this worker runs.
    pub fn spec(&self) -> StageSpec {
        self.spec.clone()
    }

    pub fn optimizer(&self) -> OptimizerSpec {
        self.optimizer
    }

    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    /// Forward passes that may wait for their backward at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Whether the worker thread still serves commands (false once a
    /// command panicked).
    pub fn is_alive(&self) -> bool {
        self.death.get().is_none() && self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Runs `f` on the worker thread and waits for its result. A panic in
    /// `f` is caught there, stops the worker and comes back as
    /// [`ModelError::WorkerGone`].
    fn call<R, F>(&self, f: F) -> Result<R, ModelError>
    where
        R: Send + 'static,
        F: FnOnce(&mut TapedStage) -> R + Send + 'static,
    {
        let tx = self.tx.as_ref().ok_or_else(|| self.gone())?;
        let (reply_tx, reply_rx) = sync_channel::<Result<R, String>>(1);
        let job: Job = Box::new(move |st: &mut TapedStage| {
            let result = catch_unwind(AssertUnwindSafe(|| f(st))).map_err(|payload| {
                let why = format!("the slot worker panicked: {}", panic_text(&*payload));
                // Recorded before the reply goes out, so every caller that
                // sees the worker gone can tell why.
                let _ = st.death.set(why.clone());
                why
            });
            let _ = reply_tx.send(result);
        });
        tx.send(Command::Run(job)).map_err(|_| self.gone())?;
        match reply_rx.recv() {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(why)) => Err(ModelError::WorkerGone(why)),
            Err(_) => Err(self.gone()),
        }
    }

    fn gone(&self) -> ModelError {
        ModelError::WorkerGone(
            self.death
                .get()
                .cloned()
                .unwrap_or_else(|| "the slot worker thread has stopped".into()),
        )
    }

    /// [`SlotWorker::forward_owned`], [`SlotWorker::backward_owned`] or
    /// [`SlotWorker::infer_owned`] without blocking, for async callers:
    /// queues `op` and returns at once; `reply` then runs on the worker
    /// thread with the result (a panic there comes back as
    /// [`ModelError::WorkerGone`]). Queued work runs in order with every
    /// other call. An error (the worker is gone, or its queue is full) means
    /// nothing was queued and `reply` is dropped unrun.
    pub fn submit<F>(&self, op: SlotOp, reply: F) -> Result<(), ModelError>
    where
        F: FnOnce(Result<HostTensor, ModelError>) + Send + 'static,
    {
        let tx = self.tx.as_ref().ok_or_else(|| self.gone())?;
        let job: Job = Box::new(move |st: &mut TapedStage| {
            let mut reply = Some(reply);
            let mut answer = |r: Result<HostTensor, ModelError>| {
                if let Some(reply) = reply.take() {
                    reply(r);
                }
            };
            let result = catch_unwind(AssertUnwindSafe(|| match op {
                SlotOp::Forward { step, input } => answer(st.forward(step, input)),
                SlotOp::Backward {
                    step,
                    grad_out,
                    input_grad,
                } => match st.gradients(step, grad_out, input_grad) {
                    // The input gradient goes out before the parameter
                    // gradients it does not need and the optimizer step:
                    // the same arithmetic, earlier on the wire. The next
                    // command runs after the step, on this thread.
                    Ok((grad_in, rest)) => {
                        answer(Ok(grad_in));
                        // A first stage's reply is only an acknowledgement:
                        // its update is what the next step waits for, and
                        // runs at full priority.
                        let applied = match input_grad {
                            InputGrad::None => st.finish(rest),
                            InputGrad::Full | InputGrad::SkipZeroInputs => st.finish_deferred(rest),
                        };
                        if let Err(e) = applied {
                            // The step is lost and the parameters would
                            // fall behind: stop serving them.
                            let _ = st
                                .death
                                .set(format!("a step's optimizer update failed: {e}"));
                        }
                    }
                    Err(e) => answer(Err(e)),
                },
                SlotOp::Infer { input } => answer(st.infer(input)),
            }));
            if let Err(payload) = result {
                let why = format!("the slot worker panicked: {}", panic_text(&*payload));
                let _ = st.death.set(why.clone());
                answer(Err(ModelError::WorkerGone(why)));
            }
        });
        tx.try_send(Command::Run(job)).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => {
                ModelError::WorkerGone("the slot worker's queue is full".into())
            }
            std::sync::mpsc::TrySendError::Disconnected(_) => self.gone(),
        })
    }
}

/// One step for [`SlotWorker::submit`].
pub enum SlotOp {
    /// As [`SlotWorker::forward_owned`].
    Forward { step: u64, input: HostTensor },
    /// As [`SlotWorker::backward_owned`], but the reply runs as soon as
    /// the input gradient exists, before the optimizer step (which the
    /// next queued command waits for).
    Backward {
        step: u64,
        grad_out: HostTensor,
        input_grad: InputGrad,
    },
    /// As [`SlotWorker::infer_owned`].
    Infer { input: HostTensor },
}

impl Drop for SlotWorker {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop once it has served what
        // is queued.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The worker thread: serves commands until the channel closes, a command
/// panics, or it is told to finish.
fn serve(slot: Slot, rx: Receiver<Command>, death: Arc<OnceLock<String>>) {
    // Dropped when this function returns, after the last product, as the
    // thread ends.
    let _pool = own_pool();
    let setup = Arc::clone(&death);
    let started = catch_unwind(AssertUnwindSafe(|| TapedStage::from_slot(slot, death)));
    let mut stage = match started {
        Ok(mut stage) => {
            stage.update = update_pool();
            stage
        }
        Err(payload) => {
            let _ = setup.set(format!(
                "the slot worker panicked while starting: {}",
                panic_text(&*payload)
            ));
            return;
        }
    };
    while let Ok(command) = rx.recv() {
        match command {
            Command::Run(job) => {
                job(&mut stage);
                if stage.death.get().is_some() {
                    // The stage may be half updated: stop serving it.
                    return;
                }
            }
            Command::Finish(reply) => {
                let _ = reply.send(stage.into_slot());
                return;
            }
        }
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<SlotWorker>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InitSpec, LayerSpec};

    fn worker() -> SlotWorker {
        let stage = StageSpec {
            layers: vec![
                LayerSpec::Linear {
                    inputs: 3,
                    outputs: 2,
                },
                LayerSpec::Tanh,
            ],
        };
        let init = InitSpec {
            seed: 1,
            stage_index: 0,
        };
        let slot = Slot::new(&stage, init, OptimizerSpec::Sgd { lr: 0.1 }).expect("slot");
        SlotWorker::spawn(slot).expect("spawn")
    }

    #[test]
    fn a_panic_stops_the_worker_without_hanging_callers() {
        let w = worker();
        assert!(w.is_alive());
        assert_eq!(w.steps_applied().expect("alive"), 0);
        let err = w.call(|_| -> u8 { panic!("boom") }).expect_err("panicked");
        match err {
            ModelError::WorkerGone(why) => assert!(why.contains("boom"), "{why}"),
            other => panic!("unexpected error {other:?}"),
        }
        for _ in 0..3 {
            match w.forward(0, &HostTensor::zeros(vec![1, 3])) {
                Err(ModelError::WorkerGone(why)) => assert!(why.contains("boom"), "{why}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(matches!(w.params_digest(), Err(ModelError::WorkerGone(_))));
        assert!(!w.is_alive());
        assert!(matches!(w.into_slot(), Err(ModelError::WorkerGone(_))));
    }

    #[test]
    fn runs_on_a_named_thread() {
        let w = worker();
        let name = w
            .call(|_| std::thread::current().name().map(str::to_owned))
            .expect("alive");
        assert_eq!(name.as_deref(), Some(THREAD_NAME));
    }

    /// Names of this process's threads (Linux).
    #[cfg(target_os = "linux")]
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .map(|n| n.trim_end().to_string())
            .collect()
    }

    #[test]
    fn the_worker_thread_is_the_first_of_its_own_compute_pool() {
        let w = worker();
        let (index, threads) = w
            .call(|_| (rayon::current_thread_index(), rayon::current_num_threads()))
            .expect("alive");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores >= 2 {
            assert_eq!(index, Some(0));
            assert_eq!(threads, cores);
        } else {
            assert_eq!(index, None);
        }
    }

    /// This process's threads (Linux): id, name, niceness, CPU ticks.
    #[cfg(target_os = "linux")]
    fn threads() -> Vec<(u32, String, i32, u64)> {
        std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .filter_map(|e| {
                let path = e.ok()?.path();
                let tid = path.file_name()?.to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                // The name is in parentheses and may hold spaces; the
                // fields after it are numbered from 3.
                let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
                let f: Vec<&str> = rest.split(' ').collect();
                let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                Some((tid, name.to_string(), f.get(16)?.parse().ok()?, ticks))
            })
            .collect()
    }

    /// A backward pass that returns an input gradient applies its update on
    /// the worker's update threads, which run below the usual priority;
    /// a first stage's (no input gradient) stays on the worker's own pool.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_update_after_the_input_gradient_runs_on_threads_of_lower_priority() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stage = StageSpec {
            layers: vec![LayerSpec::Linear {
                inputs: 512,
                outputs: 512,
            }],
        };
        let init = InitSpec {
            seed: 2,
            stage_index: 1,
        };
        let slot = Slot::new(&stage, init, OptimizerSpec::Sgd { lr: 0.1 }).expect("slot");
        let w = SlotWorker::spawn(slot).expect("spawn");
        // This worker's update threads, each asked for its id (a thread
        // has set its niceness before it takes any work).
        let ids: Vec<u32> = w
            .call(|st| {
                st.update.as_ref().map_or_else(Vec::new, |pool| {
                    pool.broadcast(|_| rustix::thread::gettid().as_raw_nonzero().get() as u32)
                })
            })
            .expect("alive");
        let mine = || -> Vec<(u32, String, i32, u64)> {
            threads()
                .into_iter()
                .filter(|t| ids.contains(&t.0))
                .collect()
        };
        let ticks = |ts: &[(u32, String, i32, u64)]| ts.iter().map(|t| t.3).sum::<u64>();
        if cores < 2 {
            assert!(ids.is_empty(), "{ids:?}");
            return;
        }
        let start = mine();
        assert_eq!(start.len(), cores, "{start:?}");
        for (_, name, nice, _) in &start {
            assert!(name.starts_with(UPDATE_THREAD_PREFIX), "{name}");
            assert_eq!(*nice, UPDATE_NICENESS, "{name}");
        }

        let run = |steps: u64, input_grad: InputGrad| {
            let x = HostTensor::new(vec![256, 512], vec![0.5; 256 * 512]).expect("x");
            let g = HostTensor::new(vec![256, 512], vec![0.01; 256 * 512]).expect("g");
            let t0 = ticks(&mine());
            let first = w.steps_applied().expect("alive");
            for step in first..first + steps {
                let (tx, rx) = sync_channel(1);
                w.submit(
                    SlotOp::Forward {
                        step,
                        input: x.clone(),
                    },
                    move |r| {
                        let _ = tx.send(r.map(|_| ()));
                    },
                )
                .expect("queued");
                rx.recv().expect("reply").expect("forward");
                let (tx, rx) = sync_channel(1);
                w.submit(
                    SlotOp::Backward {
                        step,
                        grad_out: g.clone(),
                        input_grad,
                    },
                    move |r| {
                        let _ = tx.send(r.map(|_| ()));
                    },
                )
                .expect("queued");
                rx.recv().expect("reply").expect("backward");
            }
            assert_eq!(w.steps_applied().expect("alive"), first + steps);
            ticks(&mine()) - t0
        };
        // A clock tick is 10 ms: enough steps that the updates take many.
        let deferred = run(100, InputGrad::Full);
        assert!(deferred > 0, "the update threads took no CPU");
        // Idle pool threads spin a little before they sleep.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let first_stage = run(100, InputGrad::None);
        assert!(
            first_stage * 10 <= deferred,
            "a first stage's update left the worker: {first_stage} ticks on the update threads, \
             {deferred} for the deferred updates"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_stopped_worker_leaves_no_helper_thread_behind() {
        let helpers = || {
            thread_names()
                .iter()
                .filter(|n| {
                    n.starts_with(COMPUTE_THREAD_PREFIX)
                        || n.starts_with(UPDATE_THREAD_PREFIX)
                        || n.as_str() == THREAD_NAME
                })
                .count()
        };
        // Other tests of this binary start workers too: count only what
        // this one leaves, after it has started and stopped many.
        let before = helpers();
        for _ in 0..20 {
            let w = worker();
            w.forward(0, &HostTensor::zeros(vec![2, w.input_dim()]))
                .expect("forward");
            drop(w);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while helpers() > before + 8 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Twenty workers with their pools would leave 20 x 2 x cores threads.
        assert!(
            helpers() <= before + 8,
            "{} worker and helper threads, {before} before, {cores} cores",
            helpers()
        );
    }

    /// A worker's helper and update threads end with it; their clocks
    /// stay readable (`mixnn bench paper` counts their CPU per party).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_stopped_worker_s_helpers_leave_their_clocks() {
        let gettid = || rustix::thread::gettid().as_raw_nonzero().get() as u32;
        let w = worker();
        w.forward(0, &HostTensor::zeros(vec![2, w.input_dim()]))
            .expect("forward");
        let (me, mut ids) = w
            .call(move |st| {
                let me = gettid();
                let mut ids = rayon::broadcast(|_| gettid());
                if let Some(pool) = &st.update {
                    ids.extend(pool.broadcast(|_| gettid()));
                }
                (me, ids)
            })
            .expect("alive");
        ids.retain(|&t| t != me);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            assert!(ids.is_empty(), "{ids:?}");
            return;
        }
        // One helper in the compute pool, one update thread per core.
        assert_eq!(ids.len(), 2 * cores - 1, "{ids:?}");
        drop(w);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let ended = loop {
            let ended: Vec<_> = crate::cpu::ended_threads()
                .into_iter()
                .filter(|e| ids.contains(&e.tid))
                .collect();
            if ended.len() == ids.len() || std::time::Instant::now() > deadline {
                break ended;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(ended.len(), ids.len(), "{ended:?} of {ids:?}");
        for e in &ended {
            assert!(
                e.name.starts_with(COMPUTE_THREAD_PREFIX)
                    || e.name.starts_with(UPDATE_THREAD_PREFIX),
                "{e:?}"
            );
        }
    }
}
