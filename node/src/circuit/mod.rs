//! Mix circuits: frames on direct streams, what the onion carries, the hop
//! side (mix relay and layer host) and the client side.

pub mod admission;
pub mod budget;
pub mod host;
pub mod payload;
pub mod server;
pub mod session;
pub mod wire;

pub use server::CIRCUIT_PROTOCOL;
