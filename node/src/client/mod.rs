//! The client: route choice, circuit rings, training and inference jobs,
//! and the model map.

pub mod job;
pub mod model_map;
pub mod ring;
pub mod route;

pub use job::{infer_network, train_network, InferReport, JobError, JobOptions, NetworkReport};
pub use model_map::ModelMap;
