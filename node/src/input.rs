//! The owner's own inputs for `mixnn predict`: PNG and JPEG images, `.npy`
//! float32 arrays and IDX image files, each turned into rows of the
//! model's input features, scaled as the training data is (`[0, 1]`,
//! pixel / 255).
//!
//! The format is told by the file's first bytes, not its name. Every size
//! read from a file is bounded before anything is allocated for it.

use std::path::{Path, PathBuf};

use mixnn_model::data::load_idx_images;
use mixnn_model::{DataError, HostTensor};

/// Largest input file read.
pub const MAX_INPUT_BYTES: u64 = 512 << 20;
/// Largest image width or height decoded.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Largest `.npy` header.
const MAX_NPY_HEADER: usize = 64 << 10;

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_MAGIC: &[u8] = &[0xff, 0xd8, 0xff];
const NPY_MAGIC: &[u8] = b"\x93NUMPY";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const IDX_IMAGES_MAGIC: &[u8] = &[0, 0, 8, 3];

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {size} bytes is larger than the {limit}-byte limit", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: not a PNG or JPEG image, a .npy array or an IDX image file", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("{}: image: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    #[error("{}: .npy: {reason}", path.display())]
    Npy { path: PathBuf, reason: String },
    #[error(transparent)]
    Idx(#[from] DataError),
    #[error("{}: {found} features per example, the model takes {expected}", path.display())]
    Features {
        path: PathBuf,
        found: usize,
        expected: usize,
    },
    #[error("no inputs")]
    Empty,
}

/// Rows of input features, each with a name for the output: the file's
/// path, with `#i` for the rows of a file holding several.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Inputs {
    pub features: usize,
    pub names: Vec<String>,
    /// `names.len() * features` values, row-major.
    pub data: Vec<f32>,
}

impl Inputs {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Rows `start..start + n` as a `[rows, features]` tensor.
    pub fn batch(&self, start: usize, n: usize) -> HostTensor {
        let end = (start + n).min(self.len());
        let start = start.min(end);
        HostTensor {
            shape: vec![end - start, self.features],
            data: self.data[start * self.features..end * self.features].to_vec(),
        }
    }

    fn push_rows(&mut self, path: &Path, rows: Vec<f32>, several: bool) {
        let n = rows.len() / self.features.max(1);
        for i in 0..n {
            self.names.push(if several {
                format!("{}#{i}", path.display())
            } else {
                path.display().to_string()
            });
        }
        self.data.extend_from_slice(&rows[..n * self.features]);
    }
}

/// Reads every file for a model that takes `features` inputs.
pub fn load(paths: &[PathBuf], features: usize) -> Result<Inputs, InputError> {
    let mut inputs = Inputs {
        features,
        ..Inputs::default()
    };
    for path in paths {
        let (rows, several) = load_file(path, features)?;
        inputs.push_rows(path, rows, several);
    }
    if inputs.is_empty() {
        return Err(InputError::Empty);
    }
    Ok(inputs)
}

/// One file's rows, and whether the file holds an array (named `#i`) rather
/// than one image.
fn load_file(path: &Path, features: usize) -> Result<(Vec<f32>, bool), InputError> {
    let io = |source| InputError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_INPUT_BYTES {
        return Err(InputError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_INPUT_BYTES,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    if bytes.starts_with(PNG_MAGIC) || bytes.starts_with(JPEG_MAGIC) {
        Ok((image_features(path, &bytes, features)?, false))
    } else if bytes.starts_with(NPY_MAGIC) {
        Ok((npy_features(path, &bytes, features)?, true))
    } else if bytes.starts_with(GZIP_MAGIC) || bytes.starts_with(IDX_IMAGES_MAGIC) {
        drop(bytes);
        let rows = load_idx_images(path)?;
        let found = mixnn_model::data::MNIST_FEATURES;
        if features != found {
            return Err(InputError::Features {
                path: path.to_path_buf(),
                found,
                expected: features,
            });
        }
        Ok((rows, true))
    } else {
        Err(InputError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }
}

/// The side of the square image a model of `features` inputs takes.
fn square_side(features: usize) -> Option<u32> {
    let side = (features as f64).sqrt().round() as usize;
    (side * side == features && side > 0)
        .then_some(side)
        .and_then(|s| u32::try_from(s).ok())
}

/// A PNG or JPEG image in grey, resized to the model's square input if its
/// size differs, pixel / 255.
pub fn image_features(path: &Path, bytes: &[u8], features: usize) -> Result<Vec<f32>, InputError> {
    let bad = |reason: String| InputError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let side = square_side(features).ok_or_else(|| {
        bad(format!(
            "the model takes {features} features, not a square image"
        ))
    })?;
    let mut limits = image::io::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_INPUT_BYTES);
    let mut reader = image::io::Reader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    reader.limits(limits);
    let img = reader.decode().map_err(|e| bad(e.to_string()))?;
    let mut grey = img.to_luma8();
    if grey.width() != side || grey.height() != side {
        grey = image::imageops::resize(&grey, side, side, image::imageops::FilterType::Triangle);
    }
    Ok(grey
        .as_raw()
        .iter()
        .map(|&p| f32::from(p) / 255.0)
        .collect())
}

/// A `.npy` array (format 1.0 or 2.0, little-endian float32, C order) of
/// shape `[N, features]` or `[N, h, w]` with `h * w == features`.
pub fn npy_features(path: &Path, bytes: &[u8], features: usize) -> Result<Vec<f32>, InputError> {
    let bad = |reason: String| InputError::Npy {
        path: path.to_path_buf(),
        reason,
    };
    let truncated = || bad("truncated".into());
    let version = bytes
        .get(NPY_MAGIC.len()..NPY_MAGIC.len() + 2)
        .ok_or_else(truncated)?;
    let (header_len, start) = match version {
        [1, 0] => {
            let b = bytes.get(8..10).ok_or_else(truncated)?;
            (usize::from(u16::from_le_bytes([b[0], b[1]])), 10)
        }
        [2, 0] => {
            let b = bytes.get(8..12).ok_or_else(truncated)?;
            let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (usize::try_from(n).unwrap_or(usize::MAX), 12)
        }
        v => {
            return Err(bad(format!(
                "format version {}.{} (1.0 and 2.0 are supported)",
                v[0], v[1]
            )))
        }
    };
    if header_len > MAX_NPY_HEADER {
        return Err(bad(format!(
            "header of {header_len} bytes (at most {MAX_NPY_HEADER})"
        )));
    }
    let header = bytes.get(start..start + header_len).ok_or_else(truncated)?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text".into()))?;
    let header = NpyHeader::parse(header).map_err(bad)?;
    if header.descr != "<f4" {
        return Err(bad(format!(
            "dtype {:?}; only little-endian float32 ('<f4') is supported (numpy: a.astype('<f4'))",
            header.descr
        )));
    }
    if header.fortran_order {
        return Err(bad(
            "Fortran order is not supported (numpy: np.ascontiguousarray(a))".into(),
        ));
    }
    let row = match header.shape[..] {
        [_, f] => f,
        [_, h, w] => h.saturating_mul(w),
        _ => {
            return Err(bad(format!(
                "shape {:?}; expected [N, {features}] or [N, h, w]",
                header.shape
            )))
        }
    };
    if row != features {
        return Err(InputError::Features {
            path: path.to_path_buf(),
            found: row,
            expected: features,
        });
    }
    let count = header
        .shape
        .iter()
        .try_fold(4usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {:?} overflows", header.shape)))?;
    let data = &bytes[start + header_len..];
    if data.len() != count {
        return Err(bad(format!(
            "shape {:?} needs {count} bytes of data, the file has {}",
            header.shape,
            data.len()
        )));
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(i) = mixnn_model::tensor::first_non_finite(&values) {
        return Err(bad(format!("non-finite value at index {i}")));
    }
    Ok(values)
}

/// The header dict of a `.npy` file:
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 784), }`.
#[derive(Debug, PartialEq)]
struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl NpyHeader {
    fn parse(text: &str) -> Result<NpyHeader, String> {
        let mut p = Parser {
            s: text.trim_end_matches(['\n', ' ']).as_bytes(),
            at: 0,
        };
        p.expect(b'{')?;
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        loop {
            p.skip_ws();
            if p.eat(b'}') {
                break;
            }
            let key = p.string()?;
            p.skip_ws();
            p.expect(b':')?;
            p.skip_ws();
            match key.as_str() {
                "descr" if descr.is_none() => descr = Some(p.string()?),
                "fortran_order" if fortran.is_none() => fortran = Some(p.boolean()?),
                "shape" if shape.is_none() => shape = Some(p.tuple()?),
                k => return Err(format!("unexpected or repeated key {k:?} in the header")),
            }
            p.skip_ws();
            if !p.eat(b',') {
                p.skip_ws();
                p.expect(b'}')?;
                break;
            }
        }
        p.skip_ws();
        if p.at != p.s.len() {
            return Err("trailing text after the header dict".into());
        }
        Ok(NpyHeader {
            descr: descr.ok_or("the header has no 'descr'")?,
            fortran_order: fortran.ok_or("the header has no 'fortran_order'")?,
            shape: shape.ok_or("the header has no 'shape'")?,
        })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.at).is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.at) == Some(&b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), String> {
        if self.eat(b) {
            Ok(())
        } else {
            Err(format!(
                "malformed header: expected {:?} at byte {}",
                b as char, self.at
            ))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = match self.s.get(self.at) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(format!(
                    "malformed header: expected a string at byte {}",
                    self.at
                ))
            }
        };
        self.at += 1;
        let start = self.at;
        while let Some(&b) = self.s.get(self.at) {
            if b == quote {
                let text = String::from_utf8_lossy(&self.s[start..self.at]).into_owned();
                self.at += 1;
                return Ok(text);
            }
            self.at += 1;
        }
        Err("malformed header: unterminated string".into())
    }

    fn boolean(&mut self) -> Result<bool, String> {
        let rest = &self.s[self.at..];
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if rest.starts_with(word) {
                self.at += word.len();
                return Ok(value);
            }
        }
        Err("malformed header: fortran_order is not True or False".into())
    }

    fn tuple(&mut self) -> Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.at;
            while self.s.get(self.at).is_some_and(u8::is_ascii_digit) {
                self.at += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("");
            if digits.is_empty() || digits.len() > 12 || dims.len() >= 8 {
                return Err("malformed header: bad shape".into());
            }
            dims.push(digits.parse().map_err(|_| "malformed header: bad shape")?);
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

/// Writes `data` as a `.npy` file of float32 with the given shape (for
/// tests and for users' convenience).
pub fn npy_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = NPY_MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p() -> PathBuf {
        PathBuf::from("x.npy")
    }

    fn replaced(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("found");
        [&bytes[..at], to, &bytes[at + from.len()..]].concat()
    }

    #[test]
    fn npy_round_trips_and_checks_shape_and_dtype() {
        let data: Vec<f32> = (0..2 * 784).map(|i| (i % 255) as f32 / 255.0).collect();
        let bytes = npy_bytes(&[2, 784], &data);
        assert_eq!(npy_features(&p(), &bytes, 784).expect("reads"), data);
        let bytes = npy_bytes(&[2, 28, 28], &data);
        assert_eq!(npy_features(&p(), &bytes, 784).expect("reads"), data);
        let msg = npy_features(&p(), &npy_bytes(&[2, 784], &data), 100)
            .expect_err("features")
            .to_string();
        assert!(msg.contains("784 features"), "{msg}");
        assert!(npy_features(&p(), &npy_bytes(&[1568], &data), 784).is_err());
        let f8 = replaced(&bytes, b"<f4", b"<f8");
        let msg = npy_features(&p(), &f8, 784).expect_err("dtype").to_string();
        assert!(msg.contains("'<f4'"), "{msg}");
        let fortran = replaced(&bytes, b"False", b"True ");
        assert!(npy_features(&p(), &fortran, 784)
            .expect_err("order")
            .to_string()
            .contains("Fortran"));
        for cut in [0, 7, 9, 50, bytes.len() - 1] {
            assert!(npy_features(&p(), &bytes[..cut], 784).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn npy_header_parser() {
        let h = NpyHeader::parse("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }  \n")
            .expect("parses");
        assert_eq!(h.shape, vec![3, 4]);
        assert!(!h.fortran_order);
        let h = NpyHeader::parse("{\"shape\":(5,),\"descr\":\"<f4\",\"fortran_order\":True}")
            .expect("parses");
        assert_eq!(h.shape, vec![5]);
        for bad in [
            "",
            "{",
            "{'descr': '<f4'}",
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
            "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, -2)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999,)} x",
        ] {
            assert!(NpyHeader::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn images_are_grey_resized_and_scaled() {
        let mut img = image::GrayImage::new(28, 28);
        img.put_pixel(3, 5, image::Luma([255]));
        img.put_pixel(4, 5, image::Luma([51]));
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        let x = image_features(Path::new("a.png"), &png, 784).expect("reads");
        assert_eq!(x.len(), 784);
        assert_eq!(x[5 * 28 + 3], 1.0);
        assert_eq!(x[5 * 28 + 4], 0.2);
        assert_eq!(x.iter().filter(|&&v| v > 0.0).count(), 2);
        // A larger colour image is made grey and resized.
        let rgb = image::RgbImage::from_pixel(56, 40, image::Rgb([255, 255, 255]));
        let mut jpg = Vec::new();
        image::DynamicImage::ImageRgb8(rgb)
            .write_to(
                &mut std::io::Cursor::new(&mut jpg),
                image::ImageFormat::Jpeg,
            )
            .expect("jpeg");
        let x = image_features(Path::new("a.jpg"), &jpg, 784).expect("reads");
        assert_eq!(x.len(), 784);
        assert!(x.iter().all(|&v| v > 0.9), "white stays white");
        assert!(image_features(Path::new("a.png"), &png[..png.len() / 2], 784).is_err());
        assert!(image_features(Path::new("a.png"), &png, 10).is_err());
    }

    proptest! {
        #[test]
        fn random_npy_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = NPY_MAGIC.to_vec();
            bytes.extend_from_slice(&body);
            let _ = npy_features(&p(), &bytes, 4);
        }

        #[test]
        fn random_headers_never_panic(h in "[ -~]{0,80}") {
            let _ = NpyHeader::parse(&h);
        }
    }
}
