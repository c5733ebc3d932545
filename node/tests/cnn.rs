//! Convolutional models through mix circuits, in one process: LeNet-5
//! trained through the network ends where local training does, inference
//! through it agrees, `--keep-ends` works, and a mix sees nothing that
//! tells a convolution stage from a linear one but message sizes.

mod common;

use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use mixnn_model::{train_local, Arch, LayerSpec, OptimizerSpec, StageSpec, TrainConfig};
use mixnn_node::circuit::server::{HopTap, HopView};
use mixnn_node::client::{infer_network, train_network, JobOptions, ModelMap};

/// One network at a time: the hop-view test counts cells, and a network
/// slowed down by another one's training sends control traffic on its own
/// schedule.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(arch: Arch, optimizer: OptimizerSpec, limit: usize) -> TrainConfig {
    TrainConfig {
        arch,
        epochs: 1,
        batch: 64,
        optimizer,
        seed: 7,
        limit: Some(limit),
    }
}

fn momentum() -> OptimizerSpec {
    OptimizerSpec::Momentum {
        lr: 0.05,
        momentum: 0.9,
    }
}

/// LeNet-5 needs five layer hosts and, with one mix per segment, six mixes:
/// eleven distinct volunteers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenet5_through_the_network_equals_local_training_and_inference() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let net = common::testnet(11, 2, None).await;
    let (client, vols) = (&*net.client, &net.volunteers);
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let cfg = config(Arch::parse("lenet5").expect("lenet5"), momentum(), 256);
    let local = train_local(&cfg, &data, &mut |_| {}).expect("local");

    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("model.json");
    let train = data.train.clone().limit(256);
    let report = train_network(
        client,
        vols,
        common::job(&cfg, &train, &data.test, &JobOptions::default(), &map_path),
        &mut |_| {},
    )
    .await
    .expect("network training");
    assert_eq!(report.steps, local.steps);
    assert_eq!(report.losses, local.losses, "loss per step differs");
    assert_eq!(report.params_digest, local.params_digest_hex);
    assert_eq!(report.test_accuracy, local.test_accuracy);

    let map = ModelMap::load(&map_path).expect("map");
    assert_eq!(map.arch, "lenet5");
    assert_eq!(map.params_digest, local.params_digest_hex);
    let inferred = infer_network(client, vols, &map, &data.test, &JobOptions::default())
        .await
        .expect("inference");
    assert_eq!(inferred.test_accuracy, local.test_accuracy);
    assert_eq!(inferred.examples, data.test.len());
    for n in net.nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// The client keeps the first convolution and the last linear layer; the
/// volunteers hold the three stages between, and Adam ends where it does
/// locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenet5_with_kept_ends_equals_local_training() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let net = common::testnet(7, 2, None).await;
    let (client, vols) = (&*net.client, &net.volunteers);
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let cfg = config(
        Arch::parse("lenet5").expect("lenet5"),
        OptimizerSpec::Adam {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        192,
    );
    let local = train_local(&cfg, &data, &mut |_| {}).expect("local");
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = JobOptions {
        keep_ends: true,
        ..JobOptions::default()
    };
    let train = data.train.clone().limit(192);
    let map_path = dir.path().join("model.json");
    let report = train_network(
        client,
        vols,
        common::job(&cfg, &train, &data.test, &opts, &map_path),
        &mut |_| {},
    )
    .await
    .expect("network training");
    assert_eq!(report.losses, local.losses);
    assert_eq!(report.params_digest, local.params_digest_hex);
    let map = ModelMap::load(&map_path).expect("map");
    let inferred = infer_network(client, vols, &map, &data.test, &opts)
        .await
        .expect("inference");
    assert_eq!(inferred.test_accuracy, local.test_accuracy);
}

#[derive(Default)]
struct Recorder {
    views: Mutex<Vec<HopView>>,
    cells: Mutex<Vec<(PeerId, usize)>>,
}

impl HopTap for Recorder {
    fn setup(&self, view: &HopView) {
        self.views.lock().expect("lock").push(view.clone());
    }
    fn cell_in(&self, me: PeerId, cell: &[u8]) {
        self.cells.lock().expect("lock").push((me, cell.len()));
    }
    fn plaintext(&self, _: PeerId, _: &[u8]) {}
}

/// Cells each mix relayed (sorted), and the lengths of all their cells.
async fn what_mixes_see(arch: Arch) -> (Vec<usize>, Vec<usize>, String) {
    let rec = Arc::new(Recorder::default());
    let net = common::testnet(7, 2, Some(rec.clone() as Arc<dyn HopTap>)).await;
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let cfg = config(arch, momentum(), 192);
    let dir = tempfile::tempdir().expect("tempdir");
    let train = data.train.clone().limit(192);
    let test = data.test.clone().limit(100);
    let opts = JobOptions {
        checkpoint_every: Some(2),
        ..JobOptions::default()
    };
    let report = train_network(
        &net.client,
        &net.volunteers,
        common::job(&cfg, &train, &test, &opts, &dir.path().join("m.json")),
        &mut |_| {},
    )
    .await
    .expect("training");
    let mixes: Vec<PeerId> = rec
        .views
        .lock()
        .expect("lock")
        .iter()
        .filter(|v| v.role == "mix")
        .map(|v| v.me)
        .collect();
    let cells = rec.cells.lock().expect("lock");
    let mut per_mix: Vec<usize> = mixes
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|m| cells.iter().filter(|(p, _)| p == m).count())
        .collect();
    per_mix.sort_unstable();
    let mut lengths: Vec<usize> = cells
        .iter()
        .filter(|(p, _)| mixes.contains(p))
        .map(|(_, l)| *l)
        .collect();
    lengths.sort_unstable();
    lengths.dedup();
    (per_mix, lengths, report.params_digest)
}

/// Two models whose middle stage is a convolution in one and a linear
/// layer in the other, with the same values in and out and the same
/// parameter count: the mixes relay the same number of cells of the same
/// length. A mix learns a stage's message sizes (their size classes) and
/// nothing of what computes them: the convolution's `[batch, c, h, w]`
/// tensors and its own layer record travel inside the same cells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_cannot_tell_a_convolution_stage_from_a_linear_one() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let first = StageSpec {
        layers: vec![
            LayerSpec::Linear {
                inputs: 784,
                outputs: 128,
            },
            LayerSpec::Relu,
        ],
    };
    let last = StageSpec {
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                inputs: 32,
                outputs: 10,
            },
        ],
    };
    // 2x8x8 = 128 values in, 32x1x1 out; 32·2·8·8 + 32 = 128·32 + 32 parameters.
    let conv = StageSpec {
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 2,
                out_channels: 32,
                kernel: 8,
                stride: 1,
                padding: 0,
                bias: true,
                height: 8,
                width: 8,
            },
            LayerSpec::Relu,
        ],
    };
    let linear = StageSpec {
        layers: vec![
            LayerSpec::Linear {
                inputs: 128,
                outputs: 32,
            },
            LayerSpec::Relu,
        ],
    };
    assert_eq!(conv.param_count(), linear.param_count());
    let with_conv = Arch::from_stages(vec![first.clone(), conv, last.clone()]).expect("conv model");
    let with_linear = Arch::from_stages(vec![first, linear, last]).expect("linear model");
    assert!(with_conv.to_string().contains("conv("), "{with_conv}");

    let (conv_counts, conv_lengths, conv_digest) = what_mixes_see(with_conv).await;
    let (linear_counts, linear_lengths, linear_digest) = what_mixes_see(with_linear).await;
    // A convolution whose kernel covers its whole input is a linear layer
    // with the same weights (PyTorch's [out, in, k, k] is [out, in·k·k]
    // row-major, and the initialisation draws the same values): the two
    // jobs train the same function, and end with the same parameters.
    assert_eq!(conv_digest, linear_digest);
    assert_eq!(conv_lengths.len(), 1, "every cell has one length");
    assert_eq!(conv_lengths, linear_lengths);
    assert!(conv_counts.iter().all(|&c| c > 0), "{conv_counts:?}");
    // Cells per mix: the same, but for whole single-cell control rounds
    // (which every mix of a ring relays once) that the client's timing
    // decides: one run in a few sends one more round per ring. Anything a
    // stage's kind changed would show at some mixes and not others.
    let deltas: Vec<i64> = conv_counts
        .iter()
        .zip(&linear_counts)
        .map(|(&c, &l)| l as i64 - c as i64)
        .collect();
    assert!(
        deltas.windows(2).all(|w| w[0] == w[1]) && deltas[0].abs() <= 2,
        "cells per mix differ: {conv_counts:?} vs {linear_counts:?}"
    );
}
