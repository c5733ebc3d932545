//! `mixnn train`

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use mixnn_model::{
    to_hex, train_local_model, Arch, ModelParams, OptimizerSpec, StepInfo, TrainConfig,
};
use mixnn_node::client::JobEvent;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Architecture: `mlp:IN-H1-...-OUT` (Linear+ReLU between layers, none after the last),
    /// `lenet5` (a CNN for 28x28 images, 5 stages), or `seq:INPUT|LAYERS|...`, e.g.
    /// `seq:1x28x28|conv(6,5,p=2) relu maxpool(2)|flatten linear(10)` (README, "Models").
    #[arg(long, default_value = "mlp:784-128-10")]
    pub arch: String,
    /// A model file (TOML, or JSON if it ends in .json) listing the input shape and each
    /// stage's layers; instead of --arch (README, "Models").
    #[arg(long = "model", value_name = "FILE", conflicts_with = "arch")]
    pub model_file: Option<PathBuf>,
    /// `synthetic` (built in) or a directory with the four MNIST IDX files (gzipped or not).
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Passes over the training data [default: 1; with --resume, the job's own].
    #[arg(long)]
    pub epochs: Option<u32>,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,
    /// sgd, momentum (0.9) or adam.
    #[arg(long, default_value = "momentum")]
    pub optimizer: String,
    /// Seeds parameter initialization and batch order.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Train on the first N training examples only.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl ModelArgs {
    pub fn config(&self) -> anyhow::Result<TrainConfig> {
        let arch = match &self.model_file {
            Some(path) => Arch::from_model_file(path)?,
            None => Arch::parse(&self.arch).with_context(|| format!("--arch {}", self.arch))?,
        };
        let optimizer = OptimizerSpec::from_name(&self.optimizer, self.lr)
            .with_context(|| format!("--optimizer {} --lr {}", self.optimizer, self.lr))?;
        let cfg = TrainConfig {
            arch,
            epochs: self.epochs.unwrap_or(1),
            batch: self.batch,
            optimizer,
            seed: self.seed,
            limit: self.limit,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Train in this process instead of through the network.
    #[arg(long)]
    pub local: bool,
    /// Bootstrap peers, each ending in /p2p/<peer id> (network training).
    #[arg(long, env = "MIXNN_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Mixes between adjacent layer hosts (and between the client and its first and last host).
    #[arg(long, default_value_t = 1)]
    pub mixes: usize,
    /// Where to write the model map: the owner's private file tying slots, hosts and keys together.
    /// The owner's checkpoint goes beside it (`<map>.ckpt`).
    #[arg(long, default_value = "model.json")]
    pub model_map: PathBuf,
    /// Carry on the interrupted (or finished) job of --model-map from its checkpoint; with
    /// --epochs N, train to N epochs in all. Model, optimizer, seed and batch come from the map.
    #[arg(long)]
    pub resume: bool,
    /// Overwrite an existing model map (and with it the only key to its slots).
    #[arg(long)]
    pub force: bool,
    /// Every stage's state goes to the owner every K steps (default: chosen so checkpoints,
    /// the final one included, cost at most about 5% of the training time; a short job may
    /// take only the final one).
    #[arg(long, value_name = "K")]
    pub checkpoint_every: Option<u64>,
    /// New runs from the last checkpoint after failed hops, before the job gives up
    /// (0: stop at the first failure).
    #[arg(long, default_value_t = 5)]
    pub max_failovers: u32,
    /// How long the model's slots live on the volunteers after the job
    /// (e.g. 7d, 12h, 90m, 3600s); each volunteer caps it with its own
    /// maximum. `mixnn renew` extends it, `mixnn release` ends it.
    #[arg(long, default_value = "7d", value_parser = super::slots::parse_duration)]
    pub lease: std::time::Duration,
    /// Keep the first and last layer in this process (raw inputs and labels never leave it).
    #[arg(long)]
    pub keep_ends: bool,
    /// A hop that has not answered within this many seconds has failed (the job fails over).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub step_timeout: u64,
    /// Start from the weights in this safetensors file (`mixnn export`, `--save`) instead of
    /// the seeded initialisation; the optimizer state starts at zero.
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// With --local: write the trained model to this safetensors file (for a network job,
    /// use `mixnn export`).
    #[arg(long, value_name = "FILE", requires = "local")]
    pub save: Option<PathBuf>,
    /// Print one JSON object on stdout's last line.
    #[arg(long)]
    pub json: bool,
}

/// A progress bar over examples, on stderr (hidden when it is not a
/// terminal): the epoch (once [`on_step`] knows it), examples done, examples
/// per second, the time left and the latest loss.
pub fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(&format!(
        "{what} {{prefix}} [{{bar:30}}] {{pos}}/{{len}} examples  {{rate}}  ETA {{eta}}  {{msg}}"
    ))
    .map(|s| s.with_key("rate", rate))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Examples per second, rounded: `1234 ex/s`.
fn rate(state: &ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{} ex/s", state.per_sec().round() as u64);
}

/// The bar's epoch label, `epoch 2/5`.
pub fn epoch_label(epoch: u32, epochs: u32) -> String {
    format!("epoch {}/{}", epoch + 1, epochs.max(epoch + 1))
}

/// Moves the bar after each step of a job of `epochs` epochs.
pub fn on_step(bar: &ProgressBar, epochs: u32) -> impl FnMut(StepInfo) + '_ {
    let mut shown = None;
    move |s: StepInfo| {
        if shown != Some(s.epoch) {
            shown = Some(s.epoch);
            bar.set_prefix(epoch_label(s.epoch, epochs));
        }
        bar.set_position(s.examples_done);
        if s.step % 10 == 1 {
            bar.set_message(format!("loss {:.4}", s.loss));
        }
    }
}

/// Progress of a network job: steps move the bar, failovers and
/// checkpoints print a line above it.
pub fn on_event(bar: &ProgressBar, epochs: u32) -> impl FnMut(JobEvent) + Send + '_ {
    let mut step = on_step(bar, epochs);
    move |e: JobEvent| match e {
        JobEvent::Step(s) => step(s),
        JobEvent::Failover {
            number,
            reason,
            blamed,
            restore_step,
        } => {
            let who = if blamed.is_empty() {
                String::new()
            } else {
                let peers: Vec<String> = blamed.iter().map(|p| p.to_string()).collect();
                format!(" (avoiding {})", peers.join(", "))
            };
            bar.println(format!(
                "failover {number}: {reason}{who}; going back to the checkpoint of step {restore_step}"
            ))
        }
        JobEvent::Resumed { step, seconds } => bar.println(format!(
            "running again from step {step} after {seconds:.1} s"
        )),
        JobEvent::Checkpoint { .. } => {}
    }
}

/// Losses rounded for people: `0.4321, 0.2107`; of a long run, the first
/// and last few.
pub fn format_losses(losses: &[f32]) -> String {
    let show = |ls: &[f32]| {
        ls.iter()
            .map(|l| format!("{l:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if losses.len() <= 8 {
        show(losses)
    } else {
        format!(
            "{}, ..., {}",
            show(&losses[..3]),
            show(&losses[losses.len() - 3..])
        )
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if args.resume {
        anyhow::ensure!(
            !args.local,
            "--resume carries on a network job; drop --local"
        );
        anyhow::ensure!(
            args.init.is_none(),
            "--resume carries on from the job's checkpoint; drop --init"
        );
        return super::network::resume(&args);
    }
    let cfg = args.model.config()?;
    let init = match &args.init {
        Some(path) => {
            let params = ModelParams::load(path, Some(&cfg.arch))
                .with_context(|| format!("--init {}", path.display()))?;
            eprintln!(
                "starting from the weights in {} (params digest {})",
                path.display(),
                to_hex(&params.digest())
            );
            Some(params.slot_states(cfg.optimizer)?)
        }
        None => None,
    };
    let data = mixnn_node::dataset::load(&args.model.data)?;
    if !args.local {
        return super::network::train(&args, cfg, data, init);
    }
    let train_len = args
        .model
        .limit
        .map_or(data.train.len(), |l| l.min(data.train.len()));
    let bar = progress(cfg.epochs as u64 * train_len as u64, "local");
    let (report, model) =
        train_local_model(&cfg, &data, init.as_deref(), &mut on_step(&bar, cfg.epochs))?;
    bar.finish_and_clear();
    if let Some(path) = &args.save {
        ModelParams::from_model(&model)
            .save(path)
            .with_context(|| format!("--save {}", path.display()))?;
        eprintln!("model written to {}", path.display());
    }
    eprintln!(
        "trained {} locally: {} steps, loss per epoch {}, test accuracy {:.4}, {:.2} s, params digest {}",
        cfg.arch,
        report.steps,
        format_losses(&report.epoch_losses),
        report.test_accuracy,
        report.seconds,
        report.params_digest_hex
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "local",
                "arch": cfg.arch.to_string(),
                "test_accuracy": report.test_accuracy,
                "final_loss": report.final_loss,
                "epoch_losses": report.epoch_losses,
                "steps": report.steps,
                "seconds": report.seconds,
                "params_digest": report.params_digest_hex,
            })
        );
    }
    Ok(())
}
