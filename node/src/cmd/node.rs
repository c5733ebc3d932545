//! `mixnn node`

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use mixnn_node::config::{parse_addrs, FileConfig, NodeConfig};
use mixnn_node::node::RunningNode;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// TOML config file; flags and MIXNN_* variables override its values.
    #[arg(long, env = "MIXNN_CONFIG")]
    config: Option<PathBuf>,
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
        let mut c = NodeConfig::new(data_dir);
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
        c.mix = self.mix || file.mix.unwrap_or(false);
        c.layers = !self.no_layers && file.layers.unwrap_or(true);
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
        if let Some(v) = file.max_lease_secs {
            c.max_lease_secs = v;
        }
        if let Some(v) = file.circuit_idle_secs {
            c.circuit_idle_secs = v;
        }
        c.validate()?;
        Ok(c)
    }
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
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
