//! Training and inference through mix circuits, in one process.

mod common;

use mixnn_model::{train_local, Arch, OptimizerSpec, TrainConfig};
use mixnn_node::client::{infer_network, train_network, JobOptions, ModelMap};

fn config(arch: &str, optimizer: OptimizerSpec) -> TrainConfig {
    TrainConfig {
        arch: Arch::parse(arch).expect("arch"),
        epochs: 1,
        batch: 64,
        optimizer,
        seed: 7,
        limit: Some(640),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_training_equals_local_training_and_inference_matches() {
    let net = common::testnet(7, 2, None).await;
    let (client, vols) = (&*net.client, &net.volunteers);

    let mut data = mixnn_node::dataset::load("synthetic").expect("data");
    // Three times the test split: four evaluation batches, the last one
    // short, so evaluation runs with two batches on the ring at once and
    // refills.
    let once = data.test.clone();
    for _ in 0..2 {
        data.test.images.extend_from_slice(&once.images);
        data.test.labels.extend_from_slice(&once.labels);
    }
    assert!(data.test.len() > 3 * mixnn_model::train::EVAL_BATCH);
    let cfg = config(
        "mlp:784-64-32-10",
        OptimizerSpec::Momentum {
            lr: 0.05,
            momentum: 0.9,
        },
    );
    let local = train_local(&cfg, &data, &mut |_| {}).expect("local");

    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("model.json");
    let train = data.train.clone().limit(640);
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
    assert_eq!(
        report.epoch_losses, local.epoch_losses,
        "loss per epoch differs"
    );
    assert_eq!(report.final_loss, local.final_loss);
    assert_eq!(report.epoch_losses.len(), 1);
    assert_eq!(
        report.params_digest, local.params_digest_hex,
        "params digest differs"
    );
    assert_eq!(report.test_accuracy, local.test_accuracy);

    let map = ModelMap::load(&map_path).expect("map");
    assert!(map.complete);
    assert_eq!(map.params_digest, local.params_digest_hex);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&map_path)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "the model map is private");
    }
    // Slots were persisted on the hosts.
    let held: usize = net
        .nodes
        .iter()
        .map(|n| {
            mixnn_node::store::SlotStore::list_slots(&n.state.slots)
                .expect("list")
                .len()
        })
        .sum();
    assert_eq!(held, 3);

    let inferred = infer_network(client, vols, &map, &data.test, &JobOptions::default())
        .await
        .expect("inference");
    assert_eq!(inferred.test_accuracy, local.test_accuracy);
    assert_eq!(inferred.examples, data.test.len());
    for n in net.nodes {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_ends_training_equals_local_training() {
    let net = common::testnet(5, 2, None).await;
    let (client, vols) = (&*net.client, &net.volunteers);
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let cfg = config(
        "mlp:784-64-32-10",
        OptimizerSpec::Adam {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    );
    let local = train_local(&cfg, &data, &mut |_| {}).expect("local");
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = JobOptions {
        keep_ends: true,
        ..JobOptions::default()
    };
    let train = data.train.clone().limit(640);
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
    assert_eq!(report.epoch_losses, local.epoch_losses);
    assert_eq!(report.params_digest, local.params_digest_hex);
    let map = ModelMap::load(&map_path).expect("map");
    let inferred = infer_network(client, vols, &map, &data.test, &opts)
        .await
        .expect("inference");
    assert_eq!(inferred.test_accuracy, local.test_accuracy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_from_given_parameters_restores_them_into_fresh_slots() {
    let net = common::testnet(5, 4, None).await;
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let cfg = config("mlp:784-32-10", OptimizerSpec::Sgd { lr: 0.1 });
    let local = train_local(&cfg, &data, &mut |_| {}).expect("local");
    // The seeded parameters, given explicitly: they reach the slots as a
    // restore of step 0, and the job ends where the seeded one does.
    let init: Vec<Vec<u8>> = cfg
        .arch
        .stages()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            mixnn_model::Slot::new(
                s,
                mixnn_model::InitSpec {
                    seed: cfg.seed,
                    stage_index: i as u32,
                },
                cfg.optimizer,
            )
            .expect("slot")
            .to_bytes()
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let train = data.train.clone().limit(640);
    let path = dir.path().join("m.json");
    let opts = JobOptions::default();
    let report = mixnn_node::client::train_network_from(
        &net.client,
        &net.volunteers,
        common::job(&cfg, &train, &data.test, &opts, &path),
        Some(init.clone()),
        &mut |_| {},
    )
    .await
    .expect("training from given parameters");
    assert_eq!(report.params_digest, local.params_digest_hex);
    // Parameters of another model are refused before anything starts.
    let mut wrong = init;
    wrong.swap(0, 1);
    let err = mixnn_node::client::train_network_from(
        &net.client,
        &net.volunteers,
        common::job(&cfg, &train, &data.test, &opts, &dir.path().join("w.json")),
        Some(wrong),
        &mut |_| {},
    )
    .await
    .expect_err("wrong stages");
    assert!(err.to_string().contains("initial state"), "{err}");
}

/// A route whose layer hosts differ in what they offer: two of three offer
/// AES-256-GCM cells, one only ChaCha20-Poly1305, and the client offers
/// both. In any order of the three, some segments use AES-256-GCM (a
/// segment whose two ends offer it) and some ChaCha20-Poly1305; training
/// through it ends where local training does, and inference through a
/// fresh circuit agrees. The hosts count each of their segments by suite:
/// the one that offers no AES never seals or opens an AES cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_mixing_both_cell_suites_trains_as_local_training_does() {
    use mixnn_crypto::cells::CellSuite;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Nodes 0..3 hold layers (AES, no AES, AES); the other four are mixes.
    let offers = [true, false, true, true, true, true, true];
    let next = AtomicUsize::new(0);
    let net = common::testnet_with(7, 1, None, |c| {
        let i = next.fetch_add(1, Ordering::SeqCst);
        c.aes_cells = offers[i];
        if i >= 3 {
            c.layers = false;
            c.slots = 0;
        }
    })
    .await;
    // Each descriptor says what its node offers (`mixnn peers` shows it).
    for (i, node) in net.nodes.iter().enumerate() {
        let v = net
            .volunteers
            .iter()
            .find(|v| v.peer_id == node.peer_id())
            .expect("discovered");
        let summary = mixnn_node::discovery::VolunteerSummary::from(v);
        assert_eq!(summary.aes_gcm, offers[i], "node {i}");
    }
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let cfg = config("mlp:784-64-32-10", OptimizerSpec::Sgd { lr: 0.1 });
    let local = train_local(&cfg, &data, &mut |_| {}).expect("local");
    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("model.json");
    let train = data.train.clone().limit(640);
    let opts = JobOptions {
        aes_cells: true,
        ..JobOptions::default()
    };
    let report = train_network(
        &net.client,
        &net.volunteers,
        common::job(&cfg, &train, &data.test, &opts, &map_path),
        &mut |_| {},
    )
    .await
    .expect("network training");
    assert_eq!(report.losses, local.losses);
    assert_eq!(report.params_digest, local.params_digest_hex);
    let map = ModelMap::load(&map_path).expect("map");
    let inferred = infer_network(&net.client, &net.volunteers, &map, &data.test, &opts)
        .await
        .expect("inference");
    assert_eq!(inferred.test_accuracy, local.test_accuracy);

    let count = |i: usize, suite| net.nodes[i].state.metrics.segments_with(suite);
    let total = |suite| (0..3).map(|i| count(i, suite)).sum::<u64>();
    assert!(
        total(CellSuite::Aes256Gcm) > 0,
        "no segment used AES-256-GCM"
    );
    assert!(
        total(CellSuite::ChaCha20Poly1305) > 0,
        "no segment used ChaCha20-Poly1305"
    );
    assert_eq!(count(1, CellSuite::Aes256Gcm), 0, "the host without AES");
    assert!(count(1, CellSuite::ChaCha20Poly1305) > 0);
    for i in 3..7 {
        assert_eq!(
            count(i, CellSuite::Aes256Gcm) + count(i, CellSuite::ChaCha20Poly1305),
            0,
            "a mix opens no cells"
        );
    }
}
