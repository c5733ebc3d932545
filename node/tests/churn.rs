//! Volunteers leave mid-job, clients die and come back: every job still
//! ends with the parameters of an uninterrupted run, bit for bit.

mod common;

use std::time::Duration;

use libp2p::PeerId;
use mixnn_model::{train_local, Arch, Dataset, OptimizerSpec, TrainConfig, TrainReport};
use mixnn_node::client::model_map::StageEntry;
use mixnn_node::client::{
    checkpoint, resume_network, train_network, JobError, JobEvent, JobOptions, ModelMap,
    NetworkReport, TrainJob,
};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

type Net = common::TestNet;

fn config(epochs: u32) -> TrainConfig {
    TrainConfig {
        arch: Arch::parse("mlp:784-64-32-10").expect("arch"),
        epochs,
        batch: 64,
        optimizer: OptimizerSpec::Momentum {
            lr: 0.05,
            momentum: 0.9,
        },
        seed: 11,
        limit: Some(640),
    }
}

fn opts(checkpoint_every: u64) -> JobOptions {
    JobOptions {
        checkpoint_every: Some(checkpoint_every),
        step_timeout: Duration::from_secs(15),
        setup_timeout: Duration::from_secs(10),
        probe_timeout: Duration::from_secs(2),
        ..JobOptions::default()
    }
}

fn data() -> Dataset {
    mixnn_node::dataset::load("synthetic").expect("data")
}

fn local(cfg: &TrainConfig, data: &Dataset) -> TrainReport {
    train_local(cfg, data, &mut |_| {}).expect("local")
}

/// The peer holding stage `stage` according to the map.
fn host_of(map_path: &std::path::Path, stage: usize) -> PeerId {
    let map = ModelMap::load(map_path).expect("map");
    map.stages
        .iter()
        .find_map(|s| match s {
            StageEntry::Remote { index, host, .. } if *index == stage => host.parse().ok(),
            _ => None,
        })
        .expect("stage is remote")
}

/// Stop the node `peer` as a crash would look to its neighbours.
async fn kill(net: &mut Net, peer: PeerId) {
    let i = net
        .nodes
        .iter()
        .position(|n| n.peer_id() == peer)
        .expect("a running node");
    net.nodes.remove(i).shutdown().await.expect("shutdown");
}

/// What to kill, and when: after the step `after` was computed, wait
/// `delay` (so the kill lands in a forward pass, a backward pass, between
/// steps or in a checkpoint), then stop the host of `stage`, or a mix of
/// the forward ring when `stage` is `None`.
#[derive(Clone, Copy, Debug)]
struct Kill {
    after: u64,
    delay: Duration,
    stage: Option<usize>,
}

/// Train through `net`, killing as told; returns the report.
async fn train_with_kills(
    net: &mut Net,
    cfg: &TrainConfig,
    data: &Dataset,
    opts: &JobOptions,
    map_path: &std::path::Path,
    kills: &[Kill],
) -> Result<NetworkReport, JobError> {
    let (tx, mut rx) = mpsc::channel::<u64>(64);
    let (client, vols) = (net.client.clone(), net.volunteers.clone());
    let (cfg2, opts2, path) = (cfg.clone(), opts.clone(), map_path.to_path_buf());
    let train = data.train.clone().limit(cfg.limit.unwrap_or(usize::MAX));
    let test = data.test.clone().limit(200);
    let job = tokio::spawn(async move {
        let mut on_event = |e: JobEvent| {
            if let JobEvent::Step(s) = e {
                let _ = tx.try_send(s.step);
            }
        };
        train_network(
            &client,
            &vols,
            common::job(&cfg2, &train, &test, &opts2, &path),
            &mut on_event,
        )
        .await
    });
    let mut pending: Vec<Kill> = kills.to_vec();
    let mut killed = Vec::new();
    while !pending.is_empty() {
        let Some(step) = rx.recv().await else { break };
        let due: Vec<Kill> = pending
            .iter()
            .copied()
            .filter(|k| step >= k.after)
            .collect();
        pending.retain(|k| step < k.after);
        for k in due {
            tokio::time::sleep(k.delay).await;
            let victim = match k.stage {
                Some(stage) => host_of(map_path, stage),
                None => {
                    // A forward-ring mix: any running volunteer that holds
                    // no stage of ours and relays cells right now.
                    let map = ModelMap::load(map_path).expect("map");
                    let hosts: Vec<String> = map
                        .stages
                        .iter()
                        .filter_map(|s| match s {
                            StageEntry::Remote { host, .. } => Some(host.clone()),
                            _ => None,
                        })
                        .collect();
                    let busiest = net
                        .nodes
                        .iter()
                        .filter(|n| !hosts.contains(&n.peer_id().to_string()))
                        .max_by_key(|n| n.state.metrics.cells_relayed.get())
                        .expect("a mix");
                    busiest.peer_id()
                }
            };
            if killed.contains(&victim) {
                continue;
            }
            kill(net, victim).await;
            killed.push(victim);
        }
    }
    let report = tokio::time::timeout(Duration::from_secs(120), job)
        .await
        .expect("the job ends in time")
        .expect("join");
    if let Ok(r) = &report {
        for v in &killed {
            assert!(
                r.route.iter().all(|h| !h.contains(&v.to_string())),
                "the last run still used a dead peer"
            );
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_anywhere_in_the_job_ends_with_the_local_digest() {
    let data = data();
    let cfg = config(2);
    let reference = local(&cfg, &data);
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261130);
    // Seeded kill points: each lands at another place of a step; the
    // checkpoint every 4 steps means some land during a checkpoint.
    for round in 0..4 {
        let mut net = common::testnet(9, 16, None).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let map_path = dir.path().join("m.json");
        let kill = Kill {
            after: rng.gen_range(2..18),
            delay: Duration::from_millis(rng.gen_range(0..30)),
            stage: Some(rng.gen_range(0..3)),
        };
        let report = train_with_kills(&mut net, &cfg, &data, &opts(4), &map_path, &[kill])
            .await
            .unwrap_or_else(|e| panic!("round {round} ({kill:?}): {e}"));
        assert!(report.failovers >= 1, "round {round} ({kill:?})");
        assert_eq!(
            report.params_digest, reference.params_digest_hex,
            "round {round} ({kill:?})"
        );
        assert_eq!(report.losses, reference.losses, "round {round} ({kill:?})");
        assert_eq!(report.steps, reference.steps);
        let map = ModelMap::load(&map_path).expect("map");
        assert!(map.complete);
        assert_eq!(map.params_digest, reference.params_digest_hex);
        // The checkpoint beside the map holds the final model.
        let ckpt = checkpoint::Checkpoint::load(&checkpoint::path_for(&map_path)).expect("ckpt");
        assert_eq!(ckpt.step, reference.steps);
        assert_eq!(
            mixnn_model::to_hex(&ckpt.digest().expect("digest")),
            reference.params_digest_hex
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_and_then_two_hosts_lost_in_one_job_end_with_the_local_digest() {
    let data = data();
    let cfg = config(2);
    let reference = local(&cfg, &data);
    let mut net = common::testnet(11, 16, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("m.json");
    let kills = [
        Kill {
            after: 3,
            delay: Duration::ZERO,
            stage: None,
        },
        Kill {
            after: 9,
            delay: Duration::from_millis(5),
            stage: Some(2),
        },
        Kill {
            after: 15,
            delay: Duration::ZERO,
            stage: Some(0),
        },
    ];
    let report = train_with_kills(&mut net, &cfg, &data, &opts(5), &map_path, &kills)
        .await
        .expect("training through three failures");
    assert!(report.failovers >= 2, "{} failovers", report.failovers);
    assert_eq!(report.params_digest, reference.params_digest_hex);
    assert_eq!(report.losses, reference.losses);
    assert_eq!(report.test_accuracy, {
        // The report's accuracy is over the test split the job was given.
        let mut model =
            mixnn_model::LocalModel::new(&cfg.arch, cfg.seed, cfg.optimizer).expect("model");
        let train = data.train.clone().limit(640);
        for epoch in 0..cfg.epochs {
            for (x, l) in train.batches(cfg.batch, epoch, cfg.seed) {
                model.train_step(&x, &l).expect("step");
            }
        }
        model.evaluate(&data.test.clone().limit(200), mixnn_model::EVAL_BATCH)
    });
}

/// A convolution stage's host lost mid-job: the replay from the last
/// checkpoint puts the stage on another volunteer and the CNN ends with
/// the local parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_convolution_host_killed_mid_job_ends_with_the_local_digest() {
    let data = data();
    let cfg = TrainConfig {
        arch: Arch::parse(
            "seq:1x28x28|conv(4,5,s=2,p=2) relu maxpool(2)|conv(8,3) relu|flatten linear(10)",
        )
        .expect("arch"),
        ..config(1)
    };
    let reference = local(&cfg, &data);
    let mut net = common::testnet(9, 16, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("m.json");
    let kills = [Kill {
        after: 4,
        delay: Duration::from_millis(3),
        stage: Some(1),
    }];
    let report = train_with_kills(&mut net, &cfg, &data, &opts(3), &map_path, &kills)
        .await
        .expect("training through a lost convolution host");
    assert!(report.failovers >= 1);
    assert_eq!(report.params_digest, reference.params_digest_hex);
    assert_eq!(report.losses, reference.losses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_failovers_the_job_stops_and_resume_finishes_it() {
    let data = data();
    let cfg = config(2);
    let reference = local(&cfg, &data);
    let mut net = common::testnet(9, 16, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("m.json");
    let mut o = opts(4);
    o.max_failovers = 0;
    let kill = Kill {
        after: 6,
        delay: Duration::ZERO,
        stage: Some(1),
    };
    let victim_stage = kill.stage.expect("stage");
    let err = train_with_kills(&mut net, &cfg, &data, &o, &map_path, &[kill])
        .await
        .expect_err("no failover allowed");
    assert!(err.resumable(), "{err}");
    let map = ModelMap::load(&map_path).expect("map");
    assert!(!map.complete);
    let stopped_at = map.job.as_ref().expect("job").checkpoint_step;
    assert!(stopped_at >= 4, "checkpoint of step {stopped_at}");
    let dead = host_of(&map_path, victim_stage);
    assert!(err.to_string().contains(&dead.to_string()), "{err}");

    // Resume: the dead host's stage moves, the others keep their slots.
    let train = data.train.clone().limit(640);
    let test = data.test.clone().limit(200);
    let report = resume_network(
        &net.client,
        &net.volunteers,
        common::job(&cfg, &train, &test, &opts(4), &map_path),
        &mut |_| {},
    )
    .await
    .expect("resumed");
    assert_eq!(report.started_at_step, stopped_at);
    assert_eq!(report.params_digest, reference.params_digest_hex);
    assert_eq!(report.losses, reference.losses);
    assert_ne!(host_of(&map_path, victim_stage), dead);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropped_mid_job_resumes_to_the_local_digest() {
    let data = data();
    let cfg = config(2);
    let reference = local(&cfg, &data);
    let net = common::testnet(8, 16, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("m.json");
    let train = data.train.clone().limit(640);
    let test = data.test.clone().limit(200);
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let job = {
        let (client, vols) = (net.client.clone(), net.volunteers.clone());
        let (cfg, train, test, path) = (cfg.clone(), train.clone(), test.clone(), map_path.clone());
        tokio::spawn(async move {
            let o = opts(3);
            let mut on_event = |e: JobEvent| {
                if matches!(e, JobEvent::Step(s) if s.step == 11) {
                    let _ = tx.try_send(());
                }
            };
            train_network(
                &client,
                &vols,
                common::job(&cfg, &train, &test, &o, &path),
                &mut on_event,
            )
            .await
        })
    };
    rx.recv().await.expect("step 11 ran");
    // The client dies: its job, rings and all, vanish mid-step.
    job.abort();
    let _ = job.await;
    let map = ModelMap::load(&map_path).expect("map");
    assert!(!map.complete);
    let report = resume_network(
        &net.client,
        &net.volunteers,
        common::job(&cfg, &train, &test, &opts(3), &map_path),
        &mut |_| {},
    )
    .await
    .expect("resumed");
    assert!(report.started_at_step >= 9 && report.started_at_step <= 11);
    assert_eq!(report.params_digest, reference.params_digest_hex);
    assert_eq!(report.losses, reference.losses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_job_and_a_finished_job_given_more_epochs_resume_exactly() {
    let data = data();
    let one = config(1);
    let two = config(2);
    let reference_two = local(&two, &data);
    let net = common::testnet(8, 16, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("m.json");
    let train = data.train.clone().limit(640);
    let test = data.test.clone().limit(200);

    // Ctrl-C after step 4: the step ends, a checkpoint is written.
    let stop = CancellationToken::new();
    let s = stop.clone();
    let o = opts(100);
    let err = train_network(
        &net.client,
        &net.volunteers,
        TrainJob {
            stop,
            ..common::job(&one, &train, &test, &o, &map_path)
        },
        &mut |e| {
            if matches!(e, JobEvent::Step(st) if st.step == 4) {
                s.cancel();
            }
        },
    )
    .await
    .expect_err("stopped");
    assert!(matches!(err, JobError::Interrupted { step: 4 }), "{err}");

    // Finish the one-epoch job...
    let r1 = resume_network(
        &net.client,
        &net.volunteers,
        common::job(&one, &train, &test, &o, &map_path),
        &mut |_| {},
    )
    .await
    .expect("resumed");
    assert_eq!(r1.params_digest, local(&one, &data).params_digest_hex);
    assert!(ModelMap::load(&map_path).expect("map").complete);
    // ... then carry it on to two epochs: the digest of a two-epoch run.
    let r2 = resume_network(
        &net.client,
        &net.volunteers,
        common::job(&two, &train, &test, &o, &map_path),
        &mut |_| {},
    )
    .await
    .expect("two epochs");
    assert_eq!(r2.started_at_step, 10);
    assert_eq!(r2.steps, 20);
    assert_eq!(r2.params_digest, reference_two.params_digest_hex);
    assert_eq!(r2.losses, reference_two.losses);
    // Epoch losses of a resumed job cover the steps before the resume too.
    assert_eq!(r2.epoch_losses.len(), 2);
    assert_eq!(r2.epoch_losses, reference_two.epoch_losses);
    assert_eq!(r2.final_loss, reference_two.final_loss);

    // Another job's data is refused.
    let other = data.train.clone().limit(320);
    let err = resume_network(
        &net.client,
        &net.volunteers,
        common::job(&two, &other, &test, &o, &map_path),
        &mut |_| {},
    )
    .await
    .expect_err("other data");
    assert!(err.to_string().contains("data"), "{err}");
}

/// A validly signed descriptor whose addresses lead nowhere: anyone can
/// publish one.
fn dead_volunteer() -> mixnn_node::discovery::Volunteer {
    use mixnn_crypto::{Capacity, Descriptor, Identity, OnionKeyPair, Roles};
    let id = Identity::generate();
    let now = mixnn_node::network::records::unix_now();
    let onion = OnionKeyPair::generate(1, now + 3600);
    let descriptor = Descriptor {
        peer_id: id.peer_id_bytes(),
        identity_key: id.public_key(),
        onion_key: onion.public(),
        epoch: 1,
        expires_at: now + 600,
        roles: Roles {
            layer_host: true,
            mix: true,
        },
        free_slots: 64,
        capacity: Capacity {
            max_params: 1 << 30,
            memory_bytes: 1 << 34,
            aes_gcm: true,
        },
        addresses: vec!["/memory/987654321".into(), "/ip4/127.0.0.1/tcp/1".into()],
        seq: 1,
    };
    let signed = descriptor.sign(&id).expect("sign");
    let descriptor = signed.verify(now).expect("a valid descriptor");
    mixnn_node::discovery::Volunteer {
        peer_id: PeerId::from_bytes(&id.peer_id_bytes()).expect("peer id"),
        descriptor,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_with_dead_addresses_never_fail_a_job() {
    let data = data();
    let cfg = config(1);
    let reference = local(&cfg, &data);
    let net = common::testnet(7, 16, None).await;
    let dead: Vec<_> = (0..4).map(|_| dead_volunteer()).collect();
    let mut vols = net.volunteers.clone();
    vols.extend(dead.iter().cloned());
    let train = data.train.clone().limit(640);
    let test = data.test.clone().limit(200);
    let dir = tempfile::tempdir().expect("tempdir");
    let o = JobOptions {
        max_failovers: 0,
        ..opts(100)
    };
    // 11 candidates, 4 of them dead, 7 needed per ring: nearly every first
    // choice of a route holds a dead peer.
    for i in 0..3 {
        let path = dir.path().join(format!("m{i}.json"));
        let r = train_network(
            &net.client,
            &vols,
            common::job(&cfg, &train, &test, &o, &path),
            &mut |_| {},
        )
        .await
        .expect("the job never uses a dead peer");
        assert_eq!(r.params_digest, reference.params_digest_hex);
        assert_eq!(r.failovers, 0);
        for d in &dead {
            assert!(r.route.iter().all(|h| !h.contains(&d.peer_id.to_string())));
        }
    }
}
