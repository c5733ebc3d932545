//! An independent check of the safetensors files MixNN writes: a model
//! trained with `mixnn train --local --save` is read back by
//! `testnet/check_safetensors.py` (Python and numpy only, no code of ours),
//! which must score the MNIST test set exactly as training reported.

use std::path::PathBuf;
use std::process::Command;

fn mnist_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist")
}

/// The last line of a command's stdout as JSON; the command must succeed.
fn run_json(cmd: &mut Command, what: &str) -> serde_json::Value {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} starts: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{what}: {e}: {last:?}\n{stderr}"))
}

#[test]
#[cfg_attr(
    not(mnist),
    ignore = "needs MNIST in ../shared/data/mnist (see its README)"
)]
#[cfg_attr(
    all(mnist, not(python_numpy)),
    ignore = "needs python3 with numpy (apt-get install python3-numpy, or set MIXNN_PYTHON and rebuild)"
)]
fn an_exported_model_scores_the_same_in_numpy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("model.safetensors");
    let trained = run_json(
        Command::new(env!("CARGO_BIN_EXE_mixnn")).args([
            "train",
            "--local",
            "--arch",
            "mlp:784-128-10",
            "--data",
            mnist_dir().to_str().expect("utf-8 path"),
            "--limit",
            "6000",
            "--save",
            model.to_str().expect("utf-8 path"),
            "--json",
        ]),
        "mixnn train --local --save",
    );
    let accuracy = trained["test_accuracy"].as_f64().expect("test_accuracy");
    // Trained on a tenth of MNIST, the model is far above chance: the
    // comparison below is between two meaningful numbers.
    assert!(accuracy > 0.8, "test accuracy {accuracy}");

    let python = option_env!("MIXNN_TEST_PYTHON").unwrap_or("python3");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testnet/check_safetensors.py");
    let checked = run_json(
        Command::new(python)
            .arg(&script)
            .arg(&model)
            .arg(mnist_dir()),
        "check_safetensors.py",
    );
    assert_eq!(checked["arch"], "mlp:784-128-10");
    assert_eq!(checked["examples"], 10_000);
    let independent = checked["test_accuracy"].as_f64().expect("test_accuracy");
    // One example in 10 000 is 1e-4; train prints an f32.
    assert!(
        (independent - accuracy).abs() <= 1e-4 + 1e-6,
        "numpy scores the exported model {independent}, training reported {accuracy}"
    );

    // The script refuses a file that is not what it should be.
    let broken = tmp.path().join("broken.safetensors");
    let bytes = std::fs::read(&model).expect("read model");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).expect("write");
    let out = Command::new(python)
        .arg(&script)
        .arg(&broken)
        .arg(mnist_dir())
        .output()
        .expect("script starts");
    assert!(!out.status.success(), "a truncated file was accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
