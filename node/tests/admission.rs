//! What a stranger can cost a volunteer (issue 12): a hostile peer built on
//! the project's own crates, with many identities from one address, tries
//! to take nodes out of service without breaking a rule — by claiming
//! every slot, by holding every circuit with setups that never send a
//! cell, and by making a node allocate far more than a message's size —
//! while honest jobs run.
//!
//! Run with `--no-capture` to see the figures (peak memory, job times).

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mixnn_crypto::Identity;
use mixnn_model::{
    train_local, Arch, DecodeLimits, HostTensor, InitSpec, OptimizerSpec, StageSpec, TrainConfig,
};
use mixnn_node::circuit::payload::{
    Assignment, AssignmentBody, Direction, ErrorCode, HopRole, JobMsg, SlotCreate,
};
use mixnn_node::circuit::CIRCUIT_PROTOCOL;
use mixnn_node::client::ring::{Ring, RingError, RingHop, RingKeys};
use mixnn_node::client::route::Candidate;
use mixnn_node::client::{train_network, Client, JobOptions};
use mixnn_node::network::{split_peer_addr, TransportKind};
use mixnn_node::store::SlotStore;
use tokio_util::sync::CancellationToken;

/// One identity of the stranger: its own libp2p key and client, connected
/// from `ip` as far as every volunteer can tell (the memory transport has
/// no addresses, so the test tells them).
async fn stranger(net: &common::TestNet, ip: &str) -> Arc<Client> {
    let network = mixnn_node::discovery::join_as_client(
        net.boot.full_addrs(),
        TransportKind::Memory,
        vec![],
        CancellationToken::new(),
    )
    .await
    .expect("the stranger joins");
    let ip: IpAddr = ip.parse().expect("ip");
    for n in &net.nodes {
        assert!(n.network.peer_addrs().assign(network.peer_id(), ip));
        let (peer, addr) = split_peer_addr(&n.full_addrs()[0]).expect("addr");
        network.add_address(peer, addr).await.expect("address");
        // Connected before any burst of streams, which would otherwise
        // race to dial it.
        let mut tries = 0;
        while let Err(e) = network.connect(peer, Duration::from_secs(10)).await {
            tries += 1;
            assert!(tries < 50, "cannot connect: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Arc::new(Client::new(network).expect("client"))
}

fn candidates(net: &common::TestNet) -> Vec<Candidate> {
    net.nodes
        .iter()
        .map(|n| {
            Candidate::from(
                net.volunteers
                    .iter()
                    .find(|v| v.peer_id == n.peer_id())
                    .expect("volunteer"),
            )
        })
        .collect()
}

fn stage(arch: &str) -> StageSpec {
    Arch::parse(arch).expect("arch").stages().remove(0)
}

fn mix(c: &Candidate) -> RingHop {
    RingHop {
        peer: c.peer,
        onion_key: c.onion_key,
        epoch: c.epoch,
        label: "mix".into(),
        role: HopRole::Mix,
    }
}

/// A training forward circuit's host hop that creates `slot_id` for
/// `owner` (or binds it, once it exists), with its proof of work unless
/// `unworked`.
fn claim(
    c: &Candidate,
    owner: &Identity,
    stage: StageSpec,
    max_batch: u32,
    slot_id: [u8; 16],
    keys: ([u8; 32], [u8; 32]),
    unworked: bool,
) -> RingHop {
    host_hop(c, owner, Some(stage), max_batch, slot_id, keys, unworked)
}

fn host_hop(
    c: &Candidate,
    owner: &Identity,
    stage: Option<StageSpec>,
    max_batch: u32,
    slot_id: [u8; 16],
    keys: ([u8; 32], [u8; 32]),
    unworked: bool,
) -> RingHop {
    let body = AssignmentBody {
        slot_id,
        owner: owner.public_key(),
        direction: Direction::Forward,
        infer_only: false,
        create: stage.map(|stage| SlotCreate {
            stage,
            init: InitSpec {
                seed: 1,
                stage_index: 0,
            },
            optimizer: OptimizerSpec::Sgd { lr: 0.1 },
        }),
        in_key: keys.0,
        out_key: keys.1,
        in_suite: Default::default(),
        out_suite: Default::default(),
        first: false,
        skip_zero_inputs: false,
        max_batch,
        session: rand::random(),
        state: None,
        lease_secs: 30 * 24 * 3600,
        nonce: rand::random(),
    };
    let a = if unworked {
        Assignment::sign_as_is(body, owner, &c.onion_key)
    } else {
        Assignment::sign(body, owner, &c.onion_key)
    };
    RingHop {
        peer: c.peer,
        onion_key: c.onion_key,
        epoch: c.epoch,
        label: "victim host".into(),
        role: HopRole::Host(Box::new(a.expect("sign"))),
    }
}

async fn ring(
    client: &Client,
    hops: Vec<RingHop>,
    keys: ([u8; 32], [u8; 32]),
    timeout: Duration,
) -> Result<Ring, RingError> {
    Ring::open(
        client.network(),
        client.listener(),
        hops,
        RingKeys {
            first_segment: keys.0,
            last_segment: keys.1,
            first_suite: Default::default(),
            last_suite: Default::default(),
        },
        DecodeLimits::default(),
        64 << 20,
        timeout,
    )
    .await
}

fn forward(step: u64, rows: usize, cols: usize, value: f32) -> JobMsg {
    JobMsg::Forward {
        step,
        tensor: HostTensor::new(vec![rows, cols], vec![value; rows * cols]).expect("tensor"),
    }
}

/// Claim a slot on `h` through `a` and `b` and run one forward pass on it
/// (the slot's job has started: it is no unused claim). Returns the ring,
/// still bound to the slot, and the slot id.
async fn claim_and_use(
    s: &Client,
    h: &Candidate,
    a: &Candidate,
    b: &Candidate,
) -> Result<(Ring, [u8; 16]), RingError> {
    let owner = Identity::generate();
    let keys = (rand::random(), rand::random());
    let id: [u8; 16] = rand::random();
    let hop = claim(h, &owner, stage("mlp:784-16-10"), 8, id, keys, false);
    let mut r = ring(s, vec![mix(a), hop, mix(b)], keys, Duration::from_secs(10)).await?;
    r.send(&forward(0, 1, 784, 0.5)).await?;
    r.recv(Duration::from_secs(10)).await?;
    Ok((r, id))
}

fn config(arch: &str, limit: usize) -> TrainConfig {
    TrainConfig {
        arch: Arch::parse(arch).expect("arch"),
        epochs: 1,
        batch: 64,
        optimizer: OptimizerSpec::Sgd { lr: 0.05 },
        seed: 11,
        limit: Some(limit),
    }
}

/// Train `cfg` through the network with fresh descriptors; its digest must
/// equal local training's. Returns how long it took.
async fn honest_job(net: &common::TestNet, cfg: &TrainConfig, name: &str) -> Duration {
    let data = mixnn_node::dataset::load("synthetic").expect("data");
    let local = train_local(cfg, &data, &mut |_| {}).expect("local");
    let (vols, _) = mixnn_node::discovery::discover_at_least(
        net.client.network(),
        net.nodes.len(),
        Duration::from_secs(20),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let train = data.train.clone().limit(cfg.limit.unwrap_or(usize::MAX));
    let test = data.test.clone().limit(200);
    let opts = JobOptions {
        setup_timeout: Duration::from_secs(10),
        ..JobOptions::default()
    };
    let started = Instant::now();
    let report = train_network(
        &net.client,
        &vols,
        common::job(cfg, &train, &test, &opts, &dir.path().join(name)),
        &mut |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("the honest job {name} failed: {e}"));
    let took = started.elapsed();
    assert_eq!(report.params_digest, local.params_digest_hex);
    took
}

/// Peak resident memory of this process since the last [`reset_peak`].
fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

fn rss() -> u64 {
    status_kib("VmRSS:") * 1024
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Start measuring the peak resident memory afresh (Linux: writing 5 to
/// clear_refs resets VmHWM to the current RSS). False where it cannot.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn metric(node: &mixnn_node::node::RunningNode, name: &str) -> u64 {
    node.state
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The tests of this file measure the whole process's resident memory, so
/// under `cargo test` (one process, tests on threads) they run one at a
/// time: each would otherwise count the others' networks.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_keep_slots_it_does_not_use() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let net = common::testnet_with(7, 2, None, |c| c.slot_idle_secs = 3).await;
    let c = candidates(&net);
    let s = stranger(&net, "203.0.113.9").await;

    // Fresh owner keys claim every slot of every volunteer and run a job
    // message on each. One ring stays open: that slot is in use.
    let started = Instant::now();
    let mut kept = None;
    for i in 0..c.len() {
        for k in 0..2 {
            let (r, id) = claim_and_use(&s, &c[i], &c[(i + 1) % 7], &c[(i + 2) % 7])
                .await
                .expect("a claim with its work is served");
            if i == 0 && k == 0 {
                kept = Some((r, id));
            } else {
                r.teardown().await;
            }
        }
    }
    let claiming = started.elapsed();
    for n in &net.nodes {
        assert_eq!(n.state.slots.list_slots().expect("list").len(), 2);
        assert_eq!(n.state.free_slots(), 0, "claims in use are kept");
    }

    // A claim without its proof of work is refused.
    let keys = (rand::random(), rand::random());
    let unworked = claim(
        &c[1],
        &Identity::generate(),
        stage("mlp:784-16-10"),
        8,
        rand::random(),
        keys,
        true,
    );
    match ring(
        &s,
        vec![mix(&c[2]), unworked, mix(&c[3])],
        keys,
        Duration::from_secs(10),
    )
    .await
    {
        Err(RingError::HopReported {
            code: ErrorCode::SlotRefused,
            detail,
            ..
        }) => assert!(detail.contains("proof of work"), "{detail}"),
        other => panic!("a claim without work: {:?}", other.err()),
    }

    // Once the stranger stops using them, the volunteers offer its slots
    // again (all but the one its open ring uses), and an honest job gets
    // its slots in their place.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (vols, _) = mixnn_node::discovery::discover_at_least(
            net.client.network(),
            7,
            Duration::from_secs(10),
        )
        .await;
        let offered: u32 = vols.iter().map(|v| v.descriptor.free_slots).sum();
        if offered >= 13 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stranger's unused slots were not offered again ({offered})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = honest_job(&net, &config("mlp:784-32-10", 256), "honest.json").await;
    let evicted: u64 = net
        .nodes
        .iter()
        .map(|n| metric(n, "mixnn_slots_freed_total{reason=\"evicted\"}"))
        .sum();
    assert!(
        evicted >= 2,
        "the honest model's two slots took unused ones"
    );
    let (ring_kept, id) = kept.expect("kept");
    assert!(
        net.nodes[0]
            .state
            .slots
            .get_meta(&id)
            .expect("meta")
            .is_some(),
        "a slot in use is never taken"
    );
    ring_kept.teardown().await;
    println!(
        "slot exhaustion: 14 claims with work in {claiming:.1?}; the honest job took {took:.1?} \
         after the stranger's slots went idle (evicted {evicted})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setups_that_never_send_a_cell_do_not_lock_out_an_honest_client() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    // Five volunteers: every ring of a two-stage model uses every one.
    let net = common::testnet_with(5, 2, None, |c| c.first_cell_secs = 4).await;
    let c = candidates(&net);
    let victim = &net.nodes[0];
    let cfg = config("mlp:784-32-10", 256);

    // 5 throwaway identities from one /24, 64 valid setups each through
    // the victim, none of which ever sends a cell.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(stranger(&net, &format!("203.0.113.{}", 10 + i)).await);
    }
    // Every setup below is admitted after this; while less than the
    // first-cell time (4 s) has passed, none of them is overdue.
    let first_setup = Instant::now();
    let opened = futures::future::join_all(ids.iter().flat_map(|s| {
        let v = c[0].clone();
        (0..64).map(move |_| {
            let k = rand::random();
            let s = s.clone();
            let v = v.clone();
            async move { ring(&s, vec![mix(&v)], (k, k), Duration::from_secs(5)).await }
        })
    }))
    .await;
    let (held, refused): (Vec<_>, Vec<_>) = opened.into_iter().partition(|r| r.is_ok());
    let held: Vec<Ring> = held.into_iter().filter_map(Result::ok).collect();
    println!(
        "circuit starvation: one /24 with 5 identities x 64 setups: {} held, {} refused",
        held.len(),
        refused.len()
    );
    assert_eq!(held.len(), 16, "a sixteenth of the victim's circuits");
    assert_eq!(metric(victim, "mixnn_circuit_setups"), 16);

    // The honest job goes through the victim meanwhile.
    let took = honest_job(&net, &cfg, "a.json").await;
    println!("circuit starvation: honest job beside one /24's setups: {took:.1?}");

    // Three more /24s fill every place for setups; a fifth gets none
    // while they are fresh.
    let mut extra = Vec::new();
    for i in 0..4 {
        let s = stranger(&net, &format!("198.51.{i}.7")).await;
        // Places the groups before this one left: a setup of theirs that
        // failed on its way to the victim (a loaded machine) leaves one.
        let taken = metric(victim, "mixnn_circuit_setups");
        let v = c[0].clone();
        let more = futures::future::join_all((0..20).map(|_| {
            let k = rand::random();
            let s = s.clone();
            let v = v.clone();
            async move { ring(&s, vec![mix(&v)], (k, k), Duration::from_secs(5)).await }
        }))
        .await;
        let ok = more.iter().filter(|r| r.is_ok()).count();
        // Each group gets its 16 places and no more; on a loaded machine
        // a client may give up on one of its own setups (5 s) that the
        // victim admitted, which the victim's count below still holds.
        if i < 3 {
            assert!((12..=16).contains(&ok), "group {i}: {ok} setups");
        } else if first_setup.elapsed() < Duration::from_secs(4) {
            let left = 64u64.saturating_sub(taken);
            assert!(
                ok as u64 <= left,
                "group {i}: {ok} setups where the others left {left} of 64 places"
            );
        } else {
            // A machine this slow let the first setups become overdue, and
            // an overdue setup rightly gives way; the preemption is checked
            // below either way.
            println!("circuit starvation: the setups aged past 4 s before the fifth group ({ok} admitted)");
        }
        ids.push(s);
        extra.extend(more.into_iter().filter_map(Result::ok));
    }
    assert_eq!(
        metric(victim, "mixnn_circuit_setups"),
        64,
        "setups are full"
    );
    // Once they are overdue (4 s here), the honest rings take their places.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let took = honest_job(&net, &cfg, "b.json").await;
    let preempted = metric(victim, "mixnn_circuits_preempted_total");
    println!(
        "circuit starvation: honest job with every setup place taken: {took:.1?} ({preempted} overdue setups gave way)"
    );
    assert!(preempted >= 1);
    assert!(metric(victim, "mixnn_circuit_setups") <= 64);
    drop(held);
    drop(extra);
}

/// One identity's hostile load on one volunteer: rings that trickle a
/// cell every 2 s, setups that never send one, and raw streams that never
/// send a setup (`slow`, `setups` and `raw` of each, as many as the node
/// takes).
struct Load {
    slow: Vec<tokio::task::JoinHandle<()>>,
    setups: Vec<Ring>,
    raw: Vec<libp2p::Stream>,
}

async fn hostile_load(
    s: &Arc<Client>,
    v: &Candidate,
    (slow, setups, raw): (usize, usize, usize),
    stop: &CancellationToken,
) -> Load {
    let open = |n: usize| {
        futures::future::join_all((0..n).map(|_| {
            let k = rand::random();
            let s = s.clone();
            let v = v.clone();
            async move { ring(&s, vec![mix(&v)], (k, k), Duration::from_secs(5)).await }
        }))
    };
    let mut tasks = Vec::new();
    for r in open(slow).await.into_iter().filter_map(Result::ok) {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = r;
            let mut step = 0;
            while !stop.is_cancelled() {
                if r.send(&JobMsg::Ack { step }).await.is_err()
                    || r.recv(Duration::from_secs(10)).await.is_err()
                {
                    return;
                }
                step += 1;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }));
    }
    if slow > 0 {
        // Let the trickling rings' first cells arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let held: Vec<Ring> = open(setups)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let mut streams = Vec::new();
    let mut control = s.network().stream_control();
    for _ in 0..raw {
        if let Ok(Ok(st)) = tokio::time::timeout(
            Duration::from_secs(2),
            control.open_stream(v.peer, CIRCUIT_PROTOCOL),
        )
        .await
        {
            streams.push(st);
        }
    }
    Load {
        slow: tasks,
        setups: held,
        raw: streams,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_at_its_limits_leaves_honest_jobs_served_within_the_budget() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let budget: u64 = 256 << 20;
    let net = common::testnet_with(5, 2, None, |c| {
        c.max_memory_bytes = budget;
        c.slot_idle_secs = 2;
    })
    .await;
    let c = candidates(&net);
    let cfg = config("mlp:784-32-10", 2048);

    let alone = honest_job(&net, &cfg, "alone.json").await;

    // The stranger: 5 identities from one /24.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(stranger(&net, &format!("203.0.113.{}", 20 + i)).await);
    }
    reset_peak();
    let base_rss = rss();
    // Every slot left (the first job holds two), each used once.
    let mut claimed = 0;
    for i in 0..c.len() {
        for _ in 0..2 {
            let s = &ids[claimed % ids.len()];
            if let Ok((r, _)) = claim_and_use(s, &c[i], &c[(i + 1) % 5], &c[(i + 2) % 5]).await {
                r.teardown().await;
                claimed += 1;
            }
        }
    }
    // A slot that would not fit any volunteer's memory.
    let owner = Identity::generate();
    let keys = (rand::random(), rand::random());
    let big = claim(
        &c[0],
        &owner,
        stage("mlp:784-16384-10"),
        16_384,
        rand::random(),
        keys,
        false,
    );
    let r = ring(
        &ids[0],
        vec![mix(&c[1]), big, mix(&c[2])],
        keys,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        matches!(&r, Err(RingError::HopReported { code: ErrorCode::SlotRefused, detail, .. }) if detail.contains("memory")),
        "{:?}",
        r.err()
    );
    // On every volunteer, from every identity: as many setups, slow rings
    // and raw streams as the group may hold.
    let stop = CancellationToken::new();
    // Trickling rings first (they stop being setups at their first cell),
    // then setups, then raw streams: 64 circuits a volunteer in all.
    let mut loads = Vec::new();
    for v in &c {
        for phase in [(10, 0, 0), (0, 4, 0), (0, 0, 4)] {
            for s in &ids {
                loads.push(hostile_load(s, v, phase, &stop).await);
            }
        }
    }
    let setups: usize = loads.iter().map(|l| l.setups.len()).sum();
    let slow: usize = loads.iter().map(|l| l.slow.len()).sum();
    let raw: usize = loads.iter().map(|l| l.raw.len()).sum();
    let active: Vec<u64> = net
        .nodes
        .iter()
        .map(|n| metric(n, "mixnn_circuits_active"))
        .collect();
    println!("hostile peer: circuits open on each volunteer: {active:?}");
    assert!(active.iter().all(|&n| n <= 64), "the group's quarter");

    // Meanwhile an honest job: it waits for no one.
    let hostile = honest_job(&net, &cfg, "beside.json").await;
    let peak = peak_rss().saturating_sub(base_rss);
    let reserved_peak = net
        .nodes
        .iter()
        .map(|n| metric(n, "mixnn_memory_reserved_peak_bytes"))
        .max()
        .unwrap_or(0);
    stop.cancel();
    println!(
        "hostile peer at its limits: {claimed} slots claimed, {setups} setups, {slow} slow rings, \
         {raw} raw streams opened on 5 volunteers; honest job {alone:.1?} alone, {hostile:.1?} beside it; \
         process RSS peak +{:.0} MiB over the attack; largest reservation on one volunteer {:.1} MiB \
         of its {:.0} MiB budget",
        mib(peak),
        mib(reserved_peak),
        mib(budget)
    );
    assert!(reserved_peak <= budget);
    assert!(
        peak < budget,
        "the whole process (5 volunteers, the client and the stranger) grew by {:.0} MiB",
        mib(peak)
    );
    for l in loads {
        for t in l.slow {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        drop(l.setups);
        drop(l.raw);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_never_makes_a_node_allocate_past_its_budget() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let budget: u64 = 512 << 20;
    let net = common::testnet_with(3, 2, None, |c| c.max_memory_bytes = budget).await;
    let c = candidates(&net);
    let s = stranger(&net, "203.0.113.30").await;
    let wide = stage("mlp:784-16384-10");
    let measured = reset_peak();
    let base = rss();

    // The stranger's own 784 -> 16384 slot at 16384 rows a batch: its
    // activations alone would take gigabytes. Refused before anything is
    // allocated; the node says what it needs and what it has.
    let keys = (rand::random(), rand::random());
    let hop = claim(
        &c[0],
        &Identity::generate(),
        wide.clone(),
        16_384,
        rand::random(),
        keys,
        false,
    );
    let r = ring(
        &s,
        vec![mix(&c[1]), hop, mix(&c[2])],
        keys,
        Duration::from_secs(30),
    )
    .await;
    match r {
        Err(RingError::HopReported {
            code: ErrorCode::SlotRefused,
            detail,
            ..
        }) => {
            assert!(detail.contains("does not fit in memory"), "{detail}");
            println!("memory amplification: the 16384-row slot: {detail}");
        }
        Err(e) => panic!("{e}"),
        Ok(mut r) => {
            // What the node did before it had a budget: one sparse all-zero
            // message (a bitmap of 1.6 MB) decoded, computed and encoded.
            let _ = r.send(&forward(0, 16_384, 784, 0.0)).await;
            let _ = r.recv(Duration::from_secs(60)).await;
            panic!(
                "the slot was admitted; the message took the process from {:.0} MiB to a {:.0} MiB peak",
                mib(base),
                mib(peak_rss())
            );
        }
    }
    let refused_peak = peak_rss().saturating_sub(base);

    // At 16 rows it fits. Messages beyond the slot's shapes are refused
    // from their header: a sparse all-zero batch of 1024 rows (100 KB on
    // the wire, 3 MB decoded), a tensor of the output's width in place of
    // the input; one longer than any the slot takes, from its size.
    let owner = Identity::generate();
    let id: [u8; 16] = rand::random();
    let mut refusals = Vec::new();
    for (k, msg) in [
        forward(0, 1024, 784, 0.0),
        forward(0, 16, 16_384, 0.0),
        forward(0, 16, 784, 0.0),
        // 3 MB dense: fifty cells, refused at the first, while the client
        // is still sending; its send says why, not just that the stream
        // shut.
        forward(1, 1024, 784, 1.5),
    ]
    .into_iter()
    .enumerate()
    {
        // The last circuit's copy of the slot is gone once its memory is
        // back in the budget.
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&net.nodes[0], "mixnn_memory_reserved_bytes") > 64 << 20 {
            assert!(
                Instant::now() < deadline,
                "the slot's memory never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let keys = (rand::random(), rand::random());
        let stage = (k == 0).then(|| wide.clone());
        let hop = host_hop(&c[0], &owner, stage, 16, id, keys, false);
        let mut r = ring(
            &s,
            vec![mix(&c[1]), hop, mix(&c[2])],
            keys,
            Duration::from_secs(30),
        )
        .await
        .expect("the 16-row slot fits");
        // The host refuses a message from its first cell's header and
        // closes the circuit, so the rest of a message of several cells
        // may find the stream shut: the refusal then comes back from the
        // send, or else from the reply.
        let reply = match r.send(&msg).await {
            Ok(()) => r.recv(Duration::from_secs(30)).await,
            Err(e) => Err(e),
        };
        match (k, reply) {
            (
                0 | 1,
                Err(RingError::HopReported {
                    code: ErrorCode::BadMessage,
                    detail,
                    ..
                }),
            ) => {
                assert!(
                    detail.contains("where 1..=16 rows of 784 values were expected"),
                    "{detail}"
                );
                refusals.push(detail);
            }
            (2, Ok(JobMsg::Forward { tensor, .. })) => assert_eq!(tensor.shape, vec![16, 16_384]),
            (
                3,
                Err(RingError::HopReported {
                    code: ErrorCode::BadMessage,
                    detail,
                    ..
                }),
            ) => {
                assert!(detail.contains("exceeds the limit"), "{detail}");
                refusals.push(detail);
            }
            (_, other) => panic!("message {k}: {other:?}"),
        }
    }
    let peak = peak_rss().saturating_sub(base);
    let reserved = metric(&net.nodes[0], "mixnn_memory_reserved_peak_bytes");
    println!(
        "memory amplification: {refusals:?}; process RSS peak +{:.0} MiB while refusing the 16384-row slot, \
         +{:.0} MiB with the 16-row slot created and used (peak measured: {measured}); \
         the host reserved at most {:.0} MiB of its {:.0} MiB budget",
        mib(refused_peak),
        mib(peak),
        mib(reserved),
        mib(budget)
    );
    assert!(reserved <= budget);
    if measured {
        assert!(
            refused_peak < 64 << 20,
            "refusing took {:.0} MiB",
            mib(refused_peak)
        );
        assert!(peak < budget, "{:.0} MiB", mib(peak));
    }
}
