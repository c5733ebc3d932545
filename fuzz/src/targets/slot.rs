//! Slot bytes (what a host restores a slot from, and what an owner's
//! checkpoint holds) and the slot metadata a node stores.

use std::sync::OnceLock;

use mixnn_model::{Arch, HostTensor, InitSpec, OptimizerSpec, Slot};
use mixnn_node::store::{decode_meta, state_digest, Lease, SlotMeta};

use crate::input::{seed, Input};
use crate::Target;

pub const SLOT_BYTES: Target = Target {
    name: "slot_bytes",
    run: slot_bytes,
    seeds: slot_seeds,
    max_len: 4096,
};

pub const SLOT_META: Target = Target {
    name: "slot_meta",
    run: slot_meta,
    seeds: meta_seeds,
    max_len: 512,
};

const RAW: u8 = 0;
/// Magic and version before the record, checksum after.
const FRAMED: u8 = 1;
const SUM: usize = 32;

/// Slots of a small model with each optimizer, as `Slot::to_bytes` writes them.
pub(crate) fn sample_slots() -> Vec<Vec<u8>> {
    let stages = Arch::parse("mlp:6-4-3").expect("arch").stages();
    let opts = [
        OptimizerSpec::Sgd { lr: 0.1 },
        OptimizerSpec::Momentum {
            lr: 0.1,
            momentum: 0.9,
        },
        OptimizerSpec::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ];
    let mut out = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        for opt in opts {
            let init = InitSpec {
                seed: 1,
                stage_index: i as u32,
            };
            let mut slot = Slot::new(stage, init, opt).expect("slot");
            let x = HostTensor::zeros(vec![1, slot.input_dim()]);
            slot.forward(1, &x).expect("forward");
            let g = HostTensor::new(vec![1, slot.output_dim()], vec![0.5; slot.output_dim()])
                .expect("grad");
            slot.backward(1, &g).expect("backward");
            out.push(slot.to_bytes());
        }
    }
    out
}

/// The magic and version `Slot::to_bytes` starts with.
fn header() -> &'static [u8] {
    static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
    HEADER.get_or_init(|| sample_slots()[0][..7].to_vec())
}

fn slot_bytes(data: &[u8]) {
    let mut input = Input::new(data);
    let bytes = if input.u8() % 2 == RAW {
        input.rest().to_vec()
    } else {
        // The record of the fuzzer's choosing, framed and checksummed.
        let mut b = header().to_vec();
        b.extend_from_slice(input.rest());
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    };
    let Ok(mut slot) = Slot::from_bytes(&bytes) else {
        return;
    };
    let e = slot.to_bytes();
    let again = Slot::from_bytes(&e).expect("written slot bytes read back");
    assert!(again.to_bytes() == e, "round trip");
    assert_eq!(again.params_digest(), slot.params_digest());
    // A restored slot must serve: a forward and a backward pass.
    let x = HostTensor::zeros(vec![2, slot.input_dim()]);
    let _ = slot.infer(&x);
    if slot.forward(1, &x).is_ok() {
        let g = HostTensor::zeros(vec![2, slot.output_dim()]);
        let _ = slot.backward(1, &g);
    }
}

fn slot_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = sample_slots()
        .iter()
        .map(|b| seed(&[&[FRAMED], &b[7..b.len() - SUM]]))
        .collect();
    seeds.push(seed(&[&[RAW], &sample_slots()[0]]));
    seeds
}

fn slot_meta(data: &[u8]) {
    let Ok(m) = decode_meta(b"key", data) else {
        return;
    };
    let e = postcard::to_allocvec(&m).expect("encode");
    assert_eq!(decode_meta(b"key", &e).ok(), Some(m), "round trip");
}

fn meta_seeds() -> Vec<Vec<u8>> {
    let state = sample_slots().remove(0);
    let meta = SlotMeta {
        id: [1; 16],
        owner: [2; 32],
        version: 3,
        param_count: 28,
        lease: Lease::provisional(1_700_000_000).extended(1_700_000_010, 3600),
        state_len: state.len() as u64,
        digest: state_digest(3, &state),
    };
    vec![postcard::to_allocvec(&meta).expect("encode")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode() {
        for s in slot_seeds().iter().filter(|s| s[0] == FRAMED) {
            let mut b = header().to_vec();
            b.extend_from_slice(&s[1..]);
            let sum = blake3::hash(&b);
            b.extend_from_slice(sum.as_bytes());
            assert!(Slot::from_bytes(&b).is_ok());
        }
        for s in meta_seeds() {
            assert!(decode_meta(b"key", &s).is_ok());
        }
    }
}
