//! MixNN model crate: the math one volunteer slot runs, and everything needed
//! to check it against local training.
//!
//! - [`spec`]: architectures (`mlp:784-512-256-10`, `lenet5`, `seq:` layer
//!   lists and model files) and the stages they split into.
//! - [`tensor`]: [`HostTensor`] and its wire codec.
//! - [`slot`]: one stage's parameters, optimizer state and forward/backward.
//! - [`optim`]: our own optimizers (SGD, momentum, Adam) on plain `f32` slices.
//! - [`loss`]: softmax cross-entropy, computed by the client.
//! - [`digest`]: parameter digests (per stage and per model).
//! - [`data`]: MNIST IDX loader, synthetic dataset, deterministic batching.
//! - [`train`]: the whole-model reference trainer.
//! - [`safetensors`]: a model's parameters as a safetensors file in PyTorch's
//!   `nn.Sequential` layout.
//! - [`worker`]: [`SlotWorker`], a slot on its own thread that keeps dfdx's
//!   tape from forward to backward instead of recomputing.
//!
//! The slots and the local trainer share one stage implementation
//! (`stage::StageCore`) and one optimizer, so a model trained slot by slot has
//! the same parameters, bit for bit, as the same model trained locally.

mod conv;
pub mod cpu;
pub mod data;
pub mod digest;
mod error;
pub mod loss;
pub mod optim;
pub mod safetensors;
pub mod slot;
pub mod spec;
mod stage;
pub mod tensor;
pub mod train;
pub mod worker;

pub use data::{load_mnist, synthetic, DataError, Dataset, Split};
pub use digest::{model_digest, to_hex};
pub use error::ModelError;
pub use loss::{accuracy, softmax_cross_entropy};
pub use optim::{OptimizerSpec, OptimizerState};
pub use safetensors::{ModelParams, SafetensorsError, StageParams};
pub use slot::{max_state_bytes, InitSpec, Slot, DEFAULT_MAX_IN_FLIGHT};
pub use spec::{Arch, Features, LayerSpec, SpecError, StageSpec, BUILTIN};
pub use tensor::{CodecError, DecodeLimits, HostTensor};
pub use train::{
    epoch_losses, train_local, train_local_model, LocalModel, StepInfo, TrainConfig, TrainReport,
    EVAL_BATCH,
};
pub use worker::{
    skip_zero_inputs, InputGrad, SlotOp, SlotWorker, COMPUTE_THREAD_PREFIX, UPDATE_NICENESS,
    UPDATE_THREAD_PREFIX,
};

/// Result type of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
