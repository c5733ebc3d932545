//! A model's whole life on loopback, as a user runs it: a bootstrap and 6
//! volunteers as separate `mixnn node` processes; an MLP trained on MNIST
//! through them, exported and checked by an independent reader of the
//! safetensors format, used to classify the owner's own PNG files through
//! the network, and released, which gives the volunteers their slots back.

#![cfg_attr(not(all(mnist, python_numpy)), allow(dead_code, unused_imports))]

#[path = "common/procs.rs"]
mod procs;

#[path = "common/cli.rs"]
mod cli;

use std::time::{Duration, Instant};

use cli::{
    correct_predictions, export_and_score, free_slots, last_json, loopback_net, mixnn, mnist_dir,
    ok, test_pngs,
};

#[test]
#[cfg_attr(
    not(all(mnist, python_numpy)),
    ignore = "needs ../shared/data/mnist and a Python 3 with numpy"
)]
fn trained_exported_checked_used_and_released_on_loopback() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_procs, boot) = loopback_net(tmp.path(), 6, 2);
    let before = free_slots(&boot, 6);
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
    assert!(free_slots(&boot, 6) < before, "the model holds slots");

    // Exported, and read by a reader that shares no code with ours.
    let file = tmp.path().join("model.safetensors");
    let independent = export_and_score(&map, &file);
    assert!(
        (independent - accuracy).abs() < 1e-4,
        "the independent reader scores {independent}, train reported {accuracy}"
    );

    // 20 test images as PNG, classified through the network.
    let data = mixnn_node::dataset::load(mnist.to_str().expect("path")).expect("mnist");
    let inputs = test_pngs(&data, 20, tmp.path());
    let out = mixnn()
        .args(["predict", "--json", "--bootstrap", &boot, "--model-map"])
        .arg(&map)
        .arg("--input")
        .args(&inputs)
        .output()
        .expect("predict runs");
    let text = ok(out, "mixnn predict");
    let correct = correct_predictions(&text, &data);
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
    let mut free = free_slots(&boot, 6);
    while free != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        free = free_slots(&boot, 6);
    }
    assert_eq!(free, before, "free slots after release");
}
