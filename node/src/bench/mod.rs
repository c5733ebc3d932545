//! `mixnn bench paper`: the MixNN paper's experiment, reproduced here.

pub mod churn;
pub mod parties;
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

/// The steady step: the median time between consecutive steps, which a
/// run's fixed costs (ring setup, checkpoints, the final evaluation) leave
/// out. On a noisy machine it moves less than a whole run's wall time.
#[derive(Clone, Debug, Serialize)]
pub struct SteadyStep {
    /// The run with the median wall-time ratio: local and network, ms.
    pub local_ms: f64,
    pub network_ms: f64,
    /// Network over local, each run, and their spread.
    pub ratios: Vec<f64>,
    pub ratio_min: f64,
    pub ratio_median: f64,
    pub ratio_max: f64,
}

/// What a network run spends outside its steps, beside what local training
/// spends after its last step (the run with the median wall-time ratio).
#[derive(Clone, Debug, Serialize)]
pub struct FixedCosts {
    /// Route choice, proof of work and setting up both rings, ms.
    pub setup_ms: f64,
    /// Checkpoints taken (the final one included) and their time, ms.
    pub checkpoints: u64,
    pub checkpoint_ms: f64,
    /// The test set through the forward ring, ms.
    pub evaluation_ms: f64,
    /// Local training from its last step to its end (its evaluation), ms.
    pub local_evaluation_ms: f64,
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
    /// network_seconds / local_seconds (of the run with the median ratio).
    pub ratio: f64,
    /// Local and network runs made (`--repeat`), each run's ratio, and
    /// their smallest, median and largest.
    pub repeats: usize,
    pub ratios: Vec<f64>,
    pub ratio_min: f64,
    pub ratio_median: f64,
    pub ratio_max: f64,
    /// Every run's parameters equal its local training's.
    pub all_digests_equal: bool,
    pub local_accuracy: f32,
    pub network_accuracy: f32,
    /// Accuracy of inference through fresh circuits with the model map.
    pub infer_accuracy: f32,
    pub digest_equal: bool,
    pub rows: Vec<Row>,
    pub breakdown: StepBreakdown,
    /// A local training step, milliseconds.
    pub local_step_ms: f64,
    /// Steady step times and their ratio (`None` for runs of under three
    /// steps).
    pub steady: Option<SteadyStep>,
    /// The network run's setup, checkpoints and evaluation.
    pub fixed: FixedCosts,
    /// CPU and bytes per step of each party: the client, then the
    /// volunteers on the rings.
    pub parties: Vec<PartyCost>,
    /// The step time with one machine per party (a projection, see
    /// [`parties`]), and it over the local step time.
    pub projection: Projection,
    pub projected_ratio: f64,
    /// Core-seconds per example through the network over core-seconds per
    /// example locally (`None` where CPU time cannot be read).
    pub cpu_cost_ratio: Option<f64>,
    /// Inference batches through a circuit and locally.
    pub infer_network: Option<Latency>,
    pub infer_local: Option<Latency>,
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

use crate::client::{train_network, Inference, JobError, JobEvent, JobOptions, ModelMap, TrainJob};
use crate::discovery::{discover_for_route, join_as_client};
use crate::local_net::short_peer;
use crate::local_net::LocalNet;
use crate::network::{NetworkError, TransportKind};
use crate::node::NodeError;
use parties::{Latency, Links, PartyCost, Projection};

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
    /// Local and network training, this many times each (alternating);
    /// the report's figures are the run with the median ratio.
    pub repeat: usize,
    /// The links the one-machine-per-party projection assumes.
    pub links: Links,
}

/// Progress callbacks: a phase name, then steps.
pub trait Progress {
    fn phase(&mut self, name: &str, total_examples: u64);
    fn step(&mut self, info: StepInfo);
}

/// One local run and one network run.
struct Run {
    local: mixnn_model::TrainReport,
    local_seconds: f64,
    /// CPU of the whole process during local training, seconds.
    local_cpu: Option<f64>,
    net: crate::client::NetworkReport,
    breakdown: StepBreakdown,
    /// CPU of the whole process during network training, seconds.
    network_cpu: Option<f64>,
    parties: Vec<PartyCost>,
    links_per_step: usize,
    /// Inference through a circuit and locally, and the circuit's accuracy.
    inference: Option<(Latency, Latency, f32)>,
    /// Median time between steps, local and network, in milliseconds
    /// ([`parties::median_step_ms`]).
    local_step_median_ms: Option<f64>,
    network_step_median_ms: Option<f64>,
    /// Local training from its last step to its end, seconds.
    local_tail_seconds: f64,
}

impl Run {
    fn ratio(&self) -> f64 {
        self.net.seconds / self.local_seconds.max(1e-9)
    }

    /// The network's steady step over local training's.
    fn step_ratio(&self) -> Option<f64> {
        Some(self.network_step_median_ms? / self.local_step_median_ms?.max(1e-9))
    }
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
    // dfdx multiplies matrices on rayon's pools: local training on the
    // global one, each slot worker on its own (its thread and helpers
    // named like these). Named, their CPU can be told from the client's.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("{COMPUTE_POOL}-{i}"))
        .build_global();
    let repeat = cfg.repeat.max(1);
    let mut runs = Vec::with_capacity(repeat);
    for i in 0..repeat {
        let last = i + 1 == repeat;
        let label = |what: &str| {
            if repeat > 1 {
                format!("{what} ({} of {repeat})", i + 1)
            } else {
                what.to_string()
            }
        };
        runs.push(one_run(cfg, data, &train, examples, progress, last, &label).await?);
    }
    let ratios: Vec<f64> = runs.iter().map(Run::ratio).collect();
    let step_ratios: Option<Vec<f64>> = runs.iter().map(Run::step_ratio).collect();
    let (ratio_min, ratio_median, ratio_max) = parties::spread(&ratios);
    let digests_equal = runs
        .iter()
        .all(|r| r.net.params_digest == r.local.params_digest_hex);
    let inference = runs.iter().rev().find_map(|r| r.inference.clone());
    // The report's figures: the run whose ratio is the median (the lower
    // middle one for an even count).
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| ratios[a].total_cmp(&ratios[b]));
    let pick = order[(runs.len() - 1) / 2];
    let run = runs.swap_remove(pick);

    let want = tc.arch.num_stages() + (tc.arch.num_stages() + 1) * cfg.mixes;
    let (scaling, scaling_error) =
        scaling_points(&cfg.scaling, progress, |n| discovery_at(n, want)).await;

    let stages = tc.arch.num_stages();
    let local_step_ms = run.local_seconds * 1000.0 / run.local.steps.max(1) as f64;
    let steady = match (
        step_ratios,
        run.local_step_median_ms,
        run.network_step_median_ms,
    ) {
        (Some(ratios), Some(local_ms), Some(network_ms)) => {
            let (ratio_min, ratio_median, ratio_max) = parties::spread(&ratios);
            Some(SteadyStep {
                local_ms,
                network_ms,
                ratios,
                ratio_min,
                ratio_median,
                ratio_max,
            })
        }
        _ => None,
    };
    let b = &run.net.breakdown;
    let fixed = FixedCosts {
        setup_ms: b.setup_seconds * 1000.0,
        checkpoints: run.net.checkpoints,
        checkpoint_ms: b.checkpoint_seconds * 1000.0,
        evaluation_ms: b.evaluation_seconds * 1000.0,
        local_evaluation_ms: run.local_tail_seconds * 1000.0,
    };
    let projection = parties::project(
        &run.parties,
        run.links_per_step,
        mixnn_crypto::cells::CELL_BYTES,
        cfg.links,
    );
    let projected_ratio = projection.step_ms / local_step_ms.max(1e-9);
    let cpu_cost_ratio = match (run.network_cpu, run.local_cpu) {
        (Some(n), Some(l)) if l > 0.0 => Some(n / l),
        _ => None,
    };
    let digest_equal = run.net.params_digest == run.local.params_digest_hex;
    let eps = |seconds: f64| examples as f64 / seconds.max(1e-9);
    let rows = vec![
        Row {
            setting: "local (one process)".into(),
            test_accuracy: run.local.test_accuracy,
            seconds: run.local_seconds,
            examples_per_second: eps(run.local_seconds),
            ratio: 1.0,
            digest_equal: true,
            params_digest: run.local.params_digest_hex.clone(),
        },
        Row {
            setting: format!(
                "MixNN network ({stages} layer hosts, {} mix per segment, loopback)",
                cfg.mixes
            ),
            test_accuracy: run.net.test_accuracy,
            seconds: run.net.seconds,
            examples_per_second: eps(run.net.seconds),
            ratio: run.ratio(),
            digest_equal,
            params_digest: run.net.params_digest.clone(),
        },
    ];
    let (infer_network, infer_local, infer_accuracy) = match inference {
        Some((n, l, a)) => (Some(n), Some(l), a),
        None => (None, None, f32::NAN),
    };
    Ok(PaperReport {
        arch: tc.arch.to_string(),
        data: cfg.data_name.clone(),
        epochs: tc.epochs,
        batch: tc.batch,
        mixes: cfg.mixes,
        train_examples: train.len(),
        test_examples: data.test.len(),
        local_seconds: run.local_seconds,
        network_seconds: run.net.seconds,
        ratio: run.ratio(),
        repeats: ratios.len(),
        ratios: ratios.clone(),
        ratio_min,
        ratio_median,
        ratio_max,
        all_digests_equal: digests_equal,
        local_accuracy: run.local.test_accuracy,
        network_accuracy: run.net.test_accuracy,
        infer_accuracy,
        digest_equal,
        rows,
        breakdown: run.breakdown,
        local_step_ms,
        steady,
        fixed,
        parties: run.parties,
        projection,
        projected_ratio,
        cpu_cost_ratio,
        infer_network,
        infer_local,
        scaling,
        scaling_error,
        local_losses: run.local.losses,
        network_losses: run.net.losses,
        paper_accuracy_difference: PAPER_ACCURACY_DIFFERENCE,
        paper_ratio: PAPER_RATIO,
        environment: cfg.environment.clone(),
    })
}

/// One local training, then one through a fresh in-process network (each
/// volunteer on threads of its own), with each party's CPU; with
/// `inference`, batch latencies through a circuit and locally as well.
async fn one_run(
    cfg: &PaperConfig,
    data: &Dataset,
    train: &mixnn_model::Split,
    examples: u64,
    progress: &mut (dyn Progress + Send),
    inference: bool,
    label: &(dyn Fn(&str) -> String + Sync),
) -> Result<Run, BenchError> {
    let tc = &cfg.train;
    progress.phase(&label("local"), examples);
    let cpu0 = crate::cpu::process_cpu_ns();
    let t = Instant::now();
    let mut local_steps = Vec::new();
    let local = train_local(tc, data, &mut |s| {
        local_steps.push(Instant::now());
        progress.step(s)
    })?;
    let local_end = Instant::now();
    let local_seconds = local_end.duration_since(t).as_secs_f64();
    let local_tail_seconds = local_steps.last().map_or(0.0, |last| {
        local_end.saturating_duration_since(*last).as_secs_f64()
    });
    let local_cpu = cpu_seconds(cpu0, crate::cpu::process_cpu_ns());

    let stages = tc.arch.num_stages();
    let volunteers = stages + (stages + 1) * cfg.mixes;
    progress.phase(&format!("starting {volunteers} volunteers"), 0);
    let net = LocalNet::start_parties(volunteers, TransportKind::Tcp).await?;
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
    progress.phase(&label("network"), examples);
    let mut network_steps = Vec::new();
    let before = Usage::read(&net);
    let net_report = train_network(
        &client,
        &found,
        TrainJob {
            cfg: tc,
            train,
            test: &data.test,
            opts: &opts,
            map_path: &map_path,
            stop: cancel.child_token(),
            trained_on: None,
        },
        &mut |e| {
            if let JobEvent::Step(s) = e {
                network_steps.push(Instant::now());
                progress.step(s)
            }
        },
    )
    .await?;
    let after = Usage::read(&net);
    let network_cpu = cpu_seconds(before.process, after.process);
    let hosts = |f: &dyn Fn(&crate::metrics::Metrics) -> f64| -> f64 {
        net.volunteers.iter().map(|n| f(&n.state.metrics)).sum()
    };
    let host_compute = hosts(&|m| m.host_compute_seconds.get());
    let host_crypto = hosts(&|m| m.host_crypto_seconds.get());
    let host_codec = hosts(&|m| m.host_codec_seconds.get());

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
    let parties = party_costs(&net, &net_report, &before, &after, steps);
    let links_per_step = net_report.rings.forward.len() + net_report.rings.backward.len() + 2;

    let inference = if inference {
        progress.phase("inference", 0);
        let map = ModelMap::load(&map_path).map_err(|e| BenchError::Other(e.to_string()))?;
        Some(infer_timed(&client, &found, &map, tc, &data.test, &opts).await?)
    } else {
        None
    };
    drop(client);
    net.shutdown().await;
    Ok(Run {
        local,
        local_seconds,
        local_cpu,
        net: net_report,
        breakdown,
        network_cpu,
        parties,
        links_per_step,
        inference,
        local_tail_seconds,
        local_step_median_ms: parties::median_step_ms(&local_steps),
        network_step_median_ms: parties::median_step_ms(&network_steps),
    })
}

fn cpu_seconds(before: Option<u64>, after: Option<u64>) -> Option<f64> {
    Some(after?.saturating_sub(before?) as f64 / 1e9)
}

/// How the names of rayon's threads in `mixnn bench paper` begin: the
/// global pool's and the slot workers' helpers.
const COMPUTE_POOL: &str = mixnn_model::COMPUTE_THREAD_PREFIX;

/// What the process and each volunteer had used at one moment.
struct Usage {
    process: Option<u64>,
    /// Every live thread's clock: the volunteers' threads, rayon's (the
    /// slot workers' helpers in matrix products, and their update
    /// threads) and the client's.
    clocks: Option<crate::cpu::ThreadClocks>,
    /// Per volunteer: its slot workers' CPU (seconds), bytes it relayed
    /// or sent.
    workers: Vec<f64>,
    relayed: Vec<u64>,
}

impl Usage {
    fn read(net: &LocalNet) -> Usage {
        Usage {
            process: crate::cpu::process_cpu_ns(),
            clocks: crate::cpu::ThreadClocks::read(),
            workers: net
                .volunteers
                .iter()
                .map(|n| n.state.metrics.host_worker_cpu_seconds.get())
                .collect(),
            relayed: net
                .volunteers
                .iter()
                .map(|n| n.state.metrics.bytes_relayed.get())
                .collect(),
        }
    }
}

/// Each party's CPU and bytes per step between `before` and `after`: the
/// volunteers on the rings (layer hosts by stage, then mixes), then the
/// client, which is the rest of the process. The shared matrix-product
/// pool's CPU goes to the layer hosts in proportion to their slot workers'
/// own CPU (only slot workers multiply matrices while the job runs).
fn party_costs(
    net: &LocalNet,
    report: &crate::client::NetworkReport,
    before: &Usage,
    after: &Usage,
    steps: f64,
) -> Vec<PartyCost> {
    let rings = &report.rings;
    let hops: Vec<_> = rings.forward.iter().chain(&rings.backward).collect();
    let mut parties: Vec<(Option<usize>, PartyCost)> = Vec::new();
    let mut volunteers_ns = 0u64;
    // By thread, not by name: an earlier run's threads (the same names)
    // that end during this one must not take their clocks out of its sums.
    let used = match (&before.clocks, &after.clocks) {
        (Some(b), Some(a)) => Some(a.used_since(b)),
        _ => None,
    };
    let pool_ns = used.as_ref().map_or(0.0, |used| {
        used.iter()
            .filter(|(name, _)| {
                name.starts_with(COMPUTE_POOL)
                    || name.starts_with(mixnn_model::UPDATE_THREAD_PREFIX)
            })
            .map(|(_, ns)| *ns as f64)
            .sum()
    });
    let party_threads = used.as_ref().and_then(|used| net.party_cpu_ns(used));
    let worker_total: f64 = (0..net.volunteers.len())
        .map(|i| (after.workers[i] - before.workers[i]).max(0.0))
        .sum();
    for (i, node) in net.volunteers.iter().enumerate() {
        let peer = node.network.peer_id();
        let on_ring: Vec<_> = hops.iter().filter(|h| h.peer == peer).collect();
        let threads = party_threads.as_ref().map_or(0, |t| t[i]);
        let worker_s = (after.workers[i] - before.workers[i]).max(0.0);
        let pool_share = if worker_total > 0.0 {
            pool_ns * worker_s / worker_total
        } else {
            0.0
        };
        let ns = threads + (worker_s * 1e9 + pool_share) as u64;
        volunteers_ns += ns;
        if on_ring.is_empty() {
            continue;
        }
        let stage = on_ring.iter().find_map(|h| h.stage);
        let party = match stage {
            Some(s) => format!("layer host L{} {}", s + 1, short_peer(&peer)),
            None => format!("mix {}", short_peer(&peer)),
        };
        parties.push((
            stage,
            PartyCost {
                party,
                cpu_ms: ns as f64 / 1e6 / steps,
                bytes_sent: after.relayed[i].saturating_sub(before.relayed[i]) as f64 / steps,
                relayed_messages: if stage.is_none() {
                    on_ring.len() as f64
                } else {
                    0.0
                },
            },
        ));
    }
    parties.sort_by_key(|(stage, _)| stage.unwrap_or(usize::MAX));
    let client_ns = match (before.process, after.process) {
        (Some(b), Some(a)) => a.saturating_sub(b).saturating_sub(volunteers_ns),
        _ => 0,
    };
    let mut out = vec![PartyCost {
        party: "client (and the rest of the process)".into(),
        cpu_ms: client_ns as f64 / 1e6 / steps,
        bytes_sent: report.breakdown.bytes_sent as f64 / steps,
        relayed_messages: 0.0,
    }];
    out.extend(parties.into_iter().map(|(_, p)| p));
    out
}

/// Inference through a circuit with the model map, batch by batch at the
/// training batch size, beside the same batches through a local model of
/// the same architecture: latencies, throughputs, and the circuit's
/// accuracy.
async fn infer_timed(
    client: &crate::client::Client,
    found: &[crate::discovery::Volunteer],
    map: &ModelMap,
    tc: &TrainConfig,
    test: &mixnn_model::Split,
    opts: &JobOptions,
) -> Result<(Latency, Latency, f32), BenchError> {
    let batch = tc.batch.clamp(1, mixnn_model::EVAL_BATCH);
    let mut inference = Inference::open(client, found, map, opts).await?;
    let local = mixnn_model::LocalModel::new(&tc.arch, tc.seed, tc.optimizer)?;
    let (mut net_s, mut local_s) = (Vec::new(), Vec::new());
    let mut hits = 0.0f64;
    let mut start = 0;
    while start < test.len() {
        let n = batch.min(test.len() - start);
        let (x, labels) = test.slice(start, n);
        let t = Instant::now();
        let y = local.infer(&x)?;
        local_s.push(t.elapsed().as_secs_f64());
        std::hint::black_box(y);
        let t = Instant::now();
        let logits = inference.logits(client.network(), x).await?;
        net_s.push(t.elapsed().as_secs_f64());
        hits += f64::from(mixnn_model::accuracy(&logits, labels)) * n as f64;
        start += n;
    }
    inference.close().await;
    let acc = if test.is_empty() {
        f32::NAN
    } else {
        (hits / test.len() as f64) as f32
    };
    Ok((
        Latency::from_batches(&net_s, test.len()),
        Latency::from_batches(&local_s, test.len()),
        acc,
    ))
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
    // The same discovery as `mixnn train`'s.
    let (found, _) = discover_for_route(&network, want, Duration::from_secs(10)).await;
    let discovery_ms = t.elapsed().as_secs_f64() * 1000.0;
    let dht_requests = network.metrics().dht_requests.get() - before;
    cancel.cancel();
    net.discard().await;
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

    /// The discovery part of `bench paper` starts its volunteers with a
    /// long republish interval; the nodes must accept that configuration
    /// and the client must find what it asked for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discovery_finds_the_volunteers_it_asks_for() {
        let p = match discovery_at(6, 4).await {
            Ok(p) => p,
            Err(e) => panic!("discovery with 6 volunteers: {e}"),
        };
        assert_eq!(p.volunteers, 6);
        assert!(p.dht_requests > 0, "{p:?}");
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
