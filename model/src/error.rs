use crate::spec::SpecError;
use crate::tensor::CodecError;

/// Errors of slots, the loss and the local trainer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A stage, architecture or optimizer description is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A tensor could not be decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A tensor has the wrong shape for where it was used.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        what: &'static str,
        expected: String,
        got: Vec<usize>,
    },
    /// A tensor holds NaN or infinity where finite values are required.
    #[error("{what} contains a non-finite value at index {index}")]
    NonFinite { what: &'static str, index: usize },
    /// Labels do not fit the logits.
    #[error("labels: {0}")]
    Labels(String),
    /// `forward` was called for a step that is already in flight.
    #[error("step {0} is already in flight")]
    DuplicateStep(u64),
    /// `backward` was called for a step that has no saved forward pass.
    #[error("step {0} is not in flight (no forward pass kept for it)")]
    UnknownStep(u64),
    /// Too many forward passes wait for their backward pass.
    #[error("too many steps in flight (limit {limit})")]
    TooManyInFlight { limit: usize },
    /// Serialized slot bytes are truncated, corrupt or of another version.
    #[error("slot bytes: {0}")]
    SlotBytes(String),
    /// A training configuration is invalid.
    #[error("training config: {0}")]
    Config(String),
    /// A [`crate::SlotWorker`]'s thread has stopped (it panicked, or was
    /// shut down), so the slot it held is lost.
    #[error("slot worker is gone: {0}")]
    WorkerGone(String),
    /// The tensor backend refused an operation.
    #[error("tensor backend: {0}")]
    Backend(String),
}

impl From<dfdx::tensor::CpuError> for ModelError {
    fn from(e: dfdx::tensor::CpuError) -> Self {
        ModelError::Backend(format!("{e:?}"))
    }
}
