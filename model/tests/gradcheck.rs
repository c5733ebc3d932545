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
        let (mut plus, mut minus) = (x.clone(), x.clone());
        plus.data[i] += h;
        minus.data[i] -= h;
        let numeric = (loss_of(&reference, &plus, &labels) - loss_of(&reference, &minus, &labels))
            / (2.0 * f64::from(h));
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
