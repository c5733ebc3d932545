//! `mixnn demo`: a whole network in this process, one job through it, and
//! the same job trained locally, side by side.

use std::time::Instant;

use clap::Args;
use mixnn_model::train_local;
use mixnn_node::client::{infer_network, train_network, JobOptions, ModelMap, TrainJob};
use mixnn_node::local_net::LocalNet;
use mixnn_node::network::TransportKind;
use tokio_util::sync::CancellationToken;

use super::network::volunteers_needed;
use super::train::{on_event, on_step, progress, ModelArgs};

#[derive(Args, Debug)]
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

pub fn run(mut args: DemoArgs) -> anyhow::Result<()> {
    if args.model.arch == "mlp:784-128-10" {
        // A three-stage model shows layer hosts talking to each other.
        args.model.arch = "mlp:784-128-64-10".into();
    }
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
        let net = LocalNet::start(count, TransportKind::Tcp).await?;
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
        let mut events = on_event(&bar);
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
            },
            &mut events,
        )
        .await;
        bar.finish_and_clear();
        let network = network?;
        let map = ModelMap::load(&map_path)?;
        let inferred = infer_network(&client, &volunteers, &map, &data.test, &opts).await?;

        let bar = progress(cfg.epochs as u64 * train.len() as u64, "local  ");
        let t = Instant::now();
        let local = train_local(&cfg, &data, &mut on_step(&bar))?;
        let local_seconds = t.elapsed().as_secs_f64();
        bar.finish_and_clear();
        net.shutdown().await;

        let equal = local.params_digest_hex == network.params_digest;
        let ratio = network.seconds / local_seconds.max(1e-9);
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
                    "local": {
                        "test_accuracy": local.test_accuracy,
                        "seconds": local_seconds,
                        "params_digest": local.params_digest_hex,
                    },
                    "network": {
                        "test_accuracy": network.test_accuracy,
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
