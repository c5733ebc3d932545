//! The bootstrap and volunteer nodes as separate processes on loopback.

#[path = "../../node/tests/common/procs.rs"]
mod procs;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use procs::{spawn_first_line, Proc};

fn bootstrap_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mixnn-bootstrap"))
}

/// `mixnn` is built beside `mixnn-bootstrap` by `cargo test --workspace`.
fn mixnn_bin() -> PathBuf {
    let p = bootstrap_bin().with_file_name("mixnn");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build -p mixnn-node first)",
        p.display()
    );
    p
}

fn start_node(boot: &str, dir: &Path, mix: bool) -> (Proc, String) {
    let mut cmd = Command::new(mixnn_bin());
    cmd.args([
        "node",
        "--bootstrap",
        boot,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--slots",
        "2",
    ])
    .arg("--data-dir")
    .arg(dir)
    .env("MIXNN_REPUBLISH_SECS", "2");
    if mix {
        cmd.arg("--mix");
    }
    spawn_first_line(&mut cmd)
}

fn peer_of(addr: &str) -> String {
    addr.rsplit("/p2p/").next().expect("peer id").to_string()
}

fn peers_json(boot: &str, min: usize) -> serde_json::Value {
    let out = Command::new(mixnn_bin())
        .args([
            "peers",
            "--bootstrap",
            boot,
            "--json",
            "--timeout",
            "20",
            "--min",
            &min.to_string(),
        ])
        .output()
        .expect("mixnn peers runs");
    assert!(
        out.status.success(),
        "mixnn peers failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().expect("json line");
    serde_json::from_str(last).expect("valid json")
}

#[test]
fn bootstrap_and_two_nodes_are_listed_by_peers_and_a_restart_keeps_identity_and_slots() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_boot, boot_addr) = spawn_first_line(
        Command::new(bootstrap_bin())
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
            .arg(tmp.path().join("boot")),
    );
    assert!(boot_addr.contains("/p2p/"), "bootstrap printed {boot_addr}");

    let (mut a, a_addr) = start_node(&boot_addr, &tmp.path().join("a"), true);
    let (_b, b_addr) = start_node(&boot_addr, &tmp.path().join("b"), false);

    let listed = peers_json(&boot_addr, 2);
    let vols = listed["volunteers"].as_array().expect("volunteers");
    let find = |peer: &str| vols.iter().find(|v| v["peer_id"] == peer).cloned();
    let va = find(&peer_of(&a_addr)).expect("node a listed");
    let vb = find(&peer_of(&b_addr)).expect("node b listed");
    assert_eq!(va["roles"], serde_json::json!(["layer-host", "mix"]));
    assert_eq!(vb["roles"], serde_json::json!(["layer-host"]));
    assert_eq!(va["free_slots"], 2);

    // SIGTERM, then restart on the same data dir: same peer id.
    let status = Command::new("kill")
        .args(["-TERM", &a.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = a.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "node exited with {exit} on SIGTERM");
    let (_a2, a2_addr) = start_node(&boot_addr, &tmp.path().join("a"), true);
    assert_eq!(peer_of(&a2_addr), peer_of(&a_addr));

    // A second node on a held data dir is refused with a clear message.
    let out = Command::new(mixnn_bin())
        .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(tmp.path().join("a"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another running node"), "{err}");
}

/// The last line of a command's stdout as JSON.
fn last_json(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON line ({e}): {text}"))
}

#[test]
fn a_layer_host_killed_mid_job_is_replaced_and_the_job_ends_with_the_local_digest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_boot, boot_addr) = spawn_first_line(
        Command::new(bootstrap_bin())
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
            .arg(tmp.path().join("boot")),
    );
    // 3 stages and one mix per segment need 7 peers; 9 leave room for a
    // replacement after a host dies.
    let mut nodes: Vec<(Proc, String)> = (0..9)
        .map(|i| start_node(&boot_addr, &tmp.path().join(format!("n{i}")), true))
        .collect();
    peers_json(&boot_addr, 9);

    let flags = [
        "--arch",
        "mlp:784-64-32-10",
        "--data",
        "synthetic",
        "--epochs",
        "6",
        "--batch",
        "64",
        "--seed",
        "7",
        "--json",
    ];
    let map = tmp.path().join("m.json");
    let mut job = Command::new(mixnn_bin())
        .args([
            "train",
            "--bootstrap",
            &boot_addr,
            "--checkpoint-every",
            "8",
        ])
        .arg("--model-map")
        .arg(&map)
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("train runs");
    // Drain both pipes on threads so the job never blocks on a full one.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(job.stdout.take().map(|s| Box::new(s) as _));
    let stderr = drain(job.stderr.take().map(|s| Box::new(s) as _));
    let job = Proc(job);

    // Once the job has written a checkpoint past step 0, SIGKILL the host
    // of its middle stage.
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        assert!(Instant::now() < deadline, "the job wrote no checkpoint");
        if let Ok(text) = std::fs::read_to_string(&map) {
            if let Ok(m) = serde_json::from_str::<serde_json::Value>(&text) {
                let step = m["job"]["checkpoint_step"].as_u64().unwrap_or(0);
                let host = m["stages"][1]["host"].as_str().map(str::to_string);
                if let (true, Some(h)) = (step >= 8, host) {
                    break h;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let i = nodes
        .iter()
        .position(|(_, addr)| peer_of(addr) == victim)
        .expect("the victim is one of our nodes");
    let (mut p, _) = nodes.remove(i);
    p.0.kill().expect("SIGKILL");
    let _ = p.0.wait();

    let out = {
        let mut job = job;
        let deadline = Instant::now() + Duration::from_secs(240);
        let status = loop {
            if let Some(s) = job.0.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "the job did not finish");
            std::thread::sleep(Duration::from_millis(100));
        };
        let stdout = stdout.join().expect("stdout");
        let stderr = stderr.join().expect("stderr");
        assert!(
            status.success(),
            "the job failed: {}",
            String::from_utf8_lossy(&stderr)
        );
        stdout
    };
    let network = last_json(&out);
    assert!(
        network["failovers"].as_u64().unwrap_or(0) >= 1,
        "no failover: {network}"
    );
    let local = Command::new(mixnn_bin())
        .args(["train", "--local"])
        .args(flags)
        .output()
        .expect("local training runs");
    assert!(local.status.success());
    let local = last_json(&local.stdout);
    assert_eq!(network["params_digest"], local["params_digest"]);
    // Both print the same loss per epoch (and the last as final_loss).
    assert_eq!(
        network["epoch_losses"].as_array().map(Vec::len),
        Some(6),
        "{network}"
    );
    assert_eq!(network["epoch_losses"], local["epoch_losses"]);
    assert_eq!(network["final_loss"], local["final_loss"]);
    assert_eq!(network["final_loss"], network["epoch_losses"][5]);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&map).expect("map")).expect("json");
    assert_ne!(m["stages"][1]["host"].as_str(), Some(victim.as_str()));
    assert_eq!(m["complete"], true);
    // The map says what the model was trained on, for `infer`.
    assert_eq!(m["trained_on"]["source"], "synthetic");
    assert_eq!(m["trained_on"]["features"], 784);
    assert_eq!(m["trained_on"]["classes"], 10);
}
