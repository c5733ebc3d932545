//! Training and inference jobs through mix circuits.
//!
//! Training uses two rings: the forward ring carries activations from the
//! client through every layer host back to the client; the backward ring
//! carries the loss gradient from the client through the hosts in reverse.
//! For each batch the client sends the inputs forward, computes the loss on
//! what comes back, and sends its gradient backward; the first stage's host
//! acknowledges. Every host applies its optimizer when its backward pass
//! runs, so the arithmetic is that of local training, step for step.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mixnn_crypto::Identity;
use mixnn_model::{
    accuracy, model_digest, softmax_cross_entropy, to_hex, DecodeLimits, HostTensor, InitSpec,
    InputGrad, ModelError, Slot, Split, StageSpec, StepInfo, TrainConfig, EVAL_BATCH,
};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use thiserror::Error;

use super::model_map::{MapError, ModelMap, StageEntry, FORMAT};
use super::ring::{Ring, RingError, RingHop, RingKeys};
use super::route::{choose_mixes, choose_route, Candidate, RouteError};
use super::Client;
use crate::circuit::host::MAX_TENSOR_ELEMENTS;
use crate::circuit::payload::{
    open_slot_report, Assignment, AssignmentBody, ControlOp, Direction, HopRole, JobMsg,
    PayloadError, SlotCreate, SlotReport, REPORT_KEY,
};
use crate::circuit::CIRCUIT_PROTOCOL;
use crate::discovery::Volunteer;
use crate::network::Network;

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
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("{0}")]
    Payload(#[from] PayloadError),
    #[error("{0}")]
    Invalid(String),
}

/// How a network job runs.
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub mixes: usize,
    pub keep_ends: bool,
    /// Longest wait for one reply before the job fails.
    pub step_timeout: Duration,
    /// Longest wait for a ring to be set up.
    pub setup_timeout: Duration,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            mixes: 1,
            keep_ends: false,
            step_timeout: Duration::from_secs(60),
            setup_timeout: Duration::from_secs(20),
        }
    }
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
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// The outcome of a training job through the network.
#[derive(Clone, Debug, Serialize)]
pub struct NetworkReport {
    pub steps: u64,
    pub final_loss: f32,
    #[serde(skip)]
    pub losses: Vec<f32>,
    pub test_accuracy: f32,
    pub seconds: f64,
    pub params_digest: String,
    pub breakdown: Breakdown,
    /// Peers used, for the user: one line per hop of the forward ring.
    pub route: Vec<String>,
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

fn mix_hop(c: &Candidate) -> RingHop {
    RingHop {
        peer: c.peer,
        onion_key: c.onion_key,
        epoch: c.epoch,
        label: "mix".into(),
        role: HopRole::Mix,
    }
}

fn host_label(stage: usize, dir: Direction) -> String {
    match dir {
        Direction::Forward => format!("layer host for stage {stage}"),
        Direction::Backward => format!("layer host for stage {stage}, backward"),
    }
}

fn ring_error(during: &str, ring: &Ring, e: RingError) -> JobError {
    let peer = e
        .blamed_hop()
        .and_then(|i| ring.hops.get(i))
        .map(|h| h.peer);
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

/// Probe each hop of a stalled ring: a hop that cannot open a stream in a
/// few seconds is the likely culprit.
async fn unresponsive_hops(network: &Network, hops: &[RingHop]) -> Vec<String> {
    let mut out = Vec::new();
    for h in hops {
        let mut control = network.stream_control();
        let ok = tokio::time::timeout(
            Duration::from_secs(3),
            control.open_stream(h.peer, CIRCUIT_PROTOCOL),
        )
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
        if !ok {
            out.push(format!("{} ({})", h.peer, h.label));
        }
    }
    out
}

async fn with_probe(network: &Network, during: &str, ring: &Ring, e: RingError) -> JobError {
    if matches!(e, RingError::Timeout(_)) {
        let dead = unresponsive_hops(network, &ring.hops).await;
        if !dead.is_empty() {
            return JobError::Hop {
                during: during.to_string(),
                peer: None,
                detail: format!("{e}; unresponsive hop: {}", dead.join(", ")),
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

/// Send training step `step`'s forward pass into the forward ring.
async fn send_forward(
    network: &Network,
    fwd: &mut Ring,
    step: u64,
    tensor: HostTensor,
) -> Result<(), JobError> {
    match fwd.send(&JobMsg::Forward { step, tensor }).await {
        Ok(()) => Ok(()),
        Err(e) => Err(with_probe(network, &format!("step {step} (forward pass)"), fwd, e).await),
    }
}

fn unexpected(during: &str, got: &JobMsg) -> JobError {
    JobError::Invalid(format!("{during}: got a {} message", got.name()))
}

fn limits(stages: &[StageSpec], max_batch: u32) -> (DecodeLimits, usize) {
    let width = stages
        .iter()
        .map(|s| s.input_dim().max(s.output_dim()))
        .max()
        .unwrap_or(1);
    let max_elements = (max_batch as usize * width).min(MAX_TENSOR_ELEMENTS);
    (
        DecodeLimits {
            max_rank: 2,
            max_elements,
        },
        max_elements * 4 + 64 * 1024,
    )
}

/// A control round on the forward ring: every host runs `op` and seals a
/// report for us.
async fn control(
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

/// Run the test split through the forward ring in batches of EVAL_BATCH,
/// exactly as the local trainer evaluates.
async fn evaluate(
    network: &Network,
    ring: &mut Ring,
    test: &Split,
    first: Option<&Slot>,
    last: Option<&Slot>,
    timeout: Duration,
) -> Result<(f32, usize), JobError> {
    let mut hits = 0usize;
    let mut start = 0usize;
    let mut step = u64::MAX / 2;
    while start < test.len() {
        let n = EVAL_BATCH.min(test.len() - start);
        let (x, labels) = test.slice(start, n);
        let x = match first {
            Some(s) => s.infer(&x)?,
            None => x,
        };
        step += 1;
        let during = format!("evaluation batch at example {start}");
        let y = match exchange(
            network,
            ring,
            &JobMsg::Infer { step, tensor: x },
            &during,
            timeout,
        )
        .await?
        {
            JobMsg::Infer { step: s, tensor } if s == step => tensor,
            other => return Err(unexpected(&during, &other)),
        };
        let logits = match last {
            Some(s) => s.infer(&y)?,
            None => y,
        };
        hits += (accuracy(&logits, labels) * n as f32).round() as usize;
        start += n;
    }
    let acc = if test.is_empty() {
        0.0
    } else {
        hits as f32 / test.len() as f32
    };
    Ok((acc, test.len()))
}

/// Train `cfg` through the network, writing the model map to `map_path`.
pub async fn train_network(
    client: &Client,
    volunteers: &[Volunteer],
    cfg: &TrainConfig,
    train: &Split,
    test: &Split,
    opts: &JobOptions,
    map_path: &Path,
    on_step: &mut (dyn FnMut(StepInfo) + Send),
) -> Result<NetworkReport, JobError> {
    cfg.validate()?;
    let started = Instant::now();
    let stages = cfg.arch.stages();
    let n = stages.len();
    let (mut first, mut last, remote): (Option<Slot>, Option<Slot>, std::ops::Range<usize>) =
        if opts.keep_ends {
            if n < 3 {
                return Err(JobError::Invalid(format!(
                "--keep-ends keeps the first and last stage here and needs a middle one; {} has {n} stages",
                cfg.arch
            )));
            }
            let init = |i: usize| InitSpec {
                seed: cfg.seed,
                stage_index: i as u32,
            };
            (
                Some(Slot::new(&stages[0], init(0), cfg.optimizer)?),
                Some(Slot::new(&stages[n - 1], init(n - 1), cfg.optimizer)?),
                1..n - 1,
            )
        } else {
            (None, None, 0..n)
        };
    if train.features != cfg.arch.input_dim() {
        return Err(JobError::Invalid(format!(
            "the dataset has {} features, {} takes {}",
            train.features,
            cfg.arch,
            cfg.arch.input_dim()
        )));
    }

    let candidates: Vec<Candidate> = volunteers.iter().map(Candidate::from).collect();
    let params: Vec<u64> = remote
        .clone()
        .map(|i| stages[i].param_count() as u64)
        .collect();
    let mut rng = rand::rngs::StdRng::from_rng(rand::rngs::OsRng)
        .map_err(|e| JobError::Invalid(e.to_string()))?;
    let route = choose_route(&candidates, &params, opts.mixes, true, &mut rng)?;
    let owner = Identity::generate();
    let m = route.hosts.len();
    let slot_ids: Vec<[u8; 16]> = (0..m).map(|_| random()).collect();
    let fkeys: Vec<[u8; 32]> = (0..=m).map(|_| random()).collect();
    let bkeys: Vec<[u8; 32]> = (0..=m).map(|_| random()).collect();
    let max_batch = cfg.batch.max(EVAL_BATCH) as u32;
    let (limits, max_message) = limits(&stages, max_batch);

    let assignment = |j: usize, dir: Direction, create: bool| -> Result<RingHop, JobError> {
        let h = &route.hosts[j];
        let stage = remote.start + j;
        let (in_key, out_key) = match dir {
            Direction::Forward => (fkeys[j], fkeys[j + 1]),
            Direction::Backward => (bkeys[j + 1], bkeys[j]),
        };
        let body = AssignmentBody {
            slot_id: slot_ids[j],
            owner: owner.public_key(),
            direction: dir,
            infer_only: false,
            create: create.then(|| SlotCreate {
                stage: stages[stage].clone(),
                init: InitSpec {
                    seed: cfg.seed,
                    stage_index: stage as u32,
                },
                optimizer: cfg.optimizer,
            }),
            in_key,
            out_key,
            first: dir == Direction::Backward && stage == 0,
            skip_zero_inputs: InputGrad::after(stage.checked_sub(1).map(|p| &stages[p]))
                == InputGrad::SkipZeroInputs,
            max_batch,
            nonce: random(),
        };
        Ok(RingHop {
            peer: h.peer,
            onion_key: h.onion_key,
            epoch: h.epoch,
            label: host_label(stage, dir),
            role: HopRole::Host(Box::new(Assignment::sign(body, &owner, &h.onion_key)?)),
        })
    };
    let mut fwd_hops = Vec::new();
    let mut fwd_host_pos = Vec::new();
    for j in 0..m {
        fwd_hops.extend(route.forward_mixes[j].iter().map(mix_hop));
        fwd_host_pos.push(fwd_hops.len());
        fwd_hops.push(assignment(j, Direction::Forward, true)?);
    }
    fwd_hops.extend(route.forward_mixes[m].iter().map(mix_hop));
    let mut bwd_hops = Vec::new();
    for (k, j) in (0..m).rev().enumerate() {
        bwd_hops.extend(route.backward_mixes[k].iter().map(mix_hop));
        bwd_hops.push(assignment(j, Direction::Backward, false)?);
    }
    bwd_hops.extend(route.backward_mixes[m].iter().map(mix_hop));
    let route_lines: Vec<String> = fwd_hops
        .iter()
        .map(|h| format!("{} {}", h.label, h.peer))
        .collect();

    let (network, listener) = (client.network(), client.listener());
    let mut fwd = Ring::open(
        network,
        listener,
        fwd_hops,
        RingKeys {
            first_segment: fkeys[0],
            last_segment: fkeys[m],
        },
        limits,
        max_message,
        opts.setup_timeout,
    )
    .await
    .map_err(|e| ring_setup_error("forward", e))?;
    // The backward ring binds the slots the forward ring created.
    let mut bwd = Ring::open(
        network,
        listener,
        bwd_hops,
        RingKeys {
            first_segment: bkeys[m],
            last_segment: bkeys[0],
        },
        limits,
        max_message,
        opts.setup_timeout,
    )
    .await
    .map_err(|e| ring_setup_error("backward", e))?;
    let setup_seconds = started.elapsed().as_secs_f64();

    let mut map = ModelMap {
        format: FORMAT,
        arch: cfg.arch.to_string(),
        optimizer: cfg.optimizer,
        seed: cfg.seed,
        batch: cfg.batch,
        steps: 0,
        owner_secret: hex::encode(*owner.secret_bytes()),
        stages: Vec::new(),
        params_digest: String::new(),
        complete: false,
    };
    let write_map = |map: &mut ModelMap,
                     reports: &[SlotReport],
                     first: Option<&Slot>,
                     last: Option<&Slot>|
     -> Result<Vec<[u8; 32]>, JobError> {
        let mut digests = Vec::with_capacity(n);
        map.stages.clear();
        if let Some(s) = first {
            digests.push(s.params_digest());
            map.stages.push(StageEntry::Local {
                index: 0,
                state: hex::encode(s.to_bytes()),
                params_digest: to_hex(&s.params_digest()),
            });
        }
        for (j, h) in route.hosts.iter().enumerate() {
            let r = reports.get(j);
            digests.push(r.map(|r| r.params_digest).unwrap_or_default());
            map.stages.push(StageEntry::Remote {
                index: remote.start + j,
                slot_id: hex::encode(slot_ids[j]),
                host: h.peer.to_string(),
                addresses: volunteers
                    .iter()
                    .find(|v| v.peer_id == h.peer)
                    .map(|v| v.descriptor.addresses.clone())
                    .unwrap_or_default(),
                version: r.map_or(0, |r| r.version),
                params_digest: r.map(|r| to_hex(&r.params_digest)).unwrap_or_default(),
            });
        }
        if let Some(s) = last {
            digests.push(s.params_digest());
            map.stages.push(StageEntry::Local {
                index: n - 1,
                state: hex::encode(s.to_bytes()),
                params_digest: to_hex(&s.params_digest()),
            });
        }
        map.params_digest = to_hex(&model_digest(&digests));
        map.save(map_path)?;
        Ok(digests)
    };
    write_map(&mut map, &[], first.as_ref(), last.as_ref())?;

    let mut b = Breakdown {
        setup_seconds,
        ..Breakdown::default()
    };
    let mut losses = Vec::new();
    let mut step = 0u64;
    let examples_total = cfg.epochs as u64 * train.len() as u64;
    let mut examples_done = 0u64;
    let timeout = opts.step_timeout;
    for epoch in 0..cfg.epochs {
        let mut batches = train.batches(cfg.batch, epoch, cfg.seed);
        // The step whose forward pass is on the forward ring.
        let mut in_flight: Option<(u64, Vec<u8>)> = None;
        if let Some((x, labels)) = batches.next() {
            step += 1;
            let t = Instant::now();
            let h = match first.as_mut() {
                Some(s) => s.forward(step, &x)?,
                None => x,
            };
            b.client_compute_seconds += t.elapsed().as_secs_f64();
            send_forward(network, &mut fwd, step, h).await?;
            in_flight = Some((step, labels));
        }
        while let Some((s, labels)) = in_flight.take() {
            let during = format!("step {s} (forward pass)");
            let t = Instant::now();
            let y = match fwd.recv(timeout).await {
                Ok(JobMsg::Forward { step: got, tensor }) if got == s => tensor,
                Ok(other) => {
                    return Err(JobError::Invalid(format!(
                        "{during}: got a {} message",
                        other.name()
                    )))
                }
                Err(e) => return Err(with_probe(network, &during, &fwd, e).await),
            };
            b.waiting_seconds += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let logits = match last.as_mut() {
                Some(sl) => sl.forward(s, &y)?,
                None => y,
            };
            let (loss, mut grad) = softmax_cross_entropy(&logits, &labels)?;
            if let Some(sl) = last.as_mut() {
                grad = sl.backward(s, &grad)?;
            }
            b.client_compute_seconds += t.elapsed().as_secs_f64();
            let during = format!("step {s} (backward pass)");
            if let Err(e) = bwd
                .send(&JobMsg::Backward {
                    step: s,
                    tensor: grad,
                })
                .await
            {
                return Err(with_probe(network, &during, &bwd, e).await);
            }
            // Pipelining: the next batch travels to the first host while the
            // hosts run this step's backward pass; each host holds it until
            // its own backward pass is done, so the arithmetic is unchanged.
            // (With --keep-ends the first stage is ours and must finish its
            // backward pass first.)
            if first.is_none() {
                if let Some((x, next_labels)) = batches.next() {
                    step += 1;
                    send_forward(network, &mut fwd, step, x).await?;
                    in_flight = Some((step, next_labels));
                }
            }
            let t = Instant::now();
            let reply = match bwd.recv(timeout).await {
                Ok(r) => r,
                Err(e) => return Err(with_probe(network, &during, &bwd, e).await),
            };
            b.waiting_seconds += t.elapsed().as_secs_f64();
            match (reply, first.as_mut()) {
                (JobMsg::Ack { step: got }, None) if got == s => {}
                (JobMsg::Backward { step: got, tensor }, Some(f)) if got == s => {
                    let t = Instant::now();
                    f.backward(s, &tensor)?;
                    if let Some((x, next_labels)) = batches.next() {
                        step += 1;
                        let h = f.forward(step, &x)?;
                        b.client_compute_seconds += t.elapsed().as_secs_f64();
                        send_forward(network, &mut fwd, step, h).await?;
                        in_flight = Some((step, next_labels));
                    } else {
                        b.client_compute_seconds += t.elapsed().as_secs_f64();
                    }
                }
                (other, _) => {
                    return Err(JobError::Invalid(format!(
                        "{during}: got a {} message",
                        other.name()
                    )))
                }
            }
            losses.push(loss);
            examples_done += labels.len() as u64;
            on_step(StepInfo {
                step: s,
                epoch,
                loss,
                examples_done,
                examples_total,
            });
        }
        // A checkpoint per epoch: the slots persist, the map records it.
        let reports = control(
            network,
            &mut fwd,
            ControlOp::Checkpoint,
            &fwd_host_pos,
            timeout,
        )
        .await?;
        check_reports(&reports, &slot_ids)?;
        map.steps = step;
        write_map(&mut map, &reports, first.as_ref(), last.as_ref())?;
    }

    let (test_accuracy, _) = evaluate(
        network,
        &mut fwd,
        test,
        first.as_ref(),
        last.as_ref(),
        timeout,
    )
    .await?;
    let reports = control(network, &mut fwd, ControlOp::Finish, &fwd_host_pos, timeout).await?;
    check_reports(&reports, &slot_ids)?;
    map.steps = step;
    map.complete = true;
    let digests = write_map(&mut map, &reports, first.as_ref(), last.as_ref())?;
    b.client_crypto_seconds = (fwd.crypto + bwd.crypto).as_secs_f64();
    b.client_serialization_seconds = (fwd.codec + bwd.codec).as_secs_f64();
    b.bytes_sent = fwd.bytes_sent + bwd.bytes_sent;
    b.bytes_received = fwd.bytes_received + bwd.bytes_received;
    fwd.teardown().await;
    bwd.teardown().await;
    Ok(NetworkReport {
        steps: step,
        final_loss: losses.last().copied().unwrap_or(f32::NAN),
        losses,
        test_accuracy,
        seconds: started.elapsed().as_secs_f64(),
        params_digest: to_hex(&model_digest(&digests)),
        breakdown: b,
        route: route_lines,
    })
}

fn ring_setup_error(which: &str, e: RingError) -> JobError {
    JobError::Hop {
        during: format!("setting up the {which} ring"),
        peer: None,
        detail: e.to_string(),
    }
}

fn check_reports(reports: &[SlotReport], slot_ids: &[[u8; 16]]) -> Result<(), JobError> {
    for (r, id) in reports.iter().zip(slot_ids) {
        if r.slot_id != *id {
            return Err(JobError::Invalid(format!(
                "a host reported slot {} where {} was expected",
                hex::encode(r.slot_id),
                hex::encode(id)
            )));
        }
    }
    Ok(())
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
    let (network, listener) = (client.network(), client.listener());
    let owner = map.owner()?;
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
    let stages = arch.stages();
    let mut first = None;
    let mut last = None;
    let mut remote = Vec::new();
    for entry in &map.stages {
        match entry {
            StageEntry::Local { index, state, .. } => {
                let bytes = hex::decode(state)
                    .map_err(|_| JobError::Invalid("local stage state is not hex".into()))?;
                let slot = Slot::from_bytes(&bytes)?;
                if *index == 0 {
                    first = Some(slot);
                } else {
                    last = Some(slot);
                }
            }
            StageEntry::Remote {
                index,
                slot_id,
                host,
                ..
            } => {
                let peer: PeerId = host
                    .parse()
                    .map_err(|_| JobError::Invalid(format!("model map: bad peer id {host}")))?;
                let id: [u8; 16] = hex::decode(slot_id)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        JobError::Invalid(format!("model map: bad slot id {slot_id}"))
                    })?;
                remote.push((*index, peer, id));
            }
        }
    }
    // Fresh descriptors for the hosts (their onion keys rotate).
    let mut hosts = Vec::new();
    for (index, peer, _) in &remote {
        let c = match volunteers.iter().find(|v| v.peer_id == *peer) {
            Some(v) => Candidate::from(v),
            None => {
                let d = network
                    .get_descriptor(*peer)
                    .await
                    .map_err(|e| JobError::Hop {
                        during: "looking up the model's hosts".into(),
                        peer: Some(*peer),
                        detail: format!("the host of stage {index} ({peer}) cannot be found: {e}"),
                    })?;
                Candidate::from(&Volunteer {
                    peer_id: *peer,
                    descriptor: d,
                })
            }
        };
        hosts.push(c);
    }
    let candidates: Vec<Candidate> = volunteers.iter().map(Candidate::from).collect();
    let mut rng = rand::rngs::StdRng::from_rng(rand::rngs::OsRng)
        .map_err(|e| JobError::Invalid(e.to_string()))?;
    let mixes = choose_mixes(&candidates, &hosts, opts.mixes, &mut rng)?;
    let m = hosts.len();
    let keys: Vec<[u8; 32]> = (0..=m).map(|_| random()).collect();
    let max_batch = EVAL_BATCH as u32;
    let (limits, max_message) = limits(&stages, max_batch);
    let mut hops = Vec::new();
    let used: HashSet<PeerId> = hosts.iter().map(|h| h.peer).collect();
    if used.len() != hosts.len() {
        return Err(JobError::Invalid(
            "the model map names one host twice".into(),
        ));
    }
    for (j, ((index, _, slot_id), h)) in remote.iter().zip(&hosts).enumerate() {
        hops.extend(mixes[j].iter().map(mix_hop));
        let body = AssignmentBody {
            slot_id: *slot_id,
            owner: owner.public_key(),
            direction: Direction::Forward,
            infer_only: true,
            create: None,
            in_key: keys[j],
            out_key: keys[j + 1],
            first: false,
            skip_zero_inputs: false,
            max_batch,
            nonce: random(),
        };
        hops.push(RingHop {
            peer: h.peer,
            onion_key: h.onion_key,
            epoch: h.epoch,
            label: host_label(*index, Direction::Forward),
            role: HopRole::Host(Box::new(Assignment::sign(body, &owner, &h.onion_key)?)),
        });
    }
    hops.extend(mixes[m].iter().map(mix_hop));
    let mut ring = Ring::open(
        network,
        listener,
        hops,
        RingKeys {
            first_segment: keys[0],
            last_segment: keys[m],
        },
        limits,
        max_message,
        opts.setup_timeout,
    )
    .await
    .map_err(|e| ring_setup_error("inference", e))?;
    let (acc, examples) = evaluate(
        network,
        &mut ring,
        test,
        first.as_ref(),
        last.as_ref(),
        opts.step_timeout,
    )
    .await?;
    ring.teardown().await;
    Ok(InferReport {
        test_accuracy: acc,
        examples,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The model map's tensors decode with these limits (for callers that
/// inspect messages).
pub fn decode_limits_for(stages: &[StageSpec], max_batch: u32) -> DecodeLimits {
    limits(stages, max_batch).0
}
