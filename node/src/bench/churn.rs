//! `mixnn bench churn`: the paper's experiment with layer hosts killed at
//! random steps. Measures what failover costs: recovery time per failure,
//! steps replayed, and what checkpoints cost an uninterrupted run; checks
//! that the parameters still equal local training's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use libp2p::PeerId;
use mixnn_model::{train_local, Dataset, TrainConfig};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{BenchError, Progress};
use crate::client::model_map::StageEntry;
use crate::client::{train_network, JobEvent, JobOptions, ModelMap, NetworkReport, TrainJob};
use crate::local_net::LocalNet;
use crate::network::TransportKind;

/// What to run.
#[derive(Clone, Debug)]
pub struct ChurnConfig {
    pub train: TrainConfig,
    pub data_name: String,
    pub mixes: usize,
    /// Layer hosts killed during the churn run.
    pub kills: usize,
    /// Seeds the kill steps and stages.
    pub seed: u64,
    pub environment: String,
}

/// One run through the network.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnRun {
    pub seconds: f64,
    pub ratio: f64,
    pub digest_equal: bool,
    pub failovers: u32,
    pub replayed_steps: u64,
    pub recovery_seconds: Vec<f64>,
    pub checkpoints: u64,
    pub checkpoint_every: u64,
    pub checkpoint_seconds: f64,
    /// Checkpoint time over the run's wall time, in percent.
    pub checkpoint_overhead_percent: f64,
    pub test_accuracy: f32,
}

/// Everything `mixnn bench churn` measured.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnReport {
    pub arch: String,
    pub data: String,
    pub epochs: u32,
    pub batch: usize,
    pub steps: u64,
    pub local_seconds: f64,
    pub local_accuracy: f32,
    pub params_digest: String,
    /// Without failures: what checkpoints cost.
    pub steady: ChurnRun,
    /// With `kills` layer hosts killed.
    pub churn: ChurnRun,
    /// (step, stage) of each kill.
    pub kills: Vec<(u64, usize)>,
    pub recovery_median_seconds: f64,
    pub recovery_max_seconds: f64,
    pub environment: String,
}

fn run_summary(r: &NetworkReport, local_seconds: f64, digest: &str) -> ChurnRun {
    ChurnRun {
        seconds: r.seconds,
        ratio: r.seconds / local_seconds.max(1e-9),
        digest_equal: r.params_digest == digest,
        failovers: r.failovers,
        replayed_steps: r.replayed_steps,
        recovery_seconds: r.recovery_seconds.clone(),
        checkpoints: r.checkpoints,
        checkpoint_every: r.checkpoint_every,
        checkpoint_seconds: r.breakdown.checkpoint_seconds,
        checkpoint_overhead_percent: 100.0 * r.breakdown.checkpoint_seconds / r.seconds.max(1e-9),
        test_accuracy: r.test_accuracy,
    }
}

fn host_of(map: &Path, stage: usize) -> Option<PeerId> {
    let map = ModelMap::load(map).ok()?;
    map.stages.iter().find_map(|s| match s {
        StageEntry::Remote { index, host, .. } if *index == stage => host.parse().ok(),
        _ => None,
    })
}

/// Run local training, an uninterrupted network run and a run with kills.
pub async fn run_churn(
    cfg: &ChurnConfig,
    data: &Dataset,
    progress: &mut (dyn Progress + Send),
) -> Result<ChurnReport, BenchError> {
    let tc = &cfg.train;
    let train = match tc.limit {
        Some(n) => data.train.clone().limit(n),
        None => data.train.clone(),
    };
    let examples = tc.epochs as u64 * train.len() as u64;
    let steps = tc.epochs as u64 * train.num_batches(tc.batch) as u64;
    if steps < 2 && cfg.kills > 0 {
        return Err(BenchError::Other("too few steps to kill hosts in".into()));
    }

    progress.phase("local", examples);
    let t = Instant::now();
    let local = train_local(tc, data, &mut |s| progress.step(s))?;
    let local_seconds = t.elapsed().as_secs_f64();

    let stages = tc.arch.num_stages();
    let volunteers = stages + (stages + 1) * cfg.mixes + cfg.kills + 1;
    progress.phase(&format!("starting {volunteers} volunteers"), 0);
    let mut net = LocalNet::start(volunteers, TransportKind::Tcp).await?;
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let (client, found) = net
        .join(TransportKind::Tcp, cancel.child_token())
        .await
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let dir = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let opts = JobOptions {
        mixes: cfg.mixes,
        ..JobOptions::default()
    };

    // An uninterrupted run: what checkpoints cost.
    progress.phase("network, no failures", examples);
    let steady_map = dir.path().join("steady.json");
    let steady = train_network(
        &client,
        &found,
        TrainJob {
            cfg: tc,
            train: &train,
            test: &data.test,
            opts: &opts,
            map_path: &steady_map,
            stop: cancel.child_token(),
            trained_on: None,
        },
        &mut |e| {
            if let JobEvent::Step(s) = e {
                progress.step(s)
            }
        },
    )
    .await?;

    // The same job, killing a layer host at each of `kills` random steps.
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut kills: Vec<(u64, usize)> = (0..cfg.kills)
        .map(|_| (rng.gen_range(1..steps), rng.gen_range(0..stages.max(1))))
        .collect();
    kills.sort();
    progress.phase(&format!("network, {} host(s) killed", cfg.kills), 0);
    let churn_map = dir.path().join("churn.json");
    let (tx, mut rx) = mpsc::channel::<u64>(1024);
    let mut on_event = |e: JobEvent| {
        if let JobEvent::Step(s) = e {
            let _ = tx.try_send(s.step);
        }
    };
    let result = {
        let job = train_network(
            &client,
            &found,
            TrainJob {
                cfg: tc,
                train: &train,
                test: &data.test,
                opts: &opts,
                map_path: &churn_map,
                stop: cancel.child_token(),
                trained_on: None,
            },
            &mut on_event,
        );
        tokio::pin!(job);
        let mut pending = kills.clone();
        loop {
            tokio::select! {
                r = &mut job => break r,
                Some(step) = rx.recv() => {
                    while pending.first().is_some_and(|(at, _)| step >= *at) {
                        let (_, stage) = pending.remove(0);
                        let Some(victim) = host_of(&churn_map, stage) else { continue };
                        if let Some(i) = net.volunteers.iter().position(|n| n.peer_id() == victim) {
                            tracing::info!(event = "bench_kill", step, stage, peer = %victim);
                            let node = net.volunteers.remove(i);
                            let _ = node.shutdown().await;
                        }
                    }
                }
            }
        }
    };
    let churned = result?;
    drop(client);
    net.shutdown().await;

    let steady = run_summary(&steady, local_seconds, &local.params_digest_hex);
    let churn = run_summary(&churned, local_seconds, &local.params_digest_hex);
    let mut rec = churn.recovery_seconds.clone();
    rec.sort_by(f64::total_cmp);
    let median = median(&rec);
    Ok(ChurnReport {
        arch: tc.arch.to_string(),
        data: cfg.data_name.clone(),
        epochs: tc.epochs,
        batch: tc.batch,
        steps,
        local_seconds,
        local_accuracy: local.test_accuracy,
        params_digest: local.params_digest_hex,
        recovery_median_seconds: median,
        recovery_max_seconds: rec.last().copied().unwrap_or(0.0),
        steady,
        churn,
        kills,
        environment: cfg.environment.clone(),
    })
}

/// The median of sorted values (0 for none).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The report as a Markdown table.
pub fn table(r: &ChurnReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| run | seconds | x local | digest equal | failovers | steps replayed | recovery median / max (s) | checkpoints (every K) | checkpoint overhead |"
    );
    let _ = writeln!(s, "|---|---:|---:|:---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        s,
        "| local | {:.2} | 1.00 | - | - | - | - | - | - |",
        r.local_seconds
    );
    for (name, run) in [
        ("network, no failures", &r.steady),
        ("network, hosts killed", &r.churn),
    ] {
        let rec = if run.recovery_seconds.is_empty() {
            "-".to_string()
        } else {
            let mut v = run.recovery_seconds.clone();
            v.sort_by(f64::total_cmp);
            format!("{:.2} / {:.2}", median(&v), v[v.len() - 1])
        };
        let _ = writeln!(
            s,
            "| {name} | {:.2} | {:.2} | {} | {} | {} | {rec} | {} ({}) | {:.1}% |",
            run.seconds,
            run.ratio,
            if run.digest_equal { "yes" } else { "NO" },
            run.failovers,
            run.replayed_steps,
            run.checkpoints,
            run.checkpoint_every,
            run.checkpoint_overhead_percent
        );
    }
    s
}

/// Write report.md and report.json into `out`.
pub fn write_report(r: &ChurnReport, out: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out)?;
    let md = out.join("report.md");
    let json = out.join("report.json");
    let mut text = String::new();
    let _ = writeln!(text, "# MixNN churn benchmark\n");
    let _ = writeln!(
        text,
        "{} on {}, {} epoch(s) of batch {} ({} steps); layer hosts killed at (step, stage) {:?}.\n",
        r.arch, r.data, r.epochs, r.batch, r.steps, r.kills
    );
    text.push_str(&table(r));
    let _ = writeln!(
        text,
        "\nRecovery is the time from the detection of a failure to the job running again \
         (new rings, the lost stage on a new host, every stage restored to the last checkpoint); \
         the steps after that checkpoint are then replayed. Checkpoint overhead is the time spent \
         collecting and writing checkpoints over the run's wall time.\n"
    );
    let _ = writeln!(text, "Environment: {}", r.environment);
    std::fs::write(&md, text)?;
    std::fs::write(
        &json,
        serde_json::to_string_pretty(r).map_err(std::io::Error::other)?,
    )?;
    Ok((md, json))
}
