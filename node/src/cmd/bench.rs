//! `mixnn bench`

use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use mixnn_model::StepInfo;
use mixnn_node::bench::churn::{self, run_churn, ChurnConfig};
use mixnn_node::bench::parties::Links;
use mixnn_node::bench::{report, run_paper, PaperConfig, Progress};

use super::train::progress;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand, Debug)]
enum Which {
    /// The MixNN paper's experiment: local training, training through an
    /// in-process network on loopback (one volunteer per layer, mixes between),
    /// inference through it, and a discovery simulation; writes report.md,
    /// report.json and loss.png.
    Paper(PaperArgs),
    /// The paper's model and data with layer hosts killed at random steps:
    /// recovery time per failure, steps replayed, checkpoint overhead, and
    /// whether the parameters still equal local training's; writes
    /// report.md and report.json.
    Churn(ChurnArgs),
}

#[derive(Args, Debug)]
struct ChurnArgs {
    #[command(flatten)]
    model: ExperimentArgs,
    /// Layer hosts killed during the run, at random steps.
    #[arg(long, default_value_t = 2)]
    kills: usize,
    /// Where to write report.md and report.json.
    #[arg(long, default_value = "bench-churn")]
    out: PathBuf,
}

/// The experiment's model and data (the paper's by default).
#[derive(Args, Debug)]
struct ExperimentArgs {
    /// `synthetic` or a directory with the four MNIST IDX files.
    #[arg(long, default_value = "synthetic")]
    data: String,
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// `mlp:...`, `lenet5` or `seq:...` (see `mixnn train --help`).
    #[arg(long, default_value = "mlp:784-512-256-10")]
    arch: String,
    /// Mixes per segment.
    #[arg(long, default_value_t = 1)]
    mixes: usize,
    #[arg(long, default_value = "momentum")]
    optimizer: String,
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Train on the first N examples only.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Args, Debug)]
struct PaperArgs {
    #[command(flatten)]
    model: ExperimentArgs,
    /// Network sizes for the route-discovery simulation (memory transport).
    #[arg(long, value_delimiter = ',', default_value = "25,50,100,200")]
    scaling: Vec<usize>,
    /// Skip the route-discovery simulation.
    #[arg(long)]
    no_scaling: bool,
    /// Train locally and through the network this many times each; the
    /// report gives the ratios' min / median / max.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Link latency the one-machine-per-party projection assumes, in ms.
    #[arg(long, default_value_t = 1.0)]
    latency: f64,
    /// Link bandwidth the projection assumes, in Gbit/s.
    #[arg(long, default_value_t = 1.0)]
    bandwidth: f64,
    /// Where to write report.md, report.json and loss.png.
    #[arg(long, default_value = "bench-report")]
    out: PathBuf,
}

struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn phase(&mut self, name: &str, total: u64) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
        if total > 0 {
            self.0 = Some(progress(total, name));
        } else {
            eprintln!("{name} ...");
        }
    }
    fn step(&mut self, s: StepInfo) {
        if let Some(b) = &self.0 {
            b.set_position(s.examples_done);
            if s.step % 10 == 1 {
                b.set_message(format!("loss {:.4}", s.loss));
            }
        }
    }
}

impl ExperimentArgs {
    fn config(&self) -> anyhow::Result<mixnn_model::TrainConfig> {
        super::train::ModelArgs {
            arch: self.arch.clone(),
            model_file: None,
            data: self.data.clone(),
            epochs: Some(self.epochs),
            batch: self.batch,
            lr: self.lr,
            optimizer: self.optimizer.clone(),
            seed: self.seed,
            limit: self.limit,
        }
        .config()
    }
}

fn environment() -> String {
    format!(
        "{} CPU cores, {} {}, mixnn {}; {}; {}; {}; `{}`",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::env::consts::OS,
        std::env::consts::ARCH,
        env!("CARGO_PKG_VERSION"),
        if mixnn_crypto::aead::aes_in_hardware() {
            "cells in AES-256-GCM (every party offers it: the CPU has AES instructions)"
        } else {
            "cells in ChaCha20-Poly1305 (the CPU has no AES instructions)"
        },
        mixnn_node::memcopy::describe(),
        mixnn_node::heap::describe(),
        std::env::args().collect::<Vec<_>>().join(" ")
    )
}

fn churn(a: ChurnArgs) -> anyhow::Result<()> {
    super::network::warn_if_no_mixes(a.model.mixes);
    let train = a.model.config()?;
    let data = mixnn_node::dataset::load(&a.model.data)?;
    let cfg = ChurnConfig {
        train,
        data_name: a.model.data.clone(),
        mixes: a.model.mixes,
        kills: a.kills,
        seed: a.model.seed,
        environment: environment(),
    };
    let report = super::runtime()?.block_on(async {
        let mut bar = Bar(None);
        let r = run_churn(&cfg, &data, &mut bar).await;
        bar.phase("done", 0);
        r
    })?;
    let (md, json) = churn::write_report(&report, &a.out)?;
    println!("{}", churn::table(&report));
    eprintln!("wrote {} and {}", md.display(), json.display());
    anyhow::ensure!(
        report.steady.digest_equal && report.churn.digest_equal,
        "the network's parameters differ from local training"
    );
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let a = match args.which {
        Which::Paper(a) => a,
        Which::Churn(a) => return churn(a),
    };
    super::network::warn_if_no_mixes(a.model.mixes);
    anyhow::ensure!(
        (1..=100).contains(&a.repeat),
        "--repeat must be between 1 and 100"
    );
    anyhow::ensure!(
        a.latency.is_finite() && a.latency >= 0.0,
        "--latency must be a number of milliseconds, 0 or more"
    );
    anyhow::ensure!(
        a.bandwidth.is_finite() && a.bandwidth > 0.0,
        "--bandwidth must be a positive number of Gbit/s"
    );
    let train = a.model.config()?;
    let data = mixnn_node::dataset::load(&a.model.data)?;
    let environment = environment();
    let cfg = PaperConfig {
        train,
        data_name: a.model.data.clone(),
        mixes: a.model.mixes,
        scaling: if a.no_scaling {
            vec![]
        } else {
            a.scaling.clone()
        },
        environment,
        repeat: a.repeat,
        links: Links {
            latency_ms: a.latency,
            bandwidth_bits: a.bandwidth * 1e9,
        },
    };
    let report = super::runtime()?.block_on(async {
        let mut bar = Bar(None);
        let r = run_paper(&cfg, &data, &mut bar).await;
        bar.phase("done", 0);
        r
    })?;
    let files = report::write_report(&report, &a.out)?;
    println!("{}", report::table(&report));
    println!("{}", report::deployment(&report));
    if let Some(e) = &report.scaling_error {
        eprintln!("warning: the route-discovery simulation stopped early ({e}); the training results above are complete");
    }
    eprintln!(
        "wrote {}, {} and {}",
        files.markdown.display(),
        files.json.display(),
        files.plot.display()
    );
    Ok(())
}
