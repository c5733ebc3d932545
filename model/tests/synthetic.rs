//! The synthetic dataset is learnable.

use mixnn_model::{synthetic, train_local, Arch, OptimizerSpec, TrainConfig};

#[test]
fn small_mlp_learns_synthetic() {
    let data = synthetic(1, 2048, 512);
    let cfg = TrainConfig {
        arch: Arch::parse("mlp:784-64-10").expect("arch"),
        epochs: 1,
        batch: 64,
        optimizer: OptimizerSpec::Sgd { lr: 0.05 },
        seed: 3,
        limit: None,
    };
    let r = train_local(&cfg, &data, &mut |_| {}).expect("train");
    println!("synthetic accuracy {}", r.test_accuracy);
    assert!(r.test_accuracy > 0.5, "accuracy {}", r.test_accuracy);
    let again = train_local(&cfg, &data, &mut |_| {}).expect("train");
    assert_eq!(r.params_digest_hex, again.params_digest_hex);
    assert_eq!(r.losses, again.losses);
    let bad = TrainConfig { batch: 0, ..cfg };
    assert!(train_local(&bad, &data, &mut |_| {}).is_err());
}
