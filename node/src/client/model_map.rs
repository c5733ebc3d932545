//! The model map: the owner's private file and the only place that ties
//! slots, hosts and layer order together.

use std::path::{Path, PathBuf};

use mixnn_crypto::Identity;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MapError {
    #[error("cannot access the model map {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the model map {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// Where one stage lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "location", rename_all = "snake_case")]
pub enum StageEntry {
    /// On a volunteer.
    Remote {
        index: usize,
        slot_id: String,
        host: String,
        addresses: Vec<String>,
        version: u64,
        params_digest: String,
    },
    /// Kept by the client (`--keep-ends`); the slot's bytes in hex.
    Local {
        index: usize,
        state: String,
        params_digest: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMap {
    pub format: u32,
    pub arch: String,
    pub optimizer: mixnn_model::OptimizerSpec,
    pub seed: u64,
    pub batch: usize,
    pub steps: u64,
    /// The owner's ed25519 secret, hex: it alone can drive the slots.
    pub owner_secret: String,
    pub stages: Vec<StageEntry>,
    pub params_digest: String,
    /// Whether the job ended and every slot reported its final checkpoint.
    pub complete: bool,
    /// How the job runs, for `--resume` (absent in maps of format 1).
    #[serde(default)]
    pub job: Option<JobRecord>,
    /// What the model was trained on, for `infer` (absent in maps written
    /// before mixnn recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_on: Option<TrainingData>,
}

/// The data a model was trained on: where it came from and its shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingData {
    /// `synthetic`, or the absolute path of the MNIST directory.
    pub source: String,
    /// Features per example (the model's input).
    pub features: usize,
    /// Classes: one more than the largest label.
    pub classes: usize,
}

/// Classes of a split: one more than its largest label (0 when empty).
pub fn classes_of(split: &mixnn_model::Split) -> usize {
    split.labels.iter().max().map_or(0, |&l| usize::from(l) + 1)
}

/// `synthetic` as is; a directory as its absolute path, so the record
/// still finds it from another working directory.
pub fn data_source(spec: &str) -> String {
    if spec == "synthetic" {
        return spec.to_string();
    }
    std::fs::canonicalize(spec)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| spec.to_string())
}

impl TrainingData {
    /// A record of `data` (from `--data spec`).
    pub fn of(spec: &str, data: &mixnn_model::Dataset) -> Self {
        Self {
            source: data_source(spec),
            features: data.train.features,
            classes: classes_of(&data.train).max(classes_of(&data.test)),
        }
    }
}

/// Whether a test set suits a model, for `infer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataCheck {
    /// The same data the model was trained on (or nothing says otherwise).
    Same,
    /// Data of the right shape that is not what the model was trained on:
    /// the reason, for a warning.
    Other(String),
}

impl ModelMap {
    /// Whether `data` (from `--data spec`) can be scored by this model:
    /// an error when its features or classes are not the model's, a
    /// warning ([`DataCheck::Other`]) when it is not the data the model
    /// was trained on.
    pub fn check_data(&self, spec: &str, data: &mixnn_model::Dataset) -> Result<DataCheck, String> {
        let arch = mixnn_model::Arch::parse(&self.arch)
            .map_err(|e| format!("the model map's architecture {}: {e}", self.arch))?;
        let given = TrainingData::of(spec, data);
        let (inputs, outputs) = (arch.input_dim(), arch.output_dim());
        let mut wrong = Vec::new();
        if given.features != inputs {
            wrong.push(format!(
                "{} features per example where {} takes {inputs}",
                given.features, arch
            ));
        }
        if given.classes > outputs {
            wrong.push(format!(
                "labels up to {} where {} has {outputs} classes",
                given.classes.saturating_sub(1),
                arch
            ));
        }
        if let Some(t) = &self.trained_on {
            if given.classes != t.classes && given.classes <= outputs {
                wrong.push(format!(
                    "{} classes where the model was trained on {}",
                    given.classes, t.classes
                ));
            }
        }
        if !wrong.is_empty() {
            let trained = self
                .trained_on
                .as_ref()
                .map(|t| format!(" (the model was trained on {})", t.source))
                .unwrap_or_default();
            return Err(format!(
                "--data {spec} does not fit this model{trained}: {}",
                wrong.join("; ")
            ));
        }
        // The training split as the job saw it, against its fingerprint.
        if let Some(job) = &self.job {
            let train = match job.limit {
                Some(n) => data.train.clone().limit(n),
                None => data.train.clone(),
            };
            if DataFingerprint::of(&train) == job.data {
                return Ok(DataCheck::Same);
            }
            let trained = self
                .trained_on
                .as_ref()
                .map_or_else(|| "other data".to_string(), |t| t.source.clone());
            return Ok(DataCheck::Other(format!(
                "--data {spec} is not the data the model was trained on ({trained}): \
                 its accuracy there says little about the model"
            )));
        }
        match &self.trained_on {
            Some(t) if t.source != given.source => Ok(DataCheck::Other(format!(
                "--data {spec} is not the data the model was trained on ({}): \
                 its accuracy there says little about the model",
                t.source
            ))),
            _ => Ok(DataCheck::Same),
        }
    }
}

/// What a training job needs to carry on after an interruption.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub epochs: u32,
    pub limit: Option<usize>,
    pub keep_ends: bool,
    pub mixes: usize,
    /// The training data the job runs on.
    pub data: DataFingerprint,
    /// The step of the checkpoint beside the map.
    pub checkpoint_step: u64,
}

/// Identifies a training split: its size and a digest of its contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub examples: usize,
    pub features: usize,
    pub digest: String,
}

impl DataFingerprint {
    pub fn of(split: &mixnn_model::Split) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&(split.features as u64).to_le_bytes());
        h.update(&split.labels);
        mixnn_model::digest::hash_f32s(&mut h, &split.images);
        Self {
            examples: split.len(),
            features: split.features,
            digest: h.finalize().to_hex().to_string(),
        }
    }
}

pub const FORMAT: u32 = 2;

impl ModelMap {
    pub fn owner(&self) -> Result<Identity, MapError> {
        let bad = |reason: &str| MapError::Malformed {
            path: PathBuf::new(),
            reason: reason.into(),
        };
        let bytes = hex::decode(&self.owner_secret).map_err(|_| bad("owner_secret is not hex"))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("owner_secret is not 32 bytes"))?;
        Ok(Identity::from_secret(&secret))
    }

    /// Write atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), MapError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| MapError::Malformed {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        super::checkpoint::write_private(path, text.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self, MapError> {
        let io = |source| MapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |reason: String| MapError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > 512 << 20 {
            return Err(bad("larger than 512 MiB".into()));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let map: ModelMap = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if map.format != FORMAT && map.format != 1 {
            return Err(bad(format!("format {} is not supported", map.format)));
        }
        map.owner().map_err(|e| bad(e.to_string()))?;
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixnn_model::{synthetic, Dataset, Split};

    fn map(arch: &str, trained_on: Option<TrainingData>, job: Option<JobRecord>) -> ModelMap {
        ModelMap {
            format: FORMAT,
            arch: arch.into(),
            optimizer: mixnn_model::OptimizerSpec::Sgd { lr: 0.1 },
            seed: 7,
            batch: 32,
            steps: 0,
            owner_secret: hex::encode([7u8; 32]),
            stages: vec![],
            params_digest: String::new(),
            complete: true,
            job,
            trained_on,
        }
    }

    fn record(train: &Split, limit: Option<usize>) -> JobRecord {
        let split = match limit {
            Some(n) => train.clone().limit(n),
            None => train.clone(),
        };
        JobRecord {
            epochs: 1,
            limit,
            keep_ends: false,
            mixes: 1,
            data: DataFingerprint::of(&split),
            checkpoint_step: 0,
        }
    }

    /// The fingerprint stays what model maps already hold: blake3 over the
    /// feature count, the labels, then every pixel as little-endian f32.
    #[test]
    fn a_fingerprint_is_blake3_over_the_split_bytes() {
        let split = Split {
            features: 3,
            images: (0..3000).map(|i| i as f32 * 0.25 - 7.0).collect(),
            labels: (0..1000).map(|i| (i % 10) as u8).collect(),
        };
        let mut bytes = 3u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&split.labels);
        for x in &split.images {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        let fp = DataFingerprint::of(&split);
        assert_eq!(fp.digest, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!((fp.examples, fp.features), (1000, 3));
    }

    #[test]
    fn the_data_a_model_was_trained_on_passes_and_other_data_warns() {
        let data = synthetic(1, 64, 16);
        let trained = TrainingData::of("synthetic", &data);
        assert_eq!((trained.features, trained.classes), (784, 10));
        let m = map(
            "mlp:784-16-10",
            Some(trained),
            Some(record(&data.train, Some(40))),
        );
        assert_eq!(m.check_data("synthetic", &data), Ok(DataCheck::Same));
        // Same shape, other contents: a warning that names the training data.
        let other = synthetic(2, 64, 16);
        match m.check_data("synthetic", &other) {
            Ok(DataCheck::Other(w)) => assert!(w.contains("synthetic"), "{w}"),
            got => panic!("{got:?}"),
        }
        // Without a job record, the recorded source decides.
        let m = map(
            "mlp:784-16-10",
            Some(TrainingData {
                source: "/data/mnist".into(),
                features: 784,
                classes: 10,
            }),
            None,
        );
        match m.check_data("synthetic", &data) {
            Ok(DataCheck::Other(w)) => assert!(w.contains("/data/mnist"), "{w}"),
            got => panic!("{got:?}"),
        }
    }

    #[test]
    fn data_of_another_shape_is_refused() {
        let data = synthetic(1, 64, 16);
        // Other features.
        let m = map("mlp:100-16-10", None, None);
        let err = m.check_data("synthetic", &data).expect_err("784 != 100");
        assert!(err.contains("784 features") && err.contains("100"), "{err}");
        // Labels the model has no class for.
        let m = map("mlp:784-16-5", None, None);
        let err = m
            .check_data("synthetic", &data)
            .expect_err("10 classes > 5");
        assert!(err.contains("5 classes"), "{err}");
        // Fewer classes than the model was trained on.
        let few = Dataset {
            train: Split {
                features: 784,
                images: vec![0.0; 784 * 2],
                labels: vec![0, 3],
            },
            test: Split {
                features: 784,
                images: vec![0.0; 784],
                labels: vec![1],
            },
        };
        let m = map(
            "mlp:784-16-10",
            Some(TrainingData::of("synthetic", &data)),
            None,
        );
        let err = m
            .check_data("elsewhere", &few)
            .expect_err("4 classes != 10");
        assert!(err.contains("4 classes"), "{err}");
    }

    #[test]
    fn maps_without_a_training_record_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.json");
        let mut value = serde_json::to_value(map("mlp:784-16-10", None, None)).expect("json");
        value.as_object_mut().expect("object").remove("trained_on");
        std::fs::write(&path, value.to_string()).expect("write");
        let loaded = ModelMap::load(&path).expect("an older map loads");
        assert_eq!(loaded.trained_on, None);
        // And a record survives a round trip.
        let mut m = map("mlp:784-16-10", None, None);
        m.trained_on = Some(TrainingData {
            source: "synthetic".into(),
            features: 784,
            classes: 10,
        });
        m.save(&path).expect("save");
        assert_eq!(ModelMap::load(&path).expect("load"), m);
    }
}
