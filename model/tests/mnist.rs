//! The MNIST IDX loader on the real files and on corrupt copies, and a quick
//! training sanity check.

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::mnist_dir;
use mixnn_model::{load_mnist, train_local, Arch, DataError, OptimizerSpec, TrainConfig};

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open"))
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

/// A tempdir with small (100 train / 50 test) raw or gz copies of the real files.
fn small_copy(src: &Path, gz: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in FILES {
        let mut bytes = gunzip(&src.join(format!("{name}.gz")));
        let (n, header, item) = match (name.starts_with("train"), name.contains("images")) {
            (true, true) => (100u32, 16, 784),
            (true, false) => (100, 8, 1),
            (false, true) => (50, 16, 784),
            (false, false) => (50, 8, 1),
        };
        bytes.truncate(header + n as usize * item);
        bytes[4..8].copy_from_slice(&n.to_be_bytes());
        write(dir.path(), name, &bytes, gz);
    }
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8], gz: bool) {
    if gz {
        let f = std::fs::File::create(dir.join(format!("{name}.gz"))).expect("create");
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        enc.write_all(bytes).expect("write");
        enc.finish().expect("finish");
    } else {
        std::fs::write(dir.join(name), bytes).expect("write");
    }
}

fn corrupt(src: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, DataError) {
    let dir = small_copy(src, false);
    let path = dir.path().join(name);
    let mut bytes = std::fs::read(&path).expect("read");
    f(&mut bytes);
    std::fs::write(&path, &bytes).expect("write");
    let err = load_mnist(dir.path()).expect_err("corrupt copy must not load");
    (dir, err)
}

#[test]
#[cfg_attr(
    not(mnist),
    ignore = "needs MNIST in ../shared/data/mnist (see its README)"
)]
fn real_files_load() {
    let dir = mnist_dir();
    let d = load_mnist(&dir).expect("load");
    assert_eq!((d.train.len(), d.test.len()), (60_000, 10_000));
    assert_eq!(d.train.features, 784);
    assert_eq!(d.train.images.len(), 60_000 * 784);
    let mut counts = [0usize; 10];
    for &l in &d.test.labels {
        counts[usize::from(l)] += 1;
    }
    assert_eq!(
        counts,
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert!(d.train.images.iter().all(|x| (0.0..=1.0).contains(x)));
    assert!(d.train.images.contains(&1.0));
}

#[test]
#[cfg_attr(
    not(mnist),
    ignore = "needs MNIST in ../shared/data/mnist (see its README)"
)]
fn raw_and_gz_load_the_same() {
    let src = mnist_dir();
    let raw = load_mnist(small_copy(&src, false).path()).expect("raw");
    let gz = load_mnist(small_copy(&src, true).path()).expect("gz");
    assert_eq!(raw, gz);
    assert_eq!((raw.train.len(), raw.test.len()), (100, 50));
}

#[test]
#[cfg_attr(
    not(mnist),
    ignore = "needs MNIST in ../shared/data/mnist (see its README)"
)]
fn corrupt_files_are_named_errors() {
    let src = mnist_dir();
    let (_d, e) = corrupt(&src, "train-images-idx3-ubyte", |b| {
        b.truncate(b.len() - 10)
    });
    assert!(matches!(e, DataError::BadLength { .. }), "{e}");
    assert!(e.to_string().contains("train-images-idx3-ubyte"), "{e}");

    let (_d, e) = corrupt(&src, "t10k-labels-idx1-ubyte", |b| b[3] = 0x02);
    assert!(matches!(e, DataError::BadMagic { found: 2050, .. }), "{e}");
    assert!(e.to_string().contains("t10k-labels-idx1-ubyte"), "{e}");

    let (_d, e) = corrupt(&src, "train-labels-idx1-ubyte", |b| {
        b.truncate(8 + 99);
        b[4..8].copy_from_slice(&99u32.to_be_bytes());
    });
    assert!(
        matches!(
            e,
            DataError::CountMismatch {
                images: 100,
                labels: 99,
                ..
            }
        ),
        "{e}"
    );

    let (_d, e) = corrupt(&src, "train-labels-idx1-ubyte", |b| b[8 + 5] = 10);
    assert!(
        matches!(
            e,
            DataError::BadLabel {
                index: 5,
                value: 10,
                ..
            }
        ),
        "{e}"
    );

    let (_d, e) = corrupt(&src, "t10k-images-idx3-ubyte", |b| b[11] = 27);
    assert!(matches!(e, DataError::BadDims { rows: 27, .. }), "{e}");

    let (_d, e) = corrupt(&src, "train-images-idx3-ubyte", |b| b.truncate(3));
    assert!(matches!(e, DataError::BadLength { .. }), "{e}");

    let dir = small_copy(&src, false);
    std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).expect("rm");
    let e = load_mnist(dir.path()).expect_err("missing");
    assert!(e.to_string().contains("t10k-labels-idx1-ubyte"), "{e}");

    // A truncated gzip stream.
    let dir = small_copy(&src, true);
    let p = dir.path().join("train-labels-idx1-ubyte.gz");
    let b = std::fs::read(&p).expect("read");
    std::fs::write(&p, &b[..b.len() / 2]).expect("write");
    let e = load_mnist(dir.path()).expect_err("truncated gz");
    assert!(e.to_string().contains("train-labels-idx1-ubyte.gz"), "{e}");
}

#[test]
fn missing_dir_says_where_it_looked() {
    let e = load_mnist(Path::new("/nonexistent/mnist-dir")).expect_err("missing");
    assert!(matches!(e, DataError::MissingDir { .. }));
    assert!(e.to_string().contains("/nonexistent/mnist-dir"), "{e}");
}

fn mnist_run(limit: Option<usize>) -> mixnn_model::TrainReport {
    let dir = mnist_dir();
    let data = load_mnist(&dir).expect("load");
    let cfg = TrainConfig {
        arch: Arch::parse("mlp:784-128-10").expect("arch"),
        epochs: 1,
        batch: 128,
        optimizer: OptimizerSpec::Sgd { lr: 0.05 },
        seed: 7,
        limit,
    };
    let mut steps = 0;
    let report = train_local(&cfg, &data, &mut |info| {
        steps += 1;
        assert_eq!(info.step, steps);
    })
    .expect("train");
    assert_eq!(report.steps, steps);
    assert_eq!(report.losses.len() as u64, steps);
    println!(
        "mlp:784-128-10 limit {limit:?}: test accuracy {:.4}, final loss {:.4}, {} steps, {:.1} s, digest {}",
        report.test_accuracy, report.final_loss, report.steps, report.seconds, report.params_digest_hex
    );
    report
}

#[test]
#[cfg_attr(
    not(mnist),
    ignore = "needs MNIST in ../shared/data/mnist (see its README)"
)]
fn quick_mnist_sanity() {
    let report = mnist_run(Some(10_000));
    // Plain SGD at lr 0.05 over 79 steps: deterministic result 0.7814.
    assert!(
        report.test_accuracy > 0.75,
        "accuracy {}",
        report.test_accuracy
    );
    assert!(report.final_loss < report.losses[0]);
}

/// `cargo test -p mixnn-model --release --test mnist -- --ignored --nocapture`
#[test]
#[ignore = "full 60k MNIST epoch; run by hand"]
fn full_mnist_epoch() {
    let report = mnist_run(None);
    // Plain SGD at lr 0.05, one epoch: deterministic result 0.8994.
    assert!(
        report.test_accuracy >= 0.89,
        "accuracy {}",
        report.test_accuracy
    );
}
