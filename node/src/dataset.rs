//! Where a job's data comes from: the built-in synthetic set or MNIST files.

use std::path::Path;

use mixnn_model::data::{SYNTHETIC_TEST, SYNTHETIC_TRAIN};
use mixnn_model::{load_mnist, synthetic, DataError, Dataset};

/// The synthetic dataset does not depend on the training seed, so jobs
/// with different seeds see the same data.
pub const SYNTHETIC_SEED: u64 = 0x006d_6978_6e6e;

/// `synthetic`, or a directory holding the four MNIST IDX files.
pub fn load(spec: &str) -> Result<Dataset, DataError> {
    if spec == "synthetic" {
        Ok(synthetic(SYNTHETIC_SEED, SYNTHETIC_TRAIN, SYNTHETIC_TEST))
    } else {
        load_mnist(Path::new(spec))
    }
}
