//! The gradients are right: the input gradient matches finite differences of
//! the loss, and the last bias moves by the column sums of the loss gradient.

mod common;

use common::slots;
use mixnn_model::{softmax_cross_entropy, Arch, HostTensor, OptimizerSpec, Slot};

fn loss_of(slots: &[Slot], x: &HostTensor, labels: &[u8]) -> f64 {
    let mut act = x.clone();
    for s in slots {
        act = s.infer(&act).expect("infer");
    }
    f64::from(softmax_cross_entropy(&act, labels).expect("loss").0)
}

/// `(f(v + h·e_i) - f(v - h·e_i)) / 2h`: the derivative of `f` along
/// element `i` of `v`.
fn central_difference(v: &[f32], i: usize, h: f32, f: impl Fn(Vec<f32>) -> f64) -> f64 {
    let (mut plus, mut minus) = (v.to_vec(), v.to_vec());
    plus[i] += h;
    minus[i] -= h;
    (f(plus) - f(minus)) / (2.0 * f64::from(h))
}

/// The loss of `slots` as a function of the input's values.
fn loss_at<'a>(
    slots: &'a [Slot],
    x: &'a HostTensor,
    labels: &'a [u8],
) -> impl Fn(Vec<f32>) -> f64 + 'a {
    move |data| {
        let x = HostTensor::new(x.shape.clone(), data).expect("x");
        loss_of(slots, &x, labels)
    }
}

#[test]
fn input_gradient_matches_finite_differences() {
    let arch = Arch::parse("mlp:6-5-4-3").expect("arch");
    let opt = OptimizerSpec::Sgd { lr: 1.0 };
    let reference = slots(&arch, 21, opt);
    let mut trained = slots(&arch, 21, opt);
    let x = HostTensor::new(
        vec![2, 6],
        (0..12).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect(),
    )
    .expect("x");
    let labels = [2u8, 0];

    let mut act = x.clone();
    for s in trained.iter_mut() {
        act = s.forward(0, &act).expect("forward");
    }
    let (_, grad_logits) = softmax_cross_entropy(&act, &labels).expect("loss");
    let last_bias_before = trained[2].bias().to_vec();
    let mut grad = grad_logits.clone();
    for s in trained.iter_mut().rev() {
        grad = s.backward(0, &grad).expect("backward");
    }

    let h = 1e-3f32;
    for i in 0..x.data.len() {
        let numeric = central_difference(&x.data, i, h, loss_at(&reference, &x, &labels));
        let analytic = f64::from(grad.data[i]);
        assert!(
            (numeric - analytic).abs() < 2e-3,
            "x[{i}]: numeric {numeric} vs analytic {analytic}"
        );
    }

    for (j, (before, after)) in last_bias_before.iter().zip(trained[2].bias()).enumerate() {
        let col: f32 = grad_logits.data.chunks(3).map(|r| r[j]).sum();
        assert!(((before - after) - col).abs() < 1e-6, "bias {j}");
    }
}

/// One SGD step at learning rate 1 through `slots`; returns the input
/// gradient (each slot's parameters move by minus their gradient).
fn sgd_step(slots: &mut [Slot], x: &HostTensor, labels: &[u8]) -> HostTensor {
    let mut act = x.clone();
    for s in slots.iter_mut() {
        act = s.forward(0, &act).expect("forward");
    }
    let (_, mut grad) = softmax_cross_entropy(&act, labels).expect("loss");
    for s in slots.iter_mut().rev() {
        grad = s.backward(0, &grad).expect("backward");
    }
    grad
}

/// Convolutions (with stride and padding) and both poolings: the input
/// gradient and every weight and bias gradient match finite differences.
#[test]
fn convolution_gradients_match_finite_differences() {
    let arch = Arch::parse(
        "seq:2x7x7|conv(3,3,p=1) tanh maxpool(2,s=1)|conv(2,2,s=2,p=1) tanh avgpool(2)|flatten linear(3)",
    )
    .expect("arch");
    let opt = OptimizerSpec::Sgd { lr: 1.0 };
    let reference = slots(&arch, 5, opt);
    let mut trained = slots(&arch, 5, opt);
    let n = 2 * 2 * 7 * 7;
    let x = HostTensor::new(
        vec![2, 2, 7, 7],
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 2.0)
            .collect(),
    )
    .expect("x");
    let labels = [1u8, 2];
    let grad = sgd_step(&mut trained, &x, &labels);
    assert_eq!(grad.shape, vec![2, 2, 7, 7]);

    let h = 1e-2f32;
    let close = |numeric: f64, analytic: f64, what: String| {
        assert!(
            (numeric - analytic).abs() < 2e-3 + 2e-2 * analytic.abs(),
            "{what}: numeric {numeric} vs analytic {analytic}"
        );
    };
    for i in 0..x.data.len() {
        let numeric = central_difference(&x.data, i, h, loss_at(&reference, &x, &labels));
        close(numeric, f64::from(grad.data[i]), format!("x[{i}]"));
    }

    // Parameters: SGD at lr 1 moved each by minus its gradient. A weight
    // moves every output of its channel, so a smaller step keeps the
    // max-pool windows' winners where they were.
    let h = 2e-3f32;
    for stage in 0..2 {
        let spec = arch.stages()[stage].clone();
        let (w0, b0) = (
            reference[stage].weight().to_vec(),
            reference[stage].bias().to_vec(),
        );
        let (w1, b1) = (trained[stage].weight(), trained[stage].bias());
        let with = |w: Vec<f32>, b: Vec<f32>| {
            let mut s: Vec<Slot> = slots(&arch, 5, opt);
            s[stage] = Slot::from_params(&spec, w, b, opt).expect("slot");
            loss_of(&s, &x, &labels)
        };
        for i in 0..w0.len() {
            let numeric = central_difference(&w0, i, h, |w| with(w, b0.clone()));
            close(
                numeric,
                f64::from(w0[i] - w1[i]),
                format!("stage {stage} weight[{i}]"),
            );
        }
        for i in 0..b0.len() {
            let numeric = central_difference(&b0, i, h, |b| with(w0.clone(), b));
            close(
                numeric,
                f64::from(b0[i] - b1[i]),
                format!("stage {stage} bias[{i}]"),
            );
        }
    }
}
