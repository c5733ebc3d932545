//! The MixNN node: libp2p network (Kademlia, identify, ping, direct
//! streams), the slot store on sled, discovery of volunteers, and the
//! runtime that `mixnn node` and `mixnn-bootstrap` share.

pub mod bench;
pub mod circuit;
pub mod client;
pub mod config;
pub mod cpu;
pub mod dataset;
pub mod discovery;
pub mod heap;
pub mod input;
pub mod local_net;
pub mod memcopy;
pub mod metrics;
pub mod network;
pub mod node;
pub mod predict;
pub mod runtime;
pub mod store;
