//! Peer identities (ed25519) and epoch onion keys (x25519).
//!
//! A peer's identity key is its libp2p identity: the node derives its
//! `PeerId` from the same 32 secret bytes. Key files hold a small header and
//! the secret, are written atomically and readable by the owner only.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use thiserror::Error;
use x25519_dalek::StaticSecret;
use zeroize::{Zeroize, Zeroizing};

const IDENTITY_MAGIC: &[u8; 8] = b"MIXNNID1";
const ONION_MAGIC: &[u8; 8] = b"MIXNNOK1";

/// Length of a key file: magic, 32 secret bytes, 4-byte checksum.
const IDENTITY_FILE_LEN: usize = 8 + 32 + 4;

/// Length of an encoded onion key pair: magic, epoch, not-after, secret.
pub const ONION_KEY_BYTES: usize = 8 + 8 + 8 + 32;

/// Reading or writing a key file failed.
#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("key file {path} could not be read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} could not be written: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: &'static str },
    #[error("key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    InsecurePermissions { path: PathBuf, mode: u32 },
}

/// A signature did not verify.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the public key is not a valid ed25519 point")]
    BadKey,
    #[error("the signature does not verify")]
    BadSignature,
}

/// A peer's long-term ed25519 identity.
pub struct Identity {
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public", &hex_short(&self.public_key()))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh identity from the operating system's randomness.
    pub fn generate() -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(secret.as_mut());
        Self::from_secret(&secret)
    }

    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(secret),
        }
    }

    /// The 32 secret bytes (for deriving the libp2p keypair).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The libp2p peer id bytes of this identity.
    pub fn peer_id_bytes(&self) -> Vec<u8> {
        peer_id_bytes(&self.public_key())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// Write the key file atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let mut buf = Zeroizing::new(Vec::with_capacity(IDENTITY_FILE_LEN));
        buf.extend_from_slice(IDENTITY_MAGIC);
        buf.extend_from_slice(self.signing.as_bytes());
        let sum = checksum(&buf);
        buf.extend_from_slice(&sum);
        write_private(path, &buf)
    }

    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_private(path)?;
        let corrupt = |reason| KeyFileError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() != IDENTITY_FILE_LEN {
            return Err(corrupt("wrong length"));
        }
        if &bytes[..8] != IDENTITY_MAGIC {
            return Err(corrupt("not a MixNN identity key"));
        }
        if checksum(&bytes[..40]) != bytes[40..] {
            return Err(corrupt("checksum mismatch"));
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&bytes[8..40]);
        Ok(Self::from_secret(&secret))
    }

    /// Load the key at `path`, or create and save a new one if there is no
    /// file. Returns whether a new key was created.
    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), KeyFileError> {
        match fs::metadata(path) {
            Ok(_) => Ok((Self::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                id.save(path)?;
                Ok((id, true))
            }
            Err(source) => Err(KeyFileError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Verify an ed25519 signature by `public` over `msg`.
pub fn verify_signature(
    public: &[u8; 32],
    msg: &[u8],
    sig: &[u8; 64],
) -> Result<(), SignatureError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| SignatureError::BadKey)?;
    let sig = Signature::from_bytes(sig);
    key.verify_strict(msg, &sig)
        .or_else(|_| key.verify(msg, &sig))
        .map_err(|_| SignatureError::BadSignature)
}

/// The libp2p `PeerId` bytes of an ed25519 public key: an identity multihash
/// over the protobuf encoding of the key (`KeyType::Ed25519 = 1`).
pub fn peer_id_bytes(public: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(38);
    // multihash: code 0x00 (identity), length 36
    out.extend_from_slice(&[0x00, 36]);
    // protobuf PublicKey { Type = 1 (Ed25519), Data = 32 bytes }
    out.extend_from_slice(&[0x08, 0x01, 0x12, 0x20]);
    out.extend_from_slice(public);
    out
}

/// An x25519 key pair for one epoch, used to peel circuit setup onions.
pub struct OnionKeyPair {
    epoch: u64,
    not_after: u64,
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for OnionKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnionKeyPair")
            .field("epoch", &self.epoch)
            .field("not_after", &self.not_after)
            .field("public", &hex_short(&self.public))
            .finish_non_exhaustive()
    }
}

impl OnionKeyPair {
    /// A fresh key for `epoch`, valid until unix time `not_after`.
    pub fn generate(epoch: u64, not_after: u64) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        Self::from_parts(epoch, not_after, *bytes)
    }

    fn from_parts(epoch: u64, not_after: u64, secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Self {
            epoch,
            not_after,
            secret,
            public,
        }
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    pub fn is_valid_at(&self, now_unix: u64) -> bool {
        now_unix <= self.not_after
    }

    /// Storage encoding (secret included: keep it private).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(ONION_KEY_BYTES));
        out.extend_from_slice(ONION_MAGIC);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.not_after.to_le_bytes());
        out.extend_from_slice(self.secret.as_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, &'static str> {
        if bytes.len() != ONION_KEY_BYTES {
            return Err("wrong length for an onion key");
        }
        if &bytes[..8] != ONION_MAGIC {
            return Err("not a MixNN onion key");
        }
        let epoch = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| "epoch")?);
        let not_after = u64::from_le_bytes(bytes[16..24].try_into().map_err(|_| "expiry")?);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes[24..56]);
        let pair = Self::from_parts(epoch, not_after, secret);
        secret.zeroize();
        Ok(pair)
    }
}

fn checksum(bytes: &[u8]) -> [u8; 4] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 4];
    out.copy_from_slice(&h.as_bytes()[..4]);
    out
}

fn hex_short(bytes: &[u8]) -> String {
    bytes.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or_else(|| Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "key".into())
    ));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

fn read_private(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    if meta.len() > 4096 {
        return Err(KeyFileError::Corrupt {
            path: path.to_path_buf(),
            reason: "file too large for a key",
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(Zeroizing::new(fs::read(path).map_err(read_err)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        let (a, created) = Identity::load_or_generate(&path).expect("create");
        assert!(created);
        let (b, created) = Identity::load_or_generate(&path).expect("load");
        assert!(!created);
        assert_eq!(a.public_key(), b.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn corrupt_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        Identity::generate().save(&path).expect("save");
        let mut bytes = fs::read(&path).expect("read");
        bytes[20] ^= 1;
        fs::write(&path, &bytes).expect("write");
        assert!(matches!(
            Identity::load(&path),
            Err(KeyFileError::Corrupt {
                reason: "checksum mismatch",
                ..
            })
        ));
        fs::write(&path, &bytes[..10]).expect("write");
        assert!(matches!(
            Identity::load(&path),
            Err(KeyFileError::Corrupt { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        Identity::generate().save(&path).expect("save");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Identity::load(&path),
            Err(KeyFileError::InsecurePermissions { .. })
        ));
    }

    #[test]
    fn signatures_verify_and_reject_tampering() {
        let id = Identity::generate();
        let sig = id.sign(b"hello");
        assert_eq!(verify_signature(&id.public_key(), b"hello", &sig), Ok(()));
        assert_eq!(
            verify_signature(&id.public_key(), b"hellp", &sig),
            Err(SignatureError::BadSignature)
        );
        let other = Identity::generate();
        assert!(verify_signature(&other.public_key(), b"hello", &sig).is_err());
    }

    #[test]
    fn onion_key_round_trip() {
        let k = OnionKeyPair::generate(7, 1000);
        let back = OnionKeyPair::from_bytes(&k.to_bytes()).expect("decode");
        assert_eq!(back.public(), k.public());
        assert_eq!(back.epoch(), 7);
        assert_eq!(back.not_after(), 1000);
        assert!(back.is_valid_at(1000));
        assert!(!back.is_valid_at(1001));
        assert!(OnionKeyPair::from_bytes(&k.to_bytes()[..40]).is_err());
    }
}
