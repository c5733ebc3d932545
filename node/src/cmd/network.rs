//! Jobs through the network: `mixnn train` (without --local) and `mixnn infer`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use libp2p::Multiaddr;
use mixnn_model::{Dataset, TrainConfig};
use mixnn_node::client::model_map::{DataCheck, TrainingData};
use mixnn_node::client::{
    infer_network, resume_config, resume_network, train_network_from, Client, JobError, JobOptions,
    ModelMap, NetworkReport, TrainJob,
};
use mixnn_node::config::parse_addrs;
use mixnn_node::discovery::{discover_for_route, join_as_client, Volunteer};
use mixnn_node::network::{Network, TransportKind};
use tokio_util::sync::CancellationToken;

use super::train::{on_event, progress, TrainArgs};

/// Volunteers a job over `stages` remote stages with `mixes` per segment needs.
pub fn volunteers_needed(stages: usize, mixes: usize) -> usize {
    stages + (stages + 1) * mixes
}

/// The warning `--mixes 0` gets: it takes the mixes out of the rings.
pub const NO_MIXES_WARNING: &str = "warning: --mixes 0 removes the mixes: every layer host \
then talks to its neighbours directly and sees their peer ids (the next and previous \
layer hosts, and the client's own for the first and last), so a host can tell who holds \
the layers next to its own";

/// Print [`NO_MIXES_WARNING`] on stderr when `mixes` is 0.
pub fn warn_if_no_mixes(mixes: usize) {
    if mixes == 0 {
        eprintln!("{NO_MIXES_WARNING}");
    }
}

pub fn bootstrap_addrs(values: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    anyhow::ensure!(
        !values.is_empty(),
        "a network job needs --bootstrap <multiaddr> (mixnn-bootstrap prints it), or --local to train in this process"
    );
    Ok(parse_addrs("bootstrap address", values)?)
}

/// Join, then discover until enough volunteers answer (or 15 s pass), the
/// way the bench's route discovery does ([`discover_for_route`]).
pub async fn join_and_discover(
    bootstrap: Vec<Multiaddr>,
    want: usize,
    cancel: CancellationToken,
) -> anyhow::Result<(Network, Vec<Volunteer>)> {
    let network = join_as_client(bootstrap, TransportKind::Tcp, vec![], cancel)
        .await
        .context("cannot join the network through the bootstrap peer")?;
    let (found, _) = discover_for_route(&network, want, Duration::from_secs(15)).await;
    Ok((network, found))
}

pub fn print_network_summary(cfg: &TrainConfig, r: &NetworkReport, map: &std::path::Path) {
    eprintln!(
        "trained {} through the network: {} steps, loss per epoch {}, test accuracy {:.4}, {:.2} s, params digest {}",
        cfg.arch,
        r.steps,
        super::train::format_losses(&r.epoch_losses),
        r.test_accuracy,
        r.seconds,
        r.params_digest
    );
    eprintln!(
        "model map written to {} (keep it private: it alone can drive the slots)",
        map.display()
    );
}

fn job_options(args: &TrainArgs, mixes: usize, keep_ends: bool) -> JobOptions {
    JobOptions {
        mixes,
        keep_ends,
        step_timeout: Duration::from_secs(args.step_timeout),
        checkpoint_every: args.checkpoint_every,
        max_failovers: args.max_failovers,
        lease: args.lease,
        ..JobOptions::default()
    }
}

/// Cancelled at the first Ctrl-C (the job checkpoints and stops); a second
/// one ends the process at once.
fn stop_on_ctrl_c() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("stopping after this step (Ctrl-C again to quit at once) ...");
            s.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    stop
}

/// The command that carries an interrupted job on.
fn resume_command(args: &TrainArgs) -> String {
    let mut cmd = format!(
        "mixnn train --resume --model-map {}",
        args.model_map.display()
    );
    if !args.bootstrap.is_empty() {
        cmd.push_str(&format!(" --bootstrap {}", args.bootstrap.join(",")));
    }
    if args.model.data != "synthetic" {
        cmd.push_str(&format!(" --data {}", args.model.data));
    }
    if let Some(e) = args.model.epochs {
        cmd.push_str(&format!(" --epochs {e}"));
    }
    if args.mixes != 1 {
        cmd.push_str(&format!(" --mixes {}", args.mixes));
    }
    cmd
}

/// Print the outcome of a network training job.
fn report_training(
    args: &TrainArgs,
    cfg: &TrainConfig,
    result: Result<NetworkReport, JobError>,
) -> anyhow::Result<()> {
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            if e.resumable() && args.model_map.exists() {
                eprintln!(
                    "the model map and its checkpoint are kept; carry the job on with:\n  {}",
                    resume_command(args)
                );
            }
            return Err(e.into());
        }
    };
    print_network_summary(cfg, &report, &args.model_map);
    if report.failovers > 0 {
        eprintln!(
            "{} failover(s), {} step(s) replayed; the parameters are those of an uninterrupted run",
            report.failovers, report.replayed_steps
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "network",
                "arch": cfg.arch.to_string(),
                "test_accuracy": report.test_accuracy,
                "final_loss": report.final_loss,
                "epoch_losses": report.epoch_losses,
                "steps": report.steps,
                "seconds": report.seconds,
                "params_digest": report.params_digest,
                "model_map": args.model_map,
                "failovers": report.failovers,
                "replayed_steps": report.replayed_steps,
                "recovery_seconds": report.recovery_seconds,
                "checkpoints": report.checkpoints,
                "checkpoint_every": report.checkpoint_every,
                "started_at_step": report.started_at_step,
                "breakdown": report.breakdown,
            })
        );
    }
    Ok(())
}

/// Train through the network from the seeded initialisation or, with
/// `init`, from given stage states (`--init`).
pub fn train(
    args: &TrainArgs,
    cfg: TrainConfig,
    data: Dataset,
    init: Option<Vec<Vec<u8>>>,
) -> anyhow::Result<()> {
    warn_if_no_mixes(args.mixes);
    // Checked before anything else.
    bootstrap_addrs(&args.bootstrap)?;
    if args.model_map.exists() && !args.force {
        anyhow::bail!(
            "the model map {} exists and holds the only key to its model's slots; \
             pass --resume to carry its job on, or --force to overwrite it",
            args.model_map.display()
        );
    }
    let dir = args
        .model_map
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    anyhow::ensure!(
        dir.is_dir(),
        "the directory of --model-map {} does not exist",
        args.model_map.display()
    );
    // The map is the only key to the slots: make sure it can be written
    // before any volunteer creates one.
    tempfile::NamedTempFile::new_in(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot write the model map in {}: {e}; choose another --model-map",
            dir.display()
        )
    })?;
    let opts = job_options(args, args.mixes, args.keep_ends);
    run_training(args, &cfg, &data, opts, Start::Fresh(init))
}

/// How a network training run begins.
enum Start {
    /// From the seeded initialisation, or from given stage states.
    Fresh(Option<Vec<Vec<u8>>>),
    /// From the checkpoint beside the model map.
    Resume,
}

/// Join the network, find enough volunteers and run the job.
fn run_training(
    args: &TrainArgs,
    cfg: &TrainConfig,
    data: &Dataset,
    opts: JobOptions,
    start: Start,
) -> anyhow::Result<()> {
    let bootstrap = bootstrap_addrs(&args.bootstrap)?;
    let stages = cfg.arch.num_stages() - if opts.keep_ends { 2 } else { 0 };
    let want = volunteers_needed(stages, opts.mixes);
    let train = match cfg.limit {
        Some(n) => data.train.clone().limit(n),
        None => data.train.clone(),
    };
    super::runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let (network, volunteers) =
            join_and_discover(bootstrap, want, cancel.child_token()).await?;
        eprintln!("found {} volunteers", volunteers.len());
        anyhow::ensure!(
            volunteers.len() >= want,
            "not enough volunteers: {} with --mixes {} needs {want} distinct peers, found {}",
            cfg.arch,
            opts.mixes,
            volunteers.len()
        );
        let bar = progress(cfg.epochs as u64 * train.len() as u64, "network");
        let mut events = on_event(&bar, cfg.epochs);
        let client = Client::new(network)?;
        let job = TrainJob {
            cfg,
            train: &train,
            test: &data.test,
            opts: &opts,
            map_path: &args.model_map,
            stop: stop_on_ctrl_c(),
            trained_on: Some(TrainingData::of(&args.model.data, data)),
        };
        let report = match start {
            Start::Fresh(init) => {
                train_network_from(&client, &volunteers, job, init, &mut events).await
            }
            Start::Resume => resume_network(&client, &volunteers, job, &mut events).await,
        };
        bar.finish_and_clear();
        report_training(args, cfg, report)
    })
}

pub fn resume(args: &TrainArgs) -> anyhow::Result<()> {
    warn_if_no_mixes(args.mixes);
    let map = ModelMap::load(&args.model_map)?;
    let cfg = resume_config(&map, args.model.epochs)?;
    let record = map
        .job
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the model map records no job to resume"))?;
    let data = mixnn_node::dataset::load(&args.model.data)?;
    let opts = job_options(args, args.mixes, record.keep_ends);
    eprintln!(
        "resuming {} from the checkpoint of step {} ({} epoch(s) in all)",
        cfg.arch, record.checkpoint_step, cfg.epochs
    );
    run_training(args, &cfg, &data, opts, Start::Resume)
}

/// Join the network with enough volunteers for the model of `map`.
pub async fn join_for_map(
    bootstrap: &[String],
    map: &ModelMap,
    mixes: usize,
    cancel: CancellationToken,
) -> anyhow::Result<(Client, Vec<Volunteer>)> {
    let bootstrap = bootstrap_addrs(bootstrap)?;
    let remote = map
        .stages
        .iter()
        .filter(|s| matches!(s, mixnn_node::client::model_map::StageEntry::Remote { .. }))
        .count();
    let (network, volunteers) =
        join_and_discover(bootstrap, volunteers_needed(remote, mixes), cancel).await?;
    Ok((Client::new(network)?, volunteers))
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Bootstrap peers, each ending in /p2p/<peer id>.
    #[arg(long, env = "MIXNN_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// The model map `mixnn train` wrote.
    #[arg(long, default_value = "model.json")]
    model_map: PathBuf,
    /// `synthetic` or a directory with the MNIST IDX files; the test split is used
    /// [default: the data the model was trained on, as its model map records].
    #[arg(long)]
    data: Option<String>,
    /// Mixes between adjacent layer hosts.
    #[arg(long, default_value_t = 1)]
    mixes: usize,
    /// Fail if one batch takes longer than this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    step_timeout: u64,
    /// Print one JSON object on stdout's last line.
    #[arg(long)]
    json: bool,
}

/// The data `infer` scores: `--data`, else what the map says the model was
/// trained on. Refused when it does not fit the model; a warning when it is
/// not the model's own.
pub fn infer_data(map: &ModelMap, data: Option<&str>) -> anyhow::Result<(String, Dataset)> {
    let spec = match (data, &map.trained_on) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.source.clone(),
        (None, None) => anyhow::bail!(
            "the model map does not record what its model was trained on (an older mixnn wrote it); \
             pass --data synthetic or --data DIR (the MNIST directory) to say which test set to score"
        ),
    };
    let dataset = mixnn_node::dataset::load(&spec).with_context(|| match data {
        Some(_) => format!("--data {spec}"),
        None => format!(
            "the data the model was trained on ({spec}, as the model map records); pass --data to score another test set"
        ),
    })?;
    match map.check_data(&spec, &dataset) {
        Err(reason) => anyhow::bail!(reason),
        Ok(DataCheck::Other(reason)) => eprintln!("warning: {reason}"),
        Ok(DataCheck::Same) => {}
    }
    if data.is_none() {
        eprintln!("scoring the test split of {spec}, the data the model was trained on");
    }
    Ok((spec, dataset))
}

pub fn infer(args: InferArgs) -> anyhow::Result<()> {
    warn_if_no_mixes(args.mixes);
    let map = ModelMap::load(&args.model_map)?;
    let (spec, data) = infer_data(&map, args.data.as_deref())?;
    let opts = JobOptions {
        mixes: args.mixes,
        step_timeout: Duration::from_secs(args.step_timeout),
        ..JobOptions::default()
    };
    super::runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let (client, volunteers) =
            join_for_map(&args.bootstrap, &map, args.mixes, cancel.child_token()).await?;
        let report = infer_network(&client, &volunteers, &map, &data.test, &opts).await?;
        eprintln!(
            "inference through the network: test accuracy {:.4} on {} examples of {spec}, {:.2} s",
            report.test_accuracy, report.examples, report.seconds
        );
        if args.json {
            let mut out = serde_json::to_value(&report)?;
            out["data"] = serde_json::Value::String(spec);
            println!("{out}");
        }
        Ok(())
    })
}
