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

pub use crate::network::records::unix_now;

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

/// When a slot ends. Times are unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub created: u64,
    /// The last time a job of the owner used the slot.
    pub last_used: u64,
    /// The slot is freed once this time has passed.
    pub until: u64,
    /// Whether a job of the owner ever ran on the slot. A slot whose setup
    /// never completed gets a short first lease ([`SETUP_GRACE_SECS`]).
    pub confirmed: bool,
}

/// How long a newly created slot waits for its first job message before
/// the node frees it.
pub const SETUP_GRACE_SECS: u64 = 60;

impl Lease {
    /// The lease of a slot created at `now` by a setup that has not run
    /// yet.
    pub fn provisional(now: u64) -> Self {
        Self {
            created: now,
            last_used: now,
            until: now + SETUP_GRACE_SECS,
            confirmed: false,
        }
    }

    /// The lease after the owner used the slot at `now`, asking for
    /// `secs` more: never shorter than a confirmed lease was (the grace of
    /// a setup does not count).
    pub fn extended(self, now: u64, secs: u64) -> Self {
        let asked = now.saturating_add(secs);
        Self {
            last_used: now.max(self.last_used),
            until: if self.confirmed {
                self.until.max(asked)
            } else {
                asked
            },
            confirmed: true,
            ..self
        }
    }

    pub fn expired(&self, now: u64) -> bool {
        now >= self.until
    }
}

/// One slot as stored: who owns it, what it holds, and its serialized state
/// (the model crate's slot bytes: spec, parameters, optimizer state).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSlot {
    pub id: SlotId,
    /// ed25519 key of the model's owner; only it may drive the slot.
    pub owner: [u8; 32],
    /// Increases with every checkpoint.
    pub version: u64,
    pub param_count: u64,
    pub lease: Lease,
    pub state: Vec<u8>,
}

/// A slot's summary, without its state: what the metadata tree holds, so
/// that listing slots never reads parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMeta {
    pub id: SlotId,
    pub owner: [u8; 32],
    pub version: u64,
    pub param_count: u64,
    pub lease: Lease,
    /// Length of the state, and a digest of the version and the state:
    /// a load checks both, so a corrupt or rolled-back state is refused.
    pub state_len: u64,
    pub digest: [u8; 32],
}

/// The digest a slot's metadata keeps of its version and state.
pub fn state_digest(version: u64, state: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("mixnn slot state v1");
    h.update(&version.to_le_bytes());
    h.update(state);
    *h.finalize().as_bytes()
}

impl StoredSlot {
    pub fn meta(&self) -> SlotMeta {
        SlotMeta {
            id: self.id,
            owner: self.owner,
            version: self.version,
            param_count: self.param_count,
            lease: self.lease,
            state_len: self.state.len() as u64,
            digest: state_digest(self.version, &self.state),
        }
    }
}

/// Check a loaded state against its metadata.
fn verified(meta: SlotMeta, state: Vec<u8>) -> Result<StoredSlot, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        what: format!("slot {}", hex::encode(meta.id)),
        reason: reason.into(),
    };
    if state.len() as u64 != meta.state_len {
        return Err(corrupt(&format!(
            "its state has {} bytes where version {} has {}",
            state.len(),
            meta.version,
            meta.state_len
        )));
    }
    if state_digest(meta.version, &state) != meta.digest {
        return Err(corrupt(&format!(
            "its state does not match the digest of version {}",
            meta.version
        )));
    }
    Ok(StoredSlot {
        id: meta.id,
        owner: meta.owner,
        version: meta.version,
        param_count: meta.param_count,
        lease: meta.lease,
        state,
    })
}

/// Where a node keeps its slots.
pub trait SlotStore: Send + Sync {
    /// Insert or replace a slot (state and metadata) atomically.
    fn put_slot(&self, slot: &StoredSlot) -> Result<(), StoreError>;
    /// The slot, its state checked against its metadata: a mismatch is
    /// [`StoreError::Corrupt`], never an older or partial state.
    fn get_slot(&self, id: &SlotId) -> Result<Option<StoredSlot>, StoreError>;
    fn get_meta(&self, id: &SlotId) -> Result<Option<SlotMeta>, StoreError>;
    /// Replace a slot's lease without touching its state; false if the
    /// slot is gone.
    fn set_lease(&self, id: &SlotId, lease: Lease) -> Result<bool, StoreError>;
    fn remove_slot(&self, id: &SlotId) -> Result<bool, StoreError>;
    /// Every slot's metadata (reads no state).
    fn list_slots(&self) -> Result<Vec<SlotMeta>, StoreError>;
    /// Make every earlier write durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// In-memory slots, for tests.
#[derive(Default)]
pub struct MemoryStore {
    slots: Mutex<BTreeMap<SlotId, (SlotMeta, Vec<u8>)>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SlotId, (SlotMeta, Vec<u8>)>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Overwrite a slot's stored state behind its metadata's back (tests of
    /// corruption).
    pub fn corrupt_state(&self, id: &SlotId, state: Vec<u8>) {
        if let Some(e) = self.lock().get_mut(id) {
            e.1 = state;
        }
    }
}

impl SlotStore for MemoryStore {
    fn put_slot(&self, slot: &StoredSlot) -> Result<(), StoreError> {
        if slot.state.len() > MAX_SLOT_BYTES {
            return Err(StoreError::TooLarge(slot.state.len()));
        }
        self.lock()
            .insert(slot.id, (slot.meta(), slot.state.clone()));
        Ok(())
    }
    fn get_slot(&self, id: &SlotId) -> Result<Option<StoredSlot>, StoreError> {
        let entry = self.lock().get(id).cloned();
        entry.map(|(m, s)| verified(m, s)).transpose()
    }
    fn get_meta(&self, id: &SlotId) -> Result<Option<SlotMeta>, StoreError> {
        Ok(self.lock().get(id).map(|e| e.0.clone()))
    }
    fn set_lease(&self, id: &SlotId, lease: Lease) -> Result<bool, StoreError> {
        Ok(self.lock().get_mut(id).map(|e| e.0.lease = lease).is_some())
    }
    fn remove_slot(&self, id: &SlotId) -> Result<bool, StoreError> {
        Ok(self.lock().remove(id).is_some())
    }
    fn list_slots(&self) -> Result<Vec<SlotMeta>, StoreError> {
        Ok(self.lock().values().map(|e| e.0.clone()).collect())
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Slots in two sled trees written together: `slot_meta` (postcard of
/// [`SlotMeta`]) and `slot_state` (the state bytes).
#[derive(Clone)]
pub struct SledStore {
    meta: sled::Tree,
    state: sled::Tree,
    db: sled::Db,
}

fn decode_meta(key: &[u8], value: &[u8]) -> Result<SlotMeta, StoreError> {
    postcard::from_bytes(value).map_err(|e| StoreError::Corrupt {
        what: format!("slot metadata {}", hex::encode(key)),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| StoreError::Corrupt {
        what: what.into(),
        reason: e.to_string(),
    })
}

impl SledStore {
    /// Replace a slot's state bytes and nothing else, as a failing disk
    /// would (tests of corruption).
    #[doc(hidden)]
    pub fn overwrite_state_for_tests(&self, id: &SlotId, state: &[u8]) -> Result<(), StoreError> {
        self.state.insert(id, state)?;
        Ok(())
    }

    fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let store = Self {
            meta: db.open_tree("slot_meta")?,
            state: db.open_tree("slot_state")?,
            db: db.clone(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Slots written before the metadata tree existed (one postcard value
    /// per slot in the tree `slots`) move to the two trees with a fresh
    /// lease of [`DEFAULT_MIGRATED_LEASE_SECS`].
    fn migrate(&self) -> Result<(), StoreError> {
        #[derive(Deserialize)]
        struct OldSlot {
            id: SlotId,
            owner: [u8; 32],
            version: u64,
            param_count: u64,
            state: Vec<u8>,
        }
        let old = self.db.open_tree("slots")?;
        if old.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        for item in old.iter() {
            let (k, v) = item?;
            let o: OldSlot = postcard::from_bytes(&v).map_err(|e| StoreError::Corrupt {
                what: format!("slot {} (old format)", hex::encode(&k)),
                reason: e.to_string(),
            })?;
            self.put_slot(&StoredSlot {
                id: o.id,
                owner: o.owner,
                version: o.version,
                param_count: o.param_count,
                lease: Lease::provisional(now).extended(now, DEFAULT_MIGRATED_LEASE_SECS),
                state: o.state,
            })?;
        }
        self.db.drop_tree("slots")?;
        Ok(())
    }
}

/// Our transactions never abort on their own; storage errors pass through.
fn transaction_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
        sled::transaction::TransactionError::Abort(()) => StoreError::Corrupt {
            what: "slot".into(),
            reason: "a write was aborted".into(),
        },
    }
}

/// The lease slots of an older store get when they move to this one.
pub const DEFAULT_MIGRATED_LEASE_SECS: u64 = 7 * 24 * 3600;

impl SlotStore for SledStore {
    fn put_slot(&self, slot: &StoredSlot) -> Result<(), StoreError> {
        use sled::Transactional;
        if slot.state.len() > MAX_SLOT_BYTES {
            return Err(StoreError::TooLarge(slot.state.len()));
        }
        let meta = encode("slot metadata", &slot.meta())?;
        (&self.meta, &self.state)
            .transaction(|(m, s)| {
                s.insert(&slot.id[..], slot.state.as_slice())?;
                m.insert(&slot.id[..], meta.as_slice())?;
                Ok(())
            })
            .map_err(transaction_error)?;
        Ok(())
    }

    fn get_slot(&self, id: &SlotId) -> Result<Option<StoredSlot>, StoreError> {
        let Some(meta) = self.get_meta(id)? else {
            return Ok(None);
        };
        let state = self.state.get(id)?.map(|v| v.to_vec()).unwrap_or_default();
        verified(meta, state).map(Some)
    }

    fn get_meta(&self, id: &SlotId) -> Result<Option<SlotMeta>, StoreError> {
        self.meta.get(id)?.map(|v| decode_meta(id, &v)).transpose()
    }

    fn set_lease(&self, id: &SlotId, lease: Lease) -> Result<bool, StoreError> {
        // Compare and swap, so a checkpoint written meanwhile is not undone.
        loop {
            let Some(raw) = self.meta.get(id)? else {
                return Ok(false);
            };
            let mut meta = decode_meta(id, &raw)?;
            meta.lease = lease;
            let bytes = encode("slot metadata", &meta)?;
            if self
                .meta
                .compare_and_swap(id, Some(raw), Some(bytes))?
                .is_ok()
            {
                return Ok(true);
            }
        }
    }

    fn remove_slot(&self, id: &SlotId) -> Result<bool, StoreError> {
        use sled::Transactional;
        (&self.meta, &self.state)
            .transaction(|(m, s)| {
                let had = m.remove(&id[..])?.is_some();
                s.remove(&id[..])?;
                Ok(had)
            })
            .map_err(transaction_error)
    }

    fn list_slots(&self) -> Result<Vec<SlotMeta>, StoreError> {
        let mut out = Vec::new();
        for item in self.meta.iter() {
            let (k, v) = item?;
            out.push(decode_meta(&k, &v)?);
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Drop the replay tags of epochs before `keep_from` (their onion keys are
/// gone, so no setup of theirs can be peeled again). Tags are keyed by
/// their epoch, big-endian, first. Returns how many were dropped.
pub fn prune_replay(tree: &sled::Tree, keep_from: u64) -> Result<usize, StoreError> {
    let end = keep_from.to_be_bytes();
    let stale: Vec<_> = tree
        .range(..end.as_slice())
        .keys()
        .collect::<Result<_, _>>()?;
    for k in &stale {
        tree.remove(k)?;
    }
    Ok(stale.len())
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
        SledStore::open(&self.db)
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

    /// A flush to run on another thread (shutdown bounds its wait).
    pub fn flusher(&self) -> impl FnOnce() -> Result<(), StoreError> + Send + 'static {
        let db = self.db.clone();
        move || {
            db.flush()?;
            Ok(())
        }
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
            lease: Lease::provisional(1000),
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
        assert!(store.get_meta(&[2; 16]).expect("meta").is_none());
        // A lease changes without rewriting the state.
        let longer = Lease::provisional(1000).extended(2000, 50);
        assert!(store.set_lease(&[1; 16], longer).expect("lease"));
        assert!(!store.set_lease(&[2; 16], longer).expect("lease"));
        let got = store.get_slot(&[1; 16]).expect("get").expect("slot");
        assert_eq!((got.lease, got.version), (longer, 2));
        assert_eq!(store.list_slots().expect("list")[0].lease, longer);
        store.flush().expect("flush");
    }

    #[test]
    fn leases_only_grow_and_confirm() {
        let l = Lease::provisional(100);
        assert_eq!(l.until, 100 + SETUP_GRACE_SECS);
        assert!(!l.confirmed && !l.expired(159) && l.expired(160));
        // The first use replaces the setup's grace, even with less.
        assert_eq!(l.extended(110, 5).until, 115);
        let l = l.extended(120, 1000);
        assert_eq!((l.until, l.last_used, l.confirmed), (1120, 120, true));
        // A shorter request never cuts a lease.
        assert_eq!(l.extended(130, 10).until, 1120);
        assert_eq!(l.extended(130, 10).last_used, 130);
    }

    #[test]
    fn a_state_that_does_not_match_its_digest_is_refused() {
        let store = MemoryStore::default();
        store.put_slot(&slot(1)).expect("put");
        let mut bytes = vec![1u8; 100];
        bytes[40] ^= 1;
        store.corrupt_state(&[1; 16], bytes);
        let err = store.get_slot(&[1; 16]).expect_err("flipped byte");
        assert!(err.to_string().contains("does not match"), "{err}");
        store.corrupt_state(&[1; 16], vec![1u8; 99]);
        assert!(store.get_slot(&[1; 16]).is_err());
    }

    #[test]
    fn a_flipped_byte_on_disk_is_refused_not_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = DataDir::open(dir.path()).expect("open");
        let store = data.slots().expect("slots");
        store.put_slot(&slot(5)).expect("put");
        let mut s = slot(5);
        s.version = 2;
        s.state = vec![6; 100];
        // An older state written under the newer metadata: a rollback.
        store.put_slot(&s).expect("put");
        store.state.insert([5u8; 16], vec![5u8; 100]).expect("raw");
        let err = store.get_slot(&[5; 16]).expect_err("rolled back");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn slots_of_the_old_single_tree_format_move_to_the_metadata_tree() {
        #[derive(Serialize)]
        struct OldSlot {
            id: SlotId,
            owner: [u8; 32],
            version: u64,
            param_count: u64,
            state: Vec<u8>,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let data = DataDir::open(dir.path()).expect("open");
            let old = data.db.open_tree("slots").expect("tree");
            let o = OldSlot {
                id: [7; 16],
                owner: [1; 32],
                version: 3,
                param_count: 9,
                state: vec![4; 10],
            };
            old.insert([7u8; 16], postcard::to_allocvec(&o).expect("enc"))
                .expect("insert");
            data.flush().expect("flush");
        }
        let data = DataDir::open(dir.path()).expect("reopen");
        let store = data.slots().expect("slots");
        let s = store.get_slot(&[7; 16]).expect("get").expect("migrated");
        assert_eq!((s.version, s.param_count, s.state.len()), (3, 9, 10));
        assert!(s.lease.confirmed && s.lease.until > unix_now());
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
