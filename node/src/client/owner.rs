//! The owner's own exchanges with its model's slots: status, renew and
//! release. Each remote stage gets its own short ring (client → mixes →
//! host → mixes → client) under an assignment the owner signs, so one
//! host that is gone costs only its own stage, and a host learns nothing
//! it did not already know.

use std::time::Duration;

use libp2p::PeerId;
use mixnn_model::StageSpec;

use super::job::{control, limits, rng, JobError, JobOptions};
use super::model_map::{ModelMap, StageEntry};
use super::plan::{self, Layout, StageHost};
use super::ring::{Ring, RingError};
use super::route::{choose_mixes, Candidate};
use super::Client;
use crate::circuit::payload::{ControlOp, ErrorCode, SlotReport};
use crate::discovery::Volunteer;
use crate::network::Network;
use crate::store::SlotId;

/// What the owner asks of every slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerOp {
    /// Report version, steps, digest and lease; change nothing.
    Status,
    /// Extend the lease to at least this long from now.
    Renew(Duration),
    /// Free the slot.
    Release,
}

/// One remote stage of the map as the map names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapStage {
    pub index: usize,
    pub host: PeerId,
    pub slot_id: SlotId,
    /// The map's record of the slot's parameters after the job.
    pub params_digest: String,
    pub version: u64,
}

/// The remote stages of `map`, checked.
#[allow(clippy::result_large_err, reason = "cold error path")]
pub fn remote_stages(map: &ModelMap, stages: usize) -> Result<Vec<MapStage>, JobError> {
    let mut out: Vec<MapStage> = Vec::new();
    for entry in &map.stages {
        let StageEntry::Remote {
            index,
            slot_id,
            host,
            version,
            params_digest,
            ..
        } = entry
        else {
            continue;
        };
        let peer: PeerId = host
            .parse()
            .map_err(|_| JobError::Invalid(format!("model map: bad peer id {host}")))?;
        let id: SlotId = hex::decode(slot_id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| JobError::Invalid(format!("model map: bad slot id {slot_id}")))?;
        if *index >= stages {
            return Err(JobError::Invalid(format!(
                "model map: stage {index} of a {stages}-stage model"
            )));
        }
        if out.iter().any(|s| s.host == peer) {
            return Err(JobError::Invalid(
                "the model map names one host twice".into(),
            ));
        }
        out.push(MapStage {
            index: *index,
            host: peer,
            slot_id: id,
            params_digest: params_digest.clone(),
            version: *version,
        });
    }
    Ok(out)
}

/// The descriptor of `peer`: from the volunteers found, or looked up.
pub async fn find_host(
    network: &Network,
    volunteers: &[Volunteer],
    peer: PeerId,
) -> Result<Candidate, String> {
    if let Some(v) = volunteers.iter().find(|v| v.peer_id == peer) {
        return Ok(Candidate::from(v));
    }
    let descriptor = network
        .get_descriptor(peer)
        .await
        .map_err(|e| format!("its descriptor cannot be found: {e}"))?;
    Ok(Candidate::from(&Volunteer {
        peer_id: peer,
        descriptor,
    }))
}

/// How one stage answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageOutcome {
    /// The host answered with its slot's report (after a release: the
    /// slot is freed).
    Answered(SlotReport),
    /// The host holds no such slot any more.
    Gone,
    /// The host refused (another owner's slot, a host that no longer
    /// hosts layers).
    Refused(String),
    /// The host could not be found or did not answer.
    Unreachable(String),
}

/// One stage's answer.
#[derive(Clone, Debug)]
pub struct StageAnswer {
    pub stage: MapStage,
    pub outcome: StageOutcome,
}

/// Ask every remote stage of `map` to do `op`, each through its own ring.
pub async fn ask_stages(
    client: &Client,
    volunteers: &[Volunteer],
    map: &ModelMap,
    op: OwnerOp,
    opts: &JobOptions,
) -> Result<Vec<StageAnswer>, JobError> {
    let arch = mixnn_model::Arch::parse(&map.arch)
        .map_err(|e| JobError::Invalid(format!("model map arch: {e}")))?;
    let stages = arch.stages();
    let remote = remote_stages(map, stages.len())?;
    let mut answers = Vec::with_capacity(remote.len());
    // One stage at a time, each given a second try through new mixes: a
    // ring that could not be set up once is not yet a host that is gone.
    for stage in remote {
        let mut outcome = ask_stage(client, volunteers, map, &stages, &stage, op, opts).await;
        if matches!(outcome, StageOutcome::Unreachable(_)) {
            outcome = ask_stage(client, volunteers, map, &stages, &stage, op, opts).await;
        }
        answers.push(StageAnswer { stage, outcome });
    }
    Ok(answers)
}

async fn ask_stage(
    client: &Client,
    volunteers: &[Volunteer],
    map: &ModelMap,
    stages: &[StageSpec],
    stage: &MapStage,
    op: OwnerOp,
    opts: &JobOptions,
) -> StageOutcome {
    let network = client.network();
    let host = match find_host(network, volunteers, stage.host).await {
        Ok(c) => c,
        Err(e) => return StageOutcome::Unreachable(e),
    };
    let owner = match map.owner() {
        Ok(o) => o,
        Err(e) => return StageOutcome::Refused(e.to_string()),
    };
    let candidates: Vec<Candidate> = volunteers.iter().map(Candidate::from).collect();
    let Ok(mut rng) = rng() else {
        return StageOutcome::Unreachable("no randomness".into());
    };
    let mixes = match choose_mixes(
        &candidates,
        std::slice::from_ref(&host),
        opts.mixes,
        &mut rng,
    ) {
        Ok(m) => m,
        Err(e) => return StageOutcome::Unreachable(format!("no mixes for its ring: {e}")),
    };
    let layout = Layout {
        stages,
        seed: map.seed,
        optimizer: map.optimizer,
        max_batch: 1,
        lease_secs: match op {
            OwnerOp::Renew(d) => d.as_secs().max(1),
            OwnerOp::Status | OwnerOp::Release => 0,
        },
        aes_gcm: opts.aes_cells,
    };
    let hosts = [StageHost {
        stage: stage.index,
        host,
        slot_id: stage.slot_id,
    }];
    let planned = match plan::inference_ring(&layout, &hosts, &mixes, &owner, &mut rng) {
        Ok(p) => p,
        Err(e) => return StageOutcome::Refused(e.to_string()),
    };
    let host_pos = opts.mixes;
    let (limits, max_message) = limits(stages, 1);
    let mut ring = match Ring::open(
        network,
        client.listener(),
        planned.hops,
        planned.keys,
        limits,
        max_message,
        opts.setup_timeout,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return setup_outcome(e, host_pos),
    };
    let control_op = match op {
        OwnerOp::Release => ControlOp::Release,
        OwnerOp::Status | OwnerOp::Renew(_) => ControlOp::Digest,
    };
    let answer = control(
        network,
        &mut ring,
        control_op,
        &[host_pos],
        opts.step_timeout,
    )
    .await;
    ring.teardown().await;
    match answer {
        Ok(mut reports) if reports.len() == 1 => StageOutcome::Answered(reports.remove(0)),
        Ok(_) => StageOutcome::Refused("a reply without the slot's report".into()),
        Err(e) => classify(e),
    }
}

/// A ring that failed to open: the host's own refusal, or a hop that was
/// not there.
fn setup_outcome(e: RingError, host_pos: usize) -> StageOutcome {
    match &e {
        RingError::HopReported {
            index,
            code: ErrorCode::NoSuchSlot,
            ..
        } if *index == host_pos => StageOutcome::Gone,
        RingError::HopReported {
            index,
            code: ErrorCode::SlotRefused,
            detail,
            ..
        } if *index == host_pos => StageOutcome::Refused(detail.clone()),
        _ => StageOutcome::Unreachable(e.to_string()),
    }
}

fn classify(e: JobError) -> StageOutcome {
    StageOutcome::Unreachable(e.to_string())
}

/// The stages' answers with the map's own records: whether each slot's
/// parameters are still those the map recorded.
pub fn digest_matches(answer: &StageAnswer) -> Option<bool> {
    match &answer.outcome {
        StageOutcome::Answered(r) => {
            Some(hex::encode(r.params_digest) == answer.stage.params_digest)
        }
        _ => None,
    }
}
