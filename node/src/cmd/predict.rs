//! `mixnn predict`: the owner's own inputs through a model, locally from a
//! safetensors file or through its slots on the network.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mixnn_model::{Arch, ModelParams, OptimizerSpec};
use mixnn_node::client::{JobOptions, ModelMap};
use mixnn_node::predict::{predict_local, predict_network, Prediction};
use tokio_util::sync::CancellationToken;

use super::network::join_for_map;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A safetensors file (`mixnn export` or `train --local --save`): predict in this process.
    #[arg(
        long,
        conflicts_with = "model_map",
        required_unless_present = "model_map"
    )]
    pub model: Option<PathBuf>,
    /// A model map: predict through the model's slots on the network.
    #[arg(long)]
    pub model_map: Option<PathBuf>,
    /// Inputs: PNG or JPEG images (grey, resized to the model's input, pixel/255), .npy
    /// float32 arrays of shape [N, features] or [N, 28, 28], IDX image files (raw or gzipped).
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Bootstrap peers, each ending in /p2p/<peer id> (with --model-map).
    #[arg(long, env = "MIXNN_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Mixes between adjacent layer hosts (with --model-map).
    #[arg(long, default_value_t = 1)]
    pub mixes: usize,
    /// Fail if one batch takes longer than this many seconds (with --model-map).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub step_timeout: u64,
    /// One JSON object per input on stdout: {"input", "class", "probabilities"}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let predictions = match (&args.model, &args.model_map) {
        (Some(path), _) => {
            let params = ModelParams::load(path, None)
                .with_context(|| format!("reading the model {}", path.display()))?;
            let inputs = mixnn_node::input::load(&args.input, params.arch.input_dim())?;
            // The optimizer plays no part in inference.
            let model = params.to_model(OptimizerSpec::Sgd { lr: 0.1 })?;
            predict_local(&model, &inputs)?
        }
        (None, Some(map_path)) => network(&args, map_path)?,
        (None, None) => anyhow::bail!("give --model FILE.safetensors or --model-map MAP.json"),
    };
    print(&predictions, args.json)
}

fn network(args: &PredictArgs, map_path: &std::path::Path) -> anyhow::Result<Vec<Prediction>> {
    super::network::warn_if_no_mixes(args.mixes);
    let map = ModelMap::load(map_path)?;
    let arch = Arch::parse(&map.arch).context("the model map's architecture")?;
    let inputs = mixnn_node::input::load(&args.input, arch.input_dim())?;
    let opts = JobOptions {
        mixes: args.mixes,
        step_timeout: Duration::from_secs(args.step_timeout),
        ..JobOptions::default()
    };
    super::runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let (client, volunteers) =
            join_for_map(&args.bootstrap, &map, args.mixes, cancel.child_token()).await?;
        Ok(predict_network(&client, &volunteers, &map, &opts, &inputs).await?)
    })
}

fn print(predictions: &[Prediction], json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json {
        for p in predictions {
            writeln!(out, "{}", serde_json::to_string(p)?)?;
        }
        return Ok(());
    }
    let width = predictions
        .iter()
        .map(|p| p.input.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    writeln!(out, "{:<width$}  class  probability", "input")?;
    for p in predictions {
        let prob = p.probabilities.get(p.class).copied().unwrap_or(0.0);
        writeln!(out, "{:<width$}  {:>5}  {:>11.4}", p.input, p.class, prob)?;
    }
    Ok(())
}
