//! What travels inside the onion and inside the cells. Pure.
//!
//! - [`HopPayload`]: the per-hop part of a circuit setup: the role the hop
//!   plays and, for a layer host, its slot assignment signed by the model's
//!   owner and the segment keys it shares with its neighbouring layer hosts.
//! - [`JobMsg`]: a message between layer hosts (and the client) on a
//!   segment: activations, gradients, acknowledgements, control.
//! - Reports: a hop seals what only the client may read (errors, digests)
//!   with a key from its onion secrets; relays pass them on unopened.

use mixnn_crypto::aead::CellAead;
use mixnn_crypto::cells::{CellSuite, MessageSource};
use mixnn_crypto::onion::HOP_PAYLOAD_BYTES;
use mixnn_crypto::{verify_signature, Identity};
use mixnn_model::tensor::{Encoding, StreamDecoder};
use mixnn_model::{DecodeLimits, HostTensor, InitSpec, OptimizerSpec, StageSpec};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::admission::{leading_zeros, work_bits};
use crate::store::SlotId;

const AUTH_DOMAIN: &[u8] = b"mixnn-slot-auth-v1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("hop payload is malformed")]
    Malformed,
    #[error("hop payload of {0} bytes exceeds the onion's per-hop capacity")]
    TooLarge(usize),
    #[error("the owner's signature on the slot assignment does not verify")]
    BadAuth,
    #[error("job message is malformed: {0}")]
    BadMessage(&'static str),
    #[error("sealed report does not open")]
    BadReport,
}

/// Which ring a layer host's circuit belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// Activations from the previous layer host to the next.
    Forward,
    /// Gradients from the next layer host to the previous.
    Backward,
}

/// Create the slot if the host does not hold it yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotCreate {
    pub stage: StageSpec,
    pub init: InitSpec,
    pub optimizer: OptimizerSpec,
}

/// The part of a layer host's assignment the owner signs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AssignmentBody {
    pub slot_id: SlotId,
    /// The model owner's ed25519 key.
    pub owner: [u8; 32],
    pub direction: Direction,
    /// Only inference: the host refuses training messages.
    pub infer_only: bool,
    pub create: Option<SlotCreate>,
    /// Segment key shared with the previous layer host (or the client).
    pub in_key: [u8; 32],
    /// Segment key shared with the next layer host (or the client).
    pub out_key: [u8; 32],
    /// The cipher suite of the cells under `in_key` (the client's choice:
    /// AES-256-GCM where both ends of the segment offer it).
    pub in_suite: CellSuite,
    /// The cipher suite of the cells under `out_key`.
    pub out_suite: CellSuite,
    /// The first stage of the model: on the backward ring it acknowledges
    /// instead of sending an input gradient nobody needs.
    pub first: bool,
    /// The previous stage ends with a ReLU: on the backward ring, send the
    /// input gradient as `+0.0` wherever the input was `+0.0` (exact; see
    /// `mixnn_model::InputGrad`), which makes it as sparse as the
    /// activations.
    pub skip_zero_inputs: bool,
    /// Largest batch the client will send (bounds message sizes).
    pub max_batch: u32,
    /// Names one run of the job: the forward and backward circuits of a run
    /// share it and share the slot in memory; a bind with another session
    /// retires the circuits of the earlier one (after a failover).
    pub session: [u8; 16],
    /// Where this host's state goes in the job's state messages (training
    /// forward circuits only).
    pub state: Option<StateWindow>,
    /// How long the slot should live after this use, in seconds (the host
    /// caps it with its own maximum); 0 leaves the lease as it is (a
    /// status query).
    pub lease_secs: u64,
    /// Fresh per setup, so two signatures never cover the same bytes.
    pub nonce: [u8; 16],
}

/// A host's place in a state message ([`JobMsg::State`]): every host of
/// the ring sees a blob of `total` bytes and reads or writes only
/// `offset..offset + len`, its own state sealed between it and the owner.
/// A host learns nothing of the other stages but the blob's total size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateWindow {
    pub offset: u32,
    pub len: u32,
    pub total: u32,
}

impl StateWindow {
    /// Largest state blob a host accepts.
    pub const MAX_TOTAL: u32 = 200 << 20;

    /// The window's byte range, if it lies inside a blob of `total` bytes
    /// and can hold a sealed state.
    pub fn range(&self) -> Option<std::ops::Range<usize>> {
        let end = self.offset.checked_add(self.len)?;
        (end <= self.total && self.total <= Self::MAX_TOTAL && self.len as usize >= STATE_OVERHEAD)
            .then_some(self.offset as usize..end as usize)
    }
}

/// A layer host's assignment with the owner's signature over the body and
/// the host's onion key (so it is good for this host and epoch only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub body: AssignmentBody,
    pub signature: ([u8; 32], [u8; 32]),
}

fn auth_message(body: &AssignmentBody, hop_onion_key: &[u8; 32]) -> Result<Vec<u8>, PayloadError> {
    let mut m = AUTH_DOMAIN.to_vec();
    m.extend_from_slice(hop_onion_key);
    m.extend_from_slice(&postcard::to_allocvec(body).map_err(|_| PayloadError::Malformed)?);
    Ok(m)
}

const WORK_DOMAIN: &str = "mixnn slot claim work v1";

impl AssignmentBody {
    /// Leading zero bits the claim's work hash must have: 0 unless the body
    /// creates a slot, then [`work_bits`] of the slot's stored size.
    pub fn work_bits(&self) -> u32 {
        self.create.as_ref().map_or(0, |c| {
            work_bits(mixnn_model::max_state_bytes(&c.stage, &c.optimizer) as u64)
        })
    }

    /// The work hash as far as the nonce: the host's onion key and the body
    /// up to its last field, the nonce (postcard writes the nonce's 16
    /// bytes last, unframed).
    fn work_prefix(&self, hop_onion_key: &[u8; 32]) -> Result<blake3::Hasher, PayloadError> {
        let bytes = postcard::to_allocvec(self).map_err(|_| PayloadError::Malformed)?;
        let head = bytes
            .len()
            .checked_sub(self.nonce.len())
            .filter(|&h| bytes[h..] == self.nonce)
            .ok_or(PayloadError::Malformed)?;
        let mut h = blake3::Hasher::new_derive_key(WORK_DOMAIN);
        h.update(hop_onion_key);
        h.update(&bytes[..head]);
        Ok(h)
    }

    /// Choose the nonce so that the claim carries its work for the host
    /// with `hop_onion_key`: about `2^work_bits` hashes. Bound to the
    /// host, the slot, the owner and every other field.
    ///
    /// The nonce's first 8 bytes count up from 0 and the first count that
    /// works is taken, as a search one count after another would take it;
    /// the counts are tried a block at a time on every core of rayon's
    /// pool.
    pub fn solve_work(&mut self, hop_onion_key: &[u8; 32]) -> Result<(), PayloadError> {
        use rayon::prelude::*;
        /// Counts per block: a few milliseconds of hashing on one core.
        const BLOCK: u64 = 1 << 14;
        let bits = self.work_bits();
        if bits == 0 {
            return Ok(());
        }
        let prefix = self.work_prefix(hop_onion_key)?;
        let with_count = |counter: u64| {
            let mut nonce = self.nonce;
            nonce[..8].copy_from_slice(&counter.to_le_bytes());
            nonce
        };
        let works = |counter: &u64| {
            let mut h = prefix.clone();
            h.update(&with_count(*counter));
            leading_zeros(h.finalize().as_bytes()) >= bits
        };
        let mut start = 0u64;
        while let Some(end) = start.checked_add(BLOCK) {
            if let Some(counter) = (start..end).into_par_iter().find_first(works) {
                self.nonce = with_count(counter);
                return Ok(());
            }
            start = end;
        }
        Err(PayloadError::Malformed)
    }

    /// Whether the claim carries the work it needs for this host.
    pub fn has_work(&self, hop_onion_key: &[u8; 32]) -> bool {
        let bits = self.work_bits();
        if bits == 0 {
            return true;
        }
        let Ok(mut h) = self.work_prefix(hop_onion_key) else {
            return false;
        };
        h.update(&self.nonce);
        leading_zeros(h.finalize().as_bytes()) >= bits
    }
}

impl Assignment {
    /// Sign `body` for the host with `hop_onion_key`; a body that creates a
    /// slot first gets its proof of work ([`AssignmentBody::solve_work`]),
    /// which takes a moment (2^16 hashes for a small layer).
    pub fn sign(
        mut body: AssignmentBody,
        owner: &Identity,
        hop_onion_key: &[u8; 32],
    ) -> Result<Self, PayloadError> {
        body.solve_work(hop_onion_key)?;
        Self::sign_as_is(body, owner, hop_onion_key)
    }

    /// Sign `body` without doing its work (tests of hosts that refuse it).
    #[doc(hidden)]
    pub fn sign_as_is(
        body: AssignmentBody,
        owner: &Identity,
        hop_onion_key: &[u8; 32],
    ) -> Result<Self, PayloadError> {
        let sig = owner.sign(&auth_message(&body, hop_onion_key)?);
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a.copy_from_slice(&sig[..32]);
        b.copy_from_slice(&sig[32..]);
        Ok(Self {
            body,
            signature: (a, b),
        })
    }

    /// Check the owner's signature for this host's onion key.
    pub fn verify(&self, hop_onion_key: &[u8; 32]) -> Result<(), PayloadError> {
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&self.signature.0);
        sig[32..].copy_from_slice(&self.signature.1);
        verify_signature(
            &self.body.owner,
            &auth_message(&self.body, hop_onion_key)?,
            &sig,
        )
        .map_err(|_| PayloadError::BadAuth)
    }
}

/// The role a hop plays in a circuit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HopRole {
    /// Forward cells by circuit id; see no plaintext.
    Mix,
    /// Run a slot.
    Host(Box<Assignment>),
    /// The client's own end of a ring; `tag` names the circuit.
    End { tag: [u8; 16] },
}

/// Everything one hop learns from its onion layer besides its next hop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HopPayload {
    /// Epoch of the next hop's onion key (0 at the end).
    pub next_epoch: u64,
    pub role: HopRole,
}

impl HopPayload {
    pub fn encode(&self) -> Result<Vec<u8>, PayloadError> {
        let bytes = postcard::to_allocvec(self).map_err(|_| PayloadError::Malformed)?;
        if bytes.len() > HOP_PAYLOAD_BYTES {
            return Err(PayloadError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        if bytes.len() > HOP_PAYLOAD_BYTES {
            return Err(PayloadError::TooLarge(bytes.len()));
        }
        let (p, rest): (HopPayload, _) =
            postcard::take_from_bytes(bytes).map_err(|_| PayloadError::Malformed)?;
        if !rest.is_empty() {
            return Err(PayloadError::Malformed);
        }
        Ok(p)
    }
}

/// Control operations that travel the forward ring through every host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlOp {
    /// Persist the slot; report its version and digest.
    Checkpoint,
    /// Report the params digest only.
    Digest,
    /// Persist and report; the job is over.
    Finish,
    /// Free the slot: delete its parameters and report once more.
    Release,
}

/// What a host tells the client about its slot, sealed to the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotReport {
    pub slot_id: SlotId,
    pub version: u64,
    pub steps_applied: u64,
    pub params_digest: [u8; 32],
    /// When the slot's lease ends (unix seconds); 0 once it was released.
    pub lease_until: u64,
}

/// What a hop tells the client when it gives up, sealed to the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub code: ErrorCode,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The next hop could not be reached or its stream broke.
    NextHopFailed,
    /// The previous hop's stream broke or went silent.
    PrevHopFailed,
    /// The host refused the slot assignment.
    SlotRefused,
    /// A message did not decrypt or decode.
    BadMessage,
    /// The slot's computation failed.
    Compute,
    /// The host holds no slot of that id (never had it, or freed it).
    NoSuchSlot,
}

const MAX_REPORTS: usize = 64;
const MAX_REPORT_BYTES: usize = 256;
const MAX_DETAIL: usize = 200;

/// A message on a segment.
#[derive(Clone, Debug, PartialEq)]
pub enum JobMsg {
    /// Training forward pass of `step`.
    Forward { step: u64, tensor: HostTensor },
    /// Inference pass (keeps nothing).
    Infer { step: u64, tensor: HostTensor },
    /// Output gradient of `step`.
    Backward { step: u64, tensor: HostTensor },
    /// The first stage finished `step`'s backward pass.
    Ack { step: u64 },
    /// A control operation, with the sealed reports of the hosts before.
    Control {
        op: ControlOp,
        reports: Vec<Vec<u8>>,
    },
    /// The slots' states at `step`, each host's in its [`StateWindow`].
    State {
        op: StateOp,
        step: u64,
        blob: Vec<u8>,
    },
}

/// A [`JobMsg`]'s encoding in the making ([`JobMsg::encoding`]).
pub struct JobEncoding<'a> {
    head: [u8; 10],
    head_len: usize,
    body: JobBody<'a>,
    len: usize,
    /// Bytes written so far.
    at: usize,
}

enum JobBody<'a> {
    Tensor(Encoding<'a>),
    Bytes(&'a [u8]),
    Owned(Vec<u8>),
}

impl MessageSource for JobEncoding<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn fill(&mut self, dst: &mut [u8]) {
        let mut out = 0;
        if self.at < self.head_len {
            let n = (self.head_len - self.at).min(dst.len());
            dst[..n].copy_from_slice(&self.head[self.at..self.at + n]);
            out = n;
        }
        let rest = &mut dst[out..];
        let from = (self.at + out).saturating_sub(self.head_len);
        match &mut self.body {
            JobBody::Tensor(e) => {
                e.fill(rest);
            }
            JobBody::Bytes(b) => rest.copy_from_slice(&b[from..from + rest.len()]),
            JobBody::Owned(b) => rest.copy_from_slice(&b[from..from + rest.len()]),
        }
        self.at += dst.len();
    }
}

/// The kind of a [`JobMsg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgKind {
    Forward,
    Infer,
    Backward,
    Ack,
    Control,
    State,
}

impl MsgKind {
    pub fn name(self) -> &'static str {
        match self {
            MsgKind::Forward => "forward",
            MsgKind::Infer => "infer",
            MsgKind::Backward => "backward",
            MsgKind::Ack => "ack",
            MsgKind::Control => "control",
            MsgKind::State => "state",
        }
    }
}

/// A message's header ([`JobMsg::peek`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgHead {
    pub kind: MsgKind,
    /// A tensor's rank and dims (the first `rank` count).
    pub shape: Option<(usize, [usize; mixnn_model::tensor::MAX_RANK])>,
    /// Bytes after the kind and step.
    pub body_len: usize,
}

/// What a state message asks of the hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateOp {
    /// Write your state after `step` steps, sealed to the owner.
    Checkpoint,
    /// Replace your state with the one the owner sealed to you; it is the
    /// state after `step` steps.
    Restore,
}

const K_FORWARD: u8 = 1;
const K_INFER: u8 = 2;
const K_BACKWARD: u8 = 3;
const K_ACK: u8 = 4;
const K_CONTROL: u8 = 5;
const K_STATE: u8 = 6;

impl JobMsg {
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), PayloadError> {
        out.clear();
        match self {
            JobMsg::Forward { step, tensor }
            | JobMsg::Infer { step, tensor }
            | JobMsg::Backward { step, tensor } => {
                let kind = match self {
                    JobMsg::Forward { .. } => K_FORWARD,
                    JobMsg::Infer { .. } => K_INFER,
                    _ => K_BACKWARD,
                };
                out.reserve(9 + tensor.max_encoded_len());
                out.push(kind);
                out.extend_from_slice(&step.to_le_bytes());
                tensor.encode_into(out);
            }
            JobMsg::Ack { step } => {
                out.push(K_ACK);
                out.extend_from_slice(&step.to_le_bytes());
            }
            JobMsg::Control { op, reports } => {
                if reports.len() > MAX_REPORTS || reports.iter().any(|r| r.len() > MAX_REPORT_BYTES)
                {
                    return Err(PayloadError::BadMessage("too many or too large reports"));
                }
                out.push(K_CONTROL);
                out.extend_from_slice(&0u64.to_le_bytes());
                out.extend_from_slice(
                    &postcard::to_allocvec(&(op, reports)).map_err(|_| PayloadError::Malformed)?,
                );
            }
            JobMsg::State { op, step, blob } => {
                out.reserve(10 + blob.len());
                out.push(K_STATE);
                out.extend_from_slice(&step.to_le_bytes());
                out.push(match op {
                    StateOp::Checkpoint => 1,
                    StateOp::Restore => 2,
                });
                out.extend_from_slice(blob);
            }
        }
        Ok(())
    }

    /// The encoding, written straight into the cells that carry it
    /// ([`MessageSource`]): a tensor is encoded a cell's worth at a time,
    /// a state's blob copied from where it lies. The same bytes as
    /// [`JobMsg::encode_into`].
    pub fn encoding(&self) -> Result<JobEncoding<'_>, PayloadError> {
        let mut head = [0u8; 10];
        let (head_len, body) = match self {
            JobMsg::Forward { step, tensor }
            | JobMsg::Infer { step, tensor }
            | JobMsg::Backward { step, tensor } => {
                head[0] = match self {
                    JobMsg::Forward { .. } => K_FORWARD,
                    JobMsg::Infer { .. } => K_INFER,
                    _ => K_BACKWARD,
                };
                head[1..9].copy_from_slice(&step.to_le_bytes());
                (9, JobBody::Tensor(tensor.encoding()))
            }
            JobMsg::State { op, step, blob } => {
                head[0] = K_STATE;
                head[1..9].copy_from_slice(&step.to_le_bytes());
                head[9] = match op {
                    StateOp::Checkpoint => 1,
                    StateOp::Restore => 2,
                };
                (10, JobBody::Bytes(blob))
            }
            JobMsg::Ack { .. } | JobMsg::Control { .. } => (0, JobBody::Owned(self.encode()?)),
        };
        let len = head_len
            + match &body {
                JobBody::Tensor(e) => e.len(),
                JobBody::Bytes(b) => b.len(),
                JobBody::Owned(b) => b.len(),
            };
        Ok(JobEncoding {
            head,
            head_len,
            body,
            len,
            at: 0,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, PayloadError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<Self, PayloadError> {
        if bytes.len() < 9 {
            return Err(PayloadError::BadMessage("shorter than its header"));
        }
        let step = u64::from_le_bytes(
            bytes[1..9]
                .try_into()
                .map_err(|_| PayloadError::Malformed)?,
        );
        let body = &bytes[9..];
        let tensor =
            || HostTensor::decode(body, limits).map_err(|_| PayloadError::BadMessage("bad tensor"));
        Ok(match bytes[0] {
            K_FORWARD => JobMsg::Forward {
                step,
                tensor: tensor()?,
            },
            K_INFER => JobMsg::Infer {
                step,
                tensor: tensor()?,
            },
            K_BACKWARD => JobMsg::Backward {
                step,
                tensor: tensor()?,
            },
            K_ACK if body.is_empty() => JobMsg::Ack { step },
            K_CONTROL => {
                if body.len() > MAX_REPORTS * (MAX_REPORT_BYTES + 2) + 16 {
                    return Err(PayloadError::BadMessage("control message too large"));
                }
                let ((op, reports), rest): ((ControlOp, Vec<Vec<u8>>), _) =
                    postcard::take_from_bytes(body)
                        .map_err(|_| PayloadError::BadMessage("bad control"))?;
                if !rest.is_empty()
                    || reports.len() > MAX_REPORTS
                    || reports.iter().any(|r| r.len() > MAX_REPORT_BYTES)
                {
                    return Err(PayloadError::BadMessage("bad control"));
                }
                JobMsg::Control { op, reports }
            }
            // The blob's size is bounded by the message reader's limit.
            K_STATE => JobMsg::State {
                op: match body.first() {
                    Some(1) => StateOp::Checkpoint,
                    Some(2) => StateOp::Restore,
                    _ => return Err(PayloadError::BadMessage("bad state op")),
                },
                step,
                blob: body[1..].to_vec(),
            },
            _ => return Err(PayloadError::BadMessage("unknown kind")),
        })
    }

    /// What a message is, read from its header without decoding it:
    /// nothing is allocated, so a host checks the kind and the tensor's
    /// shape against its slot before the message may cost more than its
    /// own bytes.
    pub fn peek(bytes: &[u8]) -> Result<MsgHead, PayloadError> {
        Self::peek_prefix(bytes, bytes.len())
    }

    /// [`JobMsg::peek`] on the first bytes of a message of `total` bytes
    /// (enough of them for its header: [`JobDecoder`] waits for
    /// [`PEEK_BYTES`] or the whole message).
    pub fn peek_prefix(bytes: &[u8], total: usize) -> Result<MsgHead, PayloadError> {
        if bytes.len() < 9 || total < bytes.len() {
            return Err(PayloadError::BadMessage("shorter than its header"));
        }
        let body = &bytes[9..];
        let body_len = total - 9;
        let tensor = |kind| {
            let (rank, dims, _) =
                HostTensor::peek_shape(body).map_err(|_| PayloadError::BadMessage("bad tensor"))?;
            Ok::<_, PayloadError>(MsgHead {
                kind,
                shape: Some((rank, dims)),
                body_len,
            })
        };
        match bytes[0] {
            K_FORWARD => tensor(MsgKind::Forward),
            K_INFER => tensor(MsgKind::Infer),
            K_BACKWARD => tensor(MsgKind::Backward),
            k => Ok(MsgHead {
                kind: match k {
                    K_ACK => MsgKind::Ack,
                    K_CONTROL => MsgKind::Control,
                    K_STATE => MsgKind::State,
                    _ => return Err(PayloadError::BadMessage("unknown kind")),
                },
                shape: None,
                body_len,
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            JobMsg::Forward { .. } => "forward",
            JobMsg::Infer { .. } => "infer",
            JobMsg::Backward { .. } => "backward",
            JobMsg::Ack { .. } => "ack",
            JobMsg::Control { .. } => "control",
            JobMsg::State { .. } => "state",
        }
    }
}

/// Bytes of a message that hold its header and a tensor's shape: kind,
/// step, the tensor's rank byte and its dims at the highest rank.
pub const PEEK_BYTES: usize = 9 + 1 + 4 * mixnn_model::tensor::MAX_RANK;

/// Decodes a job message while its cells arrive. Once the first
/// [`PEEK_BYTES`] are in (or all of a shorter message), its header goes
/// through the caller's check (the host's: does this circuit carry such a
/// message, and how large may its tensor be), and a tensor message's
/// elements are decoded as the rest comes in; other messages are decoded
/// whole at the end. Whatever the pieces, it gives what [`JobMsg::peek`],
/// the check and [`JobMsg::decode`] give on the whole message.
#[derive(Debug, Default)]
pub struct JobDecoder {
    started: Option<Started>,
}

#[derive(Debug)]
struct Started {
    kind: MsgKind,
    step: u64,
    limits: DecodeLimits,
    tensor: Option<StreamDecoder>,
}

impl JobDecoder {
    /// Feeds the first bytes of a message of `total` bytes; `check` sees
    /// its header once, and its limits bound the tensor.
    pub fn feed<E: From<PayloadError>>(
        &mut self,
        prefix: &[u8],
        total: usize,
        check: impl FnOnce(&MsgHead) -> Result<DecodeLimits, E>,
    ) -> Result<(), E> {
        let started = match self.started.as_mut() {
            Some(s) => s,
            None => {
                if prefix.len() < PEEK_BYTES.min(total) {
                    return Ok(());
                }
                let head = JobMsg::peek_prefix(prefix, total)?;
                let limits = check(&head)?;
                let step = u64::from_le_bytes(
                    prefix[1..9]
                        .try_into()
                        .map_err(|_| PayloadError::Malformed)?,
                );
                self.started.insert(Started {
                    kind: head.kind,
                    step,
                    limits,
                    tensor: None,
                })
            }
        };
        if !matches!(
            started.kind,
            MsgKind::Forward | MsgKind::Infer | MsgKind::Backward
        ) {
            return Ok(());
        }
        let body = &prefix[9..];
        match started.tensor.as_mut() {
            Some(t) => t
                .feed(body)
                .map_err(|_| PayloadError::BadMessage("bad tensor"))?,
            None => {
                started.tensor = StreamDecoder::start(body, total - 9, started.limits)
                    .map_err(|_| PayloadError::BadMessage("bad tensor"))?;
                if let Some(t) = started.tensor.as_mut() {
                    t.feed(body)
                        .map_err(|_| PayloadError::BadMessage("bad tensor"))?;
                }
            }
        }
        Ok(())
    }

    /// The whole message: checks and decodes what is left, and is ready
    /// for the next message.
    pub fn finish<E: From<PayloadError>>(
        &mut self,
        msg: &[u8],
        check: impl FnOnce(&MsgHead) -> Result<DecodeLimits, E>,
    ) -> Result<JobMsg, E> {
        let r = self.feed(msg, msg.len(), check);
        let started = self.started.take();
        r?;
        // Fed the whole message, `feed` either started or refused it.
        let s = started.ok_or(PayloadError::Malformed)?;
        let tensor = match s.tensor {
            Some(t) => t
                .finish(&msg[9..])
                .map_err(|_| PayloadError::BadMessage("bad tensor"))?,
            None => return Ok(JobMsg::decode(msg, s.limits)?),
        };
        let step = s.step;
        Ok(match s.kind {
            MsgKind::Forward => JobMsg::Forward { step, tensor },
            MsgKind::Infer => JobMsg::Infer { step, tensor },
            _ => JobMsg::Backward { step, tensor },
        })
    }

    /// Drops a message in progress (its circuit ends).
    pub fn reset(&mut self) {
        self.started = None;
    }
}

/// Seal `plain` for the client with `key` (random nonce prepended).
pub fn seal_report(key: &[u8; 32], plain: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 12 + plain.len() + 16];
    out[12..12 + plain.len()].copy_from_slice(plain);
    // Encryption with a valid key and a small buffer cannot fail; should
    // it, the nonce alone goes out, never the plaintext.
    if seal_in_place(key, &mut out).is_err() {
        out.truncate(12);
    }
    out
}

/// Seal `buf` where it is: a random nonce into its first 12 bytes, the
/// bytes between them and its last 16 encrypted, the tag into those 16.
/// What [`open_report`] opens. ChaCha20-Poly1305 through the cells'
/// fastest implementation ([`CellAead`]): a checkpoint seals megabytes.
fn seal_in_place(key: &[u8; 32], buf: &mut [u8]) -> Result<(), PayloadError> {
    if buf.len() < 12 + 16 {
        return Err(PayloadError::BadMessage("no room for a nonce and a tag"));
    }
    let (nonce, rest) = buf.split_at_mut(12);
    let (plain, tag) = rest.split_at_mut(rest.len() - 16);
    rand::rngs::OsRng.fill_bytes(nonce);
    let nonce: [u8; 12] = (&*nonce)
        .try_into()
        .map_err(|_| PayloadError::BadMessage("sealing failed"))?;
    let sealed = CellAead::new(key)
        .seal_in_place(&nonce, b"", plain)
        .ok_or(PayloadError::BadMessage("sealing failed"))?;
    tag.copy_from_slice(&sealed);
    Ok(())
}

/// Open what [`seal_report`] (or [`seal_state`]) sealed: nonce,
/// ciphertext, tag.
pub fn open_report(key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, PayloadError> {
    if sealed.len() < 12 + 16 {
        return Err(PayloadError::BadReport);
    }
    let (nonce, rest) = sealed.split_at(12);
    let (ciphertext, tag) = rest.split_at(rest.len() - 16);
    let (Ok(nonce), Ok(tag)) = (<[u8; 12]>::try_from(nonce), <[u8; 16]>::try_from(tag)) else {
        return Err(PayloadError::BadReport);
    };
    let mut plain = vec![0u8; ciphertext.len()];
    if !CellAead::new(key).open_to(&nonce, b"", ciphertext, &tag, &mut plain) {
        return Err(PayloadError::BadReport);
    }
    Ok(plain)
}

/// Key labels derived from a hop's onion secrets.
pub const REPORT_KEY: &str = "mixnn/report";
pub const ERROR_KEY: &str = "mixnn/error";

pub fn seal_error(key: &[u8; 32], code: ErrorCode, detail: &str) -> Vec<u8> {
    let mut detail = detail.to_string();
    if detail.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
    }
    let plain = postcard::to_allocvec(&ErrorReport { code, detail }).unwrap_or_default();
    seal_report(key, &plain)
}

pub fn open_error(key: &[u8; 32], sealed: &[u8]) -> Result<ErrorReport, PayloadError> {
    let plain = open_report(key, sealed)?;
    postcard::from_bytes(&plain).map_err(|_| PayloadError::BadReport)
}

/// Key label for a host's state sealed to the owner (checkpoints).
pub const STATE_UP_KEY: &str = "mixnn/state/to-owner";
/// Key label for a state the owner seals to a host (restores).
pub const STATE_DOWN_KEY: &str = "mixnn/state/to-host";

/// Bytes a sealed state adds to the state itself: nonce, length, tag.
pub const STATE_OVERHEAD: usize = 12 + 8 + 16;

/// The window a state of at most `capacity` bytes needs.
pub fn state_window_len(capacity: usize) -> usize {
    capacity + STATE_OVERHEAD
}

/// Seal `state` into `window` (its whole length): length-prefixed and
/// zero-padded, so every state of the stage seals to the same size. The
/// bytes are [`seal_report`]'s (nonce, ciphertext, tag), written in place:
/// a state of megabytes is copied once, with no buffer beside the window.
pub fn seal_state(key: &[u8; 32], state: &[u8], window: &mut [u8]) -> Result<(), PayloadError> {
    let plain_len = window
        .len()
        .checked_sub(STATE_OVERHEAD - 8)
        .ok_or(PayloadError::BadMessage("state window too small"))?;
    if state.len() + 8 > plain_len {
        return Err(PayloadError::BadMessage("state larger than its window"));
    }
    let (len, body) = window[12..12 + plain_len].split_at_mut(8);
    len.copy_from_slice(&(state.len() as u64).to_le_bytes());
    let (filled, padding) = body.split_at_mut(state.len());
    filled.copy_from_slice(state);
    padding.fill(0);
    seal_in_place(key, window)
}

/// Open a window sealed by [`seal_state`].
pub fn open_state(key: &[u8; 32], window: &[u8]) -> Result<Vec<u8>, PayloadError> {
    let mut plain = open_report(key, window)?;
    let len = plain
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(PayloadError::BadReport)?;
    if len > (plain.len() - 8) as u64 {
        return Err(PayloadError::BadReport);
    }
    plain.truncate(8 + len as usize);
    plain.drain(..8);
    Ok(plain)
}

pub fn seal_slot_report(key: &[u8; 32], report: &SlotReport) -> Vec<u8> {
    seal_report(key, &postcard::to_allocvec(report).unwrap_or_default())
}

pub fn open_slot_report(key: &[u8; 32], sealed: &[u8]) -> Result<SlotReport, PayloadError> {
    let plain = open_report(key, sealed)?;
    postcard::from_bytes(&plain).map_err(|_| PayloadError::BadReport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_state_is_a_sealed_report_of_its_length_state_and_zeros() {
        let key = [7u8; 32];
        for (state_len, window_len) in [(0, STATE_OVERHEAD), (5, 64), (1000, 1000 + STATE_OVERHEAD)]
        {
            let state: Vec<u8> = (0..state_len).map(|i| (i * 31 % 251) as u8).collect();
            let mut window = vec![0xAAu8; window_len];
            seal_state(&key, &state, &mut window).expect("seal");
            // The same bytes the allocating sealer makes: nonce, then the
            // ciphertext and tag of length, state and zero padding.
            let plain = open_report(&key, &window).expect("opens as a report");
            let mut want = (state_len as u64).to_le_bytes().to_vec();
            want.extend_from_slice(&state);
            want.resize(window_len - STATE_OVERHEAD + 8, 0);
            assert_eq!(plain, want);
            assert_eq!(open_state(&key, &window).expect("opens"), state);
        }
        let mut small = vec![0u8; STATE_OVERHEAD - 9];
        assert!(seal_state(&key, &[], &mut small).is_err());
        let mut tight = vec![0u8; STATE_OVERHEAD + 3];
        assert!(seal_state(&key, &[1, 2, 3, 4], &mut tight).is_err());
        assert!(seal_state(&key, &[1, 2, 3], &mut tight).is_ok());
    }

    /// Sealed states and reports are ChaCha20-Poly1305 (RFC 8439) as the
    /// RustCrypto crate makes it, whichever implementation seals here: a
    /// checkpoint from a host of an earlier version opens, and the other
    /// way round. Sizes around a cell and a slot's megabytes; a flipped
    /// bit is refused.
    #[test]
    fn states_and_reports_are_the_chacha20poly1305_of_the_reference_crate() {
        use chacha20poly1305::aead::{Aead, KeyInit};
        use chacha20poly1305::{ChaCha20Poly1305, Nonce};
        for (i, len) in [0usize, 1, 63, 64, 65, 4095, 65_536, 1 << 20, 3_215_429]
            .into_iter()
            .enumerate()
        {
            let key = [i as u8 + 1; 32];
            let plain: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
            let reference = ChaCha20Poly1305::new(&key.into());
            // Ours sealed, the crate opens.
            let sealed = seal_report(&key, &plain);
            let opened = reference
                .decrypt(Nonce::from_slice(&sealed[..12]), &sealed[12..])
                .expect("the crate opens what this node sealed");
            assert_eq!(opened, plain);
            // The crate sealed, ours opens.
            let nonce = [i as u8 ^ 0x5A; 12];
            let mut theirs = nonce.to_vec();
            theirs.extend(
                reference
                    .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
                    .expect("seal"),
            );
            assert_eq!(open_report(&key, &theirs).expect("opens"), plain);
            let last = theirs.len() - 1;
            theirs[last] ^= 1;
            assert!(open_report(&key, &theirs).is_err());
        }
        assert!(open_report(&[1; 32], &[0; 27]).is_err());
    }
    use mixnn_model::Arch;

    fn body(create: bool) -> AssignmentBody {
        let stage = Arch::parse("mlp:784-512-256-10")
            .expect("arch")
            .stages()
            .remove(0);
        AssignmentBody {
            slot_id: [1; 16],
            owner: [0; 32],
            direction: Direction::Forward,
            infer_only: false,
            create: create.then_some(SlotCreate {
                stage,
                init: InitSpec {
                    seed: 7,
                    stage_index: 0,
                },
                optimizer: OptimizerSpec::Adam {
                    lr: 0.001,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
            }),
            in_key: [2; 32],
            out_key: [3; 32],
            in_suite: Default::default(),
            out_suite: Default::default(),
            first: true,
            skip_zero_inputs: false,
            max_batch: 256,
            session: [5; 16],
            state: Some(StateWindow {
                offset: 1 << 20,
                len: 1 << 20,
                total: 3 << 20,
            }),
            lease_secs: 7 * 24 * 3600,
            nonce: [4; 16],
        }
    }

    #[test]
    fn assignment_fits_the_onion_and_verifies_only_for_its_host() {
        let owner = Identity::generate();
        let mut b = body(true);
        b.owner = owner.public_key();
        let a = Assignment::sign(b, &owner, &[9; 32]).expect("sign");
        let p = HopPayload {
            next_epoch: 5,
            role: HopRole::Host(Box::new(a.clone())),
        };
        let bytes = p.encode().expect("fits");
        assert!(bytes.len() <= HOP_PAYLOAD_BYTES);
        assert_eq!(HopPayload::decode(&bytes).expect("decode"), p);
        assert_eq!(a.verify(&[9; 32]), Ok(()));
        assert_eq!(a.verify(&[8; 32]), Err(PayloadError::BadAuth));
        let mut forged = a.clone();
        forged.body.slot_id = [2; 16];
        assert_eq!(forged.verify(&[9; 32]), Err(PayloadError::BadAuth));
        // Someone else's key cannot sign for the owner.
        let mut b = body(false);
        b.owner = owner.public_key();
        let other = Identity::generate();
        assert_eq!(
            Assignment::sign(b, &other, &[9; 32])
                .expect("sign")
                .verify(&[9; 32]),
            Err(PayloadError::BadAuth)
        );
        assert!(HopPayload::decode(&[0xff; 40]).is_err());
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let t = HostTensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).expect("tensor");
        let limits = DecodeLimits::default();
        for m in [
            JobMsg::Forward {
                step: 3,
                tensor: t.clone(),
            },
            JobMsg::Infer {
                step: 4,
                tensor: t.clone(),
            },
            JobMsg::Backward { step: 5, tensor: t },
            JobMsg::Ack { step: 6 },
            JobMsg::State {
                op: StateOp::Restore,
                step: 9,
                blob: vec![7; 100],
            },
            JobMsg::State {
                op: StateOp::Checkpoint,
                step: 0,
                blob: vec![],
            },
            JobMsg::Control {
                op: ControlOp::Digest,
                reports: vec![vec![1, 2, 3]],
            },
        ] {
            let bytes = m.encode().expect("encode");
            assert_eq!(JobMsg::decode(&bytes, limits).expect("decode"), m);
            // Written in pieces straight into cells: the same bytes, for
            // pieces that cut the header, the body and anything between.
            for piece in [1, 3, 7, 9, 10, 64] {
                let mut e = m.encoding().expect("encoding");
                assert_eq!(MessageSource::len(&e), bytes.len());
                let mut got = vec![0xEE; bytes.len()];
                for chunk in got.chunks_mut(piece) {
                    e.fill(chunk);
                }
                assert_eq!(got, bytes, "{m:?} in pieces of {piece}");
            }
        }
        assert!(JobMsg::decode(&[1, 2, 3], limits).is_err());
        assert!(JobMsg::decode(&[9; 30], limits).is_err());
        let mut bytes = JobMsg::Ack { step: 1 }.encode().expect("encode");
        bytes.push(0);
        assert!(JobMsg::decode(&bytes, limits).is_err());
    }

    #[test]
    fn a_claim_carries_work_for_its_host_only() {
        let owner = Identity::generate();
        let mut b = body(true);
        b.owner = owner.public_key();
        assert_eq!(b.work_bits(), 19, "a 4.8 MB state");
        assert!(!b.has_work(&[9; 32]));
        let a = Assignment::sign(b.clone(), &owner, &[9; 32]).expect("sign");
        assert!(a.body.has_work(&[9; 32]));
        assert!(!a.body.has_work(&[8; 32]), "another host");
        let mut other = a.body.clone();
        other.slot_id = [7; 16];
        assert!(!other.has_work(&[9; 32]), "another slot");
        // Nothing to create, nothing to prove.
        assert_eq!(body(false).work_bits(), 0);
        assert!(body(false).has_work(&[9; 32]));
        let unworked = Assignment::sign_as_is(b, &owner, &[9; 32]).expect("sign");
        assert_eq!(unworked.verify(&[9; 32]), Ok(()));
        assert!(!unworked.body.has_work(&[9; 32]));
    }

    #[test]
    fn the_work_found_on_every_core_is_the_first_nonce_that_works() {
        let mut b = body(true);
        b.owner = Identity::generate().public_key();
        // Another slot, so that the test does not lean on one lucky nonce.
        b.slot_id = [3; 16];
        let mut solved = b.clone();
        solved.solve_work(&[5; 32]).expect("solve");
        assert!(solved.has_work(&[5; 32]));
        // Counting one by one from 0 finds the same nonce, and nothing
        // before it works.
        let count = u64::from_le_bytes(solved.nonce[..8].try_into().expect("8 bytes"));
        assert_eq!(solved.nonce[8..], b.nonce[8..]);
        let mut probe = b.clone();
        for c in 0..count {
            probe.nonce[..8].copy_from_slice(&c.to_le_bytes());
            assert!(!probe.has_work(&[5; 32]), "count {c} works before {count}");
        }
    }

    #[test]
    fn peek_reads_kind_and_shape_without_decoding() {
        let t = HostTensor::zeros(vec![1024, 784]);
        let bytes = JobMsg::Forward { step: 1, tensor: t }
            .encode()
            .expect("encode");
        // All zeros: the bitmap only, a 32nd of the decoded size.
        assert!(bytes.len() < 1024 * 784 * 4 / 30);
        let head = JobMsg::peek(&bytes).expect("peek");
        assert_eq!(head.kind, MsgKind::Forward);
        assert_eq!(head.shape, Some((2, [1024, 784, 0, 0])));
        let ack = JobMsg::Ack { step: 3 }.encode().expect("encode");
        assert_eq!(JobMsg::peek(&ack).expect("peek").kind, MsgKind::Ack);
        assert!(JobMsg::peek(&[1, 2]).is_err());
        assert!(JobMsg::peek(&[1; 9]).is_err(), "no tensor header");
        assert!(JobMsg::peek(&[42; 20]).is_err());
    }

    #[test]
    fn states_seal_to_their_window_and_open_only_with_their_key() {
        let state: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut blob = vec![0xAA; 3000];
        let w = StateWindow {
            offset: 500,
            len: state_window_len(1200) as u32,
            total: 3000,
        };
        let r = w.range().expect("valid window");
        seal_state(&[1; 32], &state, &mut blob[r.clone()]).expect("seal");
        assert!(blob[..500].iter().all(|&b| b == 0xAA), "outside the window");
        assert!(
            blob[r.end..].iter().all(|&b| b == 0xAA),
            "outside the window"
        );
        assert_eq!(open_state(&[1; 32], &blob[r.clone()]).expect("open"), state);
        assert!(open_state(&[2; 32], &blob[r.clone()]).is_err());
        let mut flipped = blob.clone();
        flipped[r.start + 40] ^= 1;
        assert!(open_state(&[1; 32], &flipped[r.clone()]).is_err());
        // Too large for the window, and windows outside their blob.
        assert!(seal_state(&[1; 32], &vec![0; 1300], &mut blob[r]).is_err());
        let outside = StateWindow {
            offset: 2000,
            len: 1200,
            total: 3000,
        };
        assert!(outside.range().is_none());
        let tiny = StateWindow {
            offset: 0,
            len: 10,
            total: 3000,
        };
        assert!(tiny.range().is_none());
        let huge = StateWindow {
            offset: u32::MAX,
            len: 100,
            total: u32::MAX,
        };
        assert!(huge.range().is_none());
    }

    #[test]
    fn reports_open_only_with_their_key() {
        let sealed = seal_error(&[1; 32], ErrorCode::NextHopFailed, &"x".repeat(500));
        let r = open_error(&[1; 32], &sealed).expect("open");
        assert_eq!(r.code, ErrorCode::NextHopFailed);
        assert_eq!(r.detail.len(), MAX_DETAIL);
        assert!(open_error(&[2; 32], &sealed).is_err());
        assert!(open_report(&[1; 32], &sealed[..10]).is_err());
    }

    /// The host's one-shot path: peek, check, decode.
    fn one_shot(
        msg: &[u8],
        check: impl FnOnce(&MsgHead) -> Result<DecodeLimits, PayloadError>,
    ) -> Result<JobMsg, PayloadError> {
        let limits = check(&JobMsg::peek(msg)?)?;
        JobMsg::decode(msg, limits)
    }

    /// A check like a host's: tensors of up to 2 000 elements; a state
    /// message refused.
    fn check(head: &MsgHead) -> Result<DecodeLimits, PayloadError> {
        match head.kind {
            MsgKind::State => Err(PayloadError::BadMessage("no state here")),
            _ => Ok(DecodeLimits {
                max_rank: 2,
                max_elements: 2000,
            }),
        }
    }

    fn message() -> impl proptest::strategy::Strategy<Value = JobMsg> {
        use proptest::prelude::*;
        let tensor = (1usize..60, 1usize..60, 0.0f64..1.0).prop_flat_map(|(r, c, z)| {
            proptest::collection::vec((0.0f64..1.0, -3.0f32..3.0), r * c).prop_map(move |v| {
                HostTensor {
                    shape: vec![r, c],
                    data: v
                        .into_iter()
                        .map(|(u, x)| if u < z { 0.0 } else { x })
                        .collect(),
                }
            })
        });
        prop_oneof![
            (any::<u64>(), tensor.clone())
                .prop_map(|(step, tensor)| JobMsg::Forward { step, tensor }),
            (any::<u64>(), tensor.clone())
                .prop_map(|(step, tensor)| JobMsg::Backward { step, tensor }),
            (any::<u64>(), tensor).prop_map(|(step, tensor)| JobMsg::Infer { step, tensor }),
            any::<u64>().prop_map(|step| JobMsg::Ack { step }),
            Just(JobMsg::Control {
                op: ControlOp::Digest,
                reports: vec![vec![1, 2, 3]]
            }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..50)).prop_map(
                |(step, blob)| JobMsg::State {
                    op: StateOp::Restore,
                    step,
                    blob
                }
            ),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// A message fed in pieces (as its cells arrive), whole or damaged,
        /// checks and decodes exactly as the whole message does, and the
        /// decoder is ready for the next one.
        #[test]
        fn a_message_in_pieces_decodes_as_the_whole(
            msg in message(),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..3),
            cut in proptest::option::of(proptest::prelude::any::<usize>()),
            cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..6),
        ) {
            let mut bytes = msg.encode().expect("encodes");
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            if let Some(c) = cut {
                bytes.truncate(c % (bytes.len() + 1));
            }
            let want = one_shot(&bytes, check);
            let mut dec = JobDecoder::default();
            let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            ends.sort_unstable();
            let mut got = None;
            for end in ends {
                if let Err(e) = dec.feed(&bytes[..end], bytes.len(), check) {
                    got = Some(Err(e));
                    dec.reset();
                    break;
                }
            }
            let got = match got {
                Some(e) => e,
                None => dec.finish(&bytes, check),
            };
            // Compared through their encodings: bit for bit, so a flip that
            // made a NaN still compares equal to itself.
            let bits = |r: Result<JobMsg, PayloadError>| r.map(|m| m.encode().expect("encodes"));
            proptest::prop_assert_eq!(bits(got), bits(want));
            // Ready for the next message.
            let next = JobMsg::Ack { step: 9 }.encode().expect("encodes");
            proptest::prop_assert_eq!(dec.finish(&next, check), Ok(JobMsg::Ack { step: 9 }));
        }
    }
}
