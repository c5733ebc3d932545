//! `mixnn bench`

use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use mixnn_model::StepInfo;
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
}

#[derive(Args, Debug)]
struct PaperArgs {
    /// `synthetic` or a directory with the four MNIST IDX files.
    #[arg(long, default_value = "synthetic")]
    data: String,
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    #[arg(long, default_value_t = 256)]
    batch: usize,
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
    /// Network sizes for the route-discovery simulation (memory transport).
    #[arg(long, value_delimiter = ',', default_value = "25,50,100,200")]
    scaling: Vec<usize>,
    /// Skip the route-discovery simulation.
    #[arg(long)]
    no_scaling: bool,
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

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let Which::Paper(a) = args.which;
    let model = super::train::ModelArgs {
        arch: a.arch.clone(),
        data: a.data.clone(),
        epochs: Some(a.epochs),
        batch: a.batch,
        lr: a.lr,
        optimizer: a.optimizer.clone(),
        seed: a.seed,
        limit: a.limit,
    };
    let train = model.config()?;
    let data = mixnn_node::dataset::load(&a.data)?;
    let environment = format!(
        "{} CPU cores, {} {}, mixnn {}; `{}`",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::env::consts::OS,
        std::env::consts::ARCH,
        env!("CARGO_PKG_VERSION"),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let cfg = PaperConfig {
        train,
        data_name: a.data.clone(),
        mixes: a.mixes,
        scaling: if a.no_scaling {
            vec![]
        } else {
            a.scaling.clone()
        },
        environment,
    };
    let report = super::runtime()?.block_on(async {
        let mut bar = Bar(None);
        let r = run_paper(&cfg, &data, &mut bar).await;
        bar.phase("done", 0);
        r
    })?;
    let files = report::write_report(&report, &a.out)?;
    println!("{}", report::table(&report));
    eprintln!(
        "wrote {}, {} and {}",
        files.markdown.display(),
        files.json.display(),
        files.plot.display()
    );
    Ok(())
}
