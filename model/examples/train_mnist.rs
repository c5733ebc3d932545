//! Trains on MNIST locally and prints the report as one line.
//!
//! `cargo run -p mixnn-model --release --example train_mnist -- [ARCH] [OPT] [LR] [EPOCHS] [BATCH] [DIR]`
//! (defaults: mlp:784-128-10 sgd 0.05 1 128 ../shared/data/mnist)

use std::path::PathBuf;

use mixnn_model::{load_mnist, train_local, Arch, OptimizerSpec, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let cfg = TrainConfig {
        arch: Arch::parse(&arg(0, "mlp:784-128-10"))?,
        optimizer: OptimizerSpec::from_name(&arg(1, "sgd"), arg(2, "0.05").parse()?)?,
        epochs: arg(3, "1").parse()?,
        batch: arg(4, "128").parse()?,
        seed: 7,
        limit: None,
    };
    let dir = PathBuf::from(arg(
        5,
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/mnist"),
    ));
    let data = load_mnist(&dir)?;
    let report = train_local(&cfg, &data, &mut |_| {})?;
    println!(
        "{} {} lr {} epochs {} batch {}: test accuracy {:.4}, final loss {:.4}, {} steps, {:.2} s ({:.2} ms/step), digest {}",
        cfg.arch,
        cfg.optimizer.name(),
        cfg.optimizer.lr(),
        cfg.epochs,
        cfg.batch,
        report.test_accuracy,
        report.final_loss,
        report.steps,
        report.seconds,
        report.seconds * 1e3 / report.steps as f64,
        report.params_digest_hex
    );
    Ok(())
}
