//! `mixnn bench paper`: the MixNN paper's experiment, reproduced here.

pub mod churn;
pub mod report;

use serde::Serialize;

/// One setting of the experiment (a row of the table).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// "local", "network (3 hosts, 1 mix/segment)", ...
    pub setting: String,
    pub test_accuracy: f32,
    pub seconds: f64,
    pub examples_per_second: f64,
    /// seconds / local seconds.
    pub ratio: f64,
    /// Params digest equal to local training's.
    pub digest_equal: bool,
    pub params_digest: String,
}

/// Where the time of one training step went, in milliseconds per step.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepBreakdown {
    /// dfdx on the layer hosts (and the client's loss).
    pub compute_ms: f64,
    /// Sealing and opening cells, hosts and client.
    pub crypto_ms: f64,
    /// Encoding and decoding tensors and messages.
    pub serialization_ms: f64,
    /// The rest of the client's wait: transfers, relaying, link encryption, scheduling.
    pub network_ms: f64,
    /// Wall time per step.
    pub total_ms: f64,
}

/// Route discovery at one network size.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingPoint {
    pub volunteers: usize,
    /// Wall time to discover enough verified volunteers for a route.
    pub discovery_ms: f64,
    /// Kademlia requests the client sent for it.
    pub dht_requests: u64,
}

/// Everything `mixnn bench paper` measured.
#[derive(Clone, Debug, Serialize)]
pub struct PaperReport {
    pub arch: String,
    pub data: String,
    pub epochs: u32,
    pub batch: usize,
    pub mixes: usize,
    pub train_examples: usize,
    pub test_examples: usize,
    pub local_seconds: f64,
    pub network_seconds: f64,
    /// network_seconds / local_seconds.
    pub ratio: f64,
    pub local_accuracy: f32,
    pub network_accuracy: f32,
    /// Accuracy of inference through fresh circuits with the model map.
    pub infer_accuracy: f32,
    pub digest_equal: bool,
    pub rows: Vec<Row>,
    pub breakdown: StepBreakdown,
    pub scaling: Vec<ScalingPoint>,
    /// Why the discovery simulation stopped early, if it did (the training
    /// results stand without it).
    pub scaling_error: Option<String>,
    /// Loss per step, local and network.
    pub local_losses: Vec<f32>,
    pub network_losses: Vec<f32>,
    /// The paper's figures, for the table.
    pub paper_accuracy_difference: f64,
    pub paper_ratio: f64,
    /// Machine, date, command line.
    pub environment: String,
}

use std::time::{Duration, Instant};

use mixnn_model::{train_local, Dataset, StepInfo, TrainConfig};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::client::{
    infer_network, train_network, JobError, JobEvent, JobOptions, ModelMap, TrainJob,
};
use crate::discovery::{discover_sample, join_as_client};
use crate::local_net::LocalNet;
use crate::network::{NetworkError, TransportKind};
use crate::node::NodeError;

/// The paper's figures (arXiv 2203.14803, MNIST on AWS EC2).
pub const PAPER_RATIO: f64 = 7.5;
pub const PAPER_ACCURACY_DIFFERENCE: f64 = 0.001;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] mixnn_model::ModelError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{0}")]
    Other(String),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct PaperConfig {
    pub train: TrainConfig,
    pub data_name: String,
    pub mixes: usize,
    /// Network sizes for the discovery simulation (empty: skip it).
    pub scaling: Vec<usize>,
    pub environment: String,
}

/// Progress callbacks: a phase name, then steps.
pub trait Progress {
    fn phase(&mut self, name: &str, total_examples: u64);
    fn step(&mut self, info: StepInfo);
}

/// Run the experiment: local training, training through an in-process
/// network on loopback, inference through it, and the discovery simulation.
pub async fn run_paper(
    cfg: &PaperConfig,
    data: &Dataset,
    progress: &mut (dyn Progress + Send),
) -> Result<PaperReport, BenchError> {
    let tc = &cfg.train;
    let train = match tc.limit {
        Some(n) => data.train.clone().limit(n),
        None => data.train.clone(),
    };
    let examples = tc.epochs as u64 * train.len() as u64;

    progress.phase("local", examples);
    let t = Instant::now();
    let local = train_local(tc, data, &mut |s| progress.step(s))?;
    let local_seconds = t.elapsed().as_secs_f64();

    let stages = tc.arch.num_stages();
    let volunteers = stages + (stages + 1) * cfg.mixes;
    progress.phase(&format!("starting {volunteers} volunteers"), 0);
    let net = LocalNet::start(volunteers, TransportKind::Tcp).await?;
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let (client, found) = net
        .join(TransportKind::Tcp, cancel.child_token())
        .await
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let map_dir = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let map_path = map_dir.path().join("model.json");
    let opts = JobOptions {
        mixes: cfg.mixes,
        ..JobOptions::default()
    };
    progress.phase("network", examples);
    let net_report = train_network(
        &client,
        &found,
        TrainJob {
            cfg: tc,
            train: &train,
            test: &data.test,
            opts: &opts,
            map_path: &map_path,
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
    let hosts = |f: &dyn Fn(&crate::metrics::Metrics) -> f64| -> f64 {
        net.volunteers.iter().map(|n| f(&n.state.metrics)).sum()
    };
    let host_compute = hosts(&|m| m.host_compute_seconds.get());
    let host_crypto = hosts(&|m| m.host_crypto_seconds.get());
    let host_codec = hosts(&|m| m.host_codec_seconds.get());
    progress.phase("inference", 0);
    let map = ModelMap::load(&map_path).map_err(|e| BenchError::Other(e.to_string()))?;
    let inferred = infer_network(&client, &found, &map, &data.test, &opts).await?;
    drop(client);
    net.shutdown().await;

    let steps = net_report.steps.max(1) as f64;
    let b = &net_report.breakdown;
    let per_step = |s: f64| s * 1000.0 / steps;
    let compute_ms = per_step(host_compute + b.client_compute_seconds);
    let crypto_ms = per_step(host_crypto + b.client_crypto_seconds);
    let serialization_ms = per_step(host_codec + b.client_serialization_seconds);
    let total_ms = per_step(net_report.seconds);
    let breakdown = StepBreakdown {
        compute_ms,
        crypto_ms,
        serialization_ms,
        network_ms: (total_ms - compute_ms - crypto_ms - serialization_ms).max(0.0),
        total_ms,
    };

    let want = stages + (stages + 1) * cfg.mixes;
    let (scaling, scaling_error) =
        scaling_points(&cfg.scaling, progress, |n| discovery_at(n, want)).await;

    let digest_equal = net_report.params_digest == local.params_digest_hex;
    let eps = |seconds: f64| examples as f64 / seconds.max(1e-9);
    let rows = vec![
        Row {
            setting: "local (one process)".into(),
            test_accuracy: local.test_accuracy,
            seconds: local_seconds,
            examples_per_second: eps(local_seconds),
            ratio: 1.0,
            digest_equal: true,
            params_digest: local.params_digest_hex.clone(),
        },
        Row {
            setting: format!(
                "MixNN network ({stages} layer hosts, {} mix per segment, loopback)",
                cfg.mixes
            ),
            test_accuracy: net_report.test_accuracy,
            seconds: net_report.seconds,
            examples_per_second: eps(net_report.seconds),
            ratio: net_report.seconds / local_seconds.max(1e-9),
            digest_equal,
            params_digest: net_report.params_digest.clone(),
        },
    ];
    Ok(PaperReport {
        arch: tc.arch.to_string(),
        data: cfg.data_name.clone(),
        epochs: tc.epochs,
        batch: tc.batch,
        mixes: cfg.mixes,
        train_examples: train.len(),
        test_examples: data.test.len(),
        local_seconds,
        network_seconds: net_report.seconds,
        ratio: net_report.seconds / local_seconds.max(1e-9),
        local_accuracy: local.test_accuracy,
        network_accuracy: net_report.test_accuracy,
        infer_accuracy: inferred.test_accuracy,
        digest_equal,
        rows,
        breakdown,
        scaling,
        scaling_error,
        local_losses: local.losses,
        network_losses: net_report.losses,
        paper_accuracy_difference: PAPER_ACCURACY_DIFFERENCE,
        paper_ratio: PAPER_RATIO,
        environment: cfg.environment.clone(),
    })
}

/// Start `n` volunteers on the memory transport, let them publish, then
/// The discovery simulation at each size, in order, until one fails: the
/// points measured and why it stopped. A failure never loses the rest of
/// the report.
pub async fn scaling_points<F, Fut>(
    sizes: &[usize],
    progress: &mut dyn Progress,
    mut at: F,
) -> (Vec<ScalingPoint>, Option<String>)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<ScalingPoint, BenchError>>,
{
    let mut points = Vec::new();
    for &n in sizes {
        progress.phase(&format!("discovery with {n} volunteers"), 0);
        match at(n).await {
            Ok(p) => points.push(p),
            Err(e) => return (points, Some(format!("with {n} volunteers: {e}"))),
        }
    }
    (points, None)
}

/// time a client's discovery of `want` verified volunteers and count the
/// DHT requests it sent.
pub async fn discovery_at(n: usize, want: usize) -> Result<ScalingPoint, BenchError> {
    // Descriptors are published at start; no republishing during the run.
    let net = LocalNet::start_with(n, TransportKind::Memory, 3600).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !net
        .volunteers
        .iter()
        .all(|v| v.state.published.load(std::sync::atomic::Ordering::Relaxed))
    {
        if Instant::now() > deadline {
            return Err(BenchError::Other(format!(
                "{n} volunteers did not publish within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = CancellationToken::new();
    let network = join_as_client(
        net.bootstrap_addrs(),
        TransportKind::Memory,
        vec![],
        cancel.child_token(),
    )
    .await?;
    let before = network.metrics().dht_requests.get();
    let t = Instant::now();
    let (found, _) = discover_sample(&network, want, Duration::from_secs(10)).await;
    let discovery_ms = t.elapsed().as_secs_f64() * 1000.0;
    let dht_requests = network.metrics().dht_requests.get() - before;
    cancel.cancel();
    net.shutdown().await;
    if found.len() < want {
        return Err(BenchError::Other(format!(
            "with {n} volunteers the client found only {} of {want}",
            found.len()
        )));
    }
    Ok(ScalingPoint {
        volunteers: n,
        discovery_ms,
        dht_requests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl Progress for Quiet {
        fn phase(&mut self, _: &str, _: u64) {}
        fn step(&mut self, _: StepInfo) {}
    }

    #[tokio::test]
    async fn a_failing_discovery_size_keeps_the_points_before_it() {
        let (points, error) = scaling_points(&[25, 50, 200, 400], &mut Quiet, |n| async move {
            if n >= 200 {
                Err(BenchError::Other(format!(
                    "{n} volunteers did not publish within 60 s"
                )))
            } else {
                Ok(ScalingPoint {
                    volunteers: n,
                    discovery_ms: 1.0,
                    dht_requests: 3,
                })
            }
        })
        .await;
        assert_eq!(
            points.iter().map(|p| p.volunteers).collect::<Vec<_>>(),
            vec![25, 50]
        );
        let error = error.expect("the failure is kept");
        assert!(error.contains("with 200 volunteers") && error.contains("did not publish"));
        let (points, error) = scaling_points(&[], &mut Quiet, |_| async {
            Err::<ScalingPoint, _>(BenchError::Other("never called".into()))
        })
        .await;
        assert!(points.is_empty() && error.is_none());
    }
}
