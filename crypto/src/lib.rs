//! MixNN's cryptographic foundations: peer identities, signed descriptors,
//! the constant-size onion used to set up mix circuits, and the AEAD cells
//! that carry tensors through them.
//!
//! Pure code: no I/O beyond key files, no async runtime, no network.

pub mod aead;
pub mod cells;
pub mod descriptor;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod identity;
pub mod onion;
pub mod padding;
pub mod replay;

pub use descriptor::{
    next_seq, Capacity, Descriptor, DescriptorError, PeerRecord, Roles, SignedDescriptor,
    Withdrawal,
};
pub use identity::{
    peer_id_bytes, verify_signature, Identity, KeyFileError, OnionKeyPair, SignatureError,
};
