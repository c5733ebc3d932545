//! `mixnn`: run a volunteer node, find volunteers, train and query models
//! through mix circuits.

mod cmd;

use clap::{Parser, Subcommand};

/// Keeps freed buffers for reuse instead of returning them to the kernel
/// at once: a training step's activations are megabytes, taken and freed
/// every step (see `mixnn_model`'s convolutions).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "mixnn",
    version,
    about = "Train and run neural networks on volunteers' machines without trusting any of them with the model",
    long_about = "MixNN splits a model into layers held by different volunteers. Activations and \
gradients travel through onion-encrypted mix circuits, so no volunteer holds the whole model, \
learns its structure, or knows who holds the layers that are not next to its own.\n\n\
Volunteers run `mixnn node`; clients run `mixnn train`, `mixnn infer`, `mixnn export` and \
`mixnn predict`; \
`mixnn train --local` trains the same model in this process for comparison."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a volunteer node: join the DHT, offer layer slots and mix capacity, serve circuits.
    Node(cmd::node::NodeArgs),
    /// List the volunteers the DHT knows, with verified descriptors.
    Peers(cmd::peers::PeersArgs),
    /// Train a model through the network (or locally with --local).
    Train(cmd::train::TrainArgs),
    /// Run a test set through a trained model's slots, via fresh mix circuits.
    Infer(cmd::network::InferArgs),
    /// Write a trained model (the owner's checkpoint) to a safetensors file in PyTorch's layout.
    Export(cmd::export::ExportArgs),
    /// Classify your own inputs (PNG, JPEG, .npy, IDX) with a model file or through the network.
    Predict(cmd::predict::PredictArgs),
    /// Show where each stage of your model lives: does its host answer, when its lease ends, does it hold the parameters the model map recorded.
    Status(cmd::slots::StatusArgs),
    /// Extend the lease of every slot of your model (`--lease 30d`).
    Renew(cmd::slots::RenewArgs),
    /// Free every slot of your model on the volunteers: their parameters are deleted.
    Release(cmd::slots::ReleaseArgs),
    /// Start a whole network in this process, train through it and locally, compare.
    Demo(cmd::demo::DemoArgs),
    /// Benchmarks: `mixnn bench paper` reproduces the MixNN paper's experiment; `mixnn bench churn` kills hosts mid-job.
    Bench(cmd::bench::BenchArgs),
}

/// A stable name for what went wrong, for `--json` readers.
fn error_kind(e: &anyhow::Error) -> &'static str {
    use mixnn_node::client::{JobError, MapError};
    for cause in e.chain() {
        if let Some(j) = cause.downcast_ref::<JobError>() {
            return match j {
                JobError::Route(mixnn_node::client::route::RouteError::TooLarge { .. }) => {
                    "layer_too_large"
                }
                JobError::Route(_) => "not_enough_volunteers",
                JobError::Hop { .. } => "hop_failed",
                JobError::Interrupted { .. } => "interrupted",
                JobError::Model(_) => "model",
                JobError::Map(_) => "model_map",
                JobError::Payload(_) => "protocol",
                JobError::Invalid(_) => "invalid",
                JobError::Diverged { .. } => "diverged",
            };
        }
        if cause.downcast_ref::<MapError>().is_some() {
            return "model_map";
        }
        if cause
            .downcast_ref::<mixnn_node::config::ConfigError>()
            .is_some()
        {
            return "config";
        }
        if cause
            .downcast_ref::<mixnn_node::network::NetworkError>()
            .is_some()
        {
            return "network";
        }
        if cause
            .downcast_ref::<mixnn_node::node::NodeError>()
            .is_some()
        {
            return "node";
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return "io";
        }
    }
    "error"
}

fn main() -> std::process::ExitCode {
    // First, before any thread: may start this program again with glibc's
    // copies tuned (see the module).
    mixnn_node::memcopy::tune_or_continue();
    // Base pages for the heap (see the module): it applies to what the
    // allocator has mapped already.
    mixnn_node::heap::no_huge_pages();
    let cli = Cli::parse();
    let json = std::env::args().skip(1).any(|a| a == "--json");
    // Long-running services log their events; one-shot commands only warnings.
    let default_log = match cli.command {
        Command::Node(_) => "warn,mixnn_node=info",
        _ => "warn",
    };
    mixnn_node::runtime::init_tracing(default_log);
    let result = match cli.command {
        Command::Node(a) => cmd::node::run(a),
        Command::Peers(a) => cmd::peers::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Infer(a) => cmd::network::infer(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Predict(a) => cmd::predict::run(a),
        Command::Status(a) => cmd::slots::status(a),
        Command::Renew(a) => cmd::slots::renew(a),
        Command::Release(a) => cmd::slots::release(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if json {
                // Machines reading stdout get the failure as its last line.
                println!(
                    "{}",
                    serde_json::json!({ "error": format!("{e:#}"), "kind": error_kind(&e) })
                );
            }
            std::process::ExitCode::FAILURE
        }
    }
}
