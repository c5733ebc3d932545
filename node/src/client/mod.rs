//! The client: route choice, circuit rings, training and inference jobs,
//! and the model map.

pub mod checkpoint;
pub mod job;
pub mod machine;
pub mod model_map;
pub mod owner;
pub mod plan;
pub mod probe;
pub mod ring;
pub mod route;

pub use job::{
    infer_network, resume_config, resume_network, train_network, train_network_from, InferReport,
    Inference, JobError, JobEvent, JobOptions, NetworkReport, TrainJob,
};
pub use model_map::{MapError, ModelMap};

use tokio_util::sync::CancellationToken;

use crate::network::Network;
use ring::{EndListener, RingError};

/// A client on the network: its network handle and the listener that
/// receives the far ends of its rings.
pub struct Client {
    network: Network,
    listener: EndListener,
    _stop: tokio_util::sync::DropGuard,
}

impl Client {
    #[allow(clippy::result_large_err, reason = "cold error path")]
    pub fn new(network: Network) -> Result<Self, RingError> {
        let cancel = CancellationToken::new();
        let listener = EndListener::start(&network, cancel.child_token())?;
        Ok(Self {
            network,
            listener,
            _stop: cancel.drop_guard(),
        })
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    pub fn listener(&self) -> &EndListener {
        &self.listener
    }
}
