//! Jobs through the network: `mixnn train` (without --local) and `mixnn infer`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use libp2p::Multiaddr;
use mixnn_model::{Dataset, TrainConfig};
use mixnn_node::client::{
    infer_network, train_network, Client, JobOptions, ModelMap, NetworkReport,
};
use mixnn_node::config::parse_addrs;
use mixnn_node::discovery::{discover_at_least, join_as_client, Volunteer};
use mixnn_node::network::{Network, TransportKind};
use tokio_util::sync::CancellationToken;

use super::train::{on_step, progress, TrainArgs};

/// Volunteers a job over `stages` remote stages with `mixes` per segment needs.
pub fn volunteers_needed(stages: usize, mixes: usize) -> usize {
    stages + (stages + 1) * mixes
}

fn bootstrap_addrs(values: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    anyhow::ensure!(
        !values.is_empty(),
        "a network job needs --bootstrap <multiaddr> (mixnn-bootstrap prints it), or --local to train in this process"
    );
    Ok(parse_addrs("bootstrap address", values)?)
}

/// Join, then discover until enough volunteers answer (or 15 s pass).
pub async fn join_and_discover(
    bootstrap: Vec<Multiaddr>,
    want: usize,
    cancel: CancellationToken,
) -> anyhow::Result<(Network, Vec<Volunteer>)> {
    let network = join_as_client(bootstrap, TransportKind::Tcp, vec![], cancel)
        .await
        .context("cannot join the network through the bootstrap peer")?;
    let (found, _) = discover_at_least(&network, want, Duration::from_secs(15)).await;
    Ok((network, found))
}

pub fn print_network_summary(cfg: &TrainConfig, r: &NetworkReport, map: &std::path::Path) {
    eprintln!(
        "trained {} through the network: {} steps, final loss {:.4}, test accuracy {:.4}, {:.2} s, params digest {}",
        cfg.arch, r.steps, r.final_loss, r.test_accuracy, r.seconds, r.params_digest
    );
    eprintln!(
        "model map written to {} (keep it private: it alone can drive the slots)",
        map.display()
    );
}

pub fn train(args: &TrainArgs, cfg: TrainConfig, data: Dataset) -> anyhow::Result<()> {
    let bootstrap = bootstrap_addrs(&args.bootstrap)?;
    let stages = cfg.arch.num_stages() - if args.keep_ends { 2 } else { 0 };
    let want = volunteers_needed(stages, args.mixes);
    let opts = JobOptions {
        mixes: args.mixes,
        keep_ends: args.keep_ends,
        step_timeout: Duration::from_secs(args.step_timeout),
        ..JobOptions::default()
    };
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
        let bar = progress(cfg.epochs as u64 * train.len() as u64, "network");
        let mut step = on_step(&bar);
        let client = Client::new(network)?;
        let report = train_network(
            &client,
            &volunteers,
            &cfg,
            &train,
            &data.test,
            &opts,
            &args.model_map,
            &mut step,
        )
        .await;
        bar.finish_and_clear();
        let report = report?;
        print_network_summary(&cfg, &report, &args.model_map);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "mode": "network",
                    "arch": cfg.arch.to_string(),
                    "test_accuracy": report.test_accuracy,
                    "final_loss": report.final_loss,
                    "steps": report.steps,
                    "seconds": report.seconds,
                    "params_digest": report.params_digest,
                    "model_map": args.model_map,
                    "breakdown": report.breakdown,
                })
            );
        }
        Ok(())
    })
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Bootstrap peers, each ending in /p2p/<peer id>.
    #[arg(long, env = "MIXNN_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// The model map `mixnn train` wrote.
    #[arg(long, default_value = "model.json")]
    model_map: PathBuf,
    /// `synthetic` or a directory with the MNIST IDX files; the test split is used.
    #[arg(long, default_value = "synthetic")]
    data: String,
    /// Mixes between adjacent layer hosts.
    #[arg(long, default_value_t = 1)]
    mixes: usize,
    /// Fail if one batch takes longer than this many seconds.
    #[arg(long, default_value_t = 60)]
    step_timeout: u64,
    /// Print one JSON object on stdout's last line.
    #[arg(long)]
    json: bool,
}

pub fn infer(args: InferArgs) -> anyhow::Result<()> {
    let bootstrap = bootstrap_addrs(&args.bootstrap)?;
    let map = ModelMap::load(&args.model_map)?;
    let data = mixnn_node::dataset::load(&args.data)?;
    let remote = map
        .stages
        .iter()
        .filter(|s| matches!(s, mixnn_node::client::model_map::StageEntry::Remote { .. }))
        .count();
    let opts = JobOptions {
        mixes: args.mixes,
        step_timeout: Duration::from_secs(args.step_timeout),
        ..JobOptions::default()
    };
    super::runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let (network, volunteers) = join_and_discover(
            bootstrap,
            volunteers_needed(remote, args.mixes),
            cancel.child_token(),
        )
        .await?;
        let client = Client::new(network)?;
        let report = infer_network(&client, &volunteers, &map, &data.test, &opts).await?;
        eprintln!(
            "inference through the network: test accuracy {:.4} on {} examples, {:.2} s",
            report.test_accuracy, report.examples, report.seconds
        );
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        Ok(())
    })
}
