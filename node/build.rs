//! Sets `cfg(mnist)` when the real MNIST files are beside the checkout
//! (`../shared/data/mnist`): tests that need them run then, and are
//! ignored with a reason otherwise.
//!
//! Sets `cfg(python_numpy)` when a Python 3 with numpy is found
//! (`$MIXNN_PYTHON`, else `python3` on the PATH, else `/usr/bin/python3`),
//! and passes its path to the tests as `MIXNN_TEST_PYTHON`: the
//! independent check of exported models runs then, and is ignored with a
//! reason otherwise.

use std::path::Path;
use std::process::{Command, Stdio};

fn has_numpy(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import numpy"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mnist)");
    println!("cargo::rustc-check-cfg=cfg(python_numpy)");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist");
    println!("cargo::rerun-if-changed={}", dir.display());
    let present = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"]
        .iter()
        .any(|f| dir.join(f).is_file());
    if present {
        println!("cargo::rustc-cfg=mnist");
    }

    println!("cargo::rerun-if-env-changed=MIXNN_PYTHON");
    let mut candidates: Vec<String> = std::env::var("MIXNN_PYTHON").into_iter().collect();
    candidates.extend(["python3".to_string(), "/usr/bin/python3".to_string()]);
    if let Some(python) = candidates.into_iter().find(|p| has_numpy(p)) {
        println!("cargo::rustc-cfg=python_numpy");
        println!("cargo::rustc-env=MIXNN_TEST_PYTHON={python}");
    }
}
