//! `SlotWorker::submit`: the non-blocking call an async host uses gives the
//! same results, bit for bit, as the blocking calls, in the order queued;
//! its errors are the blocking calls' errors.

use std::sync::mpsc::sync_channel;

use mixnn_model::{
    softmax_cross_entropy, synthetic, Arch, HostTensor, InitSpec, InputGrad, ModelError,
    OptimizerSpec, Slot, SlotOp, SlotWorker,
};

fn pair(arch: &Arch, seed: u64) -> Vec<(SlotWorker, SlotWorker)> {
    let opt = OptimizerSpec::from_name("momentum", 0.01).expect("momentum");
    arch.stages()
        .iter()
        .enumerate()
        .map(|(i, stage)| {
            let init = InitSpec {
                seed,
                stage_index: i as u32,
            };
            let a = Slot::new(stage, init, opt).expect("slot");
            let b = Slot::new(stage, init, opt).expect("slot");
            (
                SlotWorker::spawn(a).expect("spawn"),
                SlotWorker::spawn(b).expect("spawn"),
            )
        })
        .collect()
}

/// Submits `op` and waits for its reply on this thread.
fn submitted(w: &SlotWorker, op: SlotOp) -> Result<HostTensor, ModelError> {
    let (tx, rx) = sync_channel(1);
    w.submit(op, move |r| {
        let _ = tx.send(r);
    })?;
    rx.recv().expect("the reply runs")
}

fn bits(t: &HostTensor) -> Vec<u32> {
    t.data.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn submitted_steps_equal_blocking_steps_bit_for_bit() {
    let arch = Arch::parse("mlp:784-32-16-10").expect("arch");
    let workers = pair(&arch, 3);
    let data = synthetic(5, 256, 32);
    let mut step = 0u64;
    for (x, labels) in data.train.batches(32, 0, 5) {
        let (mut a, mut b) = (x.clone(), x);
        for (blocking, async_) in &workers {
            a = blocking.forward_owned(step, a).expect("forward");
            b = submitted(async_, SlotOp::Forward { step, input: b }).expect("forward");
            assert_eq!(bits(&a), bits(&b));
        }
        let (_, mut ga) = softmax_cross_entropy(&a, &labels).expect("loss");
        let mut gb = ga.clone();
        for (i, (blocking, async_)) in workers.iter().enumerate().rev() {
            let input_grad = if i == 0 {
                InputGrad::Full
            } else {
                InputGrad::SkipZeroInputs
            };
            ga = blocking
                .backward_owned(step, ga, input_grad)
                .expect("backward");
            gb = submitted(
                async_,
                SlotOp::Backward {
                    step,
                    grad_out: gb,
                    input_grad,
                },
            )
            .expect("backward");
            assert_eq!(bits(&ga), bits(&gb));
        }
        step += 1;
    }
    assert!(step > 3);
    for (blocking, async_) in &workers {
        assert_eq!(
            blocking.params_digest().expect("digest"),
            async_.params_digest().expect("digest")
        );
        let x = HostTensor::zeros(vec![2, blocking.input_dim()]);
        let want = blocking.infer(&x).expect("infer");
        let got = submitted(async_, SlotOp::Infer { input: x }).expect("infer");
        assert_eq!(bits(&want), bits(&got));
    }
}

#[test]
fn submitted_errors_are_the_blocking_errors_and_replies_keep_their_order() {
    let arch = Arch::parse("mlp:6-3-2").expect("arch");
    let workers = pair(&arch, 1);
    let (blocking, w) = &workers[0];
    // A backward for a step never sent forward.
    let grad = HostTensor::zeros(vec![1, 3]);
    let want = blocking
        .backward_owned(9, grad.clone(), InputGrad::Full)
        .expect_err("unknown step");
    let got = submitted(
        w,
        SlotOp::Backward {
            step: 9,
            grad_out: grad,
            input_grad: InputGrad::Full,
        },
    )
    .expect_err("unknown step");
    assert_eq!(format!("{want:?}"), format!("{got:?}"));

    // Several queued at once answer in order.
    let (tx, rx) = sync_channel(8);
    for step in 0..4u64 {
        let tx = tx.clone();
        w.submit(
            SlotOp::Forward {
                step,
                input: HostTensor::zeros(vec![1, 6]),
            },
            move |r| {
                let _ = tx.send((step, r.is_ok()));
            },
        )
        .expect("queued");
    }
    drop(tx);
    let order: Vec<_> = rx.iter().collect();
    assert_eq!(order, vec![(0, true), (1, true), (2, true), (3, true)]);
    assert_eq!(w.in_flight().expect("alive"), 4);
}
