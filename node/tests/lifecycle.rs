//! A model's life: trained, exported as safetensors, imported to train on,
//! and used to predict on the owner's own files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use mixnn_model::{
    to_hex, train_local_model, Arch, Dataset, HostTensor, LocalModel, ModelParams, OptimizerSpec,
    TrainConfig,
};
use mixnn_node::client::checkpoint::{self, Checkpoint};
use mixnn_node::client::{train_network, train_network_from, JobOptions, ModelMap};
use mixnn_node::input::{self, npy_bytes};
use mixnn_node::predict::{classes, predict_local};

fn config(arch: &str, limit: usize) -> TrainConfig {
    TrainConfig {
        arch: Arch::parse(arch).expect("arch"),
        epochs: 1,
        batch: 64,
        optimizer: OptimizerSpec::Momentum {
            lr: 0.05,
            momentum: 0.9,
        },
        seed: 7,
        limit: Some(limit),
    }
}

fn synthetic() -> Dataset {
    mixnn_node::dataset::load("synthetic").expect("data")
}

fn mixnn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mixnn"))
}

/// `n` examples of `split` quantized to bytes, as a PNG or IDX file holds them.
fn quantized(images: &[f32]) -> Vec<u8> {
    images
        .iter()
        .map(|&x| (x * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect()
}

fn write_png(path: &Path, pixels: &[u8]) {
    let img = image::GrayImage::from_raw(28, 28, pixels.to_vec()).expect("28x28");
    img.save_with_format(path, image::ImageFormat::Png)
        .expect("png");
}

fn write_idx(path: &Path, pixels: &[u8]) {
    let n = (pixels.len() / 784) as u32;
    let mut bytes = vec![0, 0, 8, 3];
    for v in [n, 28, 28] {
        bytes.extend_from_slice(&v.to_be_bytes());
    }
    bytes.extend_from_slice(pixels);
    std::fs::write(path, bytes).expect("idx");
}

#[test]
fn save_load_and_init_keep_the_parameters() {
    let data = synthetic();
    let cfg = config("mlp:784-64-32-10", 640);
    let (report, model) = train_local_model(&cfg, &data, None, &mut |_| {}).expect("train");
    assert_eq!(to_hex(&model.params_digest()), report.params_digest_hex);

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.safetensors");
    ModelParams::from_model(&model).save(&path).expect("save");
    let back = ModelParams::load(&path, Some(&cfg.arch)).expect("load");
    assert_eq!(to_hex(&back.digest()), report.params_digest_hex);
    assert_eq!(back, ModelParams::from_model(&model));

    // --init then zero steps: the same model.
    let states = back.slot_states(cfg.optimizer).expect("states");
    let start = LocalModel::from_states(&cfg.arch, &states).expect("model");
    assert_eq!(to_hex(&start.params_digest()), report.params_digest_hex);
    assert_eq!(start.steps(), 0);

    // Training on from the file is training on from the model.
    let (a, _) = train_local_model(&cfg, &data, Some(&states), &mut |_| {}).expect("train on");
    let (b, _) = train_local_model(&cfg, &data, Some(&states), &mut |_| {}).expect("train on");
    assert_eq!(a.params_digest_hex, b.params_digest_hex);
    assert_ne!(a.params_digest_hex, report.params_digest_hex);
    // A state of another optimizer, or already trained, is refused.
    let sgd = back.slot_states(OptimizerSpec::Sgd { lr: 0.1 }).expect("s");
    assert!(train_local_model(&cfg, &data, Some(&sgd), &mut |_| {}).is_err());
    assert!(train_local_model(&cfg, &data, Some(&model.stage_states()), &mut |_| {}).is_err());
}

#[test]
fn predict_on_png_npy_and_idx_matches_the_model() {
    let data = synthetic();
    let cfg = config("mlp:784-64-10", 1024);
    let (_, model) = train_local_model(&cfg, &data, None, &mut |_| {}).expect("train");
    let n = 12;
    let pixels = quantized(&data.test.images[..n * 784]);
    let features: Vec<f32> = pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    let expected = classes(
        &model
            .infer(&HostTensor {
                shape: vec![n, 784],
                data: features.clone(),
            })
            .expect("infer"),
    );
    assert!(
        expected
            .iter()
            .zip(&data.test.labels)
            .filter(|(a, b)| **a == usize::from(**b))
            .count()
            >= n / 2,
        "the model learned something"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let pngs: Vec<PathBuf> = (0..n)
        .map(|i| {
            let p = dir.path().join(format!("{i}.png"));
            write_png(&p, &pixels[i * 784..(i + 1) * 784]);
            p
        })
        .collect();
    let npy = dir.path().join("x.npy");
    std::fs::write(&npy, npy_bytes(&[n, 28, 28], &features)).expect("npy");
    let idx = dir.path().join("x-images-idx3-ubyte");
    write_idx(&idx, &pixels);

    for paths in [pngs.clone(), vec![npy.clone()], vec![idx.clone()]] {
        let inputs = input::load(&paths, 784).expect("inputs");
        assert_eq!(inputs.data, features, "{paths:?}");
        let got: Vec<usize> = predict_local(&model, &inputs)
            .expect("predict")
            .iter()
            .map(|p| p.class)
            .collect();
        assert_eq!(got, expected, "{paths:?}");
    }
    let inputs = input::load(&[npy.clone(), pngs[0].clone()], 784).expect("inputs");
    assert_eq!(inputs.names[0], format!("{}#0", npy.display()));
    assert_eq!(inputs.names[n], pngs[0].display().to_string());

    // The command line: predict --json on the PNGs.
    let model_path = dir.path().join("m.safetensors");
    ModelParams::from_model(&model)
        .save(&model_path)
        .expect("save");
    let out = mixnn()
        .arg("predict")
        .arg("--model")
        .arg(&model_path)
        .arg("--json")
        .arg("--input")
        .args(&pngs)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), n);
    for (i, (line, class)) in lines.iter().zip(&expected).enumerate() {
        assert_eq!(line["input"], pngs[i].display().to_string());
        assert_eq!(line["class"], *class);
        let probs = line["probabilities"].as_array().expect("array");
        assert_eq!(probs.len(), 10);
        let sum: f64 = probs.iter().map(|p| p.as_f64().expect("f64")).sum();
        assert!((sum - 1.0).abs() < 1e-4);
    }
}

#[test]
fn bad_files_give_clear_errors() {
    let data = synthetic();
    let cfg = config("mlp:784-16-10", 128);
    let (_, model) = train_local_model(&cfg, &data, None, &mut |_| {}).expect("train");
    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("a.png");
    write_png(&png, &quantized(&data.test.images[..784]));
    let bytes = std::fs::read(&png).expect("png");
    let cut = dir.path().join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let msg = input::load(std::slice::from_ref(&cut), 784)
        .expect_err("cut")
        .to_string();
    assert!(msg.contains("cut.png: image:"), "{msg}");

    let f8 = dir.path().join("f8.npy");
    let mut bytes = npy_bytes(&[1, 784], &[0.0; 784]);
    let at = bytes.windows(3).position(|w| w == b"<f4").expect("descr");
    bytes[at + 2] = b'8';
    std::fs::write(&f8, bytes).expect("write");
    let msg = input::load(&[f8], 784).expect_err("dtype").to_string();
    assert!(msg.contains("'<f4'"), "{msg}");
    let wide = dir.path().join("wide.npy");
    std::fs::write(&wide, npy_bytes(&[2, 10], &[0.0; 20])).expect("write");
    let msg = input::load(&[wide], 784).expect_err("shape").to_string();
    assert!(
        msg.contains("10 features per example, the model takes 784"),
        "{msg}"
    );
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "hello").expect("write");
    let msg = input::load(&[other], 784).expect_err("format").to_string();
    assert!(msg.contains("not a PNG or JPEG image"), "{msg}");

    // A safetensors file without one tensor, through the command line.
    let full = ModelParams::from_model(&model).to_bytes();
    let n = u64::from_le_bytes(full[..8].try_into().expect("8")) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&full[8..8 + n]).expect("json");
    header.as_object_mut().expect("obj").remove("2.bias");
    let json = header.to_string();
    let mut broken = (json.len() as u64).to_le_bytes().to_vec();
    broken.extend_from_slice(json.as_bytes());
    broken.extend_from_slice(&full[8 + n..full.len() - 40]);
    let path = dir.path().join("broken.safetensors");
    std::fs::write(&path, broken).expect("write");
    let out = mixnn()
        .args(["predict", "--model"])
        .arg(&path)
        .arg("--input")
        .arg(&png)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tensor 2.bias is missing"), "{err}");
}

/// A network-trained model's export is the same file as the same job
/// trained locally and saved; training on from it through the network
/// equals training on from it locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_a_network_model_equals_the_local_save() {
    let net = common::testnet(7, 2, None).await;
    let client = &*net.client;
    let data = synthetic();
    let cfg = config("mlp:784-64-32-10", 640);
    let train = data.train.clone().limit(640);
    let (local, model) = train_local_model(&cfg, &data, None, &mut |_| {}).expect("local");
    let saved = ModelParams::from_model(&model);

    let dir = tempfile::tempdir().expect("tempdir");
    for keep_ends in [false, true] {
        let map_path = dir.path().join(format!("m{keep_ends}.json"));
        let opts = JobOptions {
            keep_ends,
            ..JobOptions::default()
        };
        let vols = common::fresh_volunteers(&net).await;
        let report = train_network(
            client,
            &vols,
            common::job(&cfg, &train, &data.test, &opts, &map_path),
            &mut |_| {},
        )
        .await
        .expect("network training");
        assert_eq!(report.params_digest, local.params_digest_hex);

        let out = dir.path().join(format!("m{keep_ends}.safetensors"));
        let run = mixnn()
            .arg("export")
            .arg("--model-map")
            .arg(&map_path)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("runs");
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let exported = ModelParams::load(&out, Some(&cfg.arch)).expect("reads");
        assert_eq!(exported, saved, "tensor for tensor (keep_ends {keep_ends})");
        assert_eq!(std::fs::read(&out).expect("file"), saved.to_bytes());
    }

    // An unfinished job is refused unless --partial, and says its step.
    let map_path = dir.path().join("mfalse.json");
    let mut map = ModelMap::load(&map_path).expect("map");
    map.complete = false;
    map.save(&map_path).expect("save");
    let ckpt = Checkpoint::load(&checkpoint::path_for(&map_path)).expect("ckpt");
    let partial = dir.path().join("partial.safetensors");
    let run = mixnn()
        .arg("export")
        .arg("--model-map")
        .arg(&map_path)
        .arg("--out")
        .arg(&partial)
        .output()
        .expect("runs");
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("not complete") && err.contains(&format!("step {}", ckpt.step)),
        "{err}"
    );
    assert!(!partial.exists());
    let run = mixnn()
        .arg("export")
        .arg("--partial")
        .arg("--model-map")
        .arg(&map_path)
        .arg("--out")
        .arg(&partial)
        .output()
        .expect("runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // --init through the network equals --init locally.
    let states = saved.slot_states(cfg.optimizer).expect("states");
    let (tuned, _) = train_local_model(&cfg, &data, Some(&states), &mut |_| {}).expect("local");
    let map_path = dir.path().join("tuned.json");
    let vols = common::fresh_volunteers(&net).await;
    let report = train_network_from(
        client,
        &vols,
        common::job(&cfg, &train, &data.test, &JobOptions::default(), &map_path),
        Some(states),
        &mut |_| {},
    )
    .await
    .expect("network fine-tuning");
    assert_eq!(report.params_digest, tuned.params_digest_hex);
    assert_eq!(report.losses, tuned.losses);
}

/// Real MNIST digits saved as PNG are named by a model trained on MNIST.
#[test]
#[cfg_attr(
    not(mnist),
    ignore = "needs MNIST in ../shared/data/mnist (see its README)"
)]
fn predict_names_mnist_digits_saved_as_png() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist");
    let data = mixnn_model::load_mnist(&dir).expect("mnist");
    let mut cfg = config("mlp:784-128-10", 60_000);
    cfg.batch = 128;
    cfg.optimizer = OptimizerSpec::Sgd { lr: 0.1 };
    let (report, model) = train_local_model(&cfg, &data, None, &mut |_| {}).expect("train");
    assert!(report.test_accuracy > 0.9, "{}", report.test_accuracy);
    let tmp = tempfile::tempdir().expect("tempdir");
    let model_path = tmp.path().join("mnist.safetensors");
    ModelParams::from_model(&model)
        .save(&model_path)
        .expect("save");
    let pngs: Vec<PathBuf> = (0..20)
        .map(|i| {
            let p = tmp.path().join(format!("digit{i}.png"));
            write_png(&p, &quantized(data.test.image(i)));
            p
        })
        .collect();
    let out = mixnn()
        .arg("predict")
        .arg("--model")
        .arg(&model_path)
        .arg("--json")
        .arg("--input")
        .args(&pngs)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let right = String::from_utf8_lossy(&out.stdout)
        .lines()
        .zip(&data.test.labels)
        .filter(|(line, &label)| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            v["class"] == u64::from(label)
        })
        .count();
    assert!(right >= 18, "{right} of 20 named correctly");
}
