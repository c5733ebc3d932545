//! Files a user hands to the client: an owner's checkpoint, a
//! safetensors model, and a model's architecture (`--arch` or `--model`).

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

pub const ARCH: Target = Target {
    name: "arch",
    run: arch,
    seeds: arch_seeds,
    max_len: 2048,
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

/// An architecture string, a TOML or a JSON model file: parsed or refused,
/// and what parses displays as a string that parses to the same model.
fn arch(data: &[u8]) {
    let mut input = Input::new(data);
    let kind = input.u8() % 3;
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    let parsed = match kind {
        0 => Arch::parse(text).ok(),
        1 => Arch::from_model_text(text, false).ok(),
        _ => Arch::from_model_text(text, true).ok(),
    };
    let Some(a) = parsed else { return };
    let shown = a.to_string();
    assert_eq!(Arch::parse(&shown).ok(), Some(a.clone()), "{shown}");
    assert_eq!(Arch::parse(&a.to_seq()).ok(), Some(a), "seq form");
}

fn arch_seeds() -> Vec<Vec<u8>> {
    let toml = "input = [1, 8, 8]\n[[stage]]\nlayers = [{ op = \"conv2d\", out_channels = 2, kernel = 3, padding = 1 }, { op = \"relu\" }, { op = \"maxpool2d\", kernel = 2 }]\n[[stage]]\nlayers = [{ op = \"flatten\" }, { op = \"linear\", outputs = 3 }]\n";
    let json = r#"{"input": [6], "stage": [{"layers": [{"op": "linear", "outputs": 4}, {"op": "tanh"}]}, {"layers": [{"op": "linear", "outputs": 3}]}]}"#;
    vec![
        seed(&[&[0], b"mlp:6-4-3"]),
        seed(&[&[0], b"lenet5"]),
        seed(&[
            &[0],
            b"seq:3x9x9|conv(4,3,s=2,p=1,bias=false) tanh avgpool(2,s=1)|flatten linear(5)",
        ]),
        seed(&[&[1], toml.as_bytes()]),
        seed(&[&[2], json.as_bytes()]),
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
        for s in arch_seeds() {
            let text = std::str::from_utf8(&s[1..]).expect("utf-8");
            let parsed = match s[0] {
                0 => Arch::parse(text).is_ok(),
                1 => Arch::from_model_text(text, false).is_ok(),
                _ => Arch::from_model_text(text, true).is_ok(),
            };
            assert!(parsed, "{text}");
            arch(&s);
        }
    }
}
