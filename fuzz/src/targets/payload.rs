//! What travels inside the onion and the cells: job messages, hop
//! payloads (with the slot a host would create from one), and the reports
//! and states sealed to the client.

use mixnn_model::{Arch, DecodeLimits, HostTensor, InitSpec, OptimizerSpec, Slot};
use mixnn_node::circuit::payload::{
    open_error, open_report, open_slot_report, open_state, seal_report, seal_slot_report,
    seal_state, Assignment, AssignmentBody, ControlOp, Direction, ErrorCode, HopPayload, HopRole,
    JobMsg, SlotCreate, SlotReport, StateOp, StateWindow,
};

use super::identity;
use crate::input::{seed, Input};
use crate::Target;

pub const JOB_MSG: Target = Target {
    name: "job_msg",
    run: job_msg,
    seeds: job_msg_seeds,
    max_len: 8192,
};

pub const HOP_PAYLOAD: Target = Target {
    name: "hop_payload",
    run: hop_payload,
    seeds: hop_payload_seeds,
    max_len: 1024,
};

pub const REPORT: Target = Target {
    name: "report",
    run: report,
    seeds: report_seeds,
    max_len: 4096,
};

/// Limits from one byte: some rank and element limits below the defaults.
fn limits(b: u8) -> DecodeLimits {
    DecodeLimits {
        max_rank: usize::from(b & 7),
        max_elements: match b >> 3 {
            0 => DecodeLimits::default().max_elements,
            n => usize::from(n) * 37,
        },
    }
}

fn job_msg(data: &[u8]) {
    let mut input = Input::new(data);
    let limits = limits(input.u8());
    let bytes = input.rest();
    let Ok(m) = JobMsg::decode(bytes, limits) else {
        return;
    };
    let e = m.encode().expect("a decoded message encodes");
    let again = JobMsg::decode(&e, limits).expect("an encoded message decodes");
    assert!(again.encode().ok() == Some(e.clone()), "round trip");
    // Only the control message's postcard body may have other encodings.
    if !matches!(m, JobMsg::Control { .. }) {
        assert!(e == bytes, "{} has one encoding", m.name());
    }
}

fn job_msg_seeds() -> Vec<Vec<u8>> {
    let t = HostTensor::new(vec![2, 3], vec![1.0, 0.0, 0.0, -2.0, 0.0, 0.5]).expect("tensor");
    let dense = HostTensor::new(vec![3], vec![1.0, 2.0, 3.0]).expect("tensor");
    let msgs = [
        JobMsg::Forward {
            step: 1,
            tensor: t.clone(),
        },
        JobMsg::Infer {
            step: 2,
            tensor: dense.clone(),
        },
        JobMsg::Backward { step: 3, tensor: t },
        JobMsg::Ack { step: 4 },
        JobMsg::Control {
            op: ControlOp::Checkpoint,
            reports: vec![vec![1, 2, 3], vec![]],
        },
        JobMsg::State {
            op: StateOp::Restore,
            step: 5,
            blob: vec![9; 40],
        },
    ];
    msgs.iter()
        .map(|m| seed(&[&[4], &m.encode().expect("seed message")]))
        .collect()
}

/// The onion key the assignments in the seeds are signed for.
const HOP_KEY: [u8; 32] = [9; 32];

fn hop_payload(data: &[u8]) {
    let Ok(p) = HopPayload::decode(data) else {
        return;
    };
    let e = p.encode().expect("a decoded payload fits the onion");
    let again = HopPayload::decode(&e).expect("an encoded payload decodes");
    assert!(again.encode().ok() == Some(e), "round trip");
    // What a layer host does next with an assignment.
    if let HopRole::Host(a) = &p.role {
        let _ = a.verify(&HOP_KEY);
        if let Some(w) = a.body.state {
            if let Some(r) = w.range() {
                assert!(r.end <= w.total as usize);
            }
        }
        if let Some(c) = &a.body.create {
            // Small stages only, so that one input stays fast.
            if c.stage.validate().is_ok() && c.stage.param_count() <= 1 << 12 {
                let _ = Slot::new(&c.stage, c.init, c.optimizer);
            }
        }
    }
}

fn hop_payload_seeds() -> Vec<Vec<u8>> {
    let owner = identity(3);
    let stage = Arch::parse("mlp:4-3-2").expect("arch").stages().remove(0);
    let body = AssignmentBody {
        slot_id: [1; 16],
        owner: owner.public_key(),
        direction: Direction::Forward,
        infer_only: false,
        create: Some(SlotCreate {
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
        skip_zero_inputs: true,
        max_batch: 16,
        session: [5; 16],
        state: Some(StateWindow {
            offset: 64,
            len: 128,
            total: 256,
        }),
        lease_secs: 3600,
        nonce: [4; 16],
    };
    let host = Assignment::sign(body, &owner, &HOP_KEY).expect("sign");
    [
        HopRole::Mix,
        HopRole::End { tag: [8; 16] },
        HopRole::Host(Box::new(host)),
    ]
    .into_iter()
    .map(|role| {
        HopPayload {
            next_epoch: 12,
            role,
        }
        .encode()
        .expect("seed payload")
    })
    .collect()
}

const REPORT_KEY: [u8; 32] = [5; 32];
const RAW: u8 = 0;

fn report(data: &[u8]) {
    let mut input = Input::new(data);
    if input.u8() % 2 == RAW {
        let sealed = input.rest();
        let _ = open_report(&REPORT_KEY, sealed);
        let _ = open_error(&REPORT_KEY, sealed);
        let _ = open_slot_report(&REPORT_KEY, sealed);
        let _ = open_state(&REPORT_KEY, sealed);
        return;
    }
    // Plaintexts of the fuzzer's choosing, sealed with the key they open with.
    let plain = input.rest();
    let sealed = seal_report(&REPORT_KEY, plain);
    assert!(open_report(&REPORT_KEY, &sealed).ok().as_deref() == Some(plain));
    if let Ok(r) = open_error(&REPORT_KEY, &sealed) {
        let e = postcard::to_allocvec(&r).expect("encode");
        assert_eq!(postcard::from_bytes(&e).ok(), Some(r));
    }
    if let Ok(r) = open_slot_report(&REPORT_KEY, &sealed) {
        let again = open_slot_report(&REPORT_KEY, &seal_slot_report(&REPORT_KEY, &r));
        assert_eq!(again.ok(), Some(r));
    }
    if let Ok(state) = open_state(&REPORT_KEY, &sealed) {
        assert!(plain[8..].starts_with(&state));
        let mut window = vec![0u8; sealed.len()];
        seal_state(&REPORT_KEY, &state, &mut window).expect("fits its own window");
        assert_eq!(open_state(&REPORT_KEY, &window).ok(), Some(state));
    }
}

fn report_seeds() -> Vec<Vec<u8>> {
    let error = postcard::to_allocvec(&mixnn_node::circuit::payload::ErrorReport {
        code: ErrorCode::SlotRefused,
        detail: "no room".into(),
    })
    .expect("encode");
    let slot = postcard::to_allocvec(&SlotReport {
        slot_id: [1; 16],
        version: 3,
        steps_applied: 30,
        params_digest: [7; 32],
        lease_until: 1_700_000_000,
    })
    .expect("encode");
    let mut state = 5u64.to_le_bytes().to_vec();
    state.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0, 0]);
    vec![
        seed(&[&[1], &error]),
        seed(&[&[1], &slot]),
        seed(&[&[1], &state]),
        seed(&[&[RAW], &seal_report(&REPORT_KEY, &error)]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode() {
        for s in job_msg_seeds() {
            assert!(JobMsg::decode(&s[1..], limits(s[0])).is_ok());
        }
        let mut hosts = 0;
        for s in hop_payload_seeds() {
            if let HopRole::Host(a) = HopPayload::decode(&s).expect("decodes").role {
                assert_eq!(a.verify(&HOP_KEY), Ok(()));
                hosts += 1;
            }
        }
        assert_eq!(hosts, 1);
        let s = report_seeds();
        let sealed = |s: &[u8]| seal_report(&REPORT_KEY, &s[1..]);
        assert!(open_error(&REPORT_KEY, &sealed(&s[0])).is_ok());
        assert!(open_slot_report(&REPORT_KEY, &sealed(&s[1])).is_ok());
        assert_eq!(
            open_state(&REPORT_KEY, &sealed(&s[2])).ok(),
            Some(vec![1, 2, 3, 4, 5])
        );
        assert!(open_error(&REPORT_KEY, &s[3][1..]).is_ok());
    }
}
