//! Slot lifecycle: in-flight bounds, shape errors, persistence.

mod common;

use common::{slot_step, slots};
use mixnn_model::{
    synthetic, Arch, HostTensor, InitSpec, LayerSpec, ModelError, OptimizerSpec, Slot, StageSpec,
};

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

fn input(batch: usize) -> HostTensor {
    HostTensor::new(
        vec![batch, 6],
        (0..batch * 6).map(|i| (i as f32 * 0.37).sin()).collect(),
    )
    .expect("ok")
}

#[test]
fn init_is_deterministic_and_bounded() {
    let opt = OptimizerSpec::Sgd { lr: 0.1 };
    let a = Slot::new(
        &stage(),
        InitSpec {
            seed: 1,
            stage_index: 0,
        },
        opt,
    )
    .expect("slot");
    let b = Slot::new(
        &stage(),
        InitSpec {
            seed: 1,
            stage_index: 0,
        },
        opt,
    )
    .expect("slot");
    let c = Slot::new(
        &stage(),
        InitSpec {
            seed: 1,
            stage_index: 1,
        },
        opt,
    )
    .expect("slot");
    assert_eq!(a.params_digest(), b.params_digest());
    assert_ne!(a.params_digest(), c.params_digest());
    let bound = 1.0 / 6f32.sqrt();
    assert!(a.weight().iter().chain(a.bias()).all(|w| w.abs() <= bound));
    assert_eq!(a.weight().len(), 24);
    let bad = StageSpec {
        layers: vec![LayerSpec::Relu],
    };
    assert!(Slot::new(
        &bad,
        InitSpec {
            seed: 1,
            stage_index: 0
        },
        opt
    )
    .is_err());
}

#[test]
fn in_flight_bounds_and_errors() {
    let mut s = Slot::new(
        &stage(),
        InitSpec {
            seed: 3,
            stage_index: 0,
        },
        OptimizerSpec::Sgd { lr: 0.1 },
    )
    .expect("slot");
    s.set_max_in_flight(2);
    let y = s.forward(0, &input(3)).expect("fwd");
    assert_eq!(y.shape, vec![3, 4]);
    assert!(y.data.iter().all(|&v| v >= 0.0), "relu output");
    assert!(matches!(
        s.forward(0, &input(3)),
        Err(ModelError::DuplicateStep(0))
    ));
    s.forward(1, &input(2)).expect("fwd");
    assert!(matches!(
        s.forward(2, &input(2)),
        Err(ModelError::TooManyInFlight { limit: 2 })
    ));
    assert!(matches!(
        s.backward(9, &HostTensor::zeros(vec![3, 4])),
        Err(ModelError::UnknownStep(9))
    ));
    // Wrong gradient shape: error, and the step stays in flight.
    assert!(matches!(
        s.backward(0, &HostTensor::zeros(vec![2, 4])),
        Err(ModelError::Shape { .. })
    ));
    let mut nan = HostTensor::zeros(vec![3, 4]);
    nan.data[5] = f32::NAN;
    assert!(matches!(
        s.backward(0, &nan),
        Err(ModelError::NonFinite { .. })
    ));
    assert_eq!(s.in_flight(), 2);
    let gi = s.backward(0, &HostTensor::zeros(vec![3, 4])).expect("bwd");
    assert_eq!(gi.shape, vec![3, 6]);
    assert_eq!(s.steps_applied(), 1);
    assert!(s.cancel(1));
    assert_eq!(s.in_flight(), 0);
    // Bad inputs.
    assert!(s.forward(5, &HostTensor::zeros(vec![3, 5])).is_err());
    assert!(s.forward(5, &HostTensor::zeros(vec![0, 6])).is_err());
    assert!(s.forward(5, &HostTensor::zeros(vec![6])).is_err());
    assert!(s
        .infer(&HostTensor {
            shape: vec![2, 6],
            data: vec![0.0; 3]
        })
        .is_err());
    // A [batch, 2, 3] input is flattened.
    assert_eq!(
        s.infer(&HostTensor::zeros(vec![2, 2, 3]))
            .expect("infer")
            .shape,
        vec![2, 4]
    );
    assert_eq!(s.in_flight(), 0);
}

#[test]
fn infer_matches_forward_and_keeps_nothing() {
    let mut s = Slot::new(
        &stage(),
        InitSpec {
            seed: 4,
            stage_index: 2,
        },
        OptimizerSpec::Sgd { lr: 0.1 },
    )
    .expect("slot");
    let a = s.infer(&input(5)).expect("infer");
    assert_eq!(s.in_flight(), 0);
    let b = s.forward(0, &input(5)).expect("fwd");
    assert_eq!(a, b);
}

#[test]
fn bytes_round_trip_and_training_continues_identically() {
    let arch = Arch::parse("mlp:784-32-16-10").expect("arch");
    let data = synthetic(5, 256, 10);
    for name in ["sgd", "momentum", "adam"] {
        let opt = OptimizerSpec::from_name(name, 0.01).expect("opt");
        let mut a = slots(&arch, 9, opt);
        let batches: Vec<_> = data.train.batches(32, 0, 9).collect();
        let (first, second) = batches.split_at(4);
        for (i, (x, l)) in first.iter().enumerate() {
            slot_step(&mut a, i as u64, x, l);
        }
        let mut b: Vec<Slot> = a
            .iter()
            .map(|s| Slot::from_bytes(&s.to_bytes()).expect("restore"))
            .collect();
        for (sa, sb) in a.iter().zip(&b) {
            assert_eq!(sa.params_digest(), sb.params_digest());
            assert_eq!(sa.steps_applied(), sb.steps_applied());
            assert_eq!(sa.to_bytes(), sb.to_bytes());
        }
        for (i, (x, l)) in second.iter().enumerate() {
            let step = (first.len() + i) as u64;
            let la = slot_step(&mut a, step, x, l);
            let lb = slot_step(&mut b, step, x, l);
            assert_eq!(la.to_bits(), lb.to_bits(), "{name}");
        }
        for (sa, sb) in a.iter().zip(&b) {
            assert_eq!(sa.params_digest(), sb.params_digest(), "{name}");
        }
    }
}

#[test]
fn truncated_or_corrupt_bytes_are_errors() {
    let opt = OptimizerSpec::from_name("adam", 0.01).expect("opt");
    let s = Slot::new(
        &stage(),
        InitSpec {
            seed: 3,
            stage_index: 0,
        },
        opt,
    )
    .expect("slot");
    let bytes = s.to_bytes();
    for n in 0..bytes.len() {
        assert!(Slot::from_bytes(&bytes[..n]).is_err(), "truncated to {n}");
    }
    for i in (0..bytes.len()).step_by(7) {
        let mut c = bytes.clone();
        c[i] ^= 0x10;
        assert!(Slot::from_bytes(&c).is_err(), "flipped byte {i}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Slot::from_bytes(&longer).is_err());
    assert!(Slot::from_bytes(&bytes).is_ok());
}
