//! Jobs through the network: `mixnn train` (without --local) and `mixnn infer`.

use mixnn_model::{Dataset, TrainConfig};

use super::train::TrainArgs;

pub fn train(_args: &TrainArgs, _cfg: TrainConfig, _data: Dataset) -> anyhow::Result<()> {
    anyhow::bail!("network training is not wired up yet; use --local")
}
