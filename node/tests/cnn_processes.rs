//! LeNet-5 on MNIST as a user runs it, every party a `mixnn` process on
//! loopback: local training reaches the accuracy the recipe promises and
//! gives the same digest twice; a bootstrap and eleven volunteers (five
//! layer hosts, six mixes) train the same job to the local digest; the
//! export is checked by numpy code that shares nothing with ours; the
//! owner's PNGs are classified through the network; the slots are freed.

#![cfg_attr(not(all(mnist, python_numpy)), allow(dead_code, unused_imports))]

#[path = "common/procs.rs"]
mod procs;

#[path = "common/cli.rs"]
mod cli;

use cli::{
    correct_predictions, export_and_score, last_json, loopback_net, mixnn, mnist_dir, ok, test_pngs,
};

/// `mixnn train --arch lenet5` on MNIST with the recipe, plus `extra`.
fn train(extra: &[&str]) -> serde_json::Value {
    let out = mixnn()
        .args([
            "train", "--arch", "lenet5", "--batch", "128", "--lr", "0.05",
        ])
        .args(["--seed", "7", "--json", "--data"])
        .arg(mnist_dir())
        .args(extra)
        .output()
        .expect("train runs");
    last_json(&ok(out, "mixnn train"))
}

#[test]
#[cfg_attr(not(mnist), ignore = "needs ../shared/data/mnist")]
fn lenet5_trains_locally_to_the_recipes_accuracy_with_one_digest() {
    let first = train(&["--local", "--epochs", "3"]);
    let accuracy = first["test_accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.98, "{first}");
    let second = train(&["--local", "--epochs", "3"]);
    assert_eq!(first["params_digest"], second["params_digest"]);
    assert_eq!(first["test_accuracy"], second["test_accuracy"]);
}

#[test]
#[cfg_attr(
    not(all(mnist, python_numpy)),
    ignore = "needs ../shared/data/mnist and a Python 3 with numpy"
)]
fn lenet5_through_eleven_volunteers_equals_local_and_lives_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_procs, boot) = loopback_net(tmp.path(), 11, 1);
    let map = tmp.path().join("lenet.json");
    let job = ["--limit", "10000", "--epochs", "1"];
    let local = train(&[&job[..], &["--local"]].concat());
    let network = train(
        &[
            &job[..],
            &[
                "--bootstrap",
                &boot,
                "--model-map",
                map.to_str().expect("path"),
            ],
        ]
        .concat(),
    );
    assert_eq!(
        network["params_digest"], local["params_digest"],
        "{network}\n{local}"
    );
    assert_eq!(network["test_accuracy"], local["test_accuracy"]);
    assert_eq!(network["arch"], "lenet5");
    // 79 steps of LeNet-5 learn a good deal but not all of it.
    let accuracy = network["test_accuracy"].as_f64().expect("accuracy");
    assert!(accuracy > 0.5, "{network}");

    // Exported in nn.Sequential's layout and scored by numpy alone.
    let file = tmp.path().join("lenet.safetensors");
    let independent = export_and_score(&map, &file);
    assert!(
        (independent - accuracy).abs() < 1e-4,
        "numpy scores {independent}, train reported {accuracy}"
    );

    // The owner's own images, classified through the convolution hosts.
    let data = mixnn_node::dataset::load(mnist_dir().to_str().expect("path")).expect("mnist");
    let inputs = test_pngs(&data, 20, tmp.path());
    let text = ok(
        mixnn()
            .args(["predict", "--json", "--bootstrap", &boot, "--model-map"])
            .arg(&map)
            .arg("--input")
            .args(&inputs)
            .output()
            .expect("predict runs"),
        "mixnn predict",
    );
    let correct = correct_predictions(&text, &data);
    assert!(correct >= 10, "{correct} of 20 named correctly:\n{text}");
    // The same answers, bit for bit, as the exported model gives here.
    let here = ok(
        mixnn()
            .args(["predict", "--json", "--model"])
            .arg(&file)
            .arg("--input")
            .args(&inputs)
            .output()
            .expect("predict runs"),
        "mixnn predict --model",
    );
    let lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with('{'))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(lines(&text), lines(&here));
    assert_eq!(lines(&text).len(), 20);

    let released = last_json(&ok(
        mixnn()
            .args(["release", "--json", "--bootstrap", &boot, "--model-map"])
            .arg(&map)
            .output()
            .expect("release runs"),
        "mixnn release",
    ));
    let stages = released["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 5);
    for s in stages {
        assert_eq!(s["result"], "freed", "{released}");
    }
}
