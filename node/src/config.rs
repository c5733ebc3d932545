//! Node configuration: a TOML file as the base, `MIXNN_*` environment
//! variables and command-line flags over it (clap merges those two), and
//! [`NodeConfig::validate`] before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use serde::Deserialize;
use thiserror::Error;

use crate::network::{split_peer_addr, NetworkConfig, TransportKind};

/// The TOML file; every field optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<Vec<String>>,
    pub bootstrap: Option<Vec<String>>,
    pub slots: Option<u32>,
    pub max_params: Option<u64>,
    pub mix: Option<bool>,
    pub layers: Option<bool>,
    pub metrics: Option<SocketAddr>,
    pub epoch_secs: Option<u64>,
    pub republish_secs: Option<u64>,
    pub descriptor_ttl_secs: Option<u64>,
    pub max_circuits: Option<usize>,
    pub circuit_idle_secs: Option<u64>,
    pub max_lease_secs: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// Everything a node needs to start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// Layer slots offered (0 with `layers = false`).
    pub slots: u32,
    /// Largest layer (in parameters) one slot accepts.
    pub max_params: u64,
    pub mix: bool,
    pub layers: bool,
    pub metrics: Option<SocketAddr>,
    /// Onion keys rotate every epoch; the previous key stays valid one more.
    pub epoch_secs: u64,
    /// How often the descriptor and provider records are published again.
    pub republish_secs: u64,
    /// How long a published descriptor stays valid (and in the DHT); more
    /// than `republish_secs`, so a live node's descriptor never lapses.
    pub descriptor_ttl_secs: u64,
    /// Circuits served at once, in total.
    pub max_circuits: usize,
    /// Silence on a circuit before the node tears it down.
    pub circuit_idle_secs: u64,
    /// The longest slot lease this node grants; owners ask for less or
    /// get this.
    pub max_lease_secs: u64,
    pub transport: TransportKind,
    /// Kademlia client mode: the node takes no DHT records (jobs, `peers`).
    pub dht_client: bool,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{what} `{value}` is not a valid multiaddr: {reason}")]
    Addr {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Defaults for a node storing its data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("static multiaddr")],
            bootstrap: vec![],
            slots: 4,
            max_params: 50_000_000,
            mix: true,
            layers: true,
            metrics: None,
            epoch_secs: 3600,
            republish_secs: 180,
            descriptor_ttl_secs: 600,
            max_circuits: 256,
            circuit_idle_secs: 120,
            max_lease_secs: 30 * 24 * 3600,
            transport: TransportKind::Tcp,
            dht_client: false,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() && !self.dht_client {
            return Err(ConfigError::Invalid(
                "at least one --listen address is needed".into(),
            ));
        }
        for b in &self.bootstrap {
            if split_peer_addr(b).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "bootstrap address {b} must end in /p2p/<peer id> (mixnn-bootstrap prints it on startup)"
                )));
            }
        }
        if !self.mix && !self.layers {
            // A pure DHT server: that is what mixnn-bootstrap runs.
        }
        if self.layers && self.slots == 0 {
            return Err(ConfigError::Invalid(
                "--slots must be at least 1 for a layer host (or pass --no-layers)".into(),
            ));
        }
        if self.slots > 1024 {
            return Err(ConfigError::Invalid("--slots is at most 1024".into()));
        }
        if self.layers && self.max_params == 0 {
            return Err(ConfigError::Invalid("--max-params must be positive".into()));
        }
        if !(10..=7 * 24 * 3600 / 2).contains(&self.epoch_secs) {
            return Err(ConfigError::Invalid(
                "epoch_secs must be between 10 seconds and 3.5 days".into(),
            ));
        }
        if self.republish_secs == 0 || self.republish_secs > self.epoch_secs {
            return Err(ConfigError::Invalid(
                "republish_secs must be positive and no longer than an epoch".into(),
            ));
        }
        if self.descriptor_ttl_secs <= self.republish_secs {
            return Err(ConfigError::Invalid(format!(
                "descriptor_ttl_secs ({}) must be longer than republish_secs ({}), or descriptors lapse between publications",
                self.descriptor_ttl_secs, self.republish_secs
            )));
        }
        if self.descriptor_ttl_secs > mixnn_crypto::descriptor::MAX_LIFETIME_SECS {
            return Err(ConfigError::Invalid(format!(
                "descriptor_ttl_secs is at most {} (7 days)",
                mixnn_crypto::descriptor::MAX_LIFETIME_SECS
            )));
        }
        if !(1..=3600).contains(&self.circuit_idle_secs) {
            return Err(ConfigError::Invalid(
                "circuit_idle_secs must be between 1 and 3600".into(),
            ));
        }
        if !(60..=365 * 24 * 3600).contains(&self.max_lease_secs) {
            return Err(ConfigError::Invalid(
                "max_lease_secs must be between 60 seconds and a year".into(),
            ));
        }
        if self.max_circuits == 0 || self.max_circuits > 65_536 {
            return Err(ConfigError::Invalid(
                "max_circuits must be between 1 and 65536".into(),
            ));
        }
        Ok(())
    }

    pub fn network(&self) -> NetworkConfig {
        NetworkConfig {
            listen: self.listen.clone(),
            bootstrap: self.bootstrap.clone(),
            server: !self.dht_client,
            transport: self.transport,
            record_ttl: self.descriptor_ttl(),
            republish: self.republish_interval(),
            ..NetworkConfig::default()
        }
    }

    pub fn republish_interval(&self) -> Duration {
        Duration::from_secs(self.republish_secs)
    }

    pub fn descriptor_ttl(&self) -> Duration {
        Duration::from_secs(self.descriptor_ttl_secs)
    }
}

/// Parse multiaddrs given as strings, naming the bad one.
pub fn parse_addrs(what: &'static str, values: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    values
        .iter()
        .map(|v| {
            v.parse::<Multiaddr>().map_err(|e| ConfigError::Addr {
                what,
                value: v.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_config_parses_and_refuses_unknown_keys() {
        let f: FileConfig =
            toml::from_str("slots = 3\nmix = false\nlisten = [\"/ip4/127.0.0.1/tcp/1\"]")
                .expect("parse");
        assert_eq!(f.slots, Some(3));
        assert_eq!(f.mix, Some(false));
        assert!(toml::from_str::<FileConfig>("slotz = 3").is_err());
    }

    #[test]
    fn validate_catches_mistakes() {
        let mut c = NodeConfig::new("/tmp/x".into());
        assert!(c.validate().is_ok());
        c.bootstrap = vec!["/ip4/127.0.0.1/tcp/4001".parse().expect("addr")];
        assert!(c
            .validate()
            .expect_err("no peer id")
            .to_string()
            .contains("/p2p/"));
        let mut c = NodeConfig::new("/tmp/x".into());
        c.slots = 0;
        assert!(c.validate().is_err());
        c.layers = false;
        assert!(c.validate().is_ok());
        let mut c = NodeConfig::new("/tmp/x".into());
        c.epoch_secs = 1;
        assert!(c.validate().is_err());
        // A descriptor must outlive the interval between publications.
        let mut c = NodeConfig::new("/tmp/x".into());
        assert_eq!((c.republish_secs, c.descriptor_ttl_secs), (180, 600));
        c.descriptor_ttl_secs = c.republish_secs;
        assert!(c
            .validate()
            .expect_err("ttl not above republish")
            .to_string()
            .contains("descriptor_ttl_secs"));
        c.descriptor_ttl_secs = c.republish_secs + 1;
        assert!(c.validate().is_ok());
        c.descriptor_ttl_secs = 8 * 24 * 3600;
        assert!(c.validate().is_err());
        let f: FileConfig =
            toml::from_str("descriptor_ttl_secs = 120\nrepublish_secs = 30").expect("parse");
        assert_eq!(f.descriptor_ttl_secs, Some(120));
        assert!(parse_addrs("listen", &["nonsense".into()]).is_err());
    }
}
