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
        for x in &split.images {
            h.update(&x.to_le_bytes());
        }
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
