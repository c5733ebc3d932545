//! One training step of mlp:784-512-256-10 at batch 256: the whole model
//! locally, three `Slot`s (which recompute forward in backward), and three
//! `SlotWorker`s (which keep the tape); plus one slot's forward+backward.
//!
//! `cargo bench -p mixnn-model --bench slot`

use criterion::{criterion_group, criterion_main, Criterion};
use mixnn_model::{
    softmax_cross_entropy, synthetic, Arch, InitSpec, InputGrad, LocalModel, OptimizerSpec, Slot,
    SlotWorker,
};

fn bench(c: &mut Criterion) {
    let arch = Arch::parse("mlp:784-512-256-10").expect("arch");
    let opt = OptimizerSpec::Sgd { lr: 0.01 };
    let data = synthetic(1, 256, 1);
    let (x, labels) = data.train.batches(256, 0, 1).next().expect("batch");

    let mut g = c.benchmark_group("mlp784-512-256-10_b256");
    g.sample_size(30);

    let mut local = LocalModel::new(&arch, 1, opt).expect("model");
    g.bench_function("local_train_step", |b| {
        b.iter(|| local.train_step(&x, &labels).expect("step"))
    });

    let stages = arch.stages();
    let mut slots: Vec<Slot> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Slot::new(
                s,
                InitSpec {
                    seed: 1,
                    stage_index: i as u32,
                },
                opt,
            )
            .expect("slot")
        })
        .collect();
    let mut step = 0u64;
    g.bench_function("three_slots_train_step", |b| {
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
        .map(|(i, s)| {
            let slot = Slot::new(
                s,
                InitSpec {
                    seed: 1,
                    stage_index: i as u32,
                },
                opt,
            )
            .expect("slot");
            SlotWorker::spawn(slot).expect("worker")
        })
        .collect();
    let mut step = 0u64;
    g.bench_function("three_slot_workers_train_step", |b| {
        b.iter(|| {
            let mut act = x.clone();
            for w in &workers {
                act = w.forward_owned(step, act).expect("fwd");
            }
            let (_, mut grad) = softmax_cross_entropy(&act, &labels).expect("loss");
            for (i, w) in workers.iter().enumerate().rev() {
                let previous = i.checked_sub(1).map(|p| workers[p].spec());
                let input_grad = InputGrad::after(previous.as_ref());
                grad = w.backward_owned(step, grad, input_grad).expect("bwd");
            }
            step += 1;
        })
    });

    let mut first = Slot::new(
        &stages[0],
        InitSpec {
            seed: 1,
            stage_index: 0,
        },
        opt,
    )
    .expect("slot");
    let grad = mixnn_model::HostTensor::zeros(vec![256, 512]);
    let mut step = 0u64;
    g.bench_function("slot0_784x512_forward_backward", |b| {
        b.iter(|| {
            first.forward(step, &x).expect("fwd");
            first.backward(step, &grad).expect("bwd");
            step += 1;
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
