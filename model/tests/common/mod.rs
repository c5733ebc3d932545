#![allow(dead_code)]

use std::path::PathBuf;

use mixnn_model::{
    model_digest, softmax_cross_entropy, Arch, InitSpec, LocalModel, OptimizerSpec, Slot, Split,
};

/// The real MNIST files (tests that call this are ignored, with a reason,
/// where they are missing: see build.rs).
pub fn mnist_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist")
}

pub fn slots(arch: &Arch, seed: u64, opt: OptimizerSpec) -> Vec<Slot> {
    arch.stages()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Slot::new(
                s,
                InitSpec {
                    seed,
                    stage_index: i as u32,
                },
                opt,
            )
            .expect("slot")
        })
        .collect()
}

/// One training step through separate slots, as the network client drives it.
pub fn slot_step(slots: &mut [Slot], step: u64, x: &mixnn_model::HostTensor, labels: &[u8]) -> f32 {
    let mut act = x.clone();
    for s in slots.iter_mut() {
        act = s.forward(step, &act).expect("forward");
    }
    let (loss, mut grad) = softmax_cross_entropy(&act, labels).expect("loss");
    for s in slots.iter_mut().rev() {
        grad = s.backward(step, &grad).expect("backward");
    }
    loss
}

pub fn slots_digest(slots: &[Slot]) -> [u8; 32] {
    let d: Vec<[u8; 32]> = slots.iter().map(Slot::params_digest).collect();
    model_digest(&d)
}

/// Trains both ways for `epochs` and checks every loss and the final digests match.
pub fn assert_equivalent(
    arch: &str,
    opt: OptimizerSpec,
    seed: u64,
    data: &Split,
    batch: usize,
    epochs: u32,
) {
    let arch = Arch::parse(arch).expect("arch");
    let mut local = LocalModel::new(&arch, seed, opt).expect("local");
    let mut slots = slots(&arch, seed, opt);
    assert_eq!(
        local.params_digest(),
        slots_digest(&slots),
        "initial parameters differ"
    );
    let mut step = 0u64;
    for epoch in 0..epochs {
        for (x, labels) in data.batches(batch, epoch, seed) {
            let a = local.train_step(&x, &labels).expect("local step");
            let b = slot_step(&mut slots, step, &x, &labels);
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{} step {step}: loss {a} vs {b}",
                opt.name()
            );
            step += 1;
        }
    }
    assert!(step > 0);
    let stage_digests: Vec<[u8; 32]> = slots.iter().map(Slot::params_digest).collect();
    assert_eq!(
        local.stage_digests(),
        stage_digests,
        "{}: parameters differ",
        opt.name()
    );
    assert_eq!(local.params_digest(), slots_digest(&slots));
    for s in &slots {
        assert_eq!(s.steps_applied(), step);
        assert_eq!(s.in_flight(), 0);
    }
}
