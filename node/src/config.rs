//! Node configuration: a TOML file as the base, `MIXNN_*` environment
//! variables and command-line flags over it (clap merges those two), and
//! [`NodeConfig::validate`] before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::network::{split_peer_addr, NetworkConfig, TransportKind};

/// The TOML file; every field optional. Each key has a line in
/// [`FileConfig::template`] (`mixnn node --init-config`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
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
    pub max_memory_bytes: Option<u64>,
    pub slot_idle_secs: Option<u64>,
    pub circuits_per_group: Option<usize>,
    pub first_cell_secs: Option<u64>,
    pub aes_cells: Option<bool>,
}

impl FileConfig {
    /// A commented TOML file with every key and its value in `c` (the
    /// defaults of `mixnn node`, for `--init-config`). Keys that have no
    /// default (`data_dir`, `metrics`) are there commented out.
    pub fn template(c: &NodeConfig) -> String {
        let list = |v: &[Multiaddr]| {
            let items: Vec<String> = v.iter().map(|a| format!("{:?}", a.to_string())).collect();
            format!("[{}]", items.join(", "))
        };
        let data_dir = format!("{:?}", c.data_dir.display().to_string());
        let metrics = c.metrics.map_or_else(
            || "# metrics = \"127.0.0.1:9100\"".to_string(),
            |m| format!("metrics = \"{m}\""),
        );
        format!(
            "# mixnn node configuration (`mixnn node --config FILE`).\n\
             # MIXNN_* environment variables override these values, and flags override those.\n\
             # Every key is optional; the values below are the defaults.\n\
             \n\
             # Where the node keeps its identity, onion keys and slots (sled). Required, here\n\
             # or as --data-dir / MIXNN_DATA_DIR. One directory per node.\n\
             # data_dir = {data_dir}\n\
             \n\
             # Addresses to listen on. Each node on a machine needs its own port\n\
             # (tcp/0 picks a free one, but then peers cannot be told the address in advance).\n\
             listen = {listen}\n\
             \n\
             # Bootstrap peers, each ending in /p2p/<peer id> (mixnn-bootstrap prints it).\n\
             bootstrap = {bootstrap}\n\
             \n\
             # Layer slots offered to clients (0 only with layers = false).\n\
             slots = {slots}\n\
             \n\
             # Largest layer, in parameters, that one slot accepts.\n\
             max_params = {max_params}\n\
             \n\
             # Relay cells of other peers' circuits as a mix (--mix).\n\
             mix = {mix}\n\
             \n\
             # Hold layer slots (false: a pure mix, --no-layers).\n\
             layers = {layers}\n\
             \n\
             # Serve Prometheus metrics on this address (off unless set).\n\
             {metrics}\n\
             \n\
             # Onion keys rotate every epoch; the previous key stays valid one more.\n\
             epoch_secs = {epoch_secs}\n\
             \n\
             # How often the descriptor and provider records are published again.\n\
             republish_secs = {republish_secs}\n\
             \n\
             # How long a published descriptor stays valid; more than republish_secs.\n\
             descriptor_ttl_secs = {descriptor_ttl_secs}\n\
             \n\
             # Circuits served at once, in total.\n\
             max_circuits = {max_circuits}\n\
             \n\
             # Silence on a circuit, in seconds, before the node tears it down.\n\
             circuit_idle_secs = {circuit_idle_secs}\n\
             \n\
             # Longest slot lease this node grants, in seconds (owners ask with\n\
             # `mixnn train --lease`, `mixnn renew`); a slot is freed when its lease ends.\n\
             max_lease_secs = {max_lease_secs}\n\
             \n\
             # Memory peers may make this node use, in bytes: slots in memory with the\n\
             # activations of their largest batch, and every circuit's buffers (--max-memory,\n\
             # which also takes 512M, 4G). A slot is admitted only if it fits. The default is\n\
             # half of this machine's memory, between 256 MiB and 64 GiB (here:\n\
             # {max_memory_human}); it is left out below so the file suits any machine.\n\
             # max_memory_bytes = {max_memory}\n\
             \n\
             # When every slot is taken, a new claim takes the place of a slot its owner\n\
             # has not used for this many seconds (or of a claim whose job never started).\n\
             slot_idle_secs = {slot_idle_secs}\n\
             \n\
             # Circuits one address group (a public IPv4 /24, IPv6 /48) may hold at once,\n\
             # whatever identities it uses; a quarter of that may be setups without a cell.\n\
             circuits_per_group = {circuits_per_group}\n\
             \n\
             # A circuit that has not carried a cell this many seconds after it opened gives\n\
             # its place to a new one when the node needs it.\n\
             first_cell_secs = {first_cell_secs}\n\
             \n\
             # Offer AES-256-GCM for cells (a client uses it on a segment whose two ends\n\
             # offer it, ChaCha20-Poly1305 elsewhere). The default is true where this CPU\n\
             # has AES instructions (here: {aes_cells}); false: --no-aes-cells.\n\
             # aes_cells = {aes_cells}\n",
            listen = list(&c.listen),
            bootstrap = list(&c.bootstrap),
            slots = c.slots,
            max_params = c.max_params,
            mix = c.mix,
            layers = c.layers,
            epoch_secs = c.epoch_secs,
            republish_secs = c.republish_secs,
            descriptor_ttl_secs = c.descriptor_ttl_secs,
            max_circuits = c.max_circuits,
            circuit_idle_secs = c.circuit_idle_secs,
            max_lease_secs = c.max_lease_secs,
            max_memory = c.max_memory_bytes,
            max_memory_human = crate::circuit::budget::human(c.max_memory_bytes),
            slot_idle_secs = c.slot_idle_secs,
            circuits_per_group = c.circuits_per_group,
            first_cell_secs = c.first_cell_secs,
            aes_cells = c.aes_cells,
        )
    }

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
    /// What peers may make this node hold in memory: slots with the
    /// activations of their largest batch, circuit buffers.
    pub max_memory_bytes: u64,
    /// A slot unused this long may make room for a new claim.
    pub slot_idle_secs: u64,
    /// Circuits one address group may hold at once.
    pub circuits_per_group: usize,
    /// A setup without a cell after this long gives way to a new circuit.
    pub first_cell_secs: u64,
    pub transport: TransportKind,
    /// Kademlia client mode: the node takes no DHT records (jobs, `peers`).
    pub dht_client: bool,
    /// Offer AES-256-GCM cells (the descriptor's `capacity.aes_gcm`); by
    /// default where this CPU has AES instructions. False offers
    /// ChaCha20-Poly1305 only.
    pub aes_cells: bool,
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
            max_memory_bytes: default_max_memory(),
            slot_idle_secs: 600,
            circuits_per_group: 64,
            first_cell_secs: 10,
            transport: TransportKind::Tcp,
            dht_client: false,
            aes_cells: mixnn_crypto::aead::aes_in_hardware(),
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
        if !(1..=self.max_circuits).contains(&self.circuits_per_group) {
            return Err(ConfigError::Invalid(format!(
                "circuits_per_group must be between 1 and max_circuits ({})",
                self.max_circuits
            )));
        }
        if !(1..=self.circuit_idle_secs).contains(&self.first_cell_secs) {
            return Err(ConfigError::Invalid(format!(
                "first_cell_secs must be between 1 and circuit_idle_secs ({})",
                self.circuit_idle_secs
            )));
        }
        if !(1..=365 * 24 * 3600).contains(&self.slot_idle_secs) {
            return Err(ConfigError::Invalid(
                "slot_idle_secs must be between 1 second and a year".into(),
            ));
        }
        if self.max_memory_bytes < MIN_MEMORY {
            return Err(ConfigError::Invalid(format!(
                "--max-memory must be at least {} (one circuit's buffers and a small slot); got {}",
                crate::circuit::budget::human(MIN_MEMORY),
                crate::circuit::budget::human(self.max_memory_bytes)
            )));
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

/// The smallest memory budget a node accepts.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The default memory budget from `/proc/meminfo`'s text: half of the
/// machine's memory, between 256 MiB and 64 GiB. `None` if the text has
/// no `MemTotal`.
pub fn memory_default_from(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kib.saturating_mul(1024) / 2).clamp(256 << 20, 64 << 30))
}

/// Half of this machine's memory (see [`memory_default_from`]), or 1 GiB
/// where it cannot be read.
pub fn default_max_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| memory_default_from(&t))
        .unwrap_or(1 << 30)
}

/// A size in bytes, with an optional binary unit: `1073741824`, `512M`,
/// `4G`, `4GiB`, `64k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{s}`: unknown unit (use K, M, G or T)")),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 4G, 512M or a number of bytes)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
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

    /// The template with its commented-out keys (`# key = value`) switched on.
    fn every_key(template: &str) -> String {
        template
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_template_has_a_line_for_every_key() {
        let defaults = NodeConfig::new("/var/lib/mixnn".into());
        let text = FileConfig::template(&defaults);
        // As written it parses (unknown keys are refused).
        let file: FileConfig = toml::from_str(&text).expect("template parses");
        assert_eq!(file.slots, Some(defaults.slots));
        assert_eq!(file.max_lease_secs, Some(2_592_000));
        assert_eq!(
            file.data_dir, None,
            "data_dir has no default: commented out"
        );
        // With its commented keys switched on, every field of FileConfig
        // has a value: a key added to the struct without a template line
        // fails here.
        let all: FileConfig = toml::from_str(&every_key(&text)).expect("all keys parse");
        let json = serde_json::to_value(&all).expect("json");
        let fields = json.as_object().expect("an object");
        let missing: Vec<&String> = fields
            .iter()
            .filter(|(_, v)| v.is_null())
            .map(|(k, _)| k)
            .collect();
        assert!(
            missing.is_empty(),
            "keys without a template line: {missing:?}"
        );
        assert_eq!(all.data_dir, Some(PathBuf::from("/var/lib/mixnn")));
        assert_eq!(all.metrics, Some("127.0.0.1:9100".parse().expect("addr")));
    }

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
    fn memory_defaults_and_sizes() {
        let meminfo = "MemTotal:       24683652 kB\nMemFree:  2015552 kB\n";
        assert_eq!(memory_default_from(meminfo), Some(24683652 * 1024 / 2));
        assert_eq!(memory_default_from("MemTotal: 100 kB"), Some(256 << 20));
        assert_eq!(
            memory_default_from("MemTotal: 1000000000000 kB"),
            Some(64 << 30)
        );
        assert_eq!(memory_default_from("nothing"), None);
        let d = default_max_memory();
        assert!((256 << 20..=64 << 30).contains(&d));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("").is_err());
        let mut c = NodeConfig::new("/tmp/x".into());
        c.max_memory_bytes = 1 << 20;
        assert!(c
            .validate()
            .expect_err("too small")
            .to_string()
            .contains("--max-memory"));
        let mut c = NodeConfig::new("/tmp/x".into());
        c.circuits_per_group = c.max_circuits + 1;
        assert!(c.validate().is_err());
        c.circuits_per_group = 64;
        c.first_cell_secs = c.circuit_idle_secs + 1;
        assert!(c.validate().is_err());
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
