//! `mixnn peers`

use std::time::Duration;

use clap::Args;
use mixnn_node::config::parse_addrs;
use mixnn_node::discovery::{discover_at_least, join_as_client, VolunteerSummary};
use mixnn_node::network::TransportKind;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct PeersArgs {
    /// Bootstrap peers, each ending in /p2p/<peer id>.
    #[arg(long, env = "MIXNN_BOOTSTRAP", value_delimiter = ',', required = true)]
    bootstrap: Vec<String>,
    /// Keep looking until at least this many volunteers are found, the
    /// network shows no more, or --timeout passes. Withdrawn and expired
    /// volunteers are never listed.
    #[arg(long, default_value_t = 1)]
    min: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PeersArgs) -> anyhow::Result<()> {
    let bootstrap = parse_addrs("bootstrap address", &args.bootstrap)?;
    super::runtime()?.block_on(async move {
        let cancel = CancellationToken::new();
        let network = join_as_client(bootstrap, TransportKind::Tcp, vec![], cancel.clone()).await?;
        let (found, stats) =
            discover_at_least(&network, args.min, Duration::from_secs(args.timeout)).await;
        cancel.cancel();
        let rows: Vec<VolunteerSummary> = found.iter().map(VolunteerSummary::from).collect();
        let short = rows.len() < args.min;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "volunteers": rows,
                    "count": rows.len(),
                    "wanted": args.min,
                    "stats": stats,
                })
            );
        } else {
            println!(
                "{:<54} {:<16} {:>5} {:>12} {:<12} {:>8}",
                "PEER", "ROLES", "FREE", "MAX PARAMS", "CELLS", "EPOCH"
            );
            for r in &rows {
                println!(
                    "{:<54} {:<16} {:>5} {:>12} {:<12} {:>8}",
                    r.peer_id,
                    r.roles.join("+"),
                    r.free_slots,
                    r.max_params,
                    if r.aes_gcm { "aes+chacha" } else { "chacha" },
                    r.epoch
                );
            }
            eprintln!(
                "{} volunteers ({} providers found, {} withdrawn, {} without a valid descriptor)",
                rows.len(),
                stats.providers_found,
                stats.descriptors_withdrawn,
                stats.descriptors_missing
            );
        }
        if short {
            eprintln!(
                "needs {} volunteers, found {} (the network has too few)",
                args.min,
                rows.len()
            );
        }
        Ok(())
    })
}
