//! One stage's math, shared by [`crate::Slot`] and [`crate::LocalModel`] so
//! that both run exactly the same operations in the same order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dfdx::prelude::*;

use crate::conv::{avg_pool2d, conv2d, max_pool2d, ConvGeom, PoolGeom};
use crate::optim::{OptimizerSpec, OptimizerState};
use crate::spec::{Features, LayerSpec, StageSpec};
use crate::tensor::HostTensor;
use crate::ModelError;

/// A `[batch, features]` matrix on the CPU backend.
pub(crate) type Mat<T = NoneTape> = Tensor<(usize, usize), f32, Cpu, T>;
pub(crate) type Vector = Tensor<(usize,), f32, Cpu>;

/// The layer with parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    Linear,
    Conv(ConvGeom),
}

/// A layer after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Post {
    Relu,
    Tanh,
    MaxPool(PoolGeom),
    AvgPool(PoolGeom),
}

/// Parameters, optimizer state and step counter of one stage.
#[derive(Debug, Clone)]
pub(crate) struct StageCore {
    spec: StageSpec,
    inputs: usize,
    outputs: usize,
    /// What one example looks like going in and coming out.
    in_features: Features,
    out_features: Features,
    param: Param,
    post: Vec<Post>,
    dev: Cpu,
    /// `[outputs, inputs]` for a linear layer, like PyTorch's `nn.Linear`;
    /// `[out_channels, in_channels·k·k]` for a convolution (PyTorch's
    /// `[out, in, k, k]`, row-major). Row-major either way.
    weight: Mat,
    /// Empty for a convolution without bias.
    bias: Vector,
    /// Host copies of `weight` and `bias`, always equal to them.
    host_w: Vec<f32>,
    host_b: Vec<f32>,
    opt: OptimizerSpec,
    opt_state: OptimizerState,
    steps: u64,
    /// Reused buffer for gradients read out of the tape.
    scratch: Vec<f32>,
    /// Set while a backward pass needs no gradient for the stage's input
    /// (the model's first stage): a convolution then skips it.
    skip_input_grad: Arc<AtomicBool>,
}

impl StageCore {
    /// Deterministic Kaiming-uniform init (PyTorch's `nn.Linear` and
    /// `nn.Conv2d` default: weight and bias uniform in `±1/sqrt(fan_in)`,
    /// fan_in = inputs or in_channels·k·k), drawn from ChaCha20 seeded by
    /// `(seed, stage_index)`: weight row by row, then bias.
    pub(crate) fn init(
        spec: &StageSpec,
        seed: u64,
        stage_index: u32,
        opt: OptimizerSpec,
    ) -> Result<StageCore, ModelError> {
        spec.validate()?;
        opt.validate()?;
        let mut rng = init_rng(seed, stage_index);
        let bound = 1.0 / (spec.fan_in() as f32).sqrt();
        let mut sample = || {
            use rand::RngCore;
            let u = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
            (2.0 * u - 1.0) * bound
        };
        let w: Vec<f32> = (0..spec.weight_len()).map(|_| sample()).collect();
        let b: Vec<f32> = (0..spec.bias_len()).map(|_| sample()).collect();
        let state = OptimizerState::new(&opt, &[w.len(), b.len()]);
        StageCore::from_parts(spec.clone(), w, b, opt, state, 0)
    }

    /// Rebuilds a stage from its parts, checking that they fit together.
    pub(crate) fn from_parts(
        spec: StageSpec,
        host_w: Vec<f32>,
        host_b: Vec<f32>,
        opt: OptimizerSpec,
        opt_state: OptimizerState,
        steps: u64,
    ) -> Result<StageCore, ModelError> {
        spec.validate()?;
        opt.validate()?;
        let (wl, bl) = (spec.weight_len(), spec.bias_len());
        if host_w.len() != wl || host_b.len() != bl {
            return Err(ModelError::SlotBytes(format!(
                "parameter sizes {}+{} do not fit the stage (weight {:?}, bias {bl})",
                host_w.len(),
                host_b.len(),
                spec.weight_shape()
            )));
        }
        if !opt_state.matches(&opt, &[host_w.len(), host_b.len()]) {
            return Err(ModelError::SlotBytes(
                "optimizer state does not fit the optimizer or the stage".into(),
            ));
        }
        let (param, post) = plan(&spec);
        let dev = Cpu::default();
        let rows = spec.weight_shape().first().copied().unwrap_or(0);
        let weight = dev.try_tensor_from_vec(host_w.clone(), (rows, wl / rows.max(1)))?;
        let bias = dev.try_tensor_from_vec(host_b.clone(), (bl,))?;
        Ok(StageCore {
            inputs: spec.input_dim(),
            outputs: spec.output_dim(),
            in_features: spec.input_features(),
            out_features: spec.output_features(),
            spec,
            param,
            post,
            dev,
            weight,
            bias,
            host_w,
            host_b,
            opt,
            opt_state,
            steps,
            scratch: Vec::new(),
            skip_input_grad: Arc::new(AtomicBool::new(false)),
        })
    }

    pub(crate) fn spec(&self) -> &StageSpec {
        &self.spec
    }
    pub(crate) fn optimizer(&self) -> &OptimizerSpec {
        &self.opt
    }
    pub(crate) fn optimizer_state(&self) -> &OptimizerState {
        &self.opt_state
    }
    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }
    pub(crate) fn weight(&self) -> &[f32] {
        &self.host_w
    }
    pub(crate) fn bias(&self) -> &[f32] {
        &self.host_b
    }
    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }
    pub(crate) fn outputs(&self) -> usize {
        self.outputs
    }
    pub(crate) fn device(&self) -> &Cpu {
        &self.dev
    }

    /// Whether backward passes from now on leave out the gradient with
    /// respect to the stage's input (only a convolution saves work by it;
    /// nothing may read that gradient meanwhile).
    pub(crate) fn set_skip_input_grad(&self, skip: bool) {
        self.skip_input_grad.store(skip, Ordering::Relaxed);
    }

    /// The shape of a batch of `rows` examples coming out.
    pub(crate) fn output_shape(&self, rows: usize) -> Vec<usize> {
        self.out_features.batch_shape(rows)
    }

    /// The shape of a batch of `rows` examples going in.
    pub(crate) fn input_shape(&self, rows: usize) -> Vec<usize> {
        self.in_features.batch_shape(rows)
    }

    /// The stage's forward pass: its linear or convolution layer, then
    /// the layers after it (flattens change nothing: a batch is always a
    /// `[batch, values]` matrix, channels first).
    pub(crate) fn forward<T: Tape<f32, Cpu>>(&self, x: Mat<T>) -> Mat<T> {
        let mut y = match &self.param {
            Param::Linear => {
                let w = self
                    .weight
                    .retaped::<T>()
                    .permute::<(usize, usize), Axes2<1, 0>>();
                let y = x.matmul(w);
                let shape = *y.shape();
                y + self
                    .bias
                    .retaped::<T>()
                    .broadcast_like::<_, Axis<0>>(&shape)
            }
            Param::Conv(g) => {
                let bias = (!self.host_b.is_empty()).then_some(&self.bias);
                conv2d(g, x, &self.weight, bias, &self.skip_input_grad)
            }
        };
        for op in &self.post {
            y = match op {
                Post::Relu => y.relu(),
                Post::Tanh => y.tanh(),
                Post::MaxPool(g) => max_pool2d(g, y),
                Post::AvgPool(g) => avg_pool2d(g, y),
            };
        }
        y
    }

    /// Checks `t` is `[batch ≥ 1, ...]` with `inputs` features per example
    /// (extra dims are flattened) and finite, and uploads it.
    pub(crate) fn upload_input(&self, t: &HostTensor) -> Result<Mat, ModelError> {
        let batch = check_batch(t, self.inputs, "stage input")?;
        self.upload(t, batch, self.inputs)
    }

    /// Like [`StageCore::upload_input`], but moves `t`'s data into the
    /// tensor instead of copying it.
    pub(crate) fn upload_input_owned(&self, t: HostTensor) -> Result<Mat, ModelError> {
        let batch = check_batch(&t, self.inputs, "stage input")?;
        self.upload_owned(t, batch, self.inputs)
    }

    /// Like [`StageCore::upload`], but moves `t`'s data into the tensor.
    pub(crate) fn upload_owned(
        &self,
        t: HostTensor,
        batch: usize,
        features: usize,
    ) -> Result<Mat, ModelError> {
        check_finite(&t.data, "tensor")?;
        Ok(self.dev.try_tensor_from_vec(t.data, (batch, features))?)
    }

    /// Uploads `t` as a `[batch, features]` matrix after checking it is finite.
    pub(crate) fn upload(
        &self,
        t: &HostTensor,
        batch: usize,
        features: usize,
    ) -> Result<Mat, ModelError> {
        check_finite(&t.data, "tensor")?;
        Ok(self
            .dev
            .try_tensor_from_vec(t.data.clone(), (batch, features))?)
    }

    /// Applies one optimizer step from the gradients of a backward pass
    /// through [`StageCore::forward`].
    ///
    /// The gradients are read where the backward pass left them (no copy);
    /// only their values matter, so the result is the same either way.
    pub(crate) fn apply_grads(&mut self, grads: &mut Gradients<f32, Cpu>) {
        self.opt_state.begin_step();
        let (opt, state) = (&self.opt, &mut self.opt_state);
        with_param_grad(grads, &self.weight, &mut self.scratch, |g| {
            state.update(opt, 0, &mut self.host_w, g)
        });
        self.weight.copy_from(&self.host_w);
        if !self.host_b.is_empty() {
            with_param_grad(grads, &self.bias, &mut self.scratch, |g| {
                state.update(opt, 1, &mut self.host_b, g)
            });
            self.bias.copy_from(&self.host_b);
        }
        // Saturating, like Adam's count: a restored slot may claim any count.
        self.steps = self.steps.saturating_add(1);
    }

    /// Whether the stage is one linear layer, alone or followed by a ReLU:
    /// its backward pass may then run by hand, in pieces
    /// ([`StageCore::linear_pre_grad`], [`StageCore::linear_input_grad`],
    /// [`StageCore::apply_linear_grads`]), the input gradient first.
    pub(crate) fn is_linear(&self) -> bool {
        self.param == Param::Linear && matches!(self.post.as_slice(), [] | [Post::Relu])
    }

    /// The first piece of a linear stage's backward pass: turns `grad`,
    /// the gradient at the stage's output `out`, into the gradient at
    /// `x·Wᵀ + b` in place, and returns the bias's gradient.
    ///
    /// These are the values dfdx's tape computes, bit for bit: [`backprop`]
    /// sets the output's gradient to `grad + 0.0`; the ReLU's backward adds
    /// `df(y) · g` to zero (`df` is 1 where `y > 0`, which is where the
    /// output is, and 0 elsewhere); the bias addition's adds `1 · g` to
    /// zero for the product, and `1 · g` row after row into the bias's
    /// zeroed gradient. Adding to `+0.0` turns `-0.0` into `+0.0` and
    /// keeps every other value.
    pub(crate) fn linear_pre_grad(&self, grad: &mut [f32], out: &[f32]) -> Vec<f32> {
        let relu = !self.post.is_empty();
        for (g, y) in grad.iter_mut().zip(out) {
            // ReLU's derivative: 1 where `y > 0`, 0 elsewhere (NaN too).
            let df = if !relu || *y > 0.0 { 1.0 } else { 0.0 };
            *g = 0.0 + df * (*g + 0.0);
        }
        let mut bias = vec![0f32; self.outputs];
        for row in grad.chunks_exact(self.outputs) {
            for (b, g) in bias.iter_mut().zip(row) {
                *b += 1.0 * *g;
            }
        }
        bias
    }

    /// The gradient at the stage's input from `g_pre`, the gradient at
    /// `x·Wᵀ + b` ([`StageCore::linear_pre_grad`]): `g_pre · W`, the
    /// product dfdx's backward pass makes (the same operands, strides and
    /// sizes; it adds into zeros, so `-0.0` becomes `+0.0` here too).
    pub(crate) fn linear_input_grad(&self, g_pre: &Mat) -> Result<Vec<f32>, ModelError> {
        let g = g_pre.clone().try_matmul(self.weight.clone())?;
        Ok(positive_zeros(&g))
    }

    /// The rest of a linear stage's backward pass and its optimizer step:
    /// the weight's gradient `g_preᵀ · x` (dfdx's product: gemm turns the
    /// row-major `[outputs, inputs]` result into the same column-major
    /// problem dfdx's backward pass writes into the weight's gradient),
    /// then [`StageCore::apply_param_grads`] with `bias`.
    pub(crate) fn apply_linear_grads(
        &mut self,
        x: &Mat,
        g_pre: Mat,
        bias: &[f32],
    ) -> Result<(), ModelError> {
        let gt = g_pre.permute::<(usize, usize), Axes2<1, 0>>();
        let weight = positive_zeros(&gt.try_matmul(x.clone())?);
        self.apply_param_grads(&weight, bias);
        Ok(())
    }

    /// [`StageCore::apply_grads`] from gradients in hand: the same updates
    /// in the same order.
    pub(crate) fn apply_param_grads(&mut self, weight: &[f32], bias: &[f32]) {
        self.opt_state.begin_step();
        self.opt_state
            .update(&self.opt, 0, &mut self.host_w, weight);
        self.weight.copy_from(&self.host_w);
        if !self.host_b.is_empty() {
            self.opt_state.update(&self.opt, 1, &mut self.host_b, bias);
            self.bias.copy_from(&self.host_b);
        }
        self.steps = self.steps.saturating_add(1);
    }

    /// blake3 over the weight then the bias, little-endian `f32`.
    pub(crate) fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        crate::digest::hash_f32s(&mut h, &self.host_w);
        crate::digest::hash_f32s(&mut h, &self.host_b);
        *h.finalize().as_bytes()
    }
}

/// Runs `f` on `param`'s gradient, read where the backward pass left it;
/// copied into `scratch` only should it not have the parameter's size.
fn with_param_grad<S: Shape>(
    grads: &mut Gradients<f32, Cpu>,
    param: &Tensor<S, f32, Cpu>,
    scratch: &mut Vec<f32>,
    f: impl FnOnce(&[f32]),
) {
    let n = param.shape().num_elements();
    match grads.get_or_alloc_mut(param) {
        Ok(g) if g.len() == n => f(g),
        _ => {
            scratch.resize(n, 0.0);
            grads.get(param).copy_into(scratch);
            f(scratch)
        }
    }
}

/// The rows of `t` when it is `[batch ≥ 1, ...]` with `features` per row.
pub(crate) fn check_batch(
    t: &HostTensor,
    features: usize,
    what: &'static str,
) -> Result<usize, ModelError> {
    let expected = || format!("[batch, {features}]");
    let (&batch, rest) = t.shape.split_first().ok_or_else(|| ModelError::Shape {
        what,
        expected: expected(),
        got: t.shape.clone(),
    })?;
    let per_row = rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if batch == 0
        || rest.is_empty()
        || per_row != Some(features)
        || batch.checked_mul(features) != Some(t.data.len())
    {
        return Err(ModelError::Shape {
            what,
            expected: expected(),
            got: t.shape.clone(),
        });
    }
    Ok(batch)
}

pub(crate) fn check_finite(data: &[f32], what: &'static str) -> Result<(), ModelError> {
    match crate::tensor::first_non_finite(data) {
        Some(index) => Err(ModelError::NonFinite { what, index }),
        None => Ok(()),
    }
}

/// `m`'s values with `-0.0` made `+0.0` (`0 + v`, what adding into a
/// zeroed gradient gives).
fn positive_zeros(m: &Mat) -> Vec<f32> {
    let mut v = vec![0f32; m.shape().0 * m.shape().1];
    m.copy_into(&mut v);
    for x in &mut v {
        *x += 0.0;
    }
    v
}

/// Backpropagates `grad` (same shape as `out`) into `out`'s tape.
///
/// The tape gets one more operation, run first: it sets `out`'s gradient
/// to `grad`. That is the gradient of `(out * grad).sum()` with respect to
/// `out`, bit for bit (`0 + grad * 1`, which turns `-0.0` into `+0.0`), at
/// the cost of one copy instead of a product, a sum and their backward
/// passes over the whole output.
pub(crate) fn backprop(out: Mat<OwnedTape<f32, Cpu>>, grad: Mat) -> Gradients<f32, Cpu> {
    let (out, mut tape) = out.split_tape();
    let ghost = out.ghost();
    tape.add_backward_op(move |grads| {
        let dst = grads.get_or_alloc_mut(&ghost)?;
        grad.copy_into(dst);
        for d in dst.iter_mut() {
            *d += 0.0;
        }
        Ok(())
    });
    let root: Tensor<Rank0, f32, Cpu> = out.device().zeros();
    root.put_tape(tape).backward()
}

/// The stage's layers as operations, with their image shapes as
/// [`StageSpec`]'s shape check found them.
fn plan(spec: &StageSpec) -> (Param, Vec<Post>) {
    let mut param = Param::Linear;
    let mut post = Vec::new();
    let mut before = spec.input_features();
    for (layer, after) in spec.layers.iter().zip(spec.layer_outputs()) {
        // A flatten before the layer with parameters changes nothing.
        let Some(after) = after else { continue };
        match (*layer, before, after) {
            (
                LayerSpec::Conv2d {
                    kernel,
                    stride,
                    padding,
                    ..
                },
                Features::Image {
                    channels: c,
                    height: h,
                    width: w,
                },
                Features::Image {
                    channels: oc,
                    height: oh,
                    width: ow,
                },
            ) => {
                param = Param::Conv(ConvGeom {
                    c,
                    h,
                    w,
                    oc,
                    k: kernel,
                    s: stride,
                    p: padding,
                    oh,
                    ow,
                });
            }
            (LayerSpec::Relu, ..) => post.push(Post::Relu),
            (LayerSpec::Tanh, ..) => post.push(Post::Tanh),
            (
                LayerSpec::MaxPool2d { kernel, stride } | LayerSpec::AvgPool2d { kernel, stride },
                Features::Image {
                    channels: c,
                    height: h,
                    width: w,
                },
                Features::Image {
                    height: oh,
                    width: ow,
                    ..
                },
            ) => {
                let g = PoolGeom {
                    c,
                    h,
                    w,
                    k: kernel,
                    s: stride,
                    oh,
                    ow,
                };
                post.push(if matches!(layer, LayerSpec::MaxPool2d { .. }) {
                    Post::MaxPool(g)
                } else {
                    Post::AvgPool(g)
                });
            }
            // Linear layers and flattens: a batch is always a
            // `[batch, values]` matrix.
            _ => {}
        }
        before = after;
    }
    (param, post)
}

fn init_rng(seed: u64, stage_index: u32) -> rand_chacha::ChaCha20Rng {
    use rand::SeedableRng;
    let mut material = [0u8; 12];
    material[..8].copy_from_slice(&seed.to_le_bytes());
    material[8..].copy_from_slice(&stage_index.to_le_bytes());
    let key = blake3::derive_key("mixnn-model 2025 stage init v1", &material);
    rand_chacha::ChaCha20Rng::from_seed(key)
}

#[allow(dead_code)]
fn assert_send() {
    fn is_send<T: Send + Sync>() {}
    is_send::<StageCore>();
    is_send::<Mat>();
}
