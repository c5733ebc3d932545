//! Fuzz targets for every MixNN decoder that bytes from a peer (or from a
//! file) reach: the setup onion, cells and messages, circuit frames, job
//! messages, hop payloads, sealed reports, descriptor records, the tensor
//! codec, slot bytes and metadata, checkpoints and safetensors files.
//!
//! A target takes arbitrary bytes and must not panic; where the format has
//! an encoder it also checks the round trip. Where a tag or a signature
//! stands in front of a decoder, the target seals or signs the fuzzer's
//! bytes with a fixed key first (`mixnn_crypto::fuzzing`), so the decoder
//! sees them. The first byte of an input often picks a mode (raw bytes, or
//! bytes wrapped so they pass the outer checks).
//!
//! `fuzz/run.sh` runs the targets under libFuzzer; `cargo test -p
//! mixnn-fuzz` runs each on its seeds and on the inputs kept in
//! `fuzz/regressions/<target>/` (crashes found once, fixed since).

use std::path::Path;

mod input;
mod targets;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// Runs one input; panics on a bug.
    pub run: fn(&[u8]),
    /// Inputs made with our own encoders, to start the corpus from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Longest input worth trying (libFuzzer's `-max_len`).
    pub max_len: usize,
}

pub const TARGETS: &[Target] = &[
    targets::onion::TARGET,
    targets::cells::TARGET,
    targets::wire::TARGET,
    targets::payload::JOB_MSG,
    targets::payload::HOP_PAYLOAD,
    targets::payload::REPORT,
    targets::descriptor::TARGET,
    targets::tensor::TARGET,
    targets::slot::SLOT_BYTES,
    targets::slot::SLOT_META,
    targets::files::CHECKPOINT,
    targets::files::SAFETENSORS,
    targets::files::ARCH,
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Writes `target`'s seeds into `dir` (created if missing) as `seed-N`.
pub fn write_seeds(target: &Target, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, seed) in (target.seeds)().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), seed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, t) in TARGETS.iter().enumerate() {
            assert!(
                TARGETS[..i].iter().all(|u| u.name != t.name),
                "{} twice",
                t.name
            );
        }
    }

    #[test]
    fn every_target_runs_its_seeds() {
        for t in TARGETS {
            let seeds = (t.seeds)();
            assert!(!seeds.is_empty(), "{} has no seeds", t.name);
            for s in &seeds {
                assert!(s.len() <= t.max_len, "{}: a seed over max_len", t.name);
                (t.run)(s);
            }
        }
    }

    /// Inputs that once crashed a decoder, kept so the fix stays.
    #[test]
    fn regressions_stay_fixed() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        for t in TARGETS {
            let Ok(entries) = std::fs::read_dir(root.join(t.name)) else {
                continue;
            };
            for e in entries {
                let path = e.expect("regression entry").path();
                let bytes = std::fs::read(&path).expect("regression input");
                (t.run)(&bytes);
            }
        }
    }

    #[test]
    fn seeds_are_written_where_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = target("tensor").expect("a target");
        write_seeds(t, &dir.path().join("corpus")).expect("written");
        let n = std::fs::read_dir(dir.path().join("corpus"))
            .expect("the corpus")
            .count();
        assert_eq!(n, (t.seeds)().len());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// What the fuzzer does, briefly and without coverage: any bytes.
        #[test]
        fn random_inputs_are_fine(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            for t in TARGETS {
                (t.run)(&data);
            }
        }
    }

    #[test]
    fn empty_and_tiny_inputs_are_fine() {
        for t in TARGETS {
            (t.run)(&[]);
            for b in 0..=255u8 {
                (t.run)(&[b]);
                (t.run)(&[b, b]);
            }
        }
    }
}
