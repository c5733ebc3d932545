//! What a node keeps on disk: its identity, its onion keys, the slots it
//! holds and the replay cache, in one data directory.
//!
//! Slots live behind the [`SlotStore`] trait: [`SledStore`] for nodes,
//! [`MemoryStore`] for tests. Every slot write replaces one sled value, so a
//! crash leaves either the old or the new slot, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mixnn_crypto::{Identity, KeyFileError, OnionKeyPair};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Opaque slot id chosen by the model's owner.
pub type SlotId = [u8; 16];

/// Largest slot record the store accepts (parameters plus optimizer state).
pub const MAX_SLOT_BYTES: usize = 512 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("the data directory {path} could not be used: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data directory {0} is in use by another running node (its database is locked); \
         stop that node or choose another --data-dir"
    )]
    Locked(PathBuf),
    #[error("database error: {0}")]
    Db(#[from] sled::Error),
    #[error("stored record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("slot record of {0} bytes exceeds the {MAX_SLOT_BYTES} byte limit")]
    TooLarge(usize),
    #[error(transparent)]
    Key(#[from] KeyFileError),
}

/// One slot as stored: who owns it, what it holds, and its serialized state
/// (the model crate's slot bytes: spec, parameters, optimizer state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredSlot {
    pub id: SlotId,
    /// ed25519 key of the model's owner; only it may drive the slot.
    pub owner: [u8; 32],
    /// Increases with every checkpoint.
    pub version: u64,
    pub param_count: u64,
    pub state: Vec<u8>,
}

/// A slot's summary, without its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMeta {
    pub id: SlotId,
    pub owner: [u8; 32],
    pub version: u64,
    pub param_count: u64,
}

impl From<&StoredSlot> for SlotMeta {
    fn from(s: &StoredSlot) -> Self {
        Self {
            id: s.id,
            owner: s.owner,
            version: s.version,
            param_count: s.param_count,
        }
    }
}

/// Where a node keeps its slots.
pub trait SlotStore: Send + Sync {
    /// Insert or replace a slot atomically.
    fn put_slot(&self, slot: &StoredSlot) -> Result<(), StoreError>;
    fn get_slot(&self, id: &SlotId) -> Result<Option<StoredSlot>, StoreError>;
    fn remove_slot(&self, id: &SlotId) -> Result<bool, StoreError>;
    fn list_slots(&self) -> Result<Vec<SlotMeta>, StoreError>;
    /// Make every earlier write durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// In-memory slots, for tests.
#[derive(Default)]
pub struct MemoryStore {
    slots: Mutex<BTreeMap<SlotId, StoredSlot>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SlotId, StoredSlot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SlotStore for MemoryStore {
    fn put_slot(&self, slot: &StoredSlot) -> Result<(), StoreError> {
        if slot.state.len() > MAX_SLOT_BYTES {
            return Err(StoreError::TooLarge(slot.state.len()));
        }
        self.lock().insert(slot.id, slot.clone());
        Ok(())
    }
    fn get_slot(&self, id: &SlotId) -> Result<Option<StoredSlot>, StoreError> {
        Ok(self.lock().get(id).cloned())
    }
    fn remove_slot(&self, id: &SlotId) -> Result<bool, StoreError> {
        Ok(self.lock().remove(id).is_some())
    }
    fn list_slots(&self) -> Result<Vec<SlotMeta>, StoreError> {
        Ok(self.lock().values().map(SlotMeta::from).collect())
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Slots in a sled tree; the value is postcard of [`StoredSlot`].
#[derive(Clone)]
pub struct SledStore {
    slots: sled::Tree,
    db: sled::Db,
}

fn decode_slot(key: &[u8], value: &[u8]) -> Result<StoredSlot, StoreError> {
    postcard::from_bytes(value).map_err(|e| StoreError::Corrupt {
        what: format!("slot {}", hex::encode(key)),
        reason: e.to_string(),
    })
}

impl SlotStore for SledStore {
    fn put_slot(&self, slot: &StoredSlot) -> Result<(), StoreError> {
        if slot.state.len() > MAX_SLOT_BYTES {
            return Err(StoreError::TooLarge(slot.state.len()));
        }
        let bytes = postcard::to_allocvec(slot).map_err(|e| StoreError::Corrupt {
            what: "slot".into(),
            reason: e.to_string(),
        })?;
        self.slots.insert(slot.id, bytes)?;
        Ok(())
    }

    fn get_slot(&self, id: &SlotId) -> Result<Option<StoredSlot>, StoreError> {
        match self.slots.get(id)? {
            Some(v) => decode_slot(id, &v).map(Some),
            None => Ok(None),
        }
    }

    fn remove_slot(&self, id: &SlotId) -> Result<bool, StoreError> {
        Ok(self.slots.remove(id)?.is_some())
    }

    fn list_slots(&self) -> Result<Vec<SlotMeta>, StoreError> {
        let mut out = Vec::new();
        for item in self.slots.iter() {
            let (k, v) = item?;
            out.push(SlotMeta::from(&decode_slot(&k, &v)?));
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// A node's data directory: `identity.key` and a sled database `db/`.
///
/// Opening it takes sled's exclusive lock, so two nodes can never share one.
pub struct DataDir {
    path: PathBuf,
    db: sled::Db,
    identity: Identity,
    created: bool,
}

impl DataDir {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::DataDir {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let db = sled::Config::new()
            .path(path.join("db"))
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(32 << 20)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io_err)
                    if io_err.kind() == std::io::ErrorKind::WouldBlock
                        || io_err.to_string().contains("lock") =>
                {
                    StoreError::Locked(path.to_path_buf())
                }
                other => StoreError::Db(other),
            })?;
        let (identity, created) = Identity::load_or_generate(&path.join("identity.key"))?;
        Ok(Self {
            path: path.to_path_buf(),
            db,
            identity,
            created,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether this open created a new identity.
    pub fn is_new(&self) -> bool {
        self.created
    }

    pub fn slots(&self) -> Result<SledStore, StoreError> {
        Ok(SledStore {
            slots: self.db.open_tree("slots")?,
            db: self.db.clone(),
        })
    }

    /// Onion keys by epoch.
    pub fn save_onion_key(&self, key: &OnionKeyPair) -> Result<(), StoreError> {
        let tree = self.db.open_tree("onion")?;
        tree.insert(key.epoch().to_be_bytes(), key.to_bytes().as_slice())?;
        Ok(())
    }

    pub fn load_onion_keys(&self) -> Result<Vec<OnionKeyPair>, StoreError> {
        let tree = self.db.open_tree("onion")?;
        let mut out = Vec::new();
        for item in tree.iter() {
            let (k, v) = item?;
            let key = OnionKeyPair::from_bytes(&v).map_err(|reason| StoreError::Corrupt {
                what: format!("onion key {}", hex::encode(&k)),
                reason: reason.into(),
            })?;
            out.push(key);
        }
        Ok(out)
    }

    pub fn remove_onion_key(&self, epoch: u64) -> Result<(), StoreError> {
        self.db.open_tree("onion")?.remove(epoch.to_be_bytes())?;
        Ok(())
    }

    /// A persistent replay cache tree.
    pub fn replay_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree("replay")?)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u8) -> StoredSlot {
        StoredSlot {
            id: [n; 16],
            owner: [9; 32],
            version: 1,
            param_count: 3,
            state: vec![n; 100],
        }
    }

    fn exercise(store: &dyn SlotStore) {
        assert!(store.get_slot(&[1; 16]).expect("get").is_none());
        store.put_slot(&slot(1)).expect("put");
        store.put_slot(&slot(2)).expect("put");
        let mut s = slot(1);
        s.version = 2;
        store.put_slot(&s).expect("replace");
        assert_eq!(store.get_slot(&[1; 16]).expect("get"), Some(s));
        assert_eq!(store.list_slots().expect("list").len(), 2);
        assert!(store.remove_slot(&[2; 16]).expect("remove"));
        assert!(!store.remove_slot(&[2; 16]).expect("remove"));
        store.flush().expect("flush");
    }

    #[test]
    fn memory_store_behaves() {
        exercise(&MemoryStore::default());
    }

    #[test]
    fn sled_store_behaves_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let peer;
        {
            let data = DataDir::open(dir.path()).expect("open");
            assert!(data.is_new());
            peer = data.identity().public_key();
            let store = data.slots().expect("slots");
            exercise(&store);
            data.save_onion_key(&OnionKeyPair::generate(4, 99))
                .expect("onion");
            data.flush().expect("flush");
        }
        let data = DataDir::open(dir.path()).expect("reopen");
        assert!(!data.is_new());
        assert_eq!(data.identity().public_key(), peer);
        let store = data.slots().expect("slots");
        assert_eq!(store.list_slots().expect("list").len(), 1);
        assert_eq!(
            store.get_slot(&[1; 16]).expect("get").map(|s| s.version),
            Some(2)
        );
        assert_eq!(data.load_onion_keys().expect("keys")[0].epoch(), 4);
    }

    #[test]
    fn a_held_data_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = DataDir::open(dir.path()).expect("open");
        match DataDir::open(dir.path()) {
            Err(StoreError::Locked(p)) => assert_eq!(p, dir.path()),
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("a second open of a held data dir succeeded"),
        }
    }

    #[test]
    fn oversize_slot_is_refused() {
        let store = MemoryStore::default();
        let mut s = slot(1);
        s.state = vec![0; MAX_SLOT_BYTES + 1];
        assert!(matches!(store.put_slot(&s), Err(StoreError::TooLarge(_))));
    }
}
