//! Every slot has an owner, a lease and an end: `release` frees a model's
//! slots (and only its owner may), `renew` extends them, and a slot whose
//! lease ended is freed and advertised again.

mod common;

use std::time::Duration;

use mixnn_crypto::Identity;
use mixnn_model::{Arch, OptimizerSpec, TrainConfig};
use mixnn_node::client::owner::{ask_stages, digest_matches, OwnerOp, StageOutcome};
use mixnn_node::client::{train_network, JobOptions, ModelMap};
use mixnn_node::network::records::unix_now;

fn config() -> TrainConfig {
    TrainConfig {
        arch: Arch::parse("mlp:784-32-10").expect("arch"),
        epochs: 1,
        batch: 64,
        optimizer: OptimizerSpec::Sgd { lr: 0.1 },
        seed: 3,
        limit: Some(256),
    }
}

fn free_slots(net: &common::TestNet) -> u32 {
    net.nodes.iter().map(|n| n.state.free_slots()).sum()
}

fn metric(net: &common::TestNet, line_start: &str) -> u64 {
    net.nodes
        .iter()
        .flat_map(|n| {
            n.state
                .metrics
                .render()
                .lines()
                .filter(|l| l.starts_with(line_start))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// A bootstrap and 6 volunteers with 2 slots each, and `config()` trained
/// through them with `opts`: the net, the map's folder, its path and the map.
async fn trained(
    opts: &JobOptions,
) -> (
    common::TestNet,
    tempfile::TempDir,
    std::path::PathBuf,
    ModelMap,
) {
    let net = common::testnet(6, 2, None).await;
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let cfg = config();
    let train = data.train.clone().limit(256);
    let dir = tempfile::tempdir().expect("tempdir");
    let map_path = dir.path().join("m.json");
    train_network(
        &net.client,
        &net.volunteers,
        common::job(&cfg, &train, &data.test, opts, &map_path),
        &mut |_| {},
    )
    .await
    .expect("network training");
    let map = ModelMap::load(&map_path).expect("map");
    (net, dir, map_path, map)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_frees_every_slot_and_only_the_owner_may() {
    let opts = JobOptions::default();
    let (net, _dir, _, map) = trained(&opts).await;
    let (client, vols) = (&*net.client, &net.volunteers);
    let before = 6 * 2; // every slot of every volunteer
    assert_eq!(free_slots(&net), before - 2, "the model holds two slots");

    // Each host's /slots lists its slot, with the same owner fingerprint
    // on both; /health counts it.
    let mut owners = Vec::new();
    for n in &net.nodes {
        let (status, body) = common::http_get(n, "/slots").await;
        assert!(status.contains("200"), "{status}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let slots = v["slots"].as_array().expect("a list");
        let (_, health) = common::http_get(n, "/health").await;
        let h: serde_json::Value = serde_json::from_str(&health).expect("json");
        assert_eq!(h["peer_id"], n.peer_id().to_string());
        assert_eq!(h["slots"]["used"], slots.len());
        assert_eq!(h["slots"]["free"], 2 - slots.len());
        for s in slots {
            assert!(s["parameters"].as_u64().expect("count") > 0);
            assert!(s["lease_secs_left"].as_u64().expect("lease") > 6 * 24 * 3600);
            assert_eq!(s["setup_completed"], true);
            owners.push(s["owner"].as_str().expect("owner").to_string());
        }
    }
    assert_eq!(owners.len(), 2);
    assert_eq!(owners[0], owners[1], "one owner, one fingerprint");

    // Status: every stage answers with the map's parameters and a lease of
    // about a week.
    let now = unix_now();
    let status = ask_stages(client, vols, &map, OwnerOp::Status, &opts)
        .await
        .expect("status");
    assert_eq!(status.len(), 2);
    for a in &status {
        let StageOutcome::Answered(r) = &a.outcome else {
            panic!("stage {} did not answer: {:?}", a.stage.index, a.outcome);
        };
        assert_eq!(digest_matches(a), Some(true));
        assert_eq!(r.steps_applied, 4);
        let week = 7 * 24 * 3600;
        assert!(r.lease_until >= now + week - 120 && r.lease_until <= now + week + 120);
    }

    // Renew: the lease grows, up to the hosts' maximum (30 days).
    let renewed = ask_stages(
        client,
        vols,
        &map,
        OwnerOp::Renew(Duration::from_secs(90 * 24 * 3600)),
        &opts,
    )
    .await
    .expect("renew");
    for a in &renewed {
        let StageOutcome::Answered(r) = &a.outcome else {
            panic!("stage {} was not renewed: {:?}", a.stage.index, a.outcome);
        };
        let month = 30 * 24 * 3600;
        assert!(r.lease_until >= now + month - 120 && r.lease_until <= now + month + 120);
    }

    // A stranger with the map but not the owner's key is refused, and
    // counted; the slots stay.
    let mut forged = map.clone();
    forged.owner_secret = hex::encode(Identity::generate().secret_bytes());
    let refused = ask_stages(client, vols, &forged, OwnerOp::Release, &opts)
        .await
        .expect("stranger's release");
    for a in &refused {
        assert!(
            matches!(&a.outcome, StageOutcome::Refused(d) if d.contains("another owner")),
            "{:?}",
            a.outcome
        );
    }
    assert_eq!(metric(&net, "mixnn_slot_owner_refused_total"), 2);
    assert_eq!(free_slots(&net), before - 2);

    // The owner's release frees both, at once.
    let released = ask_stages(client, vols, &map, OwnerOp::Release, &opts)
        .await
        .expect("release");
    for a in &released {
        assert!(
            matches!(a.outcome, StageOutcome::Answered(_)),
            "{:?}",
            a.outcome
        );
    }
    assert_eq!(free_slots(&net), before);
    assert_eq!(
        metric(&net, "mixnn_slots_freed_total{reason=\"released\"}"),
        2
    );
    for n in &net.nodes {
        let (_, body) = common::http_get(n, "/slots").await;
        assert!(body.contains("\"slots\":[]"), "{body}");
    }
    // And advertised: every descriptor offers both slots again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut offered = 0;
        for n in &net.nodes {
            let d = client
                .network()
                .get_descriptor(n.peer_id())
                .await
                .expect("descriptor");
            offered += d.free_slots;
        }
        if offered == before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "released slots not advertised ({offered} of {before})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Again: already gone; status says so too.
    for op in [OwnerOp::Release, OwnerOp::Status] {
        let again = ask_stages(client, vols, &map, op, &opts)
            .await
            .expect("again");
        for a in &again {
            assert_eq!(a.outcome, StageOutcome::Gone, "{op:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_frees_the_slot_and_advertises_it_again() {
    let opts = JobOptions {
        lease: Duration::from_secs(2),
        ..JobOptions::default()
    };
    let (net, _dir, _, map) = trained(&opts).await;
    let (client, vols) = (&*net.client, &net.volunteers);
    let before = 6 * 2; // every slot of every volunteer
    let hosts: Vec<libp2p::PeerId> = map
        .stages
        .iter()
        .filter_map(|s| match s {
            mixnn_node::client::model_map::StageEntry::Remote { host, .. } => host.parse().ok(),
            _ => None,
        })
        .collect();
    assert_eq!(hosts.len(), 2);

    // Freed within seconds of the lease's end once the circuits closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while free_slots(&net) != before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(free_slots(&net), before, "the expired slots were not freed");
    assert_eq!(
        metric(&net, "mixnn_slots_freed_total{reason=\"expired\"}"),
        2
    );

    // And advertised again: the hosts' descriptors offer every slot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut full = true;
        for h in &hosts {
            let d = client
                .network()
                .get_descriptor(*h)
                .await
                .expect("descriptor");
            full &= d.free_slots == 2;
        }
        if full {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed slots were not advertised again"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gone = ask_stages(client, vols, &map, OwnerOp::Status, &opts)
        .await
        .expect("status");
    assert!(gone.iter().all(|a| a.outcome == StageOutcome::Gone));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_changed_behind_the_map_is_named_and_a_corrupt_one_is_refused() {
    use mixnn_node::client::model_map::StageEntry;
    use mixnn_node::client::{infer_network, JobError};
    use mixnn_node::store::SlotStore;

    let opts = JobOptions::default();
    let (net, _dir, _, map) = trained(&opts).await;
    let (client, vols) = (&*net.client, &net.volunteers);
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let cfg = config();
    infer_network(client, vols, &map, &data.test, &opts)
        .await
        .expect("the slots match the map");

    // The host of stage 1 rolls its slot back to a freshly made one, with
    // a digest that matches its bytes: the store cannot tell, the map can.
    let (host, slot_id) = map
        .stages
        .iter()
        .find_map(|s| match s {
            StageEntry::Remote {
                index: 1,
                host,
                slot_id,
                ..
            } => Some((
                host.parse::<libp2p::PeerId>().expect("peer"),
                slot_id.clone(),
            )),
            _ => None,
        })
        .expect("stage 1 is remote");
    let id: [u8; 16] = hex::decode(&slot_id).expect("hex").try_into().expect("16");
    let node = net
        .nodes
        .iter()
        .find(|n| n.peer_id() == host)
        .expect("the host");
    let mut stored = node.state.slots.get_slot(&id).expect("get").expect("slot");
    let fresh = mixnn_model::Slot::new(
        &cfg.arch.stages()[1],
        mixnn_model::InitSpec {
            seed: cfg.seed,
            stage_index: 1,
        },
        cfg.optimizer,
    )
    .expect("slot");
    let good = stored.clone();
    stored.state = fresh.to_bytes();
    stored.version = 0;
    node.state.slots.put_slot(&stored).expect("put");
    match infer_network(client, vols, &map, &data.test, &opts).await {
        Err(JobError::Diverged { stage, peer, .. }) => assert_eq!((stage, peer), (1, host)),
        other => panic!("expected the diverged host to be named, got {other:?}"),
    }

    // A flipped byte under the right metadata: refused at bind, never
    // served as it is, and counted.
    node.state.slots.put_slot(&good).expect("put back");
    infer_network(client, vols, &map, &data.test, &opts)
        .await
        .expect("restored");
    let mut flipped = good.state.clone();
    flipped[good.state.len() / 2] ^= 0x10;
    node.state.slots.put_slot(&good).expect("put");
    node.state
        .slots
        .overwrite_state_for_tests(&id, &flipped)
        .expect("raw write");
    let err = infer_network(client, vols, &map, &data.test, &opts)
        .await
        .expect_err("a corrupt slot is never served");
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(node
        .state
        .metrics
        .render()
        .contains("mixnn_slots_corrupt_total 1"));
}
