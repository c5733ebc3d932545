//! Files a user hands to the client: an owner's checkpoint and a
//! safetensors model.

use std::sync::OnceLock;

use mixnn_model::{Arch, ModelParams};
use mixnn_node::client::checkpoint::Checkpoint;

use super::slot::sample_slots;
use crate::input::{seed, Input};
use crate::Target;

pub const CHECKPOINT: Target = Target {
    name: "checkpoint",
    run: checkpoint,
    seeds: checkpoint_seeds,
    max_len: 8192,
};

pub const SAFETENSORS: Target = Target {
    name: "safetensors",
    run: safetensors,
    seeds: safetensors_seeds,
    max_len: 4096,
};

const RAW: u8 = 0;
/// Magic before the body, checksum after.
const FRAMED: u8 = 1;
const SUM: usize = 32;

fn sample_checkpoint() -> Checkpoint {
    let slots = sample_slots();
    Checkpoint {
        step: 1,
        stages: vec![slots[0].clone(), slots[3].clone()],
        losses: vec![2.3, f32::NAN],
    }
}

/// The magic a checkpoint file starts with.
fn magic() -> &'static [u8] {
    static MAGIC: OnceLock<Vec<u8>> = OnceLock::new();
    MAGIC.get_or_init(|| sample_checkpoint().to_bytes()[..7].to_vec())
}

fn checkpoint(data: &[u8]) {
    let mut input = Input::new(data);
    let bytes = if input.u8() % 2 == RAW {
        input.rest().to_vec()
    } else {
        let mut b = magic().to_vec();
        b.extend_from_slice(input.rest());
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    };
    let Ok(c) = Checkpoint::from_bytes(&bytes) else {
        return;
    };
    assert!(c.to_bytes() == bytes, "a checkpoint has one encoding");
    // What resuming does with it: every stage read back as a slot.
    let _ = c.digest();
}

fn checkpoint_seeds() -> Vec<Vec<u8>> {
    let b = sample_checkpoint().to_bytes();
    vec![
        seed(&[&[FRAMED], &b[7..b.len() - SUM]]),
        seed(&[&[RAW], &b]),
    ]
}

fn safetensors(data: &[u8]) {
    let mut input = Input::new(data);
    let expected = input
        .bool()
        .then(|| Arch::parse("mlp:6-4-3").expect("arch"));
    let bytes = input.rest();
    let Ok(p) = ModelParams::from_bytes(bytes, expected.as_ref()) else {
        return;
    };
    let e = p.to_bytes();
    let again = ModelParams::from_bytes(&e, Some(&p.arch)).expect("a written file reads back");
    assert_eq!(again, p, "round trip");
    assert!(again.to_bytes() == e);
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let arch = Arch::parse("mlp:6-4-3").expect("arch");
    let p = ModelParams::from_states(
        &arch,
        &sample_slots()
            .iter()
            .step_by(3)
            .cloned()
            .collect::<Vec<_>>(),
    )
    .expect("params");
    let small = ModelParams::new(
        Arch::parse("mlp:1-1").expect("arch"),
        vec![mixnn_model::StageParams {
            weight: vec![0.5],
            bias: vec![-1.0],
        }],
    )
    .expect("params");
    vec![
        seed(&[&[1], &p.to_bytes()]),
        seed(&[&[0], &small.to_bytes()]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode() {
        let c = Checkpoint::from_bytes(&checkpoint_seeds()[1][1..]).expect("reads");
        assert!(c.digest().is_ok());
        for s in safetensors_seeds() {
            assert!(ModelParams::from_bytes(&s[1..], None).is_ok());
        }
    }
}
