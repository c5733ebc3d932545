//! Sets `cfg(mnist)` when the real MNIST files are beside the checkout
//! (`../shared/data/mnist`): tests that need them run then, and are
//! ignored with a reason otherwise.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mnist)");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist");
    println!("cargo::rerun-if-changed={}", dir.display());
    let present = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"]
        .iter()
        .any(|f| dir.join(f).is_file());
    if present {
        println!("cargo::rustc-cfg=mnist");
    }
}
