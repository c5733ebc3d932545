//! `mixnn demo`: a whole network in this process, one job through it, and
//! the same job trained locally, side by side.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use mixnn_model::train_local;
use mixnn_node::client::model_map::TrainingData;
use mixnn_node::client::{infer_network, train_network, JobOptions, ModelMap, TrainJob};
use mixnn_node::local_net::{route_line, volunteers_seen, HopLog, LocalNet, VolunteerSeen};
use mixnn_node::network::TransportKind;
use tokio_util::sync::CancellationToken;

use super::network::{volunteers_needed, warn_if_no_mixes};
use super::train::{format_losses, on_event, on_step, progress, ModelArgs};

/// The demo's model when no --arch is given: three stages, so layer hosts
/// talk to each other through mixes.
pub const DEMO_ARCH: &str = "mlp:784-128-64-10";

#[derive(Args, Debug)]
#[command(mut_arg("arch", |a| a.default_value(DEMO_ARCH)))]
pub struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Mixes between adjacent layer hosts.
    #[arg(long, default_value_t = 1)]
    mixes: usize,
    /// Volunteers to start (default: as many as the job needs, plus one).
    #[arg(long)]
    volunteers: Option<usize>,
    /// Print one JSON object on stdout's last line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    warn_if_no_mixes(args.mixes);
    let cfg = args.model.config()?;
    let data = mixnn_node::dataset::load(&args.model.data)?;
    let train = match cfg.limit {
        Some(n) => data.train.clone().limit(n),
        None => data.train.clone(),
    };
    let needed = volunteers_needed(cfg.arch.num_stages(), args.mixes);
    let count = args.volunteers.unwrap_or(needed + 1);
    anyhow::ensure!(
        count >= needed,
        "{} with --mixes {} needs at least {needed} volunteers",
        cfg.arch,
        args.mixes
    );
    super::runtime()?.block_on(async {
        eprintln!("starting a bootstrap and {count} volunteers on 127.0.0.1 ...");
        let log = Arc::new(HopLog::default());
        let net = LocalNet::start_tapped(count, TransportKind::Tcp, 5, Some(log.clone())).await?;
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let (client, volunteers) = net.join(TransportKind::Tcp, cancel.child_token()).await?;
        eprintln!(
            "the client found {} volunteers through the DHT",
            volunteers.len()
        );

        let map_dir = tempfile::tempdir()?;
        let map_path = map_dir.path().join("model.json");
        let bar = progress(cfg.epochs as u64 * train.len() as u64, "network");
        let mut events = on_event(&bar, cfg.epochs);
        let opts = JobOptions {
            mixes: args.mixes,
            ..JobOptions::default()
        };
        let network = train_network(
            &client,
            &volunteers,
            TrainJob {
                cfg: &cfg,
                train: &train,
                test: &data.test,
                opts: &opts,
                map_path: &map_path,
                stop: cancel.child_token(),
                trained_on: Some(TrainingData::of(&args.model.data, &data)),
            },
            &mut events,
        )
        .await;
        bar.finish_and_clear();
        let network = network?;
        // What each volunteer saw of the training job.
        let seen = volunteers_seen(&network.rings, client.network().peer_id(), &log.take());
        let map = ModelMap::load(&map_path)?;
        let inferred = infer_network(&client, &volunteers, &map, &data.test, &opts).await?;

        let bar = progress(cfg.epochs as u64 * train.len() as u64, "local  ");
        let t = Instant::now();
        let local = train_local(&cfg, &data, &mut on_step(&bar, cfg.epochs))?;
        let local_seconds = t.elapsed().as_secs_f64();
        bar.finish_and_clear();
        net.shutdown().await;

        let equal = local.params_digest_hex == network.params_digest;
        let ratio = network.seconds / local_seconds.max(1e-9);
        eprintln!();
        eprintln!("the training job's rings (short peer ids):");
        eprintln!("  forward:  {}", route_line(&network.rings.forward));
        eprintln!("  backward: {}", route_line(&network.rings.backward));
        eprintln!();
        print_seen(&seen);
        eprintln!();
        eprintln!(
            "{} on {} ({} training examples, batch {}, {} epoch(s)):",
            cfg.arch,
            args.model.data,
            train.len(),
            cfg.batch,
            cfg.epochs
        );
        eprintln!(
            "  {:<9} {:>13} {:>9}  params digest",
            "", "test accuracy", "seconds"
        );
        eprintln!(
            "  {:<9} {:>13.4} {:>9.2}  {}",
            "local", local.test_accuracy, local_seconds, local.params_digest_hex
        );
        eprintln!(
            "  {:<9} {:>13.4} {:>9.2}  {}",
            "network", network.test_accuracy, network.seconds, network.params_digest
        );
        eprintln!(
            "  loss per epoch: local {}; network {}",
            format_losses(&local.epoch_losses),
            format_losses(&network.epoch_losses)
        );
        eprintln!(
            "  inference through fresh circuits: test accuracy {:.4}",
            inferred.test_accuracy
        );
        eprintln!(
            "  digests {}; network/local time ratio {:.2} (includes circuit setup {:.2} s)",
            if equal {
                "equal: the network trained the same parameters, bit for bit"
            } else {
                "DIFFER"
            },
            ratio,
            network.breakdown.setup_seconds
        );
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "arch": cfg.arch.to_string(),
                    "volunteers": volunteers.len(),
                    "route": {
                        "forward": route_line(&network.rings.forward),
                        "backward": route_line(&network.rings.backward),
                    },
                    "seen": seen,
                    "local": {
                        "test_accuracy": local.test_accuracy,
                        "final_loss": local.final_loss,
                        "epoch_losses": local.epoch_losses,
                        "seconds": local_seconds,
                        "params_digest": local.params_digest_hex,
                    },
                    "network": {
                        "test_accuracy": network.test_accuracy,
                        "final_loss": network.final_loss,
                        "epoch_losses": network.epoch_losses,
                        "infer_accuracy": inferred.test_accuracy,
                        "seconds": network.seconds,
                        "params_digest": network.params_digest,
                        "breakdown": network.breakdown,
                    },
                    "digest_equal": equal,
                    "ratio": ratio,
                })
            );
        }
        anyhow::ensure!(equal, "the network's parameters differ from local training");
        Ok(())
    })
}

/// Bytes for people: `812 B`, `40.3 KiB`, `7.1 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The table of what each volunteer saw: a row per circuit through it;
/// its cells, bytes and whether it read plaintext on its first row.
fn print_seen(seen: &[VolunteerSeen]) {
    eprintln!("what each volunteer saw (cells and bytes that reached it, over all its circuits):");
    eprintln!(
        "  {:<8} {:<4} {:<9} {:<8} {:<8} {:>7} {:>10}  plaintext",
        "peer", "role", "ring", "prev", "next", "cells", "bytes"
    );
    for v in seen {
        for (i, c) in v.circuits.iter().enumerate() {
            let (peer, cells, bytes, plain) = if i == 0 {
                (
                    v.peer.clone(),
                    v.cells.to_string(),
                    human_bytes(v.bytes),
                    if v.plaintext { "yes" } else { "no" },
                )
            } else {
                (String::new(), String::new(), String::new(), "")
            };
            let row = format!(
                "  {:<8} {:<4} {:<9} {:<8} {:<8} {:>7} {:>10}  {}",
                peer, c.role, c.ring, c.prev, c.next, cells, bytes, plain
            );
            eprintln!("{}", row.trim_end());
        }
    }
    eprintln!(
        "  mixes forward sealed cells and never read them; a layer host decrypts only its own segment"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    #[test]
    fn the_demo_keeps_the_arch_it_is_given() {
        let given = Cli::parse_from(["demo", "--arch", "mlp:784-128-10"]);
        assert_eq!(given.demo.model.arch, "mlp:784-128-10");
        let other = Cli::parse_from(["demo", "--arch", "mlp:784-32-16-8-10"]);
        assert_eq!(other.demo.model.arch, "mlp:784-32-16-8-10");
        let default = Cli::parse_from(["demo"]);
        assert_eq!(default.demo.model.arch, DEMO_ARCH);
        // Other commands keep their own default.
        #[derive(Parser)]
        struct Train {
            #[command(flatten)]
            model: ModelArgs,
        }
        assert_eq!(Train::parse_from(["train"]).model.arch, "mlp:784-128-10");
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(41_267), "40.3 KiB");
        assert_eq!(human_bytes(7 << 20), "7.0 MiB");
    }
}
