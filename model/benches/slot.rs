//! One training step of a model: the whole model locally, one `Slot` per
//! stage (which recompute forward in backward), and one `SlotWorker` per
//! stage (which keep the tape); for mlp:784-512-256-10 at batch 256 and
//! LeNet-5 at batch 128. Plus one stage's forward and backward: the MLP's
//! first linear layer, and LeNet-5's second convolution. And a checkpoint's
//! work on the MLP's first layer: its state to bytes and back, its digest.
//!
//! `cargo bench -p mixnn-model --bench slot`

use criterion::{criterion_group, criterion_main, Criterion};
use mixnn_model::{
    softmax_cross_entropy, synthetic, Arch, HostTensor, InitSpec, InputGrad, LocalModel,
    OptimizerSpec, Slot, SlotWorker, StageSpec,
};

fn slot(stage: &StageSpec, i: usize, opt: OptimizerSpec) -> Slot {
    Slot::new(
        stage,
        InitSpec {
            seed: 1,
            stage_index: i as u32,
        },
        opt,
    )
    .expect("slot")
}

/// Whole model, slots and workers: one training step each.
fn model(c: &mut Criterion, name: &str, arch: &str, batch: usize) {
    let arch = Arch::parse(arch).expect("arch");
    let opt = OptimizerSpec::Sgd { lr: 0.01 };
    let data = synthetic(1, batch, 1);
    let (x, labels) = data.train.batches(batch, 0, 1).next().expect("batch");

    let mut g = c.benchmark_group(name);
    g.sample_size(30);

    let mut local = LocalModel::new(&arch, 1, opt).expect("model");
    g.bench_function("local_train_step", |b| {
        b.iter(|| local.train_step(&x, &labels).expect("step"))
    });

    let stages = arch.stages();
    let mut slots: Vec<Slot> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| slot(s, i, opt))
        .collect();
    let mut step = 0u64;
    g.bench_function("slots_train_step", |b| {
        b.iter(|| {
            let mut act = x.clone();
            for s in slots.iter_mut() {
                act = s.forward(step, &act).expect("fwd");
            }
            let (_, mut grad) = softmax_cross_entropy(&act, &labels).expect("loss");
            for s in slots.iter_mut().rev() {
                grad = s.backward(step, &grad).expect("bwd");
            }
            step += 1;
        })
    });

    let workers: Vec<SlotWorker> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| SlotWorker::spawn(slot(s, i, opt)).expect("worker"))
        .collect();
    let mut step = 0u64;
    g.bench_function("slot_workers_train_step", |b| {
        b.iter(|| {
            let mut act = x.clone();
            for w in &workers {
                act = w.forward_owned(step, act).expect("fwd");
            }
            let (_, mut grad) = softmax_cross_entropy(&act, &labels).expect("loss");
            for (i, w) in workers.iter().enumerate().rev() {
                // As the network drives them: the first stage returns no
                // input gradient.
                let input_grad = match i.checked_sub(1) {
                    None => InputGrad::None,
                    Some(p) => InputGrad::after(Some(&workers[p].spec())),
                };
                grad = w.backward_owned(step, grad, input_grad).expect("bwd");
            }
            step += 1;
        })
    });
    g.finish();
}

/// One stage of `arch`: inference, and a training forward plus backward.
fn stage(c: &mut Criterion, name: &str, arch: &str, index: usize, batch: usize) {
    let arch = Arch::parse(arch).expect("arch");
    let spec = &arch.stages()[index];
    let opt = OptimizerSpec::Sgd { lr: 0.01 };
    let x = HostTensor::new(
        spec.input_features().batch_shape(batch),
        (0..batch * spec.input_dim())
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0)
            .collect(),
    )
    .expect("x");
    let grad = HostTensor::new(
        spec.output_features().batch_shape(batch),
        vec![0.01; batch * spec.output_dim()],
    )
    .expect("grad");
    let mut s = slot(spec, index, opt);
    let mut g = c.benchmark_group(name);
    g.sample_size(30);
    g.bench_function("forward", |b| b.iter(|| s.infer(&x).expect("fwd")));
    let mut step = 0u64;
    g.bench_function("forward_backward", |b| {
        b.iter(|| {
            s.forward(step, &x).expect("fwd");
            s.backward(step, &grad).expect("bwd");
            step += 1;
        })
    });
    g.finish();
}

/// A checkpoint's work on one stage: its state to bytes and back, and its
/// parameter digest (the MLP's first layer with momentum: 3.2 MB).
fn state(c: &mut Criterion, name: &str, arch: &str, index: usize) {
    let arch = Arch::parse(arch).expect("arch");
    let spec = &arch.stages()[index];
    let s = slot(
        spec,
        index,
        OptimizerSpec::Momentum {
            lr: 0.05,
            momentum: 0.9,
        },
    );
    let bytes = s.to_bytes();
    let mut g = c.benchmark_group(name);
    g.sample_size(30);
    g.throughput(criterion::Throughput::Bytes(bytes.len() as u64));
    g.bench_function("to_bytes", |b| b.iter(|| s.to_bytes()));
    g.bench_function("from_bytes", |b| {
        b.iter(|| Slot::from_bytes(&bytes).expect("from"))
    });
    g.bench_function("params_digest", |b| b.iter(|| s.params_digest()));
    g.finish();
}

fn bench(c: &mut Criterion) {
    state(c, "mlp_linear784x512_state", "mlp:784-512-256-10", 0);
    model(c, "mlp784-512-256-10_b256", "mlp:784-512-256-10", 256);
    model(c, "lenet5_b128", "lenet5", 128);
    stage(c, "mlp_linear784x512_b256", "mlp:784-512-256-10", 0, 256);
    stage(c, "lenet5_conv6to16_b128", "lenet5", 1, 128);
}

criterion_group!(benches, bench);
criterion_main!(benches);
