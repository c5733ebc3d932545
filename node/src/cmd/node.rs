//! `mixnn node`

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use mixnn_node::config::{parse_addrs, parse_size, FileConfig, NodeConfig};
use mixnn_node::node::RunningNode;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// TOML config file; flags and MIXNN_* variables override its values.
    #[arg(long, env = "MIXNN_CONFIG")]
    config: Option<PathBuf>,
    /// Write a commented config file with every key and its default to FILE, and exit.
    #[arg(long, value_name = "FILE")]
    init_config: Option<PathBuf>,
    /// With --init-config: overwrite FILE if it exists.
    #[arg(long, requires = "init_config")]
    force: bool,
    /// Where the node keeps its identity, onion keys and slots (sled).
    #[arg(long, env = "MIXNN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Addresses to listen on, e.g. /ip4/0.0.0.0/tcp/4002 (repeat or comma-separate).
    #[arg(long, env = "MIXNN_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Bootstrap peers, each ending in /p2p/<peer id> (repeat or comma-separate).
    #[arg(long, env = "MIXNN_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Number of layer slots to offer.
    #[arg(long, env = "MIXNN_SLOTS")]
    slots: Option<u32>,
    /// Largest layer, in parameters, that one slot accepts.
    #[arg(long, env = "MIXNN_MAX_PARAMS")]
    max_params: Option<u64>,
    /// Also relay cells for other peers' circuits as a mix.
    #[arg(long, env = "MIXNN_MIX")]
    mix: bool,
    /// Offer no layer slots (a pure mix, with --mix).
    #[arg(long, env = "MIXNN_NO_LAYERS")]
    no_layers: bool,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9100.
    #[arg(long, env = "MIXNN_METRICS")]
    metrics: Option<SocketAddr>,
    /// Onion key rotation period in seconds.
    #[arg(long, env = "MIXNN_EPOCH_SECS", hide_short_help = true)]
    epoch_secs: Option<u64>,
    /// How often to publish the descriptor again, in seconds [default: 180].
    #[arg(long, env = "MIXNN_REPUBLISH_SECS", hide_short_help = true)]
    republish_secs: Option<u64>,
    /// How long a published descriptor stays valid, in seconds; must be
    /// longer than --republish-secs [default: 600]. A node that stops
    /// without withdrawing drops out of discovery after this.
    #[arg(long, env = "MIXNN_DESCRIPTOR_TTL_SECS", hide_short_help = true)]
    descriptor_ttl_secs: Option<u64>,
    /// Memory peers may make this node use: slots in memory with the
    /// activations of their largest batch, and circuit buffers (e.g. 4G,
    /// 512M). A slot that does not fit is refused. [default: half of this
    /// machine's memory, between 256 MiB and 64 GiB]
    #[arg(long, env = "MIXNN_MAX_MEMORY", value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// When every slot is taken, a new claim takes the place of a slot its
    /// owner has not used for this many seconds [default: 600].
    #[arg(long, env = "MIXNN_SLOT_IDLE_SECS", hide_short_help = true)]
    slot_idle_secs: Option<u64>,
    /// Circuits one address group (a public IPv4 /24 or IPv6 /48) may hold
    /// at once, whatever identities it uses [default: 64].
    #[arg(long, env = "MIXNN_CIRCUITS_PER_GROUP", hide_short_help = true)]
    circuits_per_group: Option<usize>,
    /// Offer ChaCha20-Poly1305 cells only, even where this CPU has AES
    /// instructions (by default the node offers AES-256-GCM there, which
    /// clients use on segments whose both ends offer it).
    #[arg(long, env = "MIXNN_NO_AES_CELLS", hide_short_help = true)]
    no_aes_cells: bool,
}

/// Where `--init-config` suggests keeping the node's data.
const EXAMPLE_DATA_DIR: &str = "./mixnn-data";

/// The defaults of `mixnn node` for a node keeping its data in `data_dir`:
/// a layer host, not a mix unless asked (`--mix`).
pub fn node_defaults(data_dir: PathBuf) -> NodeConfig {
    let mut c = NodeConfig::new(data_dir);
    c.mix = false;
    c
}

/// Write the commented config template to `path` (`--init-config`).
fn init_config(path: &Path, force: bool) -> anyhow::Result<()> {
    let text = FileConfig::template(&node_defaults(PathBuf::from(EXAMPLE_DATA_DIR)));
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = match options.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            anyhow::bail!("{} exists; pass --force to overwrite it", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {}: every key with its default; start the node with `mixnn node --config {} --data-dir DIR`",
        path.display(),
        path.display()
    );
    Ok(())
}

impl NodeArgs {
    /// Defaults, then the file, then environment and flags.
    pub fn resolve(self) -> anyhow::Result<NodeConfig> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .context("no data directory: pass --data-dir DIR (or set MIXNN_DATA_DIR or data_dir in the config file)")?;
        let mut c = node_defaults(data_dir);
        let listen = if self.listen.is_empty() {
            file.listen
        } else {
            Some(self.listen)
        };
        if let Some(l) = listen {
            c.listen = parse_addrs("listen address", &l)?;
        }
        let bootstrap = if self.bootstrap.is_empty() {
            file.bootstrap
        } else {
            Some(self.bootstrap)
        };
        if let Some(b) = bootstrap {
            c.bootstrap = parse_addrs("bootstrap address", &b)?;
        }
        c.mix = self.mix || file.mix.unwrap_or(c.mix);
        c.layers = !self.no_layers && file.layers.unwrap_or(c.layers);
        if let Some(v) = self.slots.or(file.slots) {
            c.slots = v;
        }
        if !c.layers {
            c.slots = 0;
        }
        if let Some(v) = self.max_params.or(file.max_params) {
            c.max_params = v;
        }
        c.metrics = self.metrics.or(file.metrics);
        if let Some(v) = self.epoch_secs.or(file.epoch_secs) {
            c.epoch_secs = v;
        }
        if let Some(v) = self.republish_secs.or(file.republish_secs) {
            c.republish_secs = v;
        }
        if let Some(v) = self.descriptor_ttl_secs.or(file.descriptor_ttl_secs) {
            c.descriptor_ttl_secs = v;
        }
        if let Some(v) = file.max_circuits {
            c.max_circuits = v;
        }
        if let Some(v) = file.circuit_idle_secs {
            c.circuit_idle_secs = v;
        }
        if let Some(v) = file.max_lease_secs {
            c.max_lease_secs = v;
        }
        if let Some(v) = self.max_memory.or(file.max_memory_bytes) {
            c.max_memory_bytes = v;
        }
        if let Some(v) = self.slot_idle_secs.or(file.slot_idle_secs) {
            c.slot_idle_secs = v;
        }
        if let Some(v) = self.circuits_per_group.or(file.circuits_per_group) {
            c.circuits_per_group = v;
        }
        c.aes_cells = !self.no_aes_cells && file.aes_cells.unwrap_or(c.aes_cells);
        if let Some(v) = file.first_cell_secs {
            c.first_cell_secs = v;
        }
        c.validate()?;
        Ok(c)
    }
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.init_config {
        return init_config(path, args.force);
    }
    let config = args.resolve()?;
    super::runtime()?.block_on(async move {
        // The signal asks for a stop; the node's own token stays live until
        // its shutdown has withdrawn its descriptor.
        let stop = CancellationToken::new();
        mixnn_node::runtime::cancel_on_signal(stop.clone());
        let node = RunningNode::start(config, CancellationToken::new()).await?;
        for a in node.full_addrs() {
            println!("{a}");
        }
        if let Some(m) = node.metrics_addr() {
            eprintln!("metrics on http://{m}/metrics");
        }
        stop.cancelled().await;
        node.shutdown().await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    fn resolve(args: &[&str]) -> NodeConfig {
        let mut argv = vec!["node"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .expect("arguments parse")
            .node
            .resolve()
            .expect("config resolves")
    }

    #[test]
    fn the_written_config_holds_the_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        init_config(&path, false).expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        let file: FileConfig = toml::from_str(&text).expect("the template parses");
        assert_eq!(file.data_dir, None);
        let p = path.to_str().expect("utf-8 path");
        let from_file = resolve(&["--config", p, "--data-dir", "/tmp/node"]);
        let defaults = resolve(&["--data-dir", "/tmp/node"]);
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
        assert_eq!(from_file.max_lease_secs, 2_592_000);
        assert!(!from_file.mix && from_file.layers);
        // Not twice, unless --force.
        let err = init_config(&path, false).expect_err("exists");
        assert!(err.to_string().contains("--force"), "{err}");
        std::fs::write(&path, "slots = 9\n").expect("write");
        init_config(&path, true).expect("forced");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
    }

    #[test]
    fn file_values_reach_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "max_lease_secs = 60\nmix = true\nslots = 2\nmax_memory_bytes = 1073741824\n",
        )
        .expect("write");
        let c = resolve(&[
            "--config",
            path.to_str().expect("utf-8"),
            "--data-dir",
            "/tmp/n",
        ]);
        assert_eq!((c.max_lease_secs, c.mix, c.slots), (60, true, 2));
        assert_eq!(c.max_memory_bytes, 1 << 30);
        // The flag takes units, and wins over the file.
        let c = resolve(&[
            "--config",
            path.to_str().expect("utf-8"),
            "--data-dir",
            "/tmp/n",
            "--max-memory",
            "512M",
        ]);
        assert_eq!(c.max_memory_bytes, 512 << 20);
    }

    #[test]
    fn aes_cells_follow_the_cpu_unless_turned_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = resolve(&["--data-dir", "/tmp/n"]);
        assert_eq!(c.aes_cells, mixnn_crypto::aead::aes_in_hardware());
        let c = resolve(&["--data-dir", "/tmp/n", "--no-aes-cells"]);
        assert!(!c.aes_cells);
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "aes_cells = false\n").expect("write");
        let c = resolve(&[
            "--config",
            path.to_str().expect("utf-8"),
            "--data-dir",
            "/tmp/n",
        ]);
        assert!(!c.aes_cells);
        // A file may turn it on where the CPU lacks AES instructions (slow,
        // but the same bytes); the flag still turns it off.
        std::fs::write(&path, "aes_cells = true\n").expect("write");
        let args = [
            "--config",
            path.to_str().expect("utf-8"),
            "--data-dir",
            "/tmp/n",
        ];
        assert!(resolve(&args).aes_cells);
        let mut off = args.to_vec();
        off.push("--no-aes-cells");
        assert!(!resolve(&off).aes_cells);
    }
}
