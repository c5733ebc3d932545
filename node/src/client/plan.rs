//! One run of a job laid out: which host serves which stage under which
//! slot id, the keys of every segment, the state windows, and the hops of
//! each ring with the assignments the owner signs. Pure: a route, the
//! owner and a random source in, ring hops out. Training, inference and
//! the tests all build their rings here.

use std::ops::Range;

use mixnn_crypto::cells::CellSuite;
use mixnn_crypto::Identity;
use mixnn_model::{max_state_bytes, InitSpec, InputGrad, OptimizerSpec, StageSpec};
use rand::seq::SliceRandom;
use rand::{CryptoRng, Rng, RngCore};

use super::ring::{RingHop, RingKeys};
use super::route::Candidate;
use crate::circuit::payload::{
    state_window_len, Assignment, AssignmentBody, Direction, HopRole, PayloadError, SlotCreate,
    StateWindow,
};
use crate::store::SlotId;

/// The model as the owner laid it out.
#[derive(Clone, Debug)]
pub struct Layout<'a> {
    /// Every stage of the model, in order.
    pub stages: &'a [StageSpec],
    pub seed: u64,
    pub optimizer: OptimizerSpec,
    /// Largest batch any message carries.
    pub max_batch: u32,
    /// The lease each use asks of the hosts, in seconds (0: leave it).
    pub lease_secs: u64,
    /// The client offers AES-256-GCM cells (its CPU has AES instructions):
    /// the segments that start or end at the client may use them.
    pub aes_gcm: bool,
}

/// A remote stage and where it lives.
#[derive(Clone, Debug)]
pub struct StageHost {
    /// The stage's index in the model.
    pub stage: usize,
    pub host: Candidate,
    pub slot_id: SlotId,
}

/// Both rings of one run of a training job.
pub struct TrainingRings {
    pub forward: Vec<RingHop>,
    pub forward_keys: RingKeys,
    /// Where each remote stage's host sits on the forward ring.
    pub forward_hosts: Vec<usize>,
    pub backward: Vec<RingHop>,
    pub backward_keys: RingKeys,
    /// Each remote stage's window in state messages.
    pub windows: Vec<StateWindow>,
    /// Size of every state message.
    pub state_total: usize,
}

/// A forward-only ring for inference.
pub struct InferenceRing {
    pub hops: Vec<RingHop>,
    pub keys: RingKeys,
}

fn random<const N: usize, R: RngCore>(rng: &mut R) -> [u8; N] {
    let mut b = [0u8; N];
    rng.fill_bytes(&mut b);
    b
}

pub fn mix_hop(c: &Candidate) -> RingHop {
    RingHop {
        peer: c.peer,
        onion_key: c.onion_key,
        epoch: c.epoch,
        label: "mix".into(),
        role: HopRole::Mix,
    }
}

pub fn host_label(stage: usize, dir: Direction) -> String {
    match dir {
        Direction::Forward => format!("layer host for stage {stage}"),
        Direction::Backward => format!("layer host for stage {stage}, backward"),
    }
}

/// What one checkpoint of the `remote` stages costs in steps' time, judged
/// by the bytes each moves round the rings: a state message carries the
/// whole state blob (every remote stage's window) through every segment of
/// the forward ring; a training step carries an activation forward and a
/// gradient back through every segment (an acknowledgement only, back to
/// the client from the model's first stage), taken at their dense size.
/// An estimate: the dense size overstates a step's bytes and leaves out
/// its compute, and the first measured checkpoint replaces it. `None`
/// where a step moves nothing.
pub fn checkpoint_cost_in_steps(
    stages: &[StageSpec],
    remote: Range<usize>,
    batch: usize,
    optimizer: &OptimizerSpec,
) -> Option<f64> {
    let held = stages.get(remote.clone())?;
    let first = held.first()?;
    // The width of each segment's tensors: the first remote stage's input,
    // then every remote stage's output.
    let widths: Vec<usize> = std::iter::once(first.input_dim())
        .chain(held.iter().map(StageSpec::output_dim))
        .collect();
    let forward: usize = widths.iter().sum();
    let backward = if remote.start == 0 {
        forward - widths[0]
    } else {
        forward
    };
    let step = 4.0 * batch as f64 * (forward + backward) as f64;
    let blob: usize = held
        .iter()
        .map(|s| state_window_len(max_state_bytes(s, optimizer)))
        .sum();
    let checkpoint = blob as f64 * widths.len() as f64;
    (step > 0.0).then(|| checkpoint / step)
}

/// Windows for states of at most `capacities` bytes: in a random order,
/// with a random gap after each, so a host's offset says little about the
/// stages before it.
pub fn state_windows<R: Rng>(capacities: &[usize], rng: &mut R) -> (Vec<StateWindow>, usize) {
    let mut order: Vec<usize> = (0..capacities.len()).collect();
    order.shuffle(rng);
    let mut windows = vec![
        StateWindow {
            offset: 0,
            len: 0,
            total: 0
        };
        capacities.len()
    ];
    let mut at = 0usize;
    for i in order {
        let len = state_window_len(capacities[i]);
        at += rng.gen_range(0..=len / 16 + 64);
        windows[i].offset = at as u32;
        windows[i].len = len as u32;
        at += len;
    }
    for w in &mut windows {
        w.total = at as u32;
    }
    (windows, at)
}

/// The cipher suite of each segment of a ring through `hosts`: segment
/// `j` runs from host `j - 1` (the client for `j = 0`) to host `j` (the
/// client for the last), and uses AES-256-GCM where both its ends offer it
/// (`client_aes` for the client). Only a segment's two ends seal and open
/// its cells; the mixes between them relay cells they cannot open, so
/// their CPUs do not count. Both rings of a job use the same suite per
/// segment.
pub fn segment_suites(client_aes: bool, hosts: &[StageHost]) -> Vec<CellSuite> {
    let ends: Vec<bool> = std::iter::once(client_aes)
        .chain(hosts.iter().map(|h| h.host.aes_gcm))
        .chain(std::iter::once(client_aes))
        .collect();
    ends.windows(2)
        .map(|w| CellSuite::for_segment(w[0], w[1]))
        .collect()
}

/// The hops of both training rings through `hosts` (one per remote stage,
/// in order) and the mixes of each segment.
pub fn training_rings<R: RngCore + CryptoRng>(
    layout: &Layout<'_>,
    hosts: &[StageHost],
    forward_mixes: &[Vec<Candidate>],
    backward_mixes: &[Vec<Candidate>],
    owner: &Identity,
    session: [u8; 16],
    rng: &mut R,
) -> Result<TrainingRings, PayloadError> {
    let m = hosts.len();
    if forward_mixes.len() != m + 1 || backward_mixes.len() != m + 1 {
        return Err(PayloadError::BadMessage("a ring needs a segment per gap"));
    }
    let fkeys: Vec<[u8; 32]> = (0..=m).map(|_| random(rng)).collect();
    let bkeys: Vec<[u8; 32]> = (0..=m).map(|_| random(rng)).collect();
    let suites = segment_suites(layout.aes_gcm, hosts);
    let capacities: Vec<usize> = hosts
        .iter()
        .map(|h| max_state_bytes(&layout.stages[h.stage], &layout.optimizer))
        .collect();
    let (windows, state_total) = state_windows(&capacities, rng);
    if state_total > StateWindow::MAX_TOTAL as usize {
        return Err(PayloadError::BadMessage(
            "the model's state is too large for one state message",
        ));
    }
    let mut assignment = |j: usize, dir: Direction| -> Result<RingHop, PayloadError> {
        let h = &hosts[j];
        let stage = h.stage;
        let (in_key, out_key, in_suite, out_suite) = match dir {
            Direction::Forward => (fkeys[j], fkeys[j + 1], suites[j], suites[j + 1]),
            Direction::Backward => (bkeys[j + 1], bkeys[j], suites[j + 1], suites[j]),
        };
        let body = AssignmentBody {
            slot_id: h.slot_id,
            owner: owner.public_key(),
            direction: dir,
            infer_only: false,
            // Created where it does not exist yet (a new host, or a first
            // run that failed before every slot was made).
            create: (dir == Direction::Forward).then(|| SlotCreate {
                stage: layout.stages[stage].clone(),
                init: InitSpec {
                    seed: layout.seed,
                    stage_index: stage as u32,
                },
                optimizer: layout.optimizer,
            }),
            in_key,
            out_key,
            in_suite,
            out_suite,
            first: dir == Direction::Backward && stage == 0,
            skip_zero_inputs: InputGrad::after(stage.checked_sub(1).map(|p| &layout.stages[p]))
                == InputGrad::SkipZeroInputs,
            max_batch: layout.max_batch,
            session,
            state: (dir == Direction::Forward).then_some(windows[j]),
            lease_secs: layout.lease_secs,
            nonce: random(rng),
        };
        Ok(RingHop {
            peer: h.host.peer,
            onion_key: h.host.onion_key,
            epoch: h.host.epoch,
            label: host_label(stage, dir),
            role: HopRole::Host(Box::new(Assignment::sign(body, owner, &h.host.onion_key)?)),
        })
    };
    let mut forward = Vec::new();
    let mut forward_hosts = Vec::new();
    for (j, mixes) in forward_mixes[..m].iter().enumerate() {
        forward.extend(mixes.iter().map(mix_hop));
        forward_hosts.push(forward.len());
        forward.push(assignment(j, Direction::Forward)?);
    }
    forward.extend(forward_mixes[m].iter().map(mix_hop));
    let mut backward = Vec::new();
    for (k, j) in (0..m).rev().enumerate() {
        backward.extend(backward_mixes[k].iter().map(mix_hop));
        backward.push(assignment(j, Direction::Backward)?);
    }
    backward.extend(backward_mixes[m].iter().map(mix_hop));
    Ok(TrainingRings {
        forward,
        forward_keys: RingKeys {
            first_segment: fkeys[0],
            last_segment: fkeys[m],
            first_suite: suites[0],
            last_suite: suites[m],
        },
        forward_hosts,
        backward,
        backward_keys: RingKeys {
            first_segment: bkeys[m],
            last_segment: bkeys[0],
            first_suite: suites[m],
            last_suite: suites[0],
        },
        windows,
        state_total,
    })
}

/// The hops of an inference ring through `hosts` and the mixes of each
/// segment: the hosts only run their slots forward and keep nothing.
pub fn inference_ring<R: RngCore + CryptoRng>(
    layout: &Layout<'_>,
    hosts: &[StageHost],
    mixes: &[Vec<Candidate>],
    owner: &Identity,
    rng: &mut R,
) -> Result<InferenceRing, PayloadError> {
    let m = hosts.len();
    if mixes.len() != m + 1 {
        return Err(PayloadError::BadMessage("a ring needs a segment per gap"));
    }
    let keys: Vec<[u8; 32]> = (0..=m).map(|_| random(rng)).collect();
    let suites = segment_suites(layout.aes_gcm, hosts);
    let session = random(rng);
    let mut hops = Vec::new();
    for (j, h) in hosts.iter().enumerate() {
        hops.extend(mixes[j].iter().map(mix_hop));
        let body = AssignmentBody {
            slot_id: h.slot_id,
            owner: owner.public_key(),
            direction: Direction::Forward,
            infer_only: true,
            create: None,
            in_key: keys[j],
            out_key: keys[j + 1],
            in_suite: suites[j],
            out_suite: suites[j + 1],
            first: false,
            skip_zero_inputs: false,
            max_batch: layout.max_batch,
            session,
            state: None,
            lease_secs: layout.lease_secs,
            nonce: random(rng),
        };
        hops.push(RingHop {
            peer: h.host.peer,
            onion_key: h.host.onion_key,
            epoch: h.host.epoch,
            label: host_label(h.stage, Direction::Forward),
            role: HopRole::Host(Box::new(Assignment::sign(body, owner, &h.host.onion_key)?)),
        });
    }
    hops.extend(mixes[m].iter().map(mix_hop));
    Ok(InferenceRing {
        hops,
        keys: RingKeys {
            first_segment: keys[0],
            last_segment: keys[m],
            first_suite: suites[0],
            last_suite: suites[m],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;
    use mixnn_model::Arch;
    use rand::SeedableRng;

    /// A layout for `stages` whose client offers AES-256-GCM.
    fn test_layout(stages: &[StageSpec]) -> Layout<'_> {
        Layout {
            stages,
            seed: 7,
            optimizer: OptimizerSpec::Sgd { lr: 0.1 },
            max_batch: 64,
            lease_secs: 60,
            aes_gcm: true,
        }
    }

    #[test]
    fn a_checkpoint_costs_the_steps_that_move_its_bytes() {
        let stages = Arch::parse("mlp:784-512-256-10").expect("arch").stages();
        let opt = OptimizerSpec::Momentum {
            lr: 0.1,
            momentum: 0.9,
        };
        let blob: usize = stages
            .iter()
            .map(|s| state_window_len(max_state_bytes(s, &opt)))
            .sum();
        // Four segments each way; nothing but an acknowledgement goes back
        // to the data: 784 + 512 + 256 + 10 forward, 10 + 256 + 512 back.
        let step = 4.0 * 256.0 * (1562.0 + 778.0);
        let cost = checkpoint_cost_in_steps(&stages, 0..3, 256, &opt).expect("cost");
        assert!((cost - 4.0 * blob as f64 / step).abs() < 1e-9, "{cost}");
        // The paper's model: a checkpoint moves what some seven steps move.
        assert!((7.0..8.0).contains(&cost), "{cost}");
        // Half the batch, half the bytes a step moves.
        let half = checkpoint_cost_in_steps(&stages, 0..3, 128, &opt).expect("cost");
        assert!((half - 2.0 * cost).abs() < 1e-9);
        // With the ends kept by the client, one stage is remote: two
        // segments, each carrying 784-wide tensors one way and 512-wide
        // ones the other, in both directions.
        let middle = checkpoint_cost_in_steps(&stages, 1..2, 256, &opt).expect("cost");
        let window = state_window_len(max_state_bytes(&stages[1], &opt)) as f64;
        let both = 4.0 * 256.0 * 2.0 * (512.0 + 256.0);
        assert!((middle - 2.0 * window / both).abs() < 1e-9, "{middle}");
        // No remote stage, or a range past the model: no estimate.
        assert_eq!(checkpoint_cost_in_steps(&stages, 1..1, 256, &opt), None);
        assert_eq!(checkpoint_cost_in_steps(&stages, 2..5, 256, &opt), None);
        assert_eq!(checkpoint_cost_in_steps(&stages, 0..3, 0, &opt), None);
    }

    /// Three stage hosts on `cand(0..3)`.
    fn three_hosts() -> Vec<StageHost> {
        (0..3)
            .map(|i| StageHost {
                stage: i,
                host: cand(i as u8),
                slot_id: [i as u8; 16],
            })
            .collect()
    }

    fn cand(i: u8) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            onion_key: [i; 32],
            epoch: 1,
            layer_host: true,
            mix: true,
            free_slots: 1,
            max_params: 1 << 30,
            aes_gcm: i.is_multiple_of(2),
            hosts: vec![],
        }
    }

    #[test]
    fn windows_never_overlap_and_fit_their_blob() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for caps in [vec![10usize], vec![1000, 5, 300_000], vec![64; 7]] {
            let (w, total) = state_windows(&caps, &mut rng);
            let mut ranges: Vec<_> = w.iter().map(|w| w.range().expect("valid")).collect();
            for (r, c) in ranges.iter().zip(&caps) {
                assert_eq!(r.len(), state_window_len(*c));
                assert!(r.end <= total);
            }
            ranges.sort_by_key(|r| r.start);
            for pair in ranges.windows(2) {
                assert!(pair[0].end <= pair[1].start);
            }
        }
    }

    #[test]
    fn rings_carry_one_signed_assignment_per_stage_and_direction() {
        let arch = Arch::parse("mlp:784-64-32-10").expect("arch");
        let stages = arch.stages();
        let layout = test_layout(&stages);
        let hosts = three_hosts();
        let mixes: Vec<Vec<Candidate>> = (10..14).map(|i| vec![cand(i)]).collect();
        let owner = Identity::generate();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let rings = training_rings(&layout, &hosts, &mixes, &mixes, &owner, [9; 16], &mut rng)
            .expect("rings");
        assert_eq!(rings.forward.len(), 7);
        assert_eq!(rings.backward.len(), 7);
        assert_eq!(rings.forward_hosts, vec![1, 3, 5]);
        for (ring, dir) in [
            (&rings.forward, Direction::Forward),
            (&rings.backward, Direction::Backward),
        ] {
            let assigned: Vec<&Assignment> = ring
                .iter()
                .filter_map(|h| match &h.role {
                    HopRole::Host(a) => Some(&**a),
                    _ => None,
                })
                .collect();
            assert_eq!(assigned.len(), 3);
            for a in &assigned {
                assert_eq!(a.body.direction, dir);
                assert_eq!(a.body.session, [9; 16]);
                assert_eq!(a.body.state.is_some(), dir == Direction::Forward);
                assert_eq!(a.body.create.is_some(), dir == Direction::Forward);
            }
        }
        for (pos, h) in rings.forward_hosts.iter().zip(&hosts) {
            let hop = &rings.forward[*pos];
            assert_eq!(hop.peer, h.host.peer);
            match &hop.role {
                HopRole::Host(a) => {
                    assert_eq!(a.verify(&h.host.onion_key), Ok(()));
                    assert_eq!(a.body.slot_id, h.slot_id);
                }
                _ => panic!("a host hop"),
            }
        }
        let infer = inference_ring(&layout, &hosts, &mixes, &owner, &mut rng).expect("ring");
        assert_eq!(infer.hops.len(), 7);
    }

    /// Hosts 0 and 2 offer AES-256-GCM, host 1 does not (`cand`): with a
    /// client that offers it, the segments client–L1 and L3–client use it,
    /// the two touching L2 ChaCha20-Poly1305; each host learns the suites of
    /// its own two segments in both rings, and the client's ends match.
    #[test]
    fn each_segment_uses_aes_only_where_both_its_ends_offer_it() {
        use CellSuite::{Aes256Gcm as Aes, ChaCha20Poly1305 as ChaCha};
        let arch = Arch::parse("mlp:784-64-32-10").expect("arch");
        let stages = arch.stages();
        let hosts = three_hosts();
        assert_eq!(segment_suites(true, &hosts), vec![Aes, ChaCha, ChaCha, Aes]);
        assert_eq!(segment_suites(false, &hosts), vec![ChaCha; 4]);
        assert_eq!(segment_suites(true, &hosts[..1]), vec![Aes, Aes]);
        assert_eq!(segment_suites(true, &hosts[1..2]), vec![ChaCha, ChaCha]);

        let layout = test_layout(&stages);
        let mixes: Vec<Vec<Candidate>> = (10..14).map(|i| vec![cand(i)]).collect();
        let owner = Identity::generate();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let rings = training_rings(&layout, &hosts, &mixes, &mixes, &owner, [9; 16], &mut rng)
            .expect("rings");
        let suites = |ring: &[RingHop]| -> Vec<(CellSuite, CellSuite)> {
            ring.iter()
                .filter_map(|h| match &h.role {
                    HopRole::Host(a) => Some((a.body.in_suite, a.body.out_suite)),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            suites(&rings.forward),
            vec![(Aes, ChaCha), (ChaCha, ChaCha), (ChaCha, Aes)]
        );
        // The backward ring meets the hosts from the last.
        assert_eq!(
            suites(&rings.backward),
            vec![(Aes, ChaCha), (ChaCha, ChaCha), (ChaCha, Aes)]
        );
        let ends = |k: &RingKeys| (k.first_suite, k.last_suite);
        assert_eq!(ends(&rings.forward_keys), (Aes, Aes));
        assert_eq!(ends(&rings.backward_keys), (Aes, Aes));

        let infer =
            inference_ring(&layout, &hosts[1..], &mixes[1..], &owner, &mut rng).expect("ring");
        assert_eq!(suites(&infer.hops), vec![(ChaCha, ChaCha), (ChaCha, Aes)]);
        assert_eq!(ends(&infer.keys), (ChaCha, Aes));
    }
}
