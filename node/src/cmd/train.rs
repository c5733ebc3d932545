//! `mixnn train`

use clap::Args;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Train in this process instead of through the network.
    #[arg(long)]
    local: bool,
}

pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("training is not wired up yet")
}
