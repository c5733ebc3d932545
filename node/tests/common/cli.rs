//! Driving the `mixnn` binary from tests, as a user would: nodes as child
//! processes on loopback, commands run to completion, their `--json` line.
//! A test file includes it beside `procs.rs`:
//! `#[path = "common/procs.rs"] mod procs;` and `#[path = "common/cli.rs"] mod cli;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::procs::{spawn_first_line, Proc};

pub fn mixnn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mixnn"))
}

pub fn mnist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist")
}

/// `testnet/check_safetensors.py`: reads an exported model with numpy only.
pub fn check_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testnet/check_safetensors.py")
}

/// `mixnn export` of the model map `map` to `file`, then the test
/// accuracy `check_safetensors.py` (numpy only, no code of ours) gives it
/// on MNIST.
pub fn export_and_score(map: &Path, file: &Path) -> f64 {
    ok(
        mixnn()
            .args(["export", "--model-map"])
            .arg(map)
            .arg("--out")
            .arg(file)
            .output()
            .expect("export runs"),
        "mixnn export",
    );
    let checked = last_json(&ok(
        Command::new(python())
            .arg(check_script())
            .arg(file)
            .arg(mnist_dir())
            .output()
            .expect("python runs"),
        "check_safetensors.py",
    ));
    checked["test_accuracy"].as_f64().expect("accuracy")
}

/// The Python 3 with numpy that build.rs found (`cfg(python_numpy)`).
pub fn python() -> &'static str {
    option_env!("MIXNN_TEST_PYTHON").unwrap_or("python3")
}

/// Start `mixnn node` and return it with the address it prints first.
pub fn node(args: &[&str], dir: &Path) -> (Proc, String) {
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

/// A bootstrap and `n` volunteers, each a layer host with `slots` slots
/// and a mix; the processes and the bootstrap's address.
pub fn loopback_net(dir: &Path, n: usize, slots: usize) -> (Vec<Proc>, String) {
    let (boot_proc, boot) = node(&["--no-layers"], &dir.join("boot"));
    let slots = slots.to_string();
    let mut procs = vec![boot_proc];
    for i in 0..n {
        procs.push(
            node(
                &["--bootstrap", &boot, "--slots", &slots, "--mix"],
                &dir.join(format!("v{i}")),
            )
            .0,
        );
    }
    (procs, boot)
}

/// stdout of a command that must have succeeded (else its output, in the panic).
pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The JSON object on the last line of `text`.
pub fn last_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.lines().last().expect("a line")).expect("json")
}

/// Free slots the volunteers advertise, all together (waiting for at
/// least `min` volunteers).
pub fn free_slots(boot: &str, min: usize) -> u64 {
    let out = mixnn()
        .args([
            "peers",
            "--json",
            "--min",
            &min.to_string(),
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

/// Writes test images `0..n` of `data` as 28x28 PNGs `digit<i>.png` in
/// `dir` and returns their paths.
pub fn test_pngs(data: &mixnn_model::Dataset, n: usize, dir: &Path) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let pixels: Vec<u8> = data.test.images[i * 784..(i + 1) * 784]
                .iter()
                .map(|&x| (x * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect();
            let path = dir.join(format!("digit{i}.png"));
            image::GrayImage::from_raw(28, 28, pixels)
                .expect("28x28")
                .save_with_format(&path, image::ImageFormat::Png)
                .expect("png");
            path
        })
        .collect()
}

/// How many lines of `predict --json` output name the label of the
/// `digit<i>.png` they are about.
pub fn correct_predictions(text: &str, data: &mixnn_model::Dataset) -> usize {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .filter(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            let name = v["input"].as_str().expect("input");
            let i: usize = name
                .rsplit("digit")
                .next()
                .and_then(|s| s.strip_suffix(".png"))
                .and_then(|s| s.parse().ok())
                .expect("digitN.png");
            v["class"].as_u64() == Some(u64::from(data.test.labels[i]))
        })
        .count()
}
