//! Datasets: the MNIST IDX loader, a synthetic MNIST-shaped dataset, and
//! deterministic batching shared by the local trainer and the network client.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::tensor::HostTensor;

/// MNIST image side.
pub const MNIST_SIDE: usize = 28;
/// Features per MNIST image.
pub const MNIST_FEATURES: usize = MNIST_SIDE * MNIST_SIDE;
/// Classes in MNIST and in the synthetic dataset.
pub const NUM_CLASSES: usize = 10;
/// Default sizes of [`synthetic`] (small enough that `mixnn demo` trains in seconds).
pub const SYNTHETIC_TRAIN: usize = 4096;
pub const SYNTHETIC_TEST: usize = 1024;

const IMAGES_MAGIC: u32 = 2051;
const LABELS_MAGIC: u32 = 2049;
/// Largest decompressed file accepted (the MNIST train images are 47 MB).
const MAX_FILE_BYTES: u64 = 256 << 20;

/// Errors loading a dataset. Each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset directory {} does not exist or is not a directory", dir.display())]
    MissingDir { dir: PathBuf },
    #[error("{name} not found in {} (looked for {name} and {name}.gz)", dir.display())]
    MissingFile { dir: PathBuf, name: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: larger than {limit} bytes when decompressed", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: bad magic number {found} (expected {expected})", path.display())]
    BadMagic {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{}: images are {rows}x{cols} (expected 28x28)", path.display())]
    BadDims { path: PathBuf, rows: u32, cols: u32 },
    #[error("{}: header says {count} items, so the file should be {expected} bytes, but it is {found}", path.display())]
    BadLength {
        path: PathBuf,
        count: u32,
        expected: u64,
        found: u64,
    },
    #[error("{}: label {value} at index {index} is not below 10", path.display())]
    BadLabel {
        path: PathBuf,
        index: usize,
        value: u8,
    },
    #[error("{} has {images} images but {} has {labels} labels", images_path.display(), labels_path.display())]
    CountMismatch {
        images_path: PathBuf,
        images: usize,
        labels_path: PathBuf,
        labels: usize,
    },
}

/// Images (`features` values in `[0, 1]` per example, row-major) and labels.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Split {
    pub features: usize,
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
}

/// A training and a test split.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    pub train: Split,
    pub test: Split,
}

impl Split {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features of example `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * self.features..(i + 1) * self.features]
    }

    /// Keeps the first `n` examples.
    pub fn limit(mut self, n: usize) -> Split {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.images.truncate(n * self.features);
        self
    }

    /// Number of batches [`Split::batches`] yields.
    pub fn num_batches(&self, batch: usize) -> usize {
        if batch == 0 {
            0
        } else {
            self.len().div_ceil(batch)
        }
    }

    /// The epoch's batches: `([b, features] tensor, b labels)`, in an order
    /// shuffled deterministically from `(seed, epoch)`; every example once,
    /// the last batch possibly smaller. `batch == 0` yields nothing.
    pub fn batches(
        &self,
        batch: usize,
        epoch: u32,
        seed: u64,
    ) -> impl Iterator<Item = (HostTensor, Vec<u8>)> + '_ {
        let order = shuffled(self.len(), epoch, seed);
        let step = batch.max(1);
        let count = self.num_batches(batch);
        (0..count).map(move |b| {
            let idx = &order[b * step..((b + 1) * step).min(order.len())];
            let mut data = Vec::with_capacity(idx.len() * self.features);
            let mut labels = Vec::with_capacity(idx.len());
            for &i in idx {
                data.extend_from_slice(self.image(i));
                labels.push(self.labels[i]);
            }
            (
                HostTensor {
                    shape: vec![idx.len(), self.features],
                    data,
                },
                labels,
            )
        })
    }

    /// Examples `start..start + n` in order (for evaluation).
    pub fn slice(&self, start: usize, n: usize) -> (HostTensor, &[u8]) {
        let end = (start + n).min(self.len());
        let start = start.min(end);
        let data = self.images[start * self.features..end * self.features].to_vec();
        (
            HostTensor {
                shape: vec![end - start, self.features],
                data,
            },
            &self.labels[start..end],
        )
    }
}

/// A permutation of `0..n` from ChaCha20 seeded by `(seed, epoch)` (Fisher–Yates).
fn shuffled(n: usize, epoch: u32, seed: u64) -> Vec<usize> {
    let mut rng = rng_for(b"mixnn-model 2025 batch order v1", seed, u64::from(epoch));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

fn rng_for(context: &[u8], seed: u64, stream: u64) -> ChaCha20Rng {
    let mut h = blake3::Hasher::new();
    h.update(context);
    h.update(&seed.to_le_bytes());
    h.update(&stream.to_le_bytes());
    ChaCha20Rng::from_seed(*h.finalize().as_bytes())
}

fn uniform(rng: &mut ChaCha20Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// A deterministic MNIST-shaped dataset (784 features in `[0, 1]`, 10
/// classes): each class is a random sparse prototype; examples are their
/// class's prototype with random pixels dropped, noise added and clamped.
/// A small MLP learns it well above chance within an epoch.
pub fn synthetic(seed: u64, n_train: usize, n_test: usize) -> Dataset {
    let mut rng = rng_for(b"mixnn-model 2025 synthetic prototypes v1", seed, 0);
    let prototypes: Vec<Vec<f32>> = (0..NUM_CLASSES)
        .map(|_| {
            (0..MNIST_FEATURES)
                .map(|_| if uniform(&mut rng) < 0.2 { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    let split = |stream: u64, n: usize| {
        let mut rng = rng_for(b"mixnn-model 2025 synthetic examples v1", seed, stream);
        let mut images = Vec::with_capacity(n * MNIST_FEATURES);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let label = (rng.next_u32() % NUM_CLASSES as u32) as u8;
            for &p in &prototypes[usize::from(label)] {
                let keep = if uniform(&mut rng) < 0.3 { 0.0 } else { p };
                let noise = uniform(&mut rng) * 0.8 - 0.2;
                images.push((keep * 0.8 + noise).clamp(0.0, 1.0));
            }
            labels.push(label);
        }
        Split {
            features: MNIST_FEATURES,
            images,
            labels,
        }
    };
    Dataset {
        train: split(1, n_train),
        test: split(2, n_test),
    }
}

/// Loads MNIST from `dir`: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or `.gz`.
/// Pixels are scaled to `[0, 1]`.
pub fn load_mnist(dir: &Path) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::MissingDir {
            dir: dir.to_path_buf(),
        });
    }
    let train = load_split(dir, "train")?;
    let test = load_split(dir, "t10k")?;
    Ok(Dataset { train, test })
}

/// Reads one IDX image file (`*-images-idx3-ubyte`, raw or gzipped, 28x28
/// images), pixels scaled to `[0, 1]` as [`load_mnist`] does: 784 values
/// per image, images in file order.
pub fn load_idx_images(path: &Path) -> Result<Vec<f32>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 2];
    let gzipped = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let bytes = read_bounded(path, gzipped)?;
    parse_images(path, &bytes)
}

fn load_split(dir: &Path, prefix: &str) -> Result<Split, DataError> {
    let (images_path, images_bytes) = read_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let (labels_path, labels_bytes) = read_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = parse_images(&images_path, &images_bytes)?;
    let labels = parse_labels(&labels_path, &labels_bytes)?;
    let n_images = images.len() / MNIST_FEATURES;
    if n_images != labels.len() {
        return Err(DataError::CountMismatch {
            images_path,
            images: n_images,
            labels_path,
            labels: labels.len(),
        });
    }
    Ok(Split {
        features: MNIST_FEATURES,
        images,
        labels,
    })
}

/// Reads `name` (raw) or `name.gz` (gzip) from `dir`.
fn read_file(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), DataError> {
    let raw = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let (path, gzipped) = if raw.is_file() {
        (raw, false)
    } else if gz.is_file() {
        (gz, true)
    } else {
        return Err(DataError::MissingFile {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        });
    };
    let bytes = read_bounded(&path, gzipped)?;
    Ok((path, bytes))
}

/// The contents of `path` (gunzipped when `gzipped`), at most
/// [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path, gzipped: bool) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let reader: Box<dyn Read> = if gzipped {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(file)
    };
    let mut bytes = Vec::new();
    reader
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(bytes)
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Checks magic and exact length; returns `(count, payload)`.
fn parse_header<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    header_len: usize,
    item_len: usize,
) -> Result<(u32, &'a [u8]), DataError> {
    let short = |count: u32, expected: u64| DataError::BadLength {
        path: path.to_path_buf(),
        count,
        expected,
        found: bytes.len() as u64,
    };
    let found = be_u32(bytes, 0).ok_or_else(|| short(0, header_len as u64))?;
    if found != magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            expected: magic,
            found,
        });
    }
    let count = be_u32(bytes, 4).ok_or_else(|| short(0, header_len as u64))?;
    let expected = header_len as u64 + u64::from(count) * item_len as u64;
    if bytes.len() < header_len || bytes.len() as u64 != expected {
        return Err(short(count, expected));
    }
    Ok((count, &bytes[header_len..]))
}

fn parse_images(path: &Path, bytes: &[u8]) -> Result<Vec<f32>, DataError> {
    if let (Some(IMAGES_MAGIC), Some(rows), Some(cols)) =
        (be_u32(bytes, 0), be_u32(bytes, 8), be_u32(bytes, 12))
    {
        if rows as usize != MNIST_SIDE || cols as usize != MNIST_SIDE {
            return Err(DataError::BadDims {
                path: path.to_path_buf(),
                rows,
                cols,
            });
        }
    }
    let (_, payload) = parse_header(path, bytes, IMAGES_MAGIC, 16, MNIST_FEATURES)?;
    Ok(payload.iter().map(|&p| f32::from(p) / 255.0).collect())
}

fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let (_, payload) = parse_header(path, bytes, LABELS_MAGIC, 8, 1)?;
    if let Some((index, &value)) = payload
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= NUM_CLASSES)
    {
        return Err(DataError::BadLabel {
            path: path.to_path_buf(),
            index,
            value,
        });
    }
    Ok(payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_deterministic_permutations() {
        let d = synthetic(3, 103, 10);
        let a: Vec<_> = d.train.batches(10, 0, 5).collect();
        let b: Vec<_> = d.train.batches(10, 0, 5).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 11);
        assert_eq!(a[10].0.shape, vec![3, MNIST_FEATURES]);
        let c: Vec<_> = d.train.batches(10, 1, 5).collect();
        assert_ne!(a, c);
        let mut seen: Vec<u8> = a.iter().flat_map(|(_, l)| l.clone()).collect();
        let mut all = d.train.labels.clone();
        seen.sort_unstable();
        all.sort_unstable();
        assert_eq!(seen, all);
        assert_eq!(d.train.batches(0, 0, 0).count(), 0);
        assert_eq!(synthetic(3, 103, 10), d);
        assert_ne!(synthetic(4, 103, 10), d);
        assert!(d.train.images.iter().all(|x| (0.0..=1.0).contains(x)));
        assert_eq!(d.train.clone().limit(7).len(), 7);
    }
}
