//! `mixnn-bootstrap`: a stable DHT entry point. It keeps one identity in its
//! data directory, prints its full multiaddr, and serves the DHT only.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use mixnn_node::config::{parse_addrs, NodeConfig};
use mixnn_node::node::RunningNode;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "mixnn-bootstrap",
    version,
    about = "A stable MixNN DHT entry point: serves Kademlia, holds no layers, relays nothing"
)]
struct Args {
    /// Addresses to listen on (repeat or comma-separate).
    #[arg(
        long,
        env = "MIXNN_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/4001"
    )]
    listen: Vec<String>,
    /// Where the bootstrap keeps its identity (so its address stays the same).
    #[arg(long, env = "MIXNN_DATA_DIR")]
    data_dir: PathBuf,
    /// Other bootstrap peers to join, each ending in /p2p/<peer id>.
    #[arg(long, env = "MIXNN_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Serve Prometheus metrics on this address.
    #[arg(long, env = "MIXNN_METRICS")]
    metrics: Option<SocketAddr>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    mixnn_node::runtime::init_tracing("warn,mixnn_node=info,mixnn_bootstrap=info");
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = NodeConfig::new(args.data_dir);
    config.listen = parse_addrs("listen address", &args.listen)?;
    config.bootstrap = parse_addrs("bootstrap address", &args.bootstrap)?;
    config.layers = false;
    config.mix = false;
    config.slots = 0;
    config.metrics = args.metrics;
    config.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cancel = CancellationToken::new();
        mixnn_node::runtime::cancel_on_signal(cancel.clone());
        let node = RunningNode::start(config, cancel.clone()).await?;
        for a in node.full_addrs() {
            println!("{a}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        cancel.cancelled().await;
        node.shutdown().await?;
        Ok(())
    })
}
