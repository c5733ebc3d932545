//! Training and inference jobs through mix circuits: the driver that
//! carries out what the job's state machine ([`super::machine`]) decides.
//!
//! Training uses two rings: the forward ring carries activations from the
//! client through every layer host back to the client; the backward ring
//! carries the loss gradient from the client through the hosts in reverse.
//! For each batch the client sends the inputs forward, computes the loss on
//! what comes back, and sends its gradient backward; the first stage's host
//! acknowledges. Every host applies its optimizer when its backward pass
//! runs, so the arithmetic is that of local training, step for step.
//!
//! Every few steps each host's state comes back to the owner (sealed to it,
//! in a state message on the forward ring) and is written beside the model
//! map. When a hop fails, the client bans it, sets up new rings with the
//! lost stages on new hosts, restores every stage to that checkpoint and
//! replays: the job ends with the parameters of an uninterrupted run.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mixnn_crypto::Identity;
use mixnn_model::{
    accuracy, model_digest, softmax_cross_entropy, to_hex, DecodeLimits, HostTensor, InitSpec,
    ModelError, Slot, Split, StageSpec, StepInfo, TrainConfig, EVAL_BATCH,
};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{self, Checkpoint};
use super::machine::{Action, Event, Schedule, TrainMachine};
use super::model_map::{
    DataFingerprint, JobRecord, MapError, ModelMap, StageEntry, TrainingData, FORMAT,
};
use super::plan::{self, Layout, StageHost};
use super::ring::{Ring, RingError, RingHop};
use super::route::{choose_mixes, choose_route_keeping, Candidate, RouteError};
use super::Client;
use crate::circuit::host::MAX_TENSOR_ELEMENTS;
use crate::circuit::payload::{
    open_slot_report, open_state, seal_state, ControlOp, ErrorCode, HopRole, JobMsg, PayloadError,
    SlotReport, StateOp, StateWindow, REPORT_KEY, STATE_DOWN_KEY, STATE_UP_KEY,
};
use crate::circuit::CIRCUIT_PROTOCOL;
use crate::discovery::Volunteer;
use crate::network::Network;
use crate::store::SlotId;

#[derive(Debug, Error)]
pub enum JobError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{during}: {detail}")]
    Hop {
        during: String,
        /// The peer blamed, when the client could tell.
        peer: Option<PeerId>,
        detail: String,
    },
    #[error("stopped on request after the checkpoint of step {step}")]
    Interrupted { step: u64 },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("{0}")]
    Payload(#[from] PayloadError),
    #[error("{0}")]
    Invalid(String),
    #[error("stage {stage} on host {peer} diverged from the model map: {detail}")]
    Diverged {
        stage: usize,
        peer: PeerId,
        detail: String,
    },
}

impl JobError {
    /// Whether `--resume` can carry the job on from its checkpoint.
    pub fn resumable(&self) -> bool {
        matches!(
            self,
            JobError::Hop { .. } | JobError::Interrupted { .. } | JobError::Route(_)
        )
    }
}

/// How a network job runs.
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub mixes: usize,
    pub keep_ends: bool,
    /// Longest wait for one reply before the hop is held to have failed.
    pub step_timeout: Duration,
    /// Longest wait for a ring to be set up.
    pub setup_timeout: Duration,
    /// A checkpoint to the owner every this many steps; `None` chooses the
    /// interval so checkpoints cost at most about 5% of the training time.
    pub checkpoint_every: Option<u64>,
    /// New runs after failed hops before the job gives up.
    pub max_failovers: u32,
    /// Longest wait for a chosen peer to answer before a route is used.
    pub probe_timeout: Duration,
    /// How long the model's slots live after this job (each host caps it
    /// with its own maximum).
    pub lease: Duration,
    /// Offer AES-256-GCM on the segments that start or end at this client
    /// (a segment uses it where its other end offers it too); by default
    /// where this CPU has AES instructions.
    pub aes_cells: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            mixes: 1,
            keep_ends: false,
            step_timeout: Duration::from_secs(60),
            setup_timeout: Duration::from_secs(20),
            checkpoint_every: None,
            max_failovers: 5,
            probe_timeout: Duration::from_secs(3),
            lease: DEFAULT_LEASE,
            aes_cells: mixnn_crypto::aead::aes_in_hardware(),
        }
    }
}

/// The lease a job asks for unless told otherwise: a week.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);

/// A training job: what to train, on what, and where its map lives.
pub struct TrainJob<'a> {
    pub cfg: &'a TrainConfig,
    /// The training examples (with any limit already applied).
    pub train: &'a Split,
    pub test: &'a Split,
    pub opts: &'a JobOptions,
    /// The model map; the checkpoint lives beside it.
    pub map_path: &'a Path,
    /// Cancelled when the user asks to stop: the job finishes its step,
    /// checkpoints and returns [`JobError::Interrupted`].
    pub stop: CancellationToken,
    /// Where the data came from, recorded in the map for `infer`.
    pub trained_on: Option<TrainingData>,
}

/// What a job tells its caller while it runs.
#[derive(Clone, Debug)]
pub enum JobEvent {
    Step(StepInfo),
    /// A hop failed; the job goes back to the checkpoint of `restore_step`.
    Failover {
        number: u32,
        reason: String,
        /// The peers the failure was put down to (none: a timeout or an
        /// error no hop could be named for); the next rings avoid them.
        blamed: Vec<PeerId>,
        restore_step: u64,
    },
    /// New rings are up and every stage is at the checkpoint again.
    Resumed {
        step: u64,
        seconds: f64,
    },
    Checkpoint {
        step: u64,
        seconds: f64,
    },
}

/// Where the time of a network run went, as seen by the client.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Breakdown {
    pub setup_seconds: f64,
    /// Loss, gradients and local stages on the client.
    pub client_compute_seconds: f64,
    /// Sealing and opening cells on the client.
    pub client_crypto_seconds: f64,
    /// Encoding and decoding tensors on the client.
    pub client_serialization_seconds: f64,
    /// Waiting for the rings (hosts computing, mixes relaying, transfers).
    pub waiting_seconds: f64,
    /// Collecting and writing checkpoints.
    pub checkpoint_seconds: f64,
    /// The test set through the forward ring after the last step.
    pub evaluation_seconds: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// The outcome of a training job through the network.
#[derive(Clone, Debug, Serialize)]
pub struct NetworkReport {
    pub steps: u64,
    /// The mean batch loss of the last epoch.
    pub final_loss: f32,
    /// Each step's batch loss.
    #[serde(skip)]
    pub losses: Vec<f32>,
    /// The mean batch loss of each epoch, as local training computes it.
    pub epoch_losses: Vec<f32>,
    pub test_accuracy: f32,
    pub seconds: f64,
    pub params_digest: String,
    pub breakdown: Breakdown,
    /// Peers used, for the user: one line per hop of the last forward ring.
    pub route: Vec<String>,
    /// The hops of the last run's rings, in ring order (the client at both
    /// ends is left out).
    #[serde(skip)]
    pub rings: RingRoutes,
    /// New runs after failed hops.
    pub failovers: u32,
    /// Steps done again after failovers.
    pub replayed_steps: u64,
    /// From each failure to the job running again, in seconds.
    pub recovery_seconds: Vec<f64>,
    pub checkpoints: u64,
    /// The checkpoint interval in the end (chosen or given).
    pub checkpoint_every: u64,
    /// The step this run started from (0, or a resumed checkpoint).
    pub started_at_step: u64,
}

/// One hop of a ring, as the client chose it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteHop {
    pub peer: PeerId,
    /// The stage this hop runs, or `None` for a mix.
    pub stage: Option<usize>,
}

/// The hops of a training run's two rings.
#[derive(Clone, Debug, Default)]
pub struct RingRoutes {
    pub forward: Vec<RouteHop>,
    pub backward: Vec<RouteHop>,
}

fn route_hops(hops: &[RingHop], hosts: &[StageHost]) -> Vec<RouteHop> {
    use crate::circuit::payload::HopRole;
    hops.iter()
        .filter_map(|h| match &h.role {
            HopRole::Mix => Some(RouteHop {
                peer: h.peer,
                stage: None,
            }),
            HopRole::Host(_) => Some(RouteHop {
                peer: h.peer,
                stage: hosts
                    .iter()
                    .find(|s| s.host.peer == h.peer)
                    .map(|s| s.stage),
            }),
            HopRole::End { .. } => None,
        })
        .collect()
}

/// The outcome of an inference job.
#[derive(Clone, Debug, Serialize)]
pub struct InferReport {
    pub test_accuracy: f32,
    pub examples: usize,
    pub seconds: f64,
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// A state message's bytes before any host fills its window: random, so
/// that no host can tell where the windows of the others lie.
#[allow(clippy::result_large_err, reason = "cold error path")]
fn padding(len: usize) -> Result<Vec<u8>, Fault> {
    mixnn_crypto::padding::padding(len).map_err(|e| Fault::Fatal(JobError::Invalid(e.to_string())))
}

#[allow(clippy::result_large_err, reason = "cold error path")]
pub(crate) fn rng() -> Result<rand::rngs::StdRng, JobError> {
    rand::rngs::StdRng::from_rng(rand::rngs::OsRng).map_err(|e| JobError::Invalid(e.to_string()))
}

/// The peer a ring error blames, if any.
fn blamed(ring: &Ring, e: &RingError) -> Option<PeerId> {
    e.blamed_hop()
        .and_then(|i| ring.hops.get(i))
        .map(|h| h.peer)
}

fn ring_error(during: &str, ring: &Ring, e: RingError) -> JobError {
    let peer = blamed(ring, &e);
    let detail = match e.blamed_hop().and_then(|i| ring.hops.get(i)) {
        Some(h) => format!("hop {} ({}) failed: {e}", h.peer, h.label),
        None => e.to_string(),
    };
    JobError::Hop {
        during: during.to_string(),
        peer,
        detail,
    }
}

/// Probe hops in parallel: those that cannot open a stream within
/// `timeout` are the likely culprits of a stall.
pub async fn unresponsive(network: &Network, hops: &[RingHop], timeout: Duration) -> Vec<RingHop> {
    let probes = hops.iter().map(|h| async move {
        let mut control = network.stream_control();
        let ok = tokio::time::timeout(timeout, control.open_stream(h.peer, CIRCUIT_PROTOCOL))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        (!ok).then(|| h.clone())
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// A ring error as a job error. When the error names no hop (a stall, a
/// stream that broke) or names a neighbour of a broken stream (a failure
/// spreads along the ring, and the first report to arrive may name an
/// honest hop next to the dead one), the hops that do not answer a probe
/// are blamed; the hop the error names only when all of them answer.
async fn with_probe(network: &Network, during: &str, ring: &Ring, e: RingError) -> JobError {
    let secondhand = matches!(
        e,
        RingError::HopReported {
            code: ErrorCode::NextHopFailed | ErrorCode::PrevHopFailed,
            ..
        }
    );
    if e.blamed_hop().is_none() || secondhand {
        let dead = unresponsive(network, &ring.hops, Duration::from_secs(3)).await;
        if !dead.is_empty() {
            return JobError::Hop {
                during: during.to_string(),
                peer: dead.first().map(|h| h.peer),
                detail: format!(
                    "{e}; unresponsive hop: {}",
                    dead.iter()
                        .map(|h| format!("{} ({})", h.peer, h.label))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
        }
    }
    ring_error(during, ring, e)
}

/// Send `msg` on `ring` and wait for the reply; a failure or a stall names
/// the hop that caused it.
async fn exchange(
    network: &Network,
    ring: &mut Ring,
    msg: &JobMsg,
    during: &str,
    timeout: Duration,
) -> Result<JobMsg, JobError> {
    if let Err(e) = ring.send(msg).await {
        return Err(with_probe(network, during, ring, e).await);
    }
    match ring.recv(timeout).await {
        Ok(m) => Ok(m),
        Err(e) => Err(with_probe(network, during, ring, e).await),
    }
}

fn unexpected(during: &str, got: &JobMsg) -> JobError {
    JobError::Invalid(format!("{during}: got a {} message", got.name()))
}

pub(crate) fn limits(stages: &[StageSpec], max_batch: u32) -> (DecodeLimits, usize) {
    let width = stages
        .iter()
        .map(|s| s.input_dim().max(s.output_dim()))
        .max()
        .unwrap_or(1);
    let max_elements = (max_batch as usize * width).min(MAX_TENSOR_ELEMENTS);
    (
        DecodeLimits {
            // `[rows, values]`, or `[rows, c, h, w]` around a convolution.
            max_rank: mixnn_model::tensor::MAX_RANK,
            max_elements,
        },
        max_elements * 4 + 64 * 1024,
    )
}

/// A control round on the forward ring: every host runs `op` and seals a
/// report for us.
pub(crate) async fn control(
    network: &Network,
    ring: &mut Ring,
    op: ControlOp,
    host_positions: &[usize],
    timeout: Duration,
) -> Result<Vec<SlotReport>, JobError> {
    let during = format!("{op:?} round");
    let request = JobMsg::Control {
        op,
        reports: vec![],
    };
    let reports = match exchange(network, ring, &request, &during, timeout).await? {
        JobMsg::Control { op: got, reports } if got == op => reports,
        other => return Err(unexpected(&during, &other)),
    };
    if reports.len() != host_positions.len() {
        return Err(JobError::Invalid(format!(
            "{during}: {} reports for {} hosts",
            reports.len(),
            host_positions.len()
        )));
    }
    let mut out = Vec::with_capacity(reports.len());
    for (sealed, &pos) in reports.iter().zip(host_positions) {
        let key = ring
            .secrets(pos)
            .map(|s| s.key(REPORT_KEY))
            .ok_or_else(|| JobError::Invalid("report from an unknown hop".into()))?;
        out.push(open_slot_report(&key, sealed).map_err(|_| JobError::Hop {
            during: during.clone(),
            peer: ring.hops.get(pos).map(|h| h.peer),
            detail: format!("hop {} sent a report that does not open", pos),
        })?);
    }
    Ok(out)
}

/// Evaluation batches on the forward ring at once: while the hosts after
/// the first work on one batch, the first works on the next.
///
/// Two cannot deadlock the ring, though the client does not read while it
/// sends: a hop reads a whole message before it writes, and writes all of
/// it before it reads the next. When the client sends batch `i + 1`,
/// batch `i - 1` has come back, so batch `i` is the only other message on
/// the ring; wherever it is, the first hop is free to read batch `i + 1` or
/// soon will be, and the client then reads batch `i`.
const EVAL_IN_FLIGHT: usize = 2;

/// [`EVAL_IN_FLIGHT`], or one more where the results are small: batches on
/// the ring at once for a ring whose last stage gives `result_width`
/// values per example.
///
/// With three, the client sends batch `i + 2` while the results of `i` and
/// `i + 1` may both be on their way to it unread. The last hop never waits
/// on the client for them if their cell frames fit together in the window
/// yamux grants every stream from its start ([`yamux::DEFAULT_CREDIT`],
/// 256 KiB; windows only grow), since the client's connection takes frames
/// whether or not the job reads them. Then every hop finishes each write
/// (the hop it writes to finishes its own, back to the last), reads its next
/// message, and the first one takes batch `i + 2`: the argument above holds
/// with one more message on the ring. A classifier's logits for
/// [`EVAL_BATCH`] examples are one cell; wider results keep two.
///
/// Measured on a 2-core AMD EPYC VM, MNIST's 10,000 test examples through
/// `bench paper`'s ring, alternating runs: two 379, 325, 290 ms; three 284,
/// 300, 232 ms.
fn eval_in_flight(result_width: usize) -> usize {
    // The largest result message: a dense [EVAL_BATCH, width] tensor of the
    // highest rank the codec writes, behind the message's kind and step.
    let max_result = 9 + 1 + 4 * mixnn_model::tensor::MAX_RANK + 4 * EVAL_BATCH * result_width;
    let frames = mixnn_crypto::cells::message_cells(max_result);
    let unread = EVAL_IN_FLIGHT * frames * crate::circuit::wire::CELL_FRAME_BYTES;
    if unread <= yamux::DEFAULT_CREDIT as usize {
        EVAL_IN_FLIGHT + 1
    } else {
        EVAL_IN_FLIGHT
    }
}

/// Run the test split through the forward ring in batches of EVAL_BATCH,
/// exactly as the local trainer evaluates ([`eval_in_flight`] at once);
/// the ring's last stage gives `result_width` values per example.
async fn evaluate(
    network: &Network,
    ring: &mut Ring,
    test: &Split,
    (first, last): (Option<&Slot>, Option<&Slot>),
    result_width: usize,
    timeout: Duration,
) -> Result<(f32, usize), JobError> {
    let mut hits = 0usize;
    let mut next = 0usize;
    let mut step = u64::MAX / 2;
    let in_flight = eval_in_flight(result_width);
    // Batches sent and not yet back: their step, first example and size.
    let mut pending = std::collections::VecDeque::with_capacity(in_flight);
    loop {
        while pending.len() < in_flight && next < test.len() {
            let n = EVAL_BATCH.min(test.len() - next);
            let (x, _) = test.slice(next, n);
            let x = match first {
                Some(s) => s.infer(&x)?,
                None => x,
            };
            step += 1;
            if let Err(e) = ring.send(&JobMsg::Infer { step, tensor: x }).await {
                let during = format!("evaluation batch at example {next}");
                return Err(with_probe(network, &during, ring, e).await);
            }
            pending.push_back((step, next, n));
            next += n;
        }
        let Some((step, start, n)) = pending.pop_front() else {
            break;
        };
        let during = format!("evaluation batch at example {start}");
        let y = match ring.recv(timeout).await {
            Ok(JobMsg::Infer { step: s, tensor }) if s == step => tensor,
            Ok(other) => return Err(unexpected(&during, &other)),
            Err(e) => return Err(with_probe(network, &during, ring, e).await),
        };
        let logits = match last {
            Some(s) => s.infer(&y)?,
            None => y,
        };
        let labels = &test.labels[start..start + n];
        hits += (accuracy(&logits, labels) * n as f32).round() as usize;
    }
    let acc = if test.is_empty() {
        0.0
    } else {
        hits as f32 / test.len() as f32
    };
    Ok((acc, test.len()))
}

/// Which stages live where: `remote` on volunteers, the rest (with
/// `--keep-ends`, the first and the last) in the client.
#[allow(clippy::result_large_err, reason = "cold error path")]
fn remote_range(cfg: &TrainConfig, keep_ends: bool) -> Result<Range<usize>, JobError> {
    let n = cfg.arch.num_stages();
    if !keep_ends {
        return Ok(0..n);
    }
    if n < 3 {
        return Err(JobError::Invalid(format!(
            "--keep-ends keeps the first and last stage here and needs a middle one; {} has {n} stages",
            cfg.arch
        )));
    }
    Ok(1..n - 1)
}

#[allow(clippy::result_large_err, reason = "cold error path")]
fn check_data(cfg: &TrainConfig, split: &Split) -> Result<(), JobError> {
    if split.features != cfg.arch.input_dim() {
        return Err(JobError::Invalid(format!(
            "the dataset has {} features, {} takes {}",
            split.features,
            cfg.arch,
            cfg.arch.input_dim()
        )));
    }
    if split.is_empty() {
        return Err(JobError::Invalid("no training examples".into()));
    }
    Ok(())
}

/// Train `job.cfg` through the network from the seeded initialisation,
/// writing the model map (and the checkpoint beside it) to `job.map_path`.
pub async fn train_network(
    client: &Client,
    volunteers: &[Volunteer],
    job: TrainJob<'_>,
    on_event: &mut (dyn FnMut(JobEvent) + Send),
) -> Result<NetworkReport, JobError> {
    train_network_from(client, volunteers, job, None, on_event).await
}

/// [`train_network`] starting from given parameters instead of the seeded
/// initialisation: `init[i]` is stage `i`'s state ([`Slot::to_bytes`], no
/// steps applied), for example weights read from a file.
pub async fn train_network_from(
    client: &Client,
    volunteers: &[Volunteer],
    job: TrainJob<'_>,
    init: Option<Vec<Vec<u8>>>,
    on_event: &mut (dyn FnMut(JobEvent) + Send),
) -> Result<NetworkReport, JobError> {
    let cfg = job.cfg;
    cfg.validate()?;
    check_data(cfg, job.train)?;
    let remote = remote_range(cfg, job.opts.keep_ends)?;
    let stages = cfg.arch.stages();
    // The checkpoint of step 0 is the seeded initialisation (or the given
    // parameters); the owner keeps it, so any stage can be restored from
    // the start.
    let given = init.is_some();
    let states = match init {
        Some(states) => {
            if states.len() != stages.len() {
                return Err(JobError::Invalid(format!(
                    "{} initial stages for a {}-stage model",
                    states.len(),
                    stages.len()
                )));
            }
            for (i, (bytes, spec)) in states.iter().zip(&stages).enumerate() {
                let slot = Slot::from_bytes(bytes)?;
                if slot.spec() != spec
                    || *slot.optimizer() != cfg.optimizer
                    || slot.steps_applied() != 0
                {
                    return Err(JobError::Invalid(format!(
                        "the initial state of stage {i} is not a fresh {} stage with this optimizer",
                        cfg.arch
                    )));
                }
            }
            states
        }
        None => stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Slot::new(
                    s,
                    InitSpec {
                        seed: cfg.seed,
                        stage_index: i as u32,
                    },
                    cfg.optimizer,
                )
                .map(|slot| slot.to_bytes())
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let ckpt = Checkpoint {
        step: 0,
        stages: states,
        losses: Vec::new(),
    };
    let owner = Identity::generate();
    let map = ModelMap {
        format: FORMAT,
        arch: cfg.arch.to_string(),
        optimizer: cfg.optimizer,
        seed: cfg.seed,
        batch: cfg.batch,
        steps: 0,
        owner_secret: hex::encode(*owner.secret_bytes()),
        stages: Vec::new(),
        params_digest: to_hex(&ckpt.digest().map_err(JobError::Invalid)?),
        complete: false,
        job: Some(JobRecord {
            epochs: cfg.epochs,
            limit: cfg.limit,
            keep_ends: job.opts.keep_ends,
            mixes: job.opts.mixes,
            data: DataFingerprint::of(job.train),
            checkpoint_step: 0,
        }),
        trained_on: job.trained_on.clone(),
    };
    ckpt.save(&checkpoint::path_for(job.map_path))?;
    map.save(job.map_path)?;
    let placement = vec![None; remote.len()];
    // Given parameters reach the new slots as a restore of step 0.
    Driver::new(client, volunteers, job, owner, map, ckpt, remote, placement)?
        .run(!given, on_event)
        .await
}

/// Carry on the job of the model map at `job.map_path` from its latest
/// checkpoint, to `job.cfg.epochs` epochs in all. `job.cfg` must describe
/// the same model and data as the map (see [`resume_config`]).
pub async fn resume_network(
    client: &Client,
    volunteers: &[Volunteer],
    job: TrainJob<'_>,
    on_event: &mut (dyn FnMut(JobEvent) + Send),
) -> Result<NetworkReport, JobError> {
    let cfg = job.cfg;
    cfg.validate()?;
    check_data(cfg, job.train)?;
    let mut map = ModelMap::load(job.map_path)?;
    let record = map.job.clone().ok_or_else(|| {
        JobError::Invalid(format!(
            "the model map {} records no job to resume (it was written by an older mixnn)",
            job.map_path.display()
        ))
    })?;
    let same = map.arch == cfg.arch.to_string()
        && map.optimizer == cfg.optimizer
        && map.seed == cfg.seed
        && map.batch == cfg.batch
        && record.limit == cfg.limit
        && record.keep_ends == job.opts.keep_ends;
    if !same {
        return Err(JobError::Invalid(
            "the job to resume was trained with another architecture, optimizer, seed, batch, limit or --keep-ends".into(),
        ));
    }
    if record.data != DataFingerprint::of(job.train) {
        return Err(JobError::Invalid(format!(
            "the training data differs from the job's ({} examples of {} features before, {} of {} now, or other contents); pass the same --data",
            record.data.examples,
            record.data.features,
            job.train.len(),
            job.train.features
        )));
    }
    let ckpt = Checkpoint::load(&checkpoint::path_for(job.map_path))?;
    let digest = ckpt
        .digest()
        .map_err(|e| JobError::Invalid(format!("the checkpoint beside the map: {e}")))?;
    if ckpt.stages.len() != cfg.arch.num_stages() {
        return Err(JobError::Invalid(
            "the checkpoint does not hold every stage of the model".into(),
        ));
    }
    let remote = remote_range(cfg, job.opts.keep_ends)?;
    let mut placement = Vec::with_capacity(remote.len());
    for entry in &map.stages {
        if let StageEntry::Remote { host, slot_id, .. } = entry {
            let peer: Option<PeerId> = host.parse().ok();
            let id: Option<SlotId> = hex::decode(slot_id).ok().and_then(|b| b.try_into().ok());
            placement.push(peer.zip(id));
        }
    }
    placement.resize(remote.len(), None);
    map.params_digest = to_hex(&digest);
    map.complete = false;
    if map.trained_on.is_none() {
        map.trained_on = job.trained_on.clone();
    }
    if let Some(j) = map.job.as_mut() {
        j.epochs = cfg.epochs;
        j.mixes = job.opts.mixes;
    }
    map.save(job.map_path)?;
    let owner = map.owner()?;
    Driver::new(client, volunteers, job, owner, map, ckpt, remote, placement)?
        .run(false, on_event)
        .await
}

/// The training configuration of the job in the map at `path`, to
/// `epochs` epochs in all (the map's own count when `None`).
#[allow(clippy::result_large_err, reason = "cold error path")]
pub fn resume_config(map: &ModelMap, epochs: Option<u32>) -> Result<TrainConfig, JobError> {
    let record = map
        .job
        .as_ref()
        .ok_or_else(|| JobError::Invalid("the model map records no job to resume".into()))?;
    let cfg = TrainConfig {
        arch: mixnn_model::Arch::parse(&map.arch)
            .map_err(|e| JobError::Invalid(format!("model map arch: {e}")))?,
        epochs: epochs.unwrap_or(record.epochs),
        batch: map.batch,
        optimizer: map.optimizer,
        seed: map.seed,
        limit: record.limit,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// How one action ended, when it did not simply succeed.
enum Fault {
    /// A wait passed its deadline.
    TimedOut,
    /// A hop failed; the peers are those blamed.
    Hop { blamed: Vec<PeerId>, reason: String },
    /// Nothing a new run can fix (the local disk, a bug, bad arguments).
    Fatal(JobError),
}

impl From<JobError> for Fault {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Hop {
                peer,
                during,
                detail,
            } => Fault::Hop {
                blamed: peer.into_iter().collect(),
                reason: format!("{during}: {detail}"),
            },
            other => Fault::Fatal(other),
        }
    }
}

impl From<ModelError> for Fault {
    fn from(e: ModelError) -> Self {
        Fault::Fatal(e.into())
    }
}

impl From<MapError> for Fault {
    fn from(e: MapError) -> Self {
        Fault::Fatal(e.into())
    }
}

/// The rings of the current run.
struct Rings {
    fwd: Ring,
    bwd: Ring,
    forward_hosts: Vec<usize>,
    windows: Vec<StateWindow>,
    state_total: usize,
    route: Vec<String>,
    hops: RingRoutes,
}

/// The training split's batches in the order training takes them.
struct Batches<'a> {
    train: &'a Split,
    batch: usize,
    seed: u64,
    per_epoch: u64,
    /// The next step the iterator yields, and the iterator.
    at: Option<(u64, BatchIter<'a>)>,
}

type BatchIter<'a> = Box<dyn Iterator<Item = (HostTensor, Vec<u8>)> + Send + Sync + 'a>;

impl<'a> Batches<'a> {
    fn new(train: &'a Split, batch: usize, seed: u64) -> Self {
        Self {
            train,
            batch,
            seed,
            per_epoch: train.num_batches(batch).max(1) as u64,
            at: None,
        }
    }

    fn epoch_of(&self, step: u64) -> u32 {
        ((step - 1) / self.per_epoch) as u32
    }

    /// The batch of `step` (1-based over all epochs).
    fn get(&mut self, step: u64) -> Option<(HostTensor, Vec<u8>)> {
        let epoch = self.epoch_of(step);
        let index = (step - 1) % self.per_epoch;
        let fits = matches!(&self.at, Some((next, _)) if *next == step);
        if !fits {
            let it = self
                .train
                .batches(self.batch, epoch, self.seed)
                .skip(index as usize);
            self.at = Some((step, Box::new(it)));
        }
        let (next, it) = self.at.as_mut()?;
        let b = it.next();
        *next += 1;
        if index + 1 == self.per_epoch {
            self.at = None;
        }
        b
    }
}

struct Driver<'a> {
    network: &'a Network,
    client: &'a Client,
    candidates: Vec<Candidate>,
    job: TrainJob<'a>,
    stages: Vec<StageSpec>,
    remote: Range<usize>,
    owner: Identity,
    map: ModelMap,
    ckpt: Checkpoint,
    /// Per remote stage: its host and slot id in the current (or last) run.
    placement: Vec<Option<(PeerId, SlotId)>>,
    rings: Option<Rings>,
    first: Option<Slot>,
    last: Option<Slot>,
    losses: Vec<f32>,
    /// Labels of the steps in flight.
    labels: HashMap<u64, Vec<u8>>,
    batches: Batches<'a>,
    max_batch: u32,
    limits: (DecodeLimits, usize),
    b: Breakdown,
    checkpoints: u64,
    /// The hosts of the current run.
    current: Vec<StageHost>,
    /// Advertised addresses of the volunteers, for the map.
    addresses: HashMap<PeerId, Vec<String>>,
    test_accuracy: Option<f32>,
    /// The last checkpoint's files, being written while the job goes on.
    saving: PendingSave,
}

/// A checkpoint and its model map written on a thread of their own, so the
/// steps after a checkpoint do not wait for the disk (10-25 ms for MNIST's
/// 4 MB here). Whatever writes either file next, and the job's end on
/// every path, waits for it first, so the files are written in order and a
/// job returns only with its last checkpoint on disk. A job dropped
/// mid-save (its future cancelled) waits for the write as it goes, so a
/// resume in the same process never races it.
#[derive(Default)]
struct PendingSave(Option<Save>);

struct Save {
    thread: std::thread::JoinHandle<()>,
    done: tokio::sync::oneshot::Receiver<Result<(), MapError>>,
}

impl PendingSave {
    /// Write `ckpt` (already in its file form) and then `map`, after any
    /// save still under way.
    async fn start(
        &mut self,
        ckpt: Vec<u8>,
        map: ModelMap,
        map_path: &Path,
    ) -> Result<(), MapError> {
        self.wait().await?;
        let map_path = map_path.to_path_buf();
        let io = |source| MapError::Io {
            path: map_path.clone(),
            source,
        };
        let (tx, done) = tokio::sync::oneshot::channel();
        let write = {
            let map_path = map_path.clone();
            move || {
                let r = checkpoint::write_private(&checkpoint::path_for(&map_path), &ckpt)
                    .and_then(|()| map.save(&map_path));
                let _ = tx.send(r);
            }
        };
        let thread = std::thread::Builder::new()
            .name("mixnn-checkpoint".into())
            .spawn(write)
            .map_err(io)?;
        self.0 = Some(Save { thread, done });
        Ok(())
    }

    /// Until the save under way (if any) is on disk; its error if it failed.
    async fn wait(&mut self) -> Result<(), MapError> {
        let Some(save) = self.0.take() else {
            return Ok(());
        };
        let r = save.done.await;
        // It has sent its result, so it is at its end.
        let _ = save.thread.join();
        r.unwrap_or_else(|_| {
            Err(MapError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other("the checkpoint writer stopped"),
            })
        })
    }
}

impl Drop for PendingSave {
    fn drop(&mut self) {
        if let Some(save) = self.0.take() {
            // Blocks for the rest of one file write at most.
            let _ = save.thread.join();
        }
    }
}

impl<'a> Driver<'a> {
    #[allow(clippy::too_many_arguments, clippy::result_large_err)]
    fn new(
        client: &'a Client,
        volunteers: &[Volunteer],
        job: TrainJob<'a>,
        owner: Identity,
        map: ModelMap,
        ckpt: Checkpoint,
        remote: Range<usize>,
        placement: Vec<Option<(PeerId, SlotId)>>,
    ) -> Result<Self, JobError> {
        let stages = job.cfg.arch.stages();
        let max_batch = job.cfg.batch.max(EVAL_BATCH) as u32;
        let limits = limits(&stages, max_batch);
        let batches = Batches::new(job.train, job.cfg.batch, job.cfg.seed);
        let losses = ckpt.losses.clone();
        Ok(Self {
            network: client.network(),
            client,
            candidates: volunteers.iter().map(Candidate::from).collect(),
            stages,
            remote,
            owner,
            map,
            ckpt,
            placement,
            rings: None,
            first: None,
            last: None,
            losses,
            labels: HashMap::new(),
            batches,
            max_batch,
            limits,
            b: Breakdown::default(),
            checkpoints: 0,
            current: Vec::new(),
            addresses: volunteers
                .iter()
                .map(|v| (v.peer_id, v.descriptor.addresses.clone()))
                .collect(),
            test_accuracy: None,
            saving: PendingSave::default(),
            job,
        })
    }

    fn total_steps(&self) -> u64 {
        self.job.cfg.epochs as u64 * self.batches.per_epoch
    }

    async fn run(
        mut self,
        fresh: bool,
        on_event: &mut (dyn FnMut(JobEvent) + Send),
    ) -> Result<NetworkReport, JobError> {
        let r = self.drive(fresh, on_event).await;
        // On every path, the last checkpoint is on disk before the job
        // returns; a failed write is the job's error unless it has one.
        let saved = self.saving.wait().await;
        match (r, saved) {
            (Ok(report), Ok(())) => Ok(report),
            (Ok(_), Err(e)) => Err(e.into()),
            (Err(e), _) => Err(e),
        }
    }

    async fn drive(
        &mut self,
        fresh: bool,
        on_event: &mut (dyn FnMut(JobEvent) + Send),
    ) -> Result<NetworkReport, JobError> {
        let started = Instant::now();
        let start = self.ckpt.step;
        let schedule = Schedule {
            total_steps: self.total_steps(),
            checkpoint_every: self.job.opts.checkpoint_every,
            checkpoint_estimate: plan::checkpoint_cost_in_steps(
                &self.stages,
                self.remote.clone(),
                self.job.cfg.batch,
                &self.job.cfg.optimizer,
            ),
            pipeline: !self.job.opts.keep_ends,
            max_failovers: self.job.opts.max_failovers,
            step_timeout: self.job.opts.step_timeout,
        };
        let mut m = TrainMachine::new(schedule, start, fresh);
        let mut interrupted = false;
        loop {
            if !interrupted && self.job.stop.is_cancelled() {
                interrupted = true;
                m.on(Event::Interrupt, Instant::now());
            }
            let now = Instant::now();
            let Some(action) = m.next_action(now) else {
                return Err(JobError::Invalid(
                    "the job's state machine has nothing to do".into(),
                ));
            };
            let deadline = m.deadline().map(tokio::time::Instant::from_std);
            let outcome: Result<Option<Event>, Fault> = match action {
                Action::Setup { restore, avoid } => {
                    let t = Instant::now();
                    let r = self.setup(restore, &avoid).await;
                    self.b.setup_seconds += t.elapsed().as_secs_f64();
                    if r.is_ok() && !m.failovers().is_empty() {
                        on_event(JobEvent::Resumed {
                            step: self.ckpt.step,
                            seconds: m
                                .failovers()
                                .last()
                                .and_then(|f| f.recovery)
                                .map_or(0.0, |d| d.as_secs_f64()),
                        });
                    }
                    r.map(|()| Some(Event::Ready))
                }
                Action::SendForward { step } => self.send_forward(step).await.map(|()| None),
                Action::AwaitOutput { step } => self
                    .await_output(step, deadline, on_event)
                    .await
                    .map(|()| Some(Event::Output { step })),
                Action::AwaitAck { step } => self
                    .await_ack(step, deadline)
                    .await
                    .map(|()| Some(Event::Acked { step })),
                Action::Checkpoint { step } => {
                    let t = Instant::now();
                    let r = self.checkpoint(step, deadline).await;
                    let secs = t.elapsed().as_secs_f64();
                    self.b.checkpoint_seconds += secs;
                    if r.is_ok() {
                        on_event(JobEvent::Checkpoint {
                            step,
                            seconds: secs,
                        });
                    }
                    r.map(|()| Some(Event::Checkpointed { step }))
                }
                Action::Probe => {
                    let dead = match &self.rings {
                        Some(r) => {
                            let hops: Vec<RingHop> =
                                r.fwd.hops.iter().chain(&r.bwd.hops).cloned().collect();
                            unresponsive(self.network, &hops, self.job.opts.probe_timeout).await
                        }
                        None => vec![],
                    };
                    Err(Fault::Hop {
                        blamed: dead.iter().map(|h| h.peer).collect(),
                        reason: format!(
                            "no reply within {:?}{}",
                            self.job.opts.step_timeout,
                            if dead.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    "; unresponsive: {}",
                                    dead.iter()
                                        .map(|h| format!("{} ({})", h.peer, h.label))
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                )
                            }
                        ),
                    })
                }
                Action::Evaluate => {
                    let t = Instant::now();
                    let r = self.evaluate().await;
                    self.b.evaluation_seconds += t.elapsed().as_secs_f64();
                    r.map(|_| Some(Event::Evaluated))
                }
                Action::Finish => match self.finish(started, start, &m).await {
                    Ok(r) => return Ok(r),
                    Err(f) => Err(f),
                },
                Action::Stop { step } => {
                    self.teardown().await;
                    return Err(JobError::Interrupted { step });
                }
                Action::Abort { reason } => {
                    self.teardown().await;
                    let peer = m.failovers().last().and_then(|f| f.blamed.first().copied());
                    return Err(JobError::Hop {
                        during: format!(
                            "the job stopped at the checkpoint of step {}",
                            m.checkpoint_step()
                        ),
                        peer,
                        detail: reason,
                    });
                }
            };
            match outcome {
                Ok(Some(ev)) => m.on(ev, Instant::now()),
                Ok(None) => {}
                Err(Fault::TimedOut) => m.timed_out(Instant::now()),
                Err(Fault::Hop { blamed, reason }) => {
                    tracing::warn!(event = "hop_failed", %reason, blamed = ?blamed);
                    // The rings of a failed run are dropped: every hop's
                    // circuit ends and the slots fall back to the last
                    // checkpoint.
                    self.rings = None;
                    self.labels.clear();
                    let before = m.failovers().len();
                    m.on(Event::Failed { blamed, reason }, Instant::now());
                    if m.failovers().len() > before {
                        if let Some(f) = m.failovers().last() {
                            on_event(JobEvent::Failover {
                                number: m.failovers().len() as u32,
                                reason: f.reason.clone(),
                                blamed: f.blamed.clone(),
                                restore_step: f.restored_step,
                            });
                        }
                    }
                }
                Err(Fault::Fatal(e)) => {
                    self.teardown().await;
                    return Err(e);
                }
            }
        }
    }

    async fn teardown(&mut self) {
        if let Some(r) = self.rings.take() {
            r.fwd.teardown().await;
            r.bwd.teardown().await;
        }
    }

    /// Fresh descriptors of the peers that held our stages and are not
    /// among the candidates (a resumed job, or volunteers that moved on).
    async fn refresh_placement(&mut self) {
        for (peer, _) in self.placement.iter().flatten() {
            if self.candidates.iter().any(|c| c.peer == *peer) {
                continue;
            }
            let fetched =
                tokio::time::timeout(Duration::from_secs(10), self.network.get_descriptor(*peer))
                    .await;
            if let Ok(Ok(d)) = fetched {
                self.addresses.insert(*peer, d.addresses.clone());
                self.candidates.push(Candidate::from(&Volunteer {
                    peer_id: *peer,
                    descriptor: d,
                }));
            }
        }
    }

    /// A route avoiding `avoid` whose every peer answers.
    async fn choose(&mut self, avoid: &[PeerId]) -> Result<super::route::Route, Fault> {
        let params: Vec<u64> = self
            .remote
            .clone()
            .map(|i| self.stages[i].param_count() as u64)
            .collect();
        let keep: Vec<Option<PeerId>> = self.placement.iter().map(|p| p.map(|p| p.0)).collect();
        let mut avoid: HashSet<PeerId> = avoid.iter().copied().collect();
        let mut alive: HashSet<PeerId> = HashSet::new();
        let mut rediscovered = false;
        // Every round either succeeds or rules out at least one peer.
        for _ in 0..=self.candidates.len() + 1 {
            let route = choose_route_keeping(
                &self.candidates,
                &params,
                &keep,
                &avoid,
                self.job.opts.mixes,
                true,
                &mut rng()?,
            );
            let route = match route {
                Ok(r) => r,
                Err(e) if !rediscovered => {
                    // Volunteers may have joined since the job started.
                    rediscovered = true;
                    tracing::info!(event = "route_rediscovery", reason = %e);
                    let (found, _) =
                        crate::discovery::discover(self.network, Duration::from_secs(5)).await;
                    for v in &found {
                        self.addresses
                            .insert(v.peer_id, v.descriptor.addresses.clone());
                        let c = Candidate::from(v);
                        match self.candidates.iter_mut().find(|x| x.peer == c.peer) {
                            Some(x) => *x = c,
                            None => self.candidates.push(c),
                        }
                    }
                    continue;
                }
                Err(e) => return Err(Fault::Fatal(e.into())),
            };
            let unknown: Vec<PeerId> = route
                .hosts
                .iter()
                .chain(route.forward_mixes.iter().flatten())
                .chain(route.backward_mixes.iter().flatten())
                .map(|c| c.peer)
                .filter(|p| !alive.contains(p))
                .collect();
            let answered =
                super::probe::reachable(self.network, &unknown, self.job.opts.probe_timeout).await;
            let dead: Vec<PeerId> = unknown
                .into_iter()
                .filter(|p| !answered.contains(p))
                .collect();
            alive.extend(answered);
            if dead.is_empty() {
                return Ok(route);
            }
            tracing::info!(event = "route_peers_unreachable", count = dead.len());
            avoid.extend(dead);
        }
        Err(Fault::Hop {
            blamed: vec![],
            reason: "no route whose peers all answer".into(),
        })
    }

    /// Set up both rings of a new run and bring every stage to the
    /// checkpoint of `restore` (already there when `None`).
    async fn setup(&mut self, restore: Option<u64>, avoid: &[PeerId]) -> Result<(), Fault> {
        self.rings = None;
        self.refresh_placement().await;
        let route = self.choose(avoid).await?;
        let hosts: Vec<StageHost> = route
            .hosts
            .iter()
            .enumerate()
            .map(|(j, c)| StageHost {
                stage: self.remote.start + j,
                host: c.clone(),
                slot_id: match self.placement[j] {
                    Some((peer, id)) if peer == c.peer => id,
                    _ => random(),
                },
            })
            .collect();
        let layout = Layout {
            stages: &self.stages,
            seed: self.job.cfg.seed,
            optimizer: self.job.cfg.optimizer,
            max_batch: self.max_batch,
            lease_secs: self.job.opts.lease.as_secs(),
            aes_gcm: self.job.opts.aes_cells,
        };
        let planned = plan::training_rings(
            &layout,
            &hosts,
            &route.forward_mixes,
            &route.backward_mixes,
            &self.owner,
            random(),
            &mut rng()?,
        )
        .map_err(|e| Fault::Fatal(e.into()))?;
        // The map names the new placement before any slot is made, so no
        // slot of the owner's is ever unknown to it.
        self.placement = hosts
            .iter()
            .map(|h| Some((h.host.peer, h.slot_id)))
            .collect();
        self.current = hosts;
        self.saving.wait().await?;
        self.write_map(None)?;
        let route_lines: Vec<String> = planned
            .forward
            .iter()
            .map(|h| format!("{} {}", h.label, h.peer))
            .collect();
        let (limits, max_message) = self.limits;
        let max_message = max_message.max(planned.state_total + 64 * 1024);
        let (network, listener) = (self.client.network(), self.client.listener());
        let hops = RingRoutes {
            forward: route_hops(&planned.forward, &self.current),
            backward: route_hops(&planned.backward, &self.current),
        };
        let all_hops: Vec<RingHop> = planned
            .forward
            .iter()
            .chain(&planned.backward)
            .cloned()
            .collect();
        let fwd = Ring::open(
            network,
            listener,
            planned.forward,
            planned.forward_keys,
            limits,
            max_message,
            self.job.opts.setup_timeout,
        )
        .await;
        let fwd = match fwd {
            Ok(r) => r,
            Err(e) => return Err(self.setup_fault("forward", &all_hops, e).await),
        };
        // The backward ring binds the slots the forward ring created.
        let bwd = Ring::open(
            network,
            listener,
            planned.backward,
            planned.backward_keys,
            limits,
            max_message,
            self.job.opts.setup_timeout,
        )
        .await;
        let bwd = match bwd {
            Ok(r) => r,
            Err(e) => return Err(self.setup_fault("backward", &all_hops, e).await),
        };
        self.rings = Some(Rings {
            fwd,
            bwd,
            forward_hosts: planned.forward_hosts,
            windows: planned.windows,
            state_total: planned.state_total,
            route: route_lines,
            hops,
        });
        if let Some(step) = restore {
            self.restore(step).await?;
        }
        let n = self.stages.len();
        let local = |i: usize| Slot::from_bytes(&self.ckpt.stages[i]);
        self.first = (self.remote.start > 0).then(|| local(0)).transpose()?;
        self.last = (self.remote.end < n).then(|| local(n - 1)).transpose()?;
        self.losses.truncate(self.ckpt.step as usize);
        Ok(())
    }

    /// Blame for a ring that did not come up: the hop it names, or the
    /// hops that do not answer.
    async fn setup_fault(&self, which: &str, hops: &[RingHop], e: RingError) -> Fault {
        let named = e
            .blamed_hop()
            .and_then(|i| {
                let ring_hops = match which {
                    "forward" => &hops[..hops.len() / 2],
                    _ => &hops[hops.len() / 2..],
                };
                ring_hops.get(i)
            })
            .map(|h| h.peer);
        let blamed: Vec<PeerId> = match named {
            Some(p) => vec![p],
            None => unresponsive(self.network, hops, self.job.opts.probe_timeout)
                .await
                .into_iter()
                .map(|h| h.peer)
                .collect(),
        };
        Fault::Hop {
            blamed,
            reason: format!("setting up the {which} ring: {e}"),
        }
    }

    /// Send every host its state of the checkpoint, sealed to it alone.
    async fn restore(&mut self, step: u64) -> Result<(), Fault> {
        if self.ckpt.step != step {
            return Err(Fault::Fatal(JobError::Invalid(format!(
                "asked to restore step {step}, the checkpoint holds step {}",
                self.ckpt.step
            ))));
        }
        let remote = self.remote.clone();
        let timeout = self.job.opts.step_timeout;
        let network = self.network;
        let ckpt_stages = &self.ckpt.stages;
        let rings = self.rings.as_mut().ok_or_else(no_rings)?;
        let mut blob = padding(rings.state_total)?;
        for (j, stage) in remote.enumerate() {
            let w = rings.windows[j];
            let range = w.range().ok_or_else(|| {
                Fault::Fatal(JobError::Invalid("a state window out of range".into()))
            })?;
            let key = rings
                .fwd
                .secrets(rings.forward_hosts[j])
                .map(|s| s.key(STATE_DOWN_KEY))
                .ok_or_else(|| Fault::Fatal(JobError::Invalid("no secrets for a host".into())))?;
            seal_state(&key, &ckpt_stages[stage], &mut blob[range])
                .map_err(|e| Fault::Fatal(e.into()))?;
        }
        let during = format!("restoring every stage to step {step}");
        let msg = JobMsg::State {
            op: StateOp::Restore,
            step,
            blob,
        };
        match exchange(network, &mut rings.fwd, &msg, &during, timeout).await? {
            JobMsg::State {
                op: StateOp::Restore,
                step: s,
                ..
            } if s == step => Ok(()),
            other => Err(Fault::Fatal(unexpected(&during, &other))),
        }
    }

    async fn send_forward(&mut self, step: u64) -> Result<(), Fault> {
        let (x, labels) = self
            .batches
            .get(step)
            .ok_or_else(|| Fault::Fatal(JobError::Invalid(format!("no batch for step {step}"))))?;
        self.labels.insert(step, labels);
        let t = Instant::now();
        let h = match self.first.as_mut() {
            Some(s) => s.forward(step, &x)?,
            None => x,
        };
        self.b.client_compute_seconds += t.elapsed().as_secs_f64();
        let network = self.network;
        let rings = self.rings.as_mut().ok_or_else(no_rings)?;
        if let Err(e) = rings.fwd.send(&JobMsg::Forward { step, tensor: h }).await {
            return Err(with_probe(
                network,
                &format!("step {step} (forward pass)"),
                &rings.fwd,
                e,
            )
            .await
            .into());
        }
        Ok(())
    }

    async fn await_output(
        &mut self,
        step: u64,
        deadline: Option<tokio::time::Instant>,
        on_event: &mut (dyn FnMut(JobEvent) + Send),
    ) -> Result<(), Fault> {
        let during = format!("step {step} (forward pass)");
        let timeout = remaining(deadline, self.job.opts.step_timeout);
        let network = self.network;
        let t = Instant::now();
        let rings = self.rings.as_mut().ok_or_else(no_rings)?;
        let y = match rings.fwd.recv(timeout).await {
            Ok(JobMsg::Forward { step: got, tensor }) if got == step => tensor,
            Ok(other) => return Err(Fault::Fatal(unexpected(&during, &other))),
            Err(RingError::Timeout(_)) => return Err(Fault::TimedOut),
            Err(e) => return Err(with_probe(network, &during, &rings.fwd, e).await.into()),
        };
        self.b.waiting_seconds += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let logits = match self.last.as_mut() {
            Some(sl) => sl.forward(step, &y)?,
            None => y,
        };
        let labels = self
            .labels
            .get(&step)
            .ok_or_else(|| Fault::Fatal(JobError::Invalid(format!("no labels for step {step}"))))?;
        let (loss, mut grad) = softmax_cross_entropy(&logits, labels)?;
        let examples = labels.len() as u64;
        if let Some(sl) = self.last.as_mut() {
            grad = sl.backward(step, &grad)?;
        }
        self.b.client_compute_seconds += t.elapsed().as_secs_f64();
        let during = format!("step {step} (backward pass)");
        let rings = self.rings.as_mut().ok_or_else(no_rings)?;
        if let Err(e) = rings
            .bwd
            .send(&JobMsg::Backward { step, tensor: grad })
            .await
        {
            return Err(with_probe(network, &during, &rings.bwd, e).await.into());
        }
        let i = (step - 1) as usize;
        self.losses.truncate(i);
        self.losses.push(loss);
        let done = (step - 1) / self.batches.per_epoch * self.job.train.len() as u64
            + ((step - 1) % self.batches.per_epoch) * self.job.cfg.batch as u64
            + examples;
        on_event(JobEvent::Step(StepInfo {
            step,
            epoch: self.batches.epoch_of(step),
            loss,
            examples_done: done,
            examples_total: self.job.cfg.epochs as u64 * self.job.train.len() as u64,
        }));
        Ok(())
    }

    async fn await_ack(
        &mut self,
        step: u64,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), Fault> {
        let during = format!("step {step} (backward pass)");
        let timeout = remaining(deadline, self.job.opts.step_timeout);
        let network = self.network;
        let t = Instant::now();
        let rings = self.rings.as_mut().ok_or_else(no_rings)?;
        let reply = match rings.bwd.recv(timeout).await {
            Ok(r) => r,
            Err(RingError::Timeout(_)) => return Err(Fault::TimedOut),
            Err(e) => return Err(with_probe(network, &during, &rings.bwd, e).await.into()),
        };
        self.b.waiting_seconds += t.elapsed().as_secs_f64();
        match (reply, self.first.as_mut()) {
            (JobMsg::Ack { step: got }, None) if got == step => {}
            (JobMsg::Backward { step: got, tensor }, Some(f)) if got == step => {
                let t = Instant::now();
                f.backward(step, &tensor)?;
                self.b.client_compute_seconds += t.elapsed().as_secs_f64();
            }
            (other, _) => return Err(Fault::Fatal(unexpected(&during, &other))),
        }
        self.labels.remove(&step);
        Ok(())
    }

    /// Collect every stage's state after `step` steps and write it.
    async fn checkpoint(
        &mut self,
        step: u64,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), Fault> {
        let timeout = remaining(deadline, self.job.opts.step_timeout);
        let network = self.network;
        let remote = self.remote.clone();
        let rings = self.rings.as_mut().ok_or_else(no_rings)?;
        let blob = padding(rings.state_total)?;
        let during = format!("checkpoint of step {step}");
        let msg = JobMsg::State {
            op: StateOp::Checkpoint,
            step,
            blob,
        };
        if let Err(e) = rings.fwd.send(&msg).await {
            return Err(with_probe(network, &during, &rings.fwd, e).await.into());
        }
        let blob = match rings.fwd.recv(timeout).await {
            Ok(JobMsg::State {
                op: StateOp::Checkpoint,
                step: s,
                blob,
            }) if s == step && blob.len() == rings.state_total => blob,
            Ok(other) => return Err(Fault::Fatal(unexpected(&during, &other))),
            Err(RingError::Timeout(_)) => return Err(Fault::TimedOut),
            Err(e) => return Err(with_probe(network, &during, &rings.fwd, e).await.into()),
        };
        // Each stage's state, read once: checked against the step and the
        // stage, and its parameter digest taken for the map.
        let n = self.stages.len();
        let mut stages: Vec<Option<Vec<u8>>> = vec![None; n];
        let mut digests: Vec<Option<[u8; 32]>> = vec![None; n];
        for (j, stage) in remote.enumerate() {
            let pos = rings.forward_hosts[j];
            let peer = rings.fwd.hops.get(pos).map(|h| h.peer);
            let diverged = |detail: String| Fault::Hop {
                blamed: peer.into_iter().collect(),
                reason: format!("{during}: stage {stage}: {detail}"),
            };
            let key = rings
                .fwd
                .secrets(pos)
                .map(|s| s.key(STATE_UP_KEY))
                .ok_or_else(|| Fault::Fatal(JobError::Invalid("no secrets for a host".into())))?;
            let range = rings.windows[j]
                .range()
                .ok_or_else(|| diverged("a window out of range".into()))?;
            let state = open_state(&key, &blob[range])
                .map_err(|_| diverged("the host's state does not open".into()))?;
            let slot =
                Slot::from_bytes(&state).map_err(|e| diverged(format!("unreadable state: {e}")))?;
            if slot.steps_applied() != step || slot.spec() != &self.stages[stage] {
                return Err(diverged(format!(
                    "the host sent a state of another stage or step ({} steps)",
                    slot.steps_applied()
                )));
            }
            digests[stage] = Some(slot.params_digest());
            stages[stage] = Some(state);
        }
        for (i, kept) in [(0, &self.first), (n - 1, &self.last)] {
            if let Some(s) = kept {
                if s.steps_applied() != step {
                    return Err(Fault::Hop {
                        blamed: vec![],
                        reason: format!(
                            "{during}: stage {i} here has applied {} steps",
                            s.steps_applied()
                        ),
                    });
                }
                digests[i] = Some(s.params_digest());
                stages[i] = Some(s.to_bytes());
            }
        }
        let (Some(stages), Some(digests)) = (
            stages.into_iter().collect::<Option<Vec<_>>>(),
            digests.into_iter().collect::<Option<Vec<_>>>(),
        ) else {
            return Err(Fault::Fatal(JobError::Invalid(format!(
                "{during}: a stage is neither on a host nor kept here"
            ))));
        };
        let ckpt = Checkpoint {
            step,
            stages,
            losses: self.losses[..(step as usize).min(self.losses.len())].to_vec(),
        };
        self.map.steps = step;
        self.map.params_digest = to_hex(&model_digest(&digests));
        if let Some(j) = self.map.job.as_mut() {
            j.checkpoint_step = step;
        }
        // The files are written while the next steps run (see PendingSave).
        self.saving
            .start(ckpt.to_bytes(), self.map.clone(), self.job.map_path)
            .await?;
        self.ckpt = ckpt;
        self.checkpoints += 1;
        Ok(())
    }

    async fn evaluate(&mut self) -> Result<f32, Fault> {
        let network = self.network;
        let timeout = self.job.opts.step_timeout;
        let test = self.job.test;
        let ends = (self.first.as_ref(), self.last.as_ref());
        let width = self.stages[self.remote.end - 1].output_dim();
        let rings = self.rings.as_mut().ok_or_else(no_rings)?;
        let (acc, _) = evaluate(network, &mut rings.fwd, test, ends, width, timeout).await?;
        self.test_accuracy = Some(acc);
        Ok(acc)
    }

    /// The map with the current placement; `reports` (the final round)
    /// fill in each slot's version and digest.
    #[allow(clippy::result_large_err, reason = "cold error path")]
    fn write_map(&mut self, reports: Option<&[SlotReport]>) -> Result<(), Fault> {
        let n = self.stages.len();
        let mut entries = Vec::with_capacity(n);
        let local = |i: usize, bytes: &[u8]| -> Result<StageEntry, Fault> {
            let slot = Slot::from_bytes(bytes)?;
            Ok(StageEntry::Local {
                index: i,
                state: hex::encode(bytes),
                params_digest: to_hex(&slot.params_digest()),
            })
        };
        if self.remote.start > 0 {
            let bytes = match &self.first {
                Some(f) if reports.is_some() => f.to_bytes(),
                _ => self.ckpt.stages[0].clone(),
            };
            entries.push(local(0, &bytes)?);
        }
        for (j, h) in self.current.iter().enumerate() {
            let r = reports.and_then(|r| r.get(j));
            entries.push(StageEntry::Remote {
                index: h.stage,
                slot_id: hex::encode(h.slot_id),
                host: h.host.peer.to_string(),
                addresses: self
                    .addresses
                    .get(&h.host.peer)
                    .cloned()
                    .unwrap_or_default(),
                version: r.map_or(0, |r| r.version),
                params_digest: r.map(|r| to_hex(&r.params_digest)).unwrap_or_default(),
            });
        }
        if self.remote.end < n {
            let bytes = match &self.last {
                Some(l) if reports.is_some() => l.to_bytes(),
                _ => self.ckpt.stages[n - 1].clone(),
            };
            entries.push(local(n - 1, &bytes)?);
        }
        self.map.stages = entries;
        self.map.save(self.job.map_path)?;
        Ok(())
    }

    /// Final reports from every host; each must match the last checkpoint.
    async fn finish(
        &mut self,
        started: Instant,
        start_step: u64,
        m: &TrainMachine,
    ) -> Result<NetworkReport, Fault> {
        let network = self.network;
        let timeout = self.job.opts.step_timeout;
        let rings = self.rings.as_mut().ok_or_else(no_rings)?;
        let positions = rings.forward_hosts.clone();
        let reports = control(
            network,
            &mut rings.fwd,
            ControlOp::Finish,
            &positions,
            timeout,
        )
        .await?;
        let hosts = &self.current;
        let mut digests = Vec::with_capacity(self.stages.len());
        for (i, bytes) in self.ckpt.stages.iter().enumerate() {
            digests.push(Slot::from_bytes(bytes)?.params_digest());
            if let Some(j) = i
                .checked_sub(self.remote.start)
                .filter(|_| self.remote.contains(&i))
            {
                let r = &reports[j];
                if r.slot_id != hosts[j].slot_id
                    || r.params_digest != digests[i]
                    || r.steps_applied != self.ckpt.step
                {
                    return Err(Fault::Hop {
                        blamed: vec![hosts[j].host.peer],
                        reason: format!(
                            "the host of stage {i} ({}) reports a slot that differs from the checkpoint",
                            hosts[j].host.peer
                        ),
                    });
                }
            }
        }
        let route = rings.route.clone();
        let ring_routes = rings.hops.clone();
        let rings = self.rings.as_ref().ok_or_else(no_rings)?;
        let b = &mut self.b;
        let (fwd, bwd) = (&rings.fwd, &rings.bwd);
        b.client_crypto_seconds += (fwd.crypto + bwd.crypto).as_secs_f64();
        b.client_serialization_seconds += (fwd.codec + bwd.codec).as_secs_f64();
        b.bytes_sent += fwd.bytes_sent + bwd.bytes_sent;
        b.bytes_received += fwd.bytes_received + bwd.bytes_received;
        self.map.complete = true;
        self.map.steps = self.ckpt.step;
        self.map.params_digest = to_hex(&model_digest(&digests));
        self.saving.wait().await?;
        self.write_map(Some(&reports))?;
        self.teardown().await;
        let epoch_losses = mixnn_model::epoch_losses(&self.losses, self.batches.per_epoch as usize);
        Ok(NetworkReport {
            steps: self.ckpt.step,
            final_loss: epoch_losses.last().copied().unwrap_or(f32::NAN),
            losses: std::mem::take(&mut self.losses),
            epoch_losses,
            test_accuracy: self.test_accuracy.unwrap_or(f32::NAN),
            seconds: started.elapsed().as_secs_f64(),
            params_digest: to_hex(&model_digest(&digests)),
            breakdown: self.b.clone(),
            route,
            rings: ring_routes,
            failovers: m.failovers().len() as u32,
            replayed_steps: m.replayed_steps(),
            recovery_seconds: m
                .failovers()
                .iter()
                .filter_map(|f| f.recovery.map(|d| d.as_secs_f64()))
                .collect(),
            checkpoints: self.checkpoints,
            checkpoint_every: m.checkpoint_interval(),
            started_at_step: start_step,
        })
    }
}

fn no_rings() -> Fault {
    Fault::Fatal(JobError::Invalid("no rings are set up".into()))
}

/// Time left until `deadline`, or `fallback` when there is none.
fn remaining(deadline: Option<tokio::time::Instant>, fallback: Duration) -> Duration {
    deadline.map_or(fallback, |d| {
        d.saturating_duration_since(tokio::time::Instant::now())
    })
}

/// An inference ring through the slots of a model map, with the stages
/// the client keeps: send batches of inputs, get logits back.
pub struct Inference {
    ring: Ring,
    first: Option<Slot>,
    last: Option<Slot>,
    timeout: Duration,
    features: usize,
    /// Values per example the ring's last stage gives.
    result_width: usize,
    step: u64,
}

impl Inference {
    /// Set up a forward ring through the hosts the map names (with fresh
    /// descriptors: onion keys rotate) and mixes chosen among `volunteers`.
    pub async fn open(
        client: &Client,
        volunteers: &[Volunteer],
        map: &ModelMap,
        opts: &JobOptions,
    ) -> Result<Self, JobError> {
        let (network, listener) = (client.network(), client.listener());
        let owner = map.owner()?;
        let arch = mixnn_model::Arch::parse(&map.arch)
            .map_err(|e| JobError::Invalid(format!("model map arch: {e}")))?;
        let stages = arch.stages();
        let mut first = None;
        let mut last = None;
        for entry in &map.stages {
            if let StageEntry::Local { index, state, .. } = entry {
                let bytes = hex::decode(state)
                    .map_err(|_| JobError::Invalid("local stage state is not hex".into()))?;
                let slot = Slot::from_bytes(&bytes)?;
                if *index == 0 {
                    first = Some(slot);
                } else {
                    last = Some(slot);
                }
            }
        }
        let remote = super::owner::remote_stages(map, stages.len())?;
        let result_width = remote
            .last()
            .and_then(|s| stages.get(s.index))
            .map_or(0, |s| s.output_dim());
        let mut hosts = Vec::new();
        for s in &remote {
            let host = super::owner::find_host(network, volunteers, s.host)
                .await
                .map_err(|detail| JobError::Hop {
                    during: "looking up the model's hosts".into(),
                    peer: Some(s.host),
                    detail: format!("the host of stage {} ({}): {detail}", s.index, s.host),
                })?;
            hosts.push(StageHost {
                stage: s.index,
                host,
                slot_id: s.slot_id,
            });
        }
        let candidates: Vec<Candidate> = volunteers.iter().map(Candidate::from).collect();
        let mut rng = rng()?;
        let host_candidates: Vec<Candidate> = hosts.iter().map(|h| h.host.clone()).collect();
        let mixes = choose_mixes(&candidates, &host_candidates, opts.mixes, &mut rng)?;
        let max_batch = EVAL_BATCH as u32;
        let layout = Layout {
            stages: &stages,
            seed: map.seed,
            optimizer: map.optimizer,
            max_batch,
            lease_secs: opts.lease.as_secs(),
            aes_gcm: opts.aes_cells,
        };
        let planned = plan::inference_ring(&layout, &hosts, &mixes, &owner, &mut rng)?;
        let (limits, max_message) = limits(&stages, max_batch);
        let ring = Ring::open(
            network,
            listener,
            planned.hops,
            planned.keys,
            limits,
            max_message,
            opts.setup_timeout,
        )
        .await
        .map_err(|e| JobError::Hop {
            during: "setting up the inference ring".into(),
            peer: None,
            detail: e.to_string(),
        })?;
        let mut ring = ring;
        if map.complete {
            // Each slot must still hold what the map recorded: a host whose
            // copy changed (a rollback, a corrupt disk, a lie) is named.
            let positions: Vec<usize> = ring
                .hops
                .iter()
                .enumerate()
                .filter(|(_, h)| matches!(h.role, HopRole::Host(_)))
                .map(|(i, _)| i)
                .collect();
            let reports = control(
                network,
                &mut ring,
                ControlOp::Digest,
                &positions,
                opts.step_timeout,
            )
            .await?;
            for (r, s) in reports.iter().zip(&remote) {
                let digest = hex::encode(r.params_digest);
                if digest != s.params_digest || r.version != s.version {
                    ring.teardown().await;
                    return Err(JobError::Diverged {
                        stage: s.index,
                        peer: s.host,
                        detail: format!(
                            "it holds version {} with params digest {}, the model map recorded version {} with {}",
                            r.version, digest, s.version, s.params_digest
                        ),
                    });
                }
            }
        }
        Ok(Self {
            ring,
            first,
            last,
            timeout: opts.step_timeout,
            features: arch.input_dim(),
            result_width,
            step: u64::MAX / 2,
        })
    }

    /// Features per example the model takes.
    pub fn input_dim(&self) -> usize {
        self.features
    }

    /// The logits of `x` (`[rows, input_dim]`, at most [`EVAL_BATCH`] rows).
    pub async fn logits(
        &mut self,
        network: &Network,
        x: HostTensor,
    ) -> Result<HostTensor, JobError> {
        if x.shape.len() != 2 || x.shape[1] != self.features || x.shape[0] > EVAL_BATCH {
            return Err(JobError::Invalid(format!(
                "inputs of shape {:?} where [1..={EVAL_BATCH}, {}] is expected",
                x.shape, self.features
            )));
        }
        let x = match &self.first {
            Some(s) => s.infer(&x)?,
            None => x,
        };
        self.step += 1;
        let step = self.step;
        let during = format!("inference batch {}", step - u64::MAX / 2);
        let y = match exchange(
            network,
            &mut self.ring,
            &JobMsg::Infer { step, tensor: x },
            &during,
            self.timeout,
        )
        .await?
        {
            JobMsg::Infer { step: s, tensor } if s == step => tensor,
            other => return Err(unexpected(&during, &other)),
        };
        Ok(match &self.last {
            Some(s) => s.infer(&y)?,
            None => y,
        })
    }

    /// Accuracy over `test`, as the local trainer evaluates.
    pub async fn accuracy(&mut self, network: &Network, test: &Split) -> Result<f32, JobError> {
        let (acc, _) = evaluate(
            network,
            &mut self.ring,
            test,
            (self.first.as_ref(), self.last.as_ref()),
            self.result_width,
            self.timeout,
        )
        .await?;
        Ok(acc)
    }

    pub async fn close(self) {
        self.ring.teardown().await;
    }
}

/// Run the test split through the slots named in the model map.
pub async fn infer_network(
    client: &Client,
    volunteers: &[Volunteer],
    map: &ModelMap,
    test: &Split,
    opts: &JobOptions,
) -> Result<InferReport, JobError> {
    let started = Instant::now();
    let arch = mixnn_model::Arch::parse(&map.arch)
        .map_err(|e| JobError::Invalid(format!("model map arch: {e}")))?;
    if test.features != arch.input_dim() {
        return Err(JobError::Invalid(format!(
            "the dataset has {} features, {} takes {}",
            test.features,
            arch,
            arch.input_dim()
        )));
    }
    let mut inference = Inference::open(client, volunteers, map, opts).await?;
    let acc = inference.accuracy(client.network(), test).await?;
    inference.close().await;
    Ok(InferReport {
        test_accuracy: acc,
        examples: test.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The model map's tensors decode with these limits (for callers that
/// inspect messages).
pub fn decode_limits_for(stages: &[StageSpec], max_batch: u32) -> DecodeLimits {
    limits(stages, max_batch).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit::wire::CELL_FRAME_BYTES;

    fn map(steps: u64) -> ModelMap {
        ModelMap {
            format: FORMAT,
            arch: "mlp:4-3-2".into(),
            optimizer: mixnn_model::OptimizerSpec::Sgd { lr: 0.1 },
            seed: 7,
            batch: 8,
            steps,
            owner_secret: hex::encode([1u8; 32]),
            stages: vec![],
            params_digest: String::new(),
            complete: false,
            job: None,
            trained_on: None,
        }
    }

    fn ckpt(step: u64) -> Checkpoint {
        Checkpoint {
            step,
            stages: vec![vec![step as u8; 100_000]],
            losses: vec![0.5; step as usize],
        }
    }

    /// The checkpoint and then the map are on disk once `wait` returns,
    /// one save after another in order; a dropped saver still finishes
    /// the write it started; a write that fails is the waiter's error.
    #[tokio::test]
    async fn checkpoint_files_are_written_in_order_and_before_the_job_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.json");
        let mut saving = PendingSave::default();
        saving.wait().await.expect("nothing to wait for");
        for step in [20, 40] {
            saving
                .start(ckpt(step).to_bytes(), map(step), &path)
                .await
                .expect("save started");
        }
        saving.wait().await.expect("saved");
        assert_eq!(
            Checkpoint::load(&checkpoint::path_for(&path)).expect("load"),
            ckpt(40)
        );
        assert_eq!(ModelMap::load(&path).expect("map").steps, 40);

        let mut dropped = PendingSave::default();
        dropped
            .start(ckpt(60).to_bytes(), map(60), &path)
            .await
            .expect("save started");
        drop(dropped);
        assert_eq!(
            Checkpoint::load(&checkpoint::path_for(&path))
                .expect("load")
                .step,
            60
        );
        assert_eq!(ModelMap::load(&path).expect("map").steps, 60);

        let gone = dir.path().join("no-such-dir").join("m.json");
        let mut failing = PendingSave::default();
        failing
            .start(ckpt(80).to_bytes(), map(80), &gone)
            .await
            .expect("save started");
        assert!(matches!(failing.wait().await, Err(MapError::Io { .. })));
    }

    /// A classifier's results ride in one cell each, so two of them fit
    /// in a fresh yamux stream window and a third batch goes out; results
    /// too wide for that keep the two-batch bound whose argument needs no
    /// window at all.
    #[test]
    fn a_third_evaluation_batch_only_where_two_results_fit_a_stream_window() {
        let window = yamux::DEFAULT_CREDIT as usize;
        assert_eq!(eval_in_flight(10), EVAL_IN_FLIGHT + 1);
        assert_eq!(eval_in_flight(0), EVAL_IN_FLIGHT + 1);
        // 2 x 100 x 4 bytes per example: several cells per result.
        assert_eq!(eval_in_flight(100), EVAL_IN_FLIGHT);
        assert_eq!(eval_in_flight(512), EVAL_IN_FLIGHT);
        // The boundary: the widest result that still gets a third batch
        // fits twice in the window, one value more does not.
        let widest = (1..=200)
            .rev()
            .find(|&w| eval_in_flight(w) > EVAL_IN_FLIGHT)
            .expect("narrow results get a third batch");
        let frames = |w: usize| {
            mixnn_crypto::cells::message_cells(
                9 + 1 + 4 * mixnn_model::tensor::MAX_RANK + 4 * EVAL_BATCH * w,
            )
        };
        assert!(EVAL_IN_FLIGHT * frames(widest) * CELL_FRAME_BYTES <= window);
        assert!(EVAL_IN_FLIGHT * frames(widest + 1) * CELL_FRAME_BYTES > window);
    }
}
