//! The `mixnn` binary as a user meets it: warnings, refusals, generated
//! files and plain logs, without a network.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use mixnn_node::client::model_map::{ModelMap, TrainingData, FORMAT};
use mixnn_node::config::FileConfig;

fn mixnn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mixnn"))
        .args(args)
        .env_remove("MIXNN_BOOTSTRAP")
        .stdin(Stdio::null())
        .output()
        .expect("mixnn runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const WARNING: &str = "warning: --mixes 0 removes the mixes";

#[test]
fn mixes_zero_is_warned_about_wherever_it_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let map = dir.path().join("none.json");
    let map = map.to_str().expect("utf-8 path");
    for args in [
        vec!["train", "--mixes", "0"],
        vec!["train", "--mixes", "0", "--resume", "--model-map", map],
        vec!["infer", "--mixes", "0", "--model-map", map],
        vec![
            "predict",
            "--mixes",
            "0",
            "--model-map",
            map,
            "--input",
            map,
        ],
        vec!["demo", "--mixes", "0", "--volunteers", "1"],
        vec!["bench", "paper", "--mixes", "0", "--arch", "nonsense"],
        vec!["bench", "churn", "--mixes", "0", "--arch", "nonsense"],
    ] {
        let out = mixnn(&args);
        // None of these can run here (no bootstrap, no map, too few
        // volunteers): each fails, after the warning.
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(WARNING), "{args:?}: {err}");
        assert!(err.contains("neighbours"), "{args:?}: {err}");
    }
    // With mixes, or for local training, no warning.
    for args in [
        vec!["infer", "--model-map", map],
        vec!["demo", "--volunteers", "1"],
    ] {
        let err = stderr(&mixnn(&args));
        assert!(!err.contains(WARNING), "{args:?}: {err}");
    }
    let out = mixnn(&["train", "--local", "--mixes", "0", "--limit", "64"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains(WARNING));
}

#[test]
fn init_config_writes_every_key_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    let p = path.to_str().expect("utf-8 path");
    let out = mixnn(&["node", "--init-config", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&path).expect("written");
    assert!(text.starts_with('#'), "commented: {text}");
    let file = FileConfig::load(&path).expect("the template parses");
    assert_eq!(file.max_lease_secs, Some(30 * 24 * 3600));
    assert_eq!(file.slots, Some(4));
    assert_eq!(file.mix, Some(false));
    // Refused the second time, unless --force.
    std::fs::write(&path, "slots = 1\n").expect("write");
    let out = mixnn(&["node", "--init-config", p]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&path).expect("kept"), "slots = 1\n");
    let out = mixnn(&["node", "--init-config", p, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
    // A node starts from it (and fails here only for want of a data dir).
    let out = mixnn(&["node", "--config", p]);
    assert!(
        stderr(&out).contains("no data directory"),
        "{}",
        stderr(&out)
    );
}

fn write_map(path: &Path, arch: &str, trained_on: Option<TrainingData>) {
    ModelMap {
        format: FORMAT,
        arch: arch.into(),
        optimizer: mixnn_model::OptimizerSpec::Sgd { lr: 0.1 },
        seed: 7,
        batch: 32,
        steps: 10,
        owner_secret: hex::encode([9u8; 32]),
        stages: vec![],
        params_digest: String::new(),
        complete: true,
        job: None,
        trained_on,
    }
    .save(path)
    .expect("map written");
}

#[test]
fn infer_says_what_data_it_scores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let map = dir.path().join("m.json");
    let m = map.to_str().expect("utf-8 path");
    // A map from before the record: no silent guess.
    write_map(&map, "mlp:784-16-10", None);
    let err = stderr(&mixnn(&["infer", "--model-map", m]));
    assert!(
        err.contains("does not record what its model was trained on") && err.contains("--data"),
        "{err}"
    );
    // A model trained on other data (a directory that is gone): without
    // --data the recorded source is used and its absence named.
    let gone = dir.path().join("mnist-that-moved");
    write_map(
        &map,
        "mlp:784-16-10",
        Some(TrainingData {
            source: gone.display().to_string(),
            features: 784,
            classes: 10,
        }),
    );
    let err = stderr(&mixnn(&["infer", "--model-map", m]));
    assert!(
        err.contains("the data the model was trained on") && err.contains("mnist-that-moved"),
        "{err}"
    );
    // With --data synthetic: a warning, then (no bootstrap here) the
    // network error; never an accuracy.
    let out = mixnn(&["infer", "--model-map", m, "--data", "synthetic"]);
    let err = stderr(&out);
    assert!(
        err.contains("warning: --data synthetic is not the data the model was trained on"),
        "{err}"
    );
    assert!(err.contains("--bootstrap"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("accuracy"));
    // Data the model cannot take at all is refused.
    write_map(&map, "mlp:100-16-10", None);
    let out = mixnn(&["infer", "--model-map", m, "--data", "synthetic"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("does not fit this model") && err.contains("784 features"),
        "{err}"
    );
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mixnn"))
        .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(dir.path().join("node"))
        .env("RUST_LOG", "info")
        .env_remove("MIXNN_BOOTSTRAP")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    // The node prints its addresses once it listens; by then it has logged.
    let stdout = child.stdout.take().expect("stdout");
    // One line is sent: a bound of 1 never blocks the reader thread.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    let started = rx.recv_timeout(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(started, Ok(Some(Ok(_)))), "the node did not start");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("read logs");
    assert!(logs.contains("INFO"), "no log lines: {logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI codes in piped logs: {logs:?}"
    );
}

#[test]
fn the_demo_trains_the_arch_it_is_given_and_shows_what_each_hop_saw() {
    let out = mixnn(&[
        "demo",
        "--arch",
        "mlp:784-32-10",
        "--limit",
        "256",
        "--batch",
        "64",
        "--json",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("json");
    // The model asked for, not a replacement.
    assert_eq!(report["arch"], "mlp:784-32-10");
    assert_eq!(report["digest_equal"], true);
    assert_eq!(
        report["local"]["epoch_losses"],
        report["network"]["epoch_losses"]
    );
    // Two stages, one mix per segment: client → mix → L1 → mix → L2 → mix → client.
    let forward = report["route"]["forward"].as_str().expect("route");
    let names: Vec<&str> = forward
        .split(" → ")
        .map(|hop| hop.split(' ').next().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        ["client", "mix", "L1", "mix", "L2", "mix", "client"],
        "{forward}"
    );
    assert!(err.contains(forward), "the route is printed: {err}");
    // Every hop of both rings reported what it saw: mixes never plaintext,
    // layer hosts their own segment.
    let seen = report["seen"].as_array().expect("seen");
    let (mut mixes, mut hosts) = (0, 0);
    for v in seen {
        let circuits = v["circuits"].as_array().expect("circuits");
        assert!(!circuits.is_empty(), "{v}");
        assert!(v["cells"].as_u64().unwrap_or(0) > 0, "{v}");
        assert!(v["bytes"].as_u64().unwrap_or(0) > 0, "{v}");
        if circuits.iter().all(|c| c["role"] == "mix") {
            mixes += 1;
            assert_eq!(v["plaintext"], false, "a mix read plaintext: {v}");
        } else {
            hosts += 1;
            assert_eq!(v["plaintext"], true, "{v}");
            // A layer host is on both rings.
            let rings: Vec<&str> = circuits.iter().filter_map(|c| c["ring"].as_str()).collect();
            assert!(
                rings.contains(&"forward") && rings.contains(&"backward"),
                "{v}"
            );
        }
        for c in circuits {
            assert!(c["ring"] == "forward" || c["ring"] == "backward", "{v}");
            assert_ne!(c["prev"], c["next"], "{v}");
        }
    }
    assert_eq!(hosts, 2, "{seen:?}");
    assert!((3..=6).contains(&mixes), "{seen:?}");
    assert!(err.contains("plaintext"), "the table is printed: {err}");
}

#[test]
fn with_json_a_failure_is_the_last_line_of_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nowhere.json");
    let out = mixnn(&[
        "status",
        "--json",
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWLRPJAA5o6Z6ZEc8GL8zqCqTBETt1VHDvJNBK6QnxFmSW",
        "--model-map",
        missing.to_str().expect("path"),
    ]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a line")).expect("json");
    assert_eq!(last["kind"], "model_map", "{last}");
    assert!(
        last["error"]
            .as_str()
            .expect("error")
            .contains("nowhere.json"),
        "{last}"
    );
    // Without --json, stdout stays empty.
    let out = mixnn(&["infer", "--model-map", missing.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}

/// A `mixnn node` whose bootstrap is a closed port, and its stderr lines.
fn lonely_node(dir: &Path) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let boot = format!(
        "/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWLRPJAA5o6Z6ZEc8GL8zqCqTBETt1VHDvJNBK6QnxFmSW"
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_mixnn"))
        .args([
            "node",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            &boot,
        ])
        .arg("--data-dir")
        .arg(dir)
        .env_remove("GLIBC_TUNABLES")
        .env_remove(mixnn_node::memcopy::MEASURED_VAR)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The first line that contains `what`, within 20 s, and every line before.
fn wait_for_line(
    rx: &std::sync::mpsc::Receiver<String>,
    what: &str,
) -> (Option<String>, Vec<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(what) => return (Some(l), seen),
            Ok(l) => seen.push(l),
            Err(_) => return (None, seen),
        }
    }
}

#[test]
fn a_node_whose_bootstrap_never_answers_says_it_is_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, rx) = lonely_node(dir.path());
    let (found, seen) = wait_for_line(&rx, "alone");
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("no warning; stderr was:\n{}", seen.join("\n")));
    assert!(line.contains("connection refused"), "{line}");
}

#[test]
fn a_node_tunes_glibcs_copies_exactly_where_copies_just_past_their_source_are_slow() {
    // The same C library and CPU as the node's: this process measures
    // what the node will.
    let slowdown = mixnn_node::memcopy::near_copy_slowdown();
    eprintln!("copies just past their source: {slowdown:.1}x slower than elsewhere here");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, rx) = lonely_node(dir.path());
    let (found, seen) = wait_for_line(&rx, "node_started");
    // Started again or not, the node is the process spawned, and it runs.
    let (alone, _) = wait_for_line(&rx, "alone");
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("no copies line; stderr was:\n{}", seen.join("\n")));
    assert!(alone.is_some(), "the node did not run on: {line}");
    assert!(line.contains("copies="), "{line}");
    let tuned = line.contains(mixnn_node::memcopy::TUNABLE);
    let glibc_x86 = cfg!(all(
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    ));
    // Far from the threshold either way (about 20x slow, about 1x healthy).
    if glibc_x86 && slowdown > 2.0 * mixnn_node::memcopy::SLOW_FACTOR {
        assert!(
            tuned,
            "copies just past their source {slowdown:.1}x slower here, yet: {line}"
        );
    }
    if slowdown < mixnn_node::memcopy::SLOW_FACTOR / 2.0 {
        assert!(
            !tuned,
            "copies just past their source {slowdown:.1}x here, yet: {line}"
        );
        assert!(line.contains("as the C library chose"), "{line}");
    }
}

#[test]
fn arguments_that_can_be_checked_here_fail_before_the_network_is_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A bootstrap that is not there: reaching it would fail with another
    // message, so these errors prove nothing was created first.
    let boot = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWLRPJAA5o6Z6ZEc8GL8zqCqTBETt1VHDvJNBK6QnxFmSW";
    let missing = dir.path().join("no/such/dir/m.json");
    let out = mixnn(&[
        "train",
        "--bootstrap",
        boot,
        "--model-map",
        missing.to_str().expect("path"),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("bootstrap peer"), "{}", stderr(&out));

    let out = mixnn(&["train", "--bootstrap", boot, "--step-timeout", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--step-timeout"), "{}", stderr(&out));

    let out = mixnn(&["train", "--bootstrap", boot, "--lease", "0d"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--lease"), "{}", stderr(&out));
}
