//! A model's whole life on loopback, as a user runs it: a bootstrap and 6
//! volunteers as separate `mixnn node` processes; an MLP trained on MNIST
//! through them, exported and checked by an independent reader of the
//! safetensors format, used to classify the owner's own PNG files through
//! the network, and released, which gives the volunteers their slots back.

#![cfg_attr(not(all(mnist, python_numpy)), allow(dead_code, unused_imports))]

#[path = "common/procs.rs"]
mod procs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use procs::{spawn_first_line, Proc};

fn mixnn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mixnn"))
}

fn mnist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist")
}

/// Start `mixnn node` and return it with the address it prints first.
fn node(args: &[&str], dir: &Path) -> (Proc, String) {
    spawn_first_line(
        mixnn()
            .arg("node")
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .env("MIXNN_REPUBLISH_SECS", "2"),
    )
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn last_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.lines().last().expect("a line")).expect("json")
}

/// Free slots the volunteers advertise, all together.
fn free_slots(boot: &str) -> u64 {
    let out = mixnn()
        .args([
            "peers",
            "--json",
            "--min",
            "6",
            "--timeout",
            "20",
            "--bootstrap",
            boot,
        ])
        .output()
        .expect("peers runs");
    let v = last_json(&ok(out, "mixnn peers"));
    v["volunteers"]
        .as_array()
        .expect("volunteers")
        .iter()
        .map(|p| p["free_slots"].as_u64().expect("free_slots"))
        .sum()
}

#[test]
#[cfg_attr(
    not(all(mnist, python_numpy)),
    ignore = "needs ../shared/data/mnist and a Python 3 with numpy"
)]
fn trained_exported_checked_used_and_released_on_loopback() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_boot, boot) = node(&["--no-layers"], &tmp.path().join("boot"));
    let _volunteers: Vec<Proc> = (0..6)
        .map(|i| {
            node(
                &["--bootstrap", &boot, "--slots", "2", "--mix"],
                &tmp.path().join(format!("v{i}")),
            )
            .0
        })
        .collect();
    let before = free_slots(&boot);
    assert_eq!(before, 12);

    let mnist = mnist_dir();
    let map = tmp.path().join("model.json");
    let out = mixnn()
        .args([
            "train",
            "--arch",
            "mlp:784-128-10",
            "--epochs",
            "1",
            "--json",
        ])
        .arg("--data")
        .arg(&mnist)
        .args(["--bootstrap", &boot, "--model-map"])
        .arg(&map)
        .output()
        .expect("train runs");
    let trained = last_json(&ok(out, "mixnn train"));
    let accuracy = trained["test_accuracy"].as_f64().expect("accuracy");
    assert!(accuracy > 0.9, "{trained}");
    assert!(free_slots(&boot) < before, "the model holds slots");

    // Exported, and read by a reader that shares no code with ours.
    let file = tmp.path().join("model.safetensors");
    ok(
        mixnn()
            .args(["export", "--model-map"])
            .arg(&map)
            .arg("--out")
            .arg(&file)
            .output()
            .expect("export runs"),
        "mixnn export",
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testnet/check_safetensors.py");
    let checked = last_json(&ok(
        Command::new(env!("MIXNN_TEST_PYTHON"))
            .arg(&script)
            .arg(&file)
            .arg(&mnist)
            .output()
            .expect("python runs"),
        "check_safetensors.py",
    ));
    let independent = checked["test_accuracy"].as_f64().expect("accuracy");
    assert!(
        (independent - accuracy).abs() < 1e-4,
        "the independent reader scores {independent}, train reported {accuracy}"
    );

    // 20 test images as PNG, classified through the network.
    let data = mixnn_node::dataset::load(mnist.to_str().expect("path")).expect("mnist");
    let mut inputs = Vec::new();
    for i in 0..20 {
        let pixels: Vec<u8> = data.test.images[i * 784..(i + 1) * 784]
            .iter()
            .map(|&x| (x * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        let path = tmp.path().join(format!("digit{i}.png"));
        image::GrayImage::from_raw(28, 28, pixels)
            .expect("28x28")
            .save_with_format(&path, image::ImageFormat::Png)
            .expect("png");
        inputs.push(path);
    }
    let out = mixnn()
        .args(["predict", "--json", "--bootstrap", &boot, "--model-map"])
        .arg(&map)
        .arg("--input")
        .args(&inputs)
        .output()
        .expect("predict runs");
    let text = ok(out, "mixnn predict");
    let mut correct = 0;
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        let name = v["input"].as_str().expect("input");
        let i: usize = name
            .rsplit("digit")
            .next()
            .and_then(|s| s.strip_suffix(".png"))
            .and_then(|s| s.parse().ok())
            .expect("digitN.png");
        if v["class"].as_u64() == Some(u64::from(data.test.labels[i])) {
            correct += 1;
        }
    }
    assert!(correct >= 18, "{correct} of 20 named correctly:\n{text}");

    // Released: every stage freed, and the volunteers advertise their
    // slots again.
    let released = last_json(&ok(
        mixnn()
            .args(["release", "--json", "--bootstrap", &boot, "--model-map"])
            .arg(&map)
            .output()
            .expect("release runs"),
        "mixnn release",
    ));
    for s in released["stages"].as_array().expect("stages") {
        assert_eq!(s["result"], "freed", "{released}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut free = free_slots(&boot);
    while free != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        free = free_slots(&boot);
    }
    assert_eq!(free, before, "free slots after release");
}
