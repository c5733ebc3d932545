//! `SlotWorker`: a chain of workers trains bit for bit like `LocalModel` and
//! like a chain of `Slot`s; its bytes are a slot's bytes; its errors are a
//! slot's errors; it can be shared between threads.

mod common;

use common::{mnist_dir, slot_step, slots, slots_digest};
use mixnn_model::{
    load_mnist, model_digest, softmax_cross_entropy, synthetic, Arch, HostTensor, InitSpec,
    InputGrad, LayerSpec, LocalModel, ModelError, OptimizerSpec, Slot, SlotWorker, Split,
    StageSpec,
};

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<SlotWorker>();
};

fn optimizers() -> [OptimizerSpec; 3] {
    [
        OptimizerSpec::from_name("sgd", 0.05).expect("sgd"),
        OptimizerSpec::from_name("momentum", 0.01).expect("momentum"),
        OptimizerSpec::from_name("adam", 0.001).expect("adam"),
    ]
}

fn workers(arch: &Arch, seed: u64, opt: OptimizerSpec) -> Vec<SlotWorker> {
    slots(arch, seed, opt)
        .into_iter()
        .map(|s| SlotWorker::spawn(s).expect("spawn"))
        .collect()
}

/// What the network asks of worker `i`'s backward pass.
fn input_grad(workers: &[SlotWorker], i: usize) -> InputGrad {
    let previous = i.checked_sub(1).map(|p| workers[p].spec());
    InputGrad::after(previous.as_ref())
}

/// One training step through a chain of workers, as the network drives it.
fn worker_step(workers: &[SlotWorker], step: u64, x: &HostTensor, labels: &[u8]) -> f32 {
    let mut act = x.clone();
    for w in workers {
        act = w.forward_owned(step, act).expect("forward");
    }
    let (loss, mut grad) = softmax_cross_entropy(&act, labels).expect("loss");
    for (i, w) in workers.iter().enumerate().rev() {
        grad = w
            .backward_owned(step, grad, input_grad(workers, i))
            .expect("backward");
    }
    loss
}

fn stage_digests(workers: &[SlotWorker]) -> Vec<[u8; 32]> {
    workers
        .iter()
        .map(|w| w.params_digest().expect("digest"))
        .collect()
}

/// Trains a `LocalModel`, a chain of slots and a chain of workers side by
/// side; every loss and the final parameters must agree bit for bit.
fn assert_workers_equivalent(
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
    let workers = workers(&arch, seed, opt);
    assert_eq!(workers.len(), arch.stages().len());
    assert_eq!(local.stage_digests(), stage_digests(&workers));
    let mut step = 0u64;
    for epoch in 0..epochs {
        for (x, labels) in data.batches(batch, epoch, seed) {
            let a = local.train_step(&x, &labels).expect("local step");
            let b = slot_step(&mut slots, step, &x, &labels);
            let c = worker_step(&workers, step, &x, &labels);
            assert_eq!(
                a.to_bits(),
                c.to_bits(),
                "{} step {step}: local loss {a} vs workers {c}",
                opt.name()
            );
            assert_eq!(b.to_bits(), c.to_bits(), "{} step {step}", opt.name());
            step += 1;
        }
    }
    assert!(step > 0);
    let digests = stage_digests(&workers);
    assert_eq!(local.stage_digests(), digests, "{}", opt.name());
    assert_eq!(local.params_digest(), model_digest(&digests));
    assert_eq!(slots_digest(&slots), model_digest(&digests));
    for w in &workers {
        assert_eq!(w.steps_applied().expect("steps"), step);
        assert_eq!(w.in_flight().expect("in flight"), 0);
    }
}

#[test]
fn workers_equal_local_on_synthetic() {
    let data = synthetic(11, 600, 10);
    for opt in optimizers() {
        assert_workers_equivalent("mlp:784-64-32-10", opt, 42, &data.train, 64, 2);
    }
}

/// Convolution and pooling stages on workers train like the local model.
#[test]
fn conv_workers_equal_local_on_synthetic() {
    let data = synthetic(14, 256, 10);
    for opt in optimizers() {
        assert_workers_equivalent(CONV, opt, 3, &data.train, 64, 2);
    }
}

/// A small CNN with every new op: strided, padded convolutions, both
/// poolings, flatten.
const CONV: &str =
    "seq:1x28x28|conv(4,5,s=2,p=2) relu maxpool(2)|conv(8,3) tanh avgpool(2,s=1)|flatten linear(10)";

#[test]
#[cfg_attr(
    not(mnist),
    ignore = "needs MNIST in ../shared/data/mnist (see its README)"
)]
fn workers_equal_local_on_mnist() {
    let dir = mnist_dir();
    let data = load_mnist(&dir).expect("mnist");
    let train = data.train.limit(1024);
    for opt in optimizers() {
        assert_workers_equivalent("mlp:784-128-64-10", opt, 7, &train, 128, 1);
        assert_workers_equivalent("lenet5", opt, 7, &train.clone().limit(512), 128, 1);
    }
}

#[test]
fn worker_bytes_are_slot_bytes_and_training_continues_identically() {
    let arch = Arch::parse("mlp:784-32-16-10").expect("arch");
    let data = synthetic(5, 256, 10);
    for opt in optimizers() {
        let name = opt.name();
        let mut reference = slots(&arch, 9, opt);
        let workers = workers(&arch, 9, opt);
        let batches: Vec<_> = data.train.batches(32, 0, 9).collect();
        let (first, second) = batches.split_at(4);
        for (i, (x, l)) in first.iter().enumerate() {
            slot_step(&mut reference, i as u64, x, l);
            worker_step(&workers, i as u64, x, l);
        }
        // The worker writes exactly what the slot it mirrors writes.
        for (s, w) in reference.iter().zip(&workers) {
            assert_eq!(s.to_bytes(), w.to_bytes().expect("bytes"), "{name}");
        }
        let mut restored: Vec<Slot> = workers
            .iter()
            .map(|w| Slot::from_bytes(&w.to_bytes().expect("bytes")).expect("restore"))
            .collect();
        // And a worker restored from slot bytes, and a slot taken back out of
        // a worker, both continue identically.
        let rewrapped: Vec<SlotWorker> = reference
            .iter()
            .map(|s| SlotWorker::spawn(Slot::from_bytes(&s.to_bytes()).expect("restore")))
            .collect::<Result<_, _>>()
            .expect("spawn");
        let mut taken: Vec<Slot> = workers
            .into_iter()
            .map(|w| w.into_slot().expect("into slot"))
            .collect();
        for (i, (x, l)) in second.iter().enumerate() {
            let step = (first.len() + i) as u64;
            let a = slot_step(&mut reference, step, x, l);
            let b = slot_step(&mut restored, step, x, l);
            let c = worker_step(&rewrapped, step, x, l);
            let d = slot_step(&mut taken, step, x, l);
            assert_eq!(a.to_bits(), b.to_bits(), "{name} step {step}");
            assert_eq!(a.to_bits(), c.to_bits(), "{name} step {step}");
            assert_eq!(a.to_bits(), d.to_bits(), "{name} step {step}");
        }
        let expected = slots_digest(&reference);
        assert_eq!(slots_digest(&restored), expected, "{name}");
        assert_eq!(model_digest(&stage_digests(&rewrapped)), expected, "{name}");
        assert_eq!(slots_digest(&taken), expected, "{name}");
        for (s, w) in reference.iter().zip(&rewrapped) {
            assert_eq!(s.to_bytes(), w.to_bytes().expect("bytes"), "{name}");
            assert_eq!(s.steps_applied(), w.steps_applied().expect("steps"));
        }
    }
}

fn stage() -> StageSpec {
    StageSpec {
        layers: vec![
            LayerSpec::Linear {
                inputs: 6,
                outputs: 4,
            },
            LayerSpec::Relu,
        ],
    }
}

fn new_slot(max_in_flight: usize) -> Slot {
    let mut s = Slot::new(
        &stage(),
        InitSpec {
            seed: 3,
            stage_index: 0,
        },
        OptimizerSpec::from_name("adam", 0.01).expect("adam"),
    )
    .expect("slot");
    s.set_max_in_flight(max_in_flight);
    s
}

fn input(batch: usize) -> HostTensor {
    HostTensor::new(
        vec![batch, 6],
        (0..batch * 6).map(|i| (i as f32 * 0.37).sin()).collect(),
    )
    .expect("ok")
}

fn grad(batch: usize) -> HostTensor {
    HostTensor::new(
        vec![batch, 4],
        (0..batch * 4).map(|i| (i as f32 * 0.73).cos()).collect(),
    )
    .expect("ok")
}

/// Both sides of a call, compared: the same value, or the same error
/// (variant and message).
fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    slot: Result<T, ModelError>,
    worker: Result<T, ModelError>,
) -> Result<T, String> {
    match (slot, worker) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "{what}");
            Ok(a)
        }
        (Err(a), Err(b)) => {
            assert_eq!(
                std::mem::discriminant(&a),
                std::mem::discriminant(&b),
                "{what}: {a:?} vs {b:?}"
            );
            assert_eq!(a.to_string(), b.to_string(), "{what}");
            Err(a.to_string())
        }
        (a, b) => panic!("{what}: slot {a:?}, worker {b:?}"),
    }
}

#[test]
fn worker_errors_match_slot_errors() {
    let mut s = new_slot(2);
    let w = SlotWorker::spawn(new_slot(2)).expect("spawn");
    assert_eq!(w.max_in_flight(), 2);
    assert_eq!((w.input_dim(), w.output_dim()), (6, 4));
    assert_eq!(w.spec(), stage());

    same(
        "forward 0",
        s.forward(0, &input(3)),
        w.forward(0, &input(3)),
    )
    .expect("ok");
    let e = same(
        "duplicate",
        s.forward(0, &input(3)),
        w.forward(0, &input(3)),
    );
    assert!(e.expect_err("duplicate").contains("step 0"));
    same(
        "forward 1",
        s.forward(1, &input(2)),
        w.forward(1, &input(2)),
    )
    .expect("ok");
    same("too many", s.forward(2, &input(2)), w.forward(2, &input(2)))
        .expect_err("too many in flight");
    assert!(matches!(
        w.forward(2, &input(2)),
        Err(ModelError::TooManyInFlight { limit: 2 })
    ));
    assert!(matches!(
        w.backward(9, &grad(3)),
        Err(ModelError::UnknownStep(9))
    ));
    same("unknown", s.backward(9, &grad(3)), w.backward(9, &grad(3))).expect_err("unknown");
    same("bad grad", s.backward(0, &grad(2)), w.backward(0, &grad(2))).expect_err("shape");
    let mut nan = grad(3);
    nan.data[5] = f32::NAN;
    same("nan grad", s.backward(0, &nan), w.backward(0, &nan)).expect_err("non-finite");
    // Errors leave the steps in flight.
    assert_eq!(w.in_flight().expect("alive"), 2);
    same(
        "backward 0",
        s.backward(0, &grad(3)),
        w.backward(0, &grad(3)),
    )
    .expect("ok");
    same(
        "backward 0 again",
        s.backward(0, &grad(3)),
        w.backward(0, &grad(3)),
    )
    .expect_err("gone");
    assert_eq!(w.steps_applied().expect("alive"), 1);
    assert_eq!(s.params_digest(), w.params_digest().expect("alive"));
    same("cancel 1", Ok(s.cancel(1)), w.cancel(1)).expect("ok");
    same("cancel 1 again", Ok(s.cancel(1)), w.cancel(1)).expect("ok");
    assert_eq!(w.in_flight().expect("alive"), 0);

    // Bad inputs, to training and to inference.
    let bad_inputs = [
        HostTensor::zeros(vec![3, 5]),
        HostTensor::zeros(vec![0, 6]),
        HostTensor::zeros(vec![6]),
        HostTensor {
            shape: vec![2, 6],
            data: vec![0.0; 3],
        },
        HostTensor {
            shape: vec![1, 6],
            data: vec![0.0, 1.0, f32::INFINITY, 0.0, 0.0, 0.0],
        },
    ];
    for bad in &bad_inputs {
        same("bad forward", s.forward(5, bad), w.forward(5, bad)).expect_err("bad input");
        same("bad infer", s.infer(bad), w.infer(bad)).expect_err("bad input");
    }
    assert_eq!(w.in_flight().expect("alive"), 0);
    // A [batch, 2, 3] input is flattened.
    let flat = same(
        "infer",
        s.infer(&HostTensor::zeros(vec![2, 2, 3])),
        w.infer(&HostTensor::zeros(vec![2, 2, 3])),
    )
    .expect("ok");
    assert_eq!(flat.shape, vec![2, 4]);

    same(
        "forward 7",
        s.forward(7, &input(4)),
        w.forward(7, &input(4)),
    )
    .expect("ok");
    same(
        "forward 8",
        s.forward(8, &input(1)),
        w.forward(8, &input(1)),
    )
    .expect("ok");
    s.cancel_all();
    w.cancel_all().expect("alive");
    assert_eq!(w.in_flight().expect("alive"), 0);
    same(
        "unknown 7",
        s.backward(7, &grad(4)),
        w.backward(7, &grad(4)),
    )
    .expect_err("cancelled");
    assert_eq!(s.to_bytes(), w.to_bytes().expect("alive"));
}

/// `spawn` takes the slot's steps in flight along, and `into_slot` gives
/// them back.
#[test]
fn spawn_and_into_slot_carry_steps_in_flight() {
    let mut plain = new_slot(3);
    let mut moved = new_slot(3);
    let y0 = plain.forward(0, &input(3)).expect("fwd");
    assert_eq!(moved.forward(0, &input(3)).expect("fwd"), y0);
    let w = SlotWorker::spawn(moved).expect("spawn");
    assert_eq!(w.in_flight().expect("alive"), 1);
    assert_eq!(w.max_in_flight(), 3);
    assert_eq!(
        plain.backward(0, &grad(3)).expect("bwd"),
        w.backward(0, &grad(3)).expect("bwd")
    );
    assert_eq!(
        plain.forward(1, &input(2)).expect("fwd"),
        w.forward(1, &input(2)).expect("fwd")
    );
    let mut back = w.into_slot().expect("into slot");
    assert_eq!(back.in_flight(), 1);
    assert_eq!(back.max_in_flight(), 3);
    assert_eq!(
        plain.backward(1, &grad(2)).expect("bwd"),
        back.backward(1, &grad(2)).expect("bwd")
    );
    assert_eq!(plain.to_bytes(), back.to_bytes());
}

#[test]
fn worker_is_usable_from_several_threads() {
    let w = SlotWorker::spawn(new_slot(64)).expect("spawn");
    let threads = 4u64;
    let per_thread = 10u64;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let w = &w;
            scope.spawn(move || {
                for i in 0..per_thread {
                    let step = t * 1000 + i;
                    let y = w.forward(step, &input(2)).expect("fwd");
                    assert_eq!(y.shape, vec![2, 4]);
                    let gi = w.backward(step, &grad(2)).expect("bwd");
                    assert_eq!(gi.shape, vec![2, 6]);
                    assert!(gi.data.iter().all(|v| v.is_finite()));
                }
            });
        }
    });
    assert_eq!(w.steps_applied().expect("alive"), threads * per_thread);
    assert_eq!(w.in_flight().expect("alive"), 0);
    // The handle also moves to, and is shared through an Arc with, other threads.
    let shared = std::sync::Arc::new(w);
    let other = std::sync::Arc::clone(&shared);
    let steps = std::thread::spawn(move || other.steps_applied().expect("alive"))
        .join()
        .expect("join");
    assert_eq!(steps, threads * per_thread);
}

/// Skipping the gradient at zero inputs changes nothing but those elements:
/// elsewhere it is the full gradient, bit for bit.
#[test]
fn skipped_input_gradient_is_the_full_one_elsewhere() {
    let arch = Arch::parse("mlp:784-16-8-10").expect("arch");
    let opt = OptimizerSpec::from_name("sgd", 0.05).expect("sgd");
    let data = synthetic(5, 64, 0);
    let (x, labels) = data.train.slice(0, 32);
    let run = |mode: InputGrad| {
        let ws = workers(&arch, 5, opt);
        let h = ws[0].forward_owned(0, x.clone()).expect("forward");
        let y = ws[1].forward_owned(0, h.clone()).expect("forward");
        let out = ws[2].forward_owned(0, y).expect("forward");
        let (_, g) = softmax_cross_entropy(&out, labels).expect("loss");
        let g = ws[2]
            .backward_owned(0, g, InputGrad::Full)
            .expect("backward");
        (h, ws[1].backward_owned(0, g, mode).expect("backward"))
    };
    let (h, full) = run(InputGrad::Full);
    let (_, skipped) = run(InputGrad::SkipZeroInputs);
    let zeros = h.data.iter().filter(|v| v.to_bits() == 0).count();
    assert!(
        zeros > 0 && zeros < h.data.len(),
        "{zeros} zero activations"
    );
    for ((x, f), s) in h.data.iter().zip(&full.data).zip(&skipped.data) {
        if x.to_bits() == 0 {
            assert_eq!(s.to_bits(), 0);
        } else {
            assert_eq!(s.to_bits(), f.to_bits());
        }
    }
    assert!(full
        .data
        .iter()
        .zip(&h.data)
        .any(|(f, x)| x.to_bits() == 0 && *f != 0.0));
}

/// A linear stage's backward pass on a worker (by hand, its input gradient
/// first, or none for a first stage) gives what the tape gives on a
/// recomputing slot, bit for bit: the input gradient, including the sign
/// of its zeros, and the parameters after each optimizer step. The values are hard on purpose: output
/// gradients with `-0.0`, `+0.0` and tiny values, rows of them all `-0.0`
/// or all `+0.0` (with one or two outputs, their input gradients are
/// sums of zeros only, whose sign depends on every operation), inputs with
/// zeros and both signs, pre-activations on both sides of the ReLU.
#[test]
fn a_linear_stage_worker_backward_is_the_tapes_bit_for_bit() {
    let (inputs, batch) = (37, 9);
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut value = move |zeros: bool| {
        let r = next();
        match r % 8 {
            0 if zeros => 0.0,
            1 if zeros => -0.0,
            2 => f32::from_bits(1 + (r >> 40) as u32 % 1000) * if r & 1 == 0 { 1.0 } else { -1.0 },
            _ => ((r >> 40) as f32 / 16_777_216.0 - 0.5) * 4.0,
        }
    };
    for (relu, outputs) in [(true, 13), (false, 13), (true, 2), (false, 1)] {
        let mut layers = vec![LayerSpec::Linear { inputs, outputs }];
        if relu {
            layers.push(LayerSpec::Relu);
        }
        let spec = StageSpec { layers };
        for opt in optimizers() {
            let init = InitSpec {
                seed: 11,
                stage_index: 1,
            };
            let mut slot = Slot::new(&spec, init, opt).expect("slot");
            let worker =
                SlotWorker::spawn(Slot::new(&spec, init, opt).expect("slot")).expect("worker");
            for step in 0..4u64 {
                let x = HostTensor::new(
                    vec![batch, inputs],
                    (0..batch * inputs).map(|_| value(true)).collect(),
                )
                .expect("x");
                let g = HostTensor::new(
                    vec![batch, outputs],
                    (0..batch * outputs)
                        .map(|i| match i / outputs {
                            0 => -0.0,
                            1 => 0.0,
                            _ => value(true),
                        })
                        .collect(),
                )
                .expect("g");
                let a = slot.forward(step, &x).expect("slot forward");
                let b = worker.forward(step, &x).expect("worker forward");
                assert_eq!(
                    bits(&a.data),
                    bits(&b.data),
                    "forward, relu {relu}, {opt:?}"
                );
                let ga = slot.backward(step, &g).expect("slot backward");
                // Odd steps as the model's first stage: no input gradient.
                let mode = if step % 2 == 0 {
                    InputGrad::Full
                } else {
                    InputGrad::None
                };
                let gb = worker
                    .backward_owned(step, g, mode)
                    .expect("worker backward");
                assert_eq!(ga.shape, gb.shape);
                if mode == InputGrad::Full {
                    assert_eq!(
                        bits(&ga.data),
                        bits(&gb.data),
                        "input gradient, step {step}, relu {relu}, {opt:?}"
                    );
                } else {
                    assert!(gb.data.iter().all(|v| v.to_bits() == 0));
                }
                assert_eq!(
                    slot.params_digest(),
                    worker.params_digest().expect("digest"),
                    "parameters, step {step}, relu {relu}, {opt:?}"
                );
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
