//! `mixnn export`: the owner's model out of its checkpoint, as safetensors.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use mixnn_model::{to_hex, Arch, ModelParams};
use mixnn_node::client::checkpoint::{self, Checkpoint};
use mixnn_node::client::ModelMap;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The model map `mixnn train` wrote; its checkpoint (`<map>.ckpt`) holds every stage.
    #[arg(long, default_value = "model.json")]
    pub model_map: PathBuf,
    /// The safetensors file to write (PyTorch `nn.Sequential` layout).
    #[arg(long)]
    pub out: PathBuf,
    /// Export the last checkpoint of a job that has not finished.
    #[arg(long)]
    pub partial: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let map = ModelMap::load(&args.model_map)?;
    let arch = Arch::parse(&map.arch).context("the model map's architecture")?;
    let ckpt_path = checkpoint::path_for(&args.model_map);
    let ckpt = Checkpoint::load(&ckpt_path).with_context(|| {
        format!(
            "the owner's checkpoint of {} (it is written beside the map during training)",
            args.model_map.display()
        )
    })?;
    let digest = ckpt
        .digest()
        .map_err(|e| anyhow::anyhow!("{}: {e}", ckpt_path.display()))?;
    if map.complete {
        anyhow::ensure!(
            to_hex(&digest) == map.params_digest,
            "the checkpoint {} does not hold the final model the map records \
             (digest {} where the map says {})",
            ckpt_path.display(),
            to_hex(&digest),
            map.params_digest
        );
    } else if !args.partial {
        anyhow::bail!(
            "the job of {} is not complete: its last checkpoint is at step {}{}; \
             finish it with `mixnn train --resume --model-map {}`, or pass --partial \
             to export that checkpoint",
            args.model_map.display(),
            ckpt.step,
            map.job
                .as_ref()
                .map(|j| format!(" ({} epoch(s) planned)", j.epochs))
                .unwrap_or_default(),
            args.model_map.display()
        );
    }
    let params = ModelParams::from_states(&arch, &ckpt.stages)?;
    let bytes = params.to_bytes();
    checkpoint::write_private(&args.out, &bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "exported {arch} at step {}{} to {} ({} bytes, params digest {})",
        ckpt.step,
        if map.complete { "" } else { " (partial)" },
        args.out.display(),
        bytes.len(),
        to_hex(&digest)
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "arch": arch.to_string(),
                "step": ckpt.step,
                "complete": map.complete,
                "out": args.out,
                "bytes": bytes.len(),
                "params_digest": to_hex(&digest),
            })
        );
    }
    Ok(())
}
