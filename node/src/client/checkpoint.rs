//! The owner's checkpoint: every stage's state (parameters, optimizer
//! state, steps applied) after some step, and the losses up to it. Written
//! beside the model map, atomically and private (mode 0600); with the map
//! it is everything needed to resume the job or fail a stage over.

use std::io::Write;
use std::path::{Path, PathBuf};

use mixnn_model::{model_digest, Slot};

use super::model_map::MapError;

const MAGIC: &[u8; 7] = b"MXCKPT1";
const SUM: usize = 32;
/// Largest checkpoint file read back.
pub const MAX_CHECKPOINT_BYTES: u64 = 8 << 30;

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Steps every stage has applied.
    pub step: u64,
    /// Each stage's slot bytes ([`Slot::to_bytes`]), in model order.
    pub stages: Vec<Vec<u8>>,
    /// The loss of every step up to `step`.
    pub losses: Vec<f32>,
}

/// Where the checkpoint of the model map at `map` lives.
pub fn path_for(map: &Path) -> PathBuf {
    let mut name = map
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".ckpt");
    map.with_file_name(name)
}

impl Checkpoint {
    /// The model's parameter digest at this checkpoint (what `params_digest`
    /// reports), checking that every stage reads back and is at `step`.
    pub fn digest(&self) -> Result<[u8; 32], String> {
        let mut digests = Vec::with_capacity(self.stages.len());
        for (i, bytes) in self.stages.iter().enumerate() {
            let slot = Slot::from_bytes(bytes).map_err(|e| format!("stage {i}: {e}"))?;
            if slot.steps_applied() != self.step {
                return Err(format!(
                    "stage {i} has applied {} steps, the checkpoint is for step {}",
                    slot.steps_applied(),
                    self.step
                ));
            }
            digests.push(slot.params_digest());
        }
        Ok(model_digest(&digests))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let size: usize = self.stages.iter().map(|s| s.len() + 8).sum();
        let mut out = Vec::with_capacity(MAGIC.len() + 24 + size + 4 * self.losses.len() + SUM);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&(self.stages.len() as u64).to_le_bytes());
        for s in &self.stages {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s);
        }
        out.extend_from_slice(&(self.losses.len() as u64).to_le_bytes());
        for l in &self.losses {
            out.extend_from_slice(&l.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < MAGIC.len() + SUM || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a MixNN checkpoint".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - SUM);
        if blake3::hash(body).as_bytes() != sum {
            return Err("checksum mismatch (truncated or corrupt)".into());
        }
        let mut r = Reader {
            rest: &body[MAGIC.len()..],
        };
        let step = r.u64()?;
        let n = r.u64()?;
        if n > 1024 {
            return Err(format!("{n} stages"));
        }
        let mut stages = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let len = r.u64()?;
            stages.push(r.take(len)?.to_vec());
        }
        let n = r.u64()?;
        let raw = r.take(n.checked_mul(4).ok_or("too many losses")?)?;
        let losses = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if !r.rest.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(Self {
            step,
            stages,
            losses,
        })
    }

    /// Write atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), MapError> {
        write_private(path, &self.to_bytes())
    }

    pub fn load(path: &Path) -> Result<Self, MapError> {
        let io = |source| MapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > MAX_CHECKPOINT_BYTES {
            return Err(MapError::Malformed {
                path: path.to_path_buf(),
                reason: format!("larger than {MAX_CHECKPOINT_BYTES} bytes"),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Self::from_bytes(&bytes).map_err(|reason| MapError::Malformed {
            path: path.to_path_buf(),
            reason,
        })
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        if n > self.rest.len() as u64 {
            return Err("truncated".into());
        }
        let (a, b) = self.rest.split_at(n as usize);
        self.rest = b;
        Ok(a)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Write `bytes` to `path` atomically (a temporary file beside it, synced,
/// then renamed) with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), MapError> {
    let io = |source| MapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            step: 42,
            stages: vec![vec![1, 2, 3], vec![], vec![9; 1000]],
            losses: vec![2.3, 1.5, f32::NAN],
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let c = sample();
        let bytes = c.to_bytes();
        let back = Checkpoint::from_bytes(&bytes).expect("reads");
        assert_eq!(back.step, 42);
        assert_eq!(back.stages, c.stages);
        assert_eq!(back.losses.len(), 3);
        assert_eq!(back.losses[..2], c.losses[..2]);
        for cut in [0, 5, 7, 20, bytes.len() - 1] {
            assert!(Checkpoint::from_bytes(&bytes[..cut]).is_err(), "cut {cut}");
        }
        for i in [0, 8, 30, bytes.len() - 40, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Checkpoint::from_bytes(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn saved_files_are_private_and_sit_beside_the_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let map = dir.path().join("m.json");
        let path = path_for(&map);
        assert_eq!(path, dir.path().join("m.json.ckpt"));
        sample().save(&path).expect("save");
        assert_eq!(Checkpoint::load(&path).expect("load").step, 42);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
