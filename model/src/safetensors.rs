//! A model's parameters as a safetensors file, in the layout of the PyTorch
//! `nn.Sequential` its architecture describes.
//!
//! The format: an 8-byte little-endian header length `n`, `n` bytes of JSON
//! header, then the raw tensor data. The header maps each tensor name to
//! `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to
//! the start of the data) and may hold `"__metadata__"`, a map of strings.
//!
//! Tensor names are those of `nn.Sequential`'s `state_dict`: the module's
//! position in the sequence (activations and flattens count), then
//! `.weight` or `.bias`. For `mlp:784-128-10` that is `0.weight`
//! `[128, 784]`, `0.bias` `[128]`, `2.weight` `[10, 128]`, `2.bias` `[10]`;
//! a convolution's weight is `[out_channels, in_channels, k, k]`, as in
//! `nn.Conv2d`, and one without bias has no `.bias` tensor.
//! The architecture string is in the metadata under `"arch"`, so that
//! `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`
//! works on the matching `nn.Sequential`.
//!
//! Reading is strict: bounded header, every offset in range, no overlaps or
//! holes, `F32` only, exactly the tensors the architecture has, with their
//! shapes, and finite values.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::optim::OptimizerSpec;
use crate::slot::Slot;
use crate::spec::{Arch, LayerSpec};
use crate::train::LocalModel;

/// Largest JSON header read (ours take a few KiB).
pub const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Largest file read: the largest architecture's parameters and a header.
pub const MAX_FILE_BYTES: u64 = 4 << 30;
/// Metadata key holding the architecture string.
pub const ARCH_KEY: &str = "arch";

/// What is wrong with a safetensors file, or with parameters to write.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {size} bytes is larger than the {limit}-byte limit", path.display())]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("truncated: {0}")]
    Truncated(String),
    #[error(
        "header length {len} is out of range (at most {MAX_HEADER_BYTES}, and within the file)"
    )]
    HeaderLength { len: u64 },
    #[error("header is not valid JSON: {0}")]
    HeaderJson(String),
    #[error("header: {0}")]
    Header(String),
    #[error("no architecture: the header's __metadata__ has no \"{ARCH_KEY}\" string")]
    NoArch,
    #[error("architecture: {0}")]
    Arch(#[from] crate::spec::SpecError),
    #[error("the file holds {found}, expected {expected}")]
    ArchMismatch { expected: String, found: String },
    #[error("tensor {name}: dtype {dtype} (only F32 is supported)")]
    Dtype { name: String, dtype: String },
    #[error("tensor {name}: shape {found:?}, {arch} needs {expected:?}")]
    Shape {
        name: String,
        arch: String,
        expected: Vec<usize>,
        found: Vec<u64>,
    },
    #[error("tensor {name} is missing ({arch} has {expected})")]
    Missing {
        name: String,
        arch: String,
        expected: String,
    },
    #[error("unexpected tensor {name} ({arch} has only {expected})")]
    Extra {
        name: String,
        arch: String,
        expected: String,
    },
    #[error("tensor {name}: data offsets [{begin}, {end}] {reason}")]
    Offsets {
        name: String,
        begin: u64,
        end: u64,
        reason: String,
    },
    #[error("data: {0}")]
    Layout(String),
    #[error("tensor {name}: non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
    #[error("parameters: {0}")]
    Params(String),
    #[error(transparent)]
    Model(#[from] crate::ModelError),
}

type Result<T, E = SafetensorsError> = std::result::Result<T, E>;

/// One stage's parameter tensors in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorNames {
    pub weight: String,
    /// `None` for a convolution without bias.
    pub bias: Option<String>,
    /// `[outputs, inputs]`, or `[out, in, k, k]` for a convolution.
    pub weight_shape: Vec<usize>,
}

impl TensorNames {
    /// The bias's shape (`[outputs]`).
    pub fn bias_shape(&self) -> Vec<usize> {
        vec![self.weight_shape[0]]
    }
}

/// The tensor names of each stage's linear or convolution layer, in stage
/// order: the position of the layer in the `nn.Sequential` of all stages'
/// layers.
pub fn tensor_names(arch: &Arch) -> Vec<TensorNames> {
    let mut position = 0usize;
    let mut out = Vec::with_capacity(arch.num_stages());
    for stage in arch.stages() {
        for layer in &stage.layers {
            if matches!(layer, LayerSpec::Linear { .. } | LayerSpec::Conv2d { .. }) {
                out.push(TensorNames {
                    weight: format!("{position}.weight"),
                    bias: (stage.bias_len() > 0).then(|| format!("{position}.bias")),
                    weight_shape: stage.weight_shape(),
                });
            }
            position += 1;
        }
    }
    out
}

/// A model's parameters: for each stage its weight (`[outputs, inputs]`,
/// row-major) and bias.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    pub arch: Arch,
    pub stages: Vec<StageParams>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageParams {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl ModelParams {
    /// Checks that there is one stage per layer of `arch`, with its sizes.
    pub fn new(arch: Arch, stages: Vec<StageParams>) -> Result<ModelParams> {
        let specs = arch.stages();
        if stages.len() != specs.len() {
            return Err(SafetensorsError::Params(format!(
                "{} stages for {arch}, which has {}",
                stages.len(),
                specs.len()
            )));
        }
        for (i, (p, s)) in stages.iter().zip(&specs).enumerate() {
            if p.weight.len() != s.weight_len() || p.bias.len() != s.bias_len() {
                return Err(SafetensorsError::Params(format!(
                    "stage {i} has {}+{} parameters, a weight {:?} and bias need {}+{}",
                    p.weight.len(),
                    p.bias.len(),
                    s.weight_shape(),
                    s.weight_len(),
                    s.bias_len()
                )));
            }
        }
        Ok(ModelParams { arch, stages })
    }

    /// The parameters of a local model.
    pub fn from_model(model: &LocalModel) -> ModelParams {
        ModelParams {
            arch: model.arch().clone(),
            stages: model
                .stage_params()
                .into_iter()
                .map(|(w, b)| StageParams {
                    weight: w.to_vec(),
                    bias: b.to_vec(),
                })
                .collect(),
        }
    }

    /// The parameters in stage states ([`Slot::to_bytes`], in stage order),
    /// for example an owner's checkpoint; each must fit `arch`.
    pub fn from_states(arch: &Arch, states: &[Vec<u8>]) -> Result<ModelParams> {
        let specs = arch.stages();
        if states.len() != specs.len() {
            return Err(SafetensorsError::Params(format!(
                "{} stage states for {arch}, which has {} stages",
                states.len(),
                specs.len()
            )));
        }
        let mut stages = Vec::with_capacity(states.len());
        for (i, (bytes, spec)) in states.iter().zip(&specs).enumerate() {
            let slot = Slot::from_bytes(bytes)?;
            if slot.spec() != spec {
                return Err(SafetensorsError::Params(format!(
                    "stage {i} state does not fit {arch}"
                )));
            }
            stages.push(StageParams {
                weight: slot.weight().to_vec(),
                bias: slot.bias().to_vec(),
            });
        }
        ModelParams::new(arch.clone(), stages)
    }

    /// Fresh stage states holding these parameters for training with `opt`:
    /// stage `i`'s [`Slot::to_bytes`] with no steps applied and a zero
    /// optimizer state (what `train --init` starts from).
    pub fn slot_states(&self, opt: OptimizerSpec) -> Result<Vec<Vec<u8>>> {
        self.arch
            .stages()
            .iter()
            .zip(&self.stages)
            .map(|(spec, p)| {
                Slot::from_params(spec, p.weight.clone(), p.bias.clone(), opt)
                    .map(|s| s.to_bytes())
                    .map_err(SafetensorsError::from)
            })
            .collect()
    }

    /// A local model holding these parameters (no steps applied; `opt`
    /// only matters if it is trained further).
    pub fn to_model(&self, opt: OptimizerSpec) -> Result<LocalModel> {
        Ok(LocalModel::from_states(
            &self.arch,
            &self.slot_states(opt)?,
        )?)
    }

    /// The model digest of these parameters (as `params_digest` reports).
    pub fn digest(&self) -> [u8; 32] {
        let stage_digests: Vec<[u8; 32]> = self
            .stages
            .iter()
            .map(|p| {
                let mut h = blake3::Hasher::new();
                crate::digest::hash_f32s(&mut h, &p.weight);
                crate::digest::hash_f32s(&mut h, &p.bias);
                *h.finalize().as_bytes()
            })
            .collect();
        crate::digest::model_digest(&stage_digests)
    }

    /// The safetensors file: header padded with spaces to a multiple of 8
    /// bytes, tensors in the order of [`tensor_names`], weight before bias.
    pub fn to_bytes(&self) -> Vec<u8> {
        let names = tensor_names(&self.arch);
        let mut header = serde_json::Map::new();
        let mut meta = serde_json::Map::new();
        meta.insert(ARCH_KEY.into(), Value::String(self.arch.to_string()));
        header.insert("__metadata__".into(), Value::Object(meta));
        let mut offset = 0u64;
        let mut entry = |shape: Vec<usize>, len: usize| {
            let begin = offset;
            offset += 4 * len as u64;
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [begin, offset],
            })
        };
        for (n, p) in names.iter().zip(&self.stages) {
            header.insert(
                n.weight.clone(),
                entry(n.weight_shape.clone(), p.weight.len()),
            );
            if let Some(bias) = &n.bias {
                header.insert(bias.clone(), entry(n.bias_shape(), p.bias.len()));
            }
        }
        let mut json = Value::Object(header).to_string().into_bytes();
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + json.len() + offset as usize);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for p in &self.stages {
            for x in p.weight.iter().chain(&p.bias) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    /// Reads a file written by [`ModelParams::to_bytes`] or by any other
    /// safetensors writer, for the architecture in its metadata; with
    /// `expected`, that architecture must be `expected`.
    pub fn from_bytes(bytes: &[u8], expected: Option<&Arch>) -> Result<ModelParams> {
        let len_bytes: [u8; 8] =
            bytes
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    SafetensorsError::Truncated(format!(
                        "{} bytes, shorter than the 8-byte header length",
                        bytes.len()
                    ))
                })?;
        let header_len = u64::from_le_bytes(len_bytes);
        if !(2..=MAX_HEADER_BYTES).contains(&header_len) {
            return Err(SafetensorsError::HeaderLength { len: header_len });
        }
        let header_end = 8 + header_len as usize;
        let header = bytes.get(8..header_end).ok_or_else(|| {
            SafetensorsError::Truncated(format!(
                "the header is {header_len} bytes but only {} follow the length",
                bytes.len() - 8
            ))
        })?;
        if header.first() != Some(&b'{') {
            return Err(SafetensorsError::Header("does not start with '{'".into()));
        }
        let header = std::str::from_utf8(header)
            .map_err(|e| SafetensorsError::HeaderJson(e.to_string()))?
            .trim_end_matches(' ');
        let Entries(entries) = serde_json::from_str(header)
            .map_err(|e| SafetensorsError::HeaderJson(e.to_string()))?;
        let data = &bytes[header_end..];

        let mut arch = None;
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for (name, value) in entries {
            if name == "__metadata__" {
                arch = Some(read_metadata(value)?);
            } else {
                let info = TensorInfo::parse(&name, value)?;
                tensors.insert(name, info);
            }
        }
        let arch = Arch::parse(&arch.flatten().ok_or(SafetensorsError::NoArch)?)?;
        if let Some(expected) = expected {
            if *expected != arch {
                return Err(SafetensorsError::ArchMismatch {
                    expected: expected.to_string(),
                    found: arch.to_string(),
                });
            }
        }
        check_layout(&tensors, data.len() as u64)?;

        let names = tensor_names(&arch);
        let all: Vec<&str> = names
            .iter()
            .flat_map(|n| std::iter::once(n.weight.as_str()).chain(n.bias.as_deref()))
            .collect();
        let listing = all.join(", ");
        if let Some(extra) = tensors.keys().find(|k| !all.contains(&k.as_str())) {
            return Err(SafetensorsError::Extra {
                name: extra.clone(),
                arch: arch.to_string(),
                expected: listing,
            });
        }
        let mut take = |name: &str, shape: Vec<usize>| -> Result<Vec<f32>> {
            let info = tensors
                .remove(name)
                .ok_or_else(|| SafetensorsError::Missing {
                    name: name.to_string(),
                    arch: arch.to_string(),
                    expected: listing.clone(),
                })?;
            if info.shape.len() != shape.len()
                || info.shape.iter().zip(&shape).any(|(&a, &b)| a != b as u64)
            {
                return Err(SafetensorsError::Shape {
                    name: name.to_string(),
                    arch: arch.to_string(),
                    expected: shape,
                    found: info.shape,
                });
            }
            // check_layout put every tensor within `data`, of its size.
            let raw = data
                .get(info.begin as usize..info.end as usize)
                .ok_or_else(|| SafetensorsError::Layout(format!("{name} out of range")))?;
            let values: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(index) = crate::tensor::first_non_finite(&values) {
                return Err(SafetensorsError::NonFinite {
                    name: name.to_string(),
                    index,
                });
            }
            Ok(values)
        };
        let mut stages = Vec::with_capacity(names.len());
        for n in &names {
            let weight = take(&n.weight, n.weight_shape.clone())?;
            let bias = match &n.bias {
                Some(bias) => take(bias, n.bias_shape())?,
                None => Vec::new(),
            };
            stages.push(StageParams { weight, bias });
        }
        ModelParams::new(arch, stages)
    }

    /// Writes the file (see [`ModelParams::to_bytes`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_bytes()).map_err(|source| SafetensorsError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a file of at most [`MAX_FILE_BYTES`] (see [`ModelParams::from_bytes`]).
    pub fn load(path: &Path, expected: Option<&Arch>) -> Result<ModelParams> {
        let io = |source| SafetensorsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_FILE_BYTES {
            return Err(SafetensorsError::FileTooLarge {
                path: path.to_path_buf(),
                size,
                limit: MAX_FILE_BYTES,
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        ModelParams::from_bytes(&bytes, expected)
    }
}

/// `__metadata__`: a map of strings; returns its `arch`, if any.
fn read_metadata(value: Value) -> Result<Option<String>> {
    let Value::Object(map) = value else {
        return Err(SafetensorsError::Header(
            "__metadata__ is not an object".into(),
        ));
    };
    let mut arch = None;
    for (k, v) in map {
        let Value::String(s) = v else {
            return Err(SafetensorsError::Header(format!(
                "__metadata__.{k} is not a string"
            )));
        };
        if k == ARCH_KEY {
            arch = Some(s);
        }
    }
    Ok(arch)
}

#[derive(Debug)]
struct TensorInfo {
    shape: Vec<u64>,
    begin: u64,
    end: u64,
}

impl TensorInfo {
    fn parse(name: &str, value: Value) -> Result<TensorInfo> {
        let bad = |what: &str| SafetensorsError::Header(format!("tensor {name}: {what}"));
        let Value::Object(map) = value else {
            return Err(bad("not an object"));
        };
        if let Some(k) = map
            .keys()
            .find(|k| !["dtype", "shape", "data_offsets"].contains(&k.as_str()))
        {
            return Err(bad(&format!("unknown field {k:?}")));
        }
        let dtype = match map.get("dtype") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(bad("no dtype string")),
        };
        if dtype != "F32" {
            return Err(SafetensorsError::Dtype {
                name: name.to_string(),
                dtype,
            });
        }
        let uints = |key: &str| -> Result<Vec<u64>> {
            match map.get(key) {
                Some(Value::Array(xs)) if xs.len() <= 8 => xs
                    .iter()
                    .map(|x| x.as_u64().ok_or_else(|| bad(&format!("{key} holds {x}"))))
                    .collect(),
                _ => Err(bad(&format!("no {key} (an array of at most 8 integers)"))),
            }
        };
        let shape = uints("shape")?;
        let offsets = uints("data_offsets")?;
        let [begin, end] = offsets[..] else {
            return Err(bad("data_offsets is not [begin, end]"));
        };
        let offsets_err = |reason: String| SafetensorsError::Offsets {
            name: name.to_string(),
            begin,
            end,
            reason,
        };
        if end < begin {
            return Err(offsets_err("end before begin".into()));
        }
        let bytes = shape
            .iter()
            .try_fold(4u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| offsets_err(format!("shape {shape:?} overflows")))?;
        if end - begin != bytes {
            return Err(offsets_err(format!(
                "span {} bytes, shape {shape:?} of F32 needs {bytes}",
                end - begin
            )));
        }
        Ok(TensorInfo { shape, begin, end })
    }
}

/// Every tensor within the data, no two overlapping, and no byte of the
/// data outside a tensor.
fn check_layout(tensors: &BTreeMap<String, TensorInfo>, data_len: u64) -> Result<()> {
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(n, t)| (t.begin, t.end, n.as_str()))
        .collect();
    spans.sort_unstable();
    let mut at = 0u64;
    let mut previous = "";
    for (begin, end, name) in spans {
        if end > data_len {
            return Err(SafetensorsError::Offsets {
                name: name.to_string(),
                begin,
                end,
                reason: format!("run past the {data_len} bytes of data (truncated file?)"),
            });
        }
        if begin < at {
            return Err(SafetensorsError::Offsets {
                name: name.to_string(),
                begin,
                end,
                reason: format!("overlap tensor {previous}"),
            });
        }
        if begin > at {
            return Err(SafetensorsError::Layout(format!(
                "bytes {at}..{begin} belong to no tensor"
            )));
        }
        at = end;
        previous = name;
    }
    if at != data_len {
        return Err(SafetensorsError::Layout(format!(
            "bytes {at}..{data_len} belong to no tensor"
        )));
    }
    Ok(())
}

/// A JSON object's entries in order, refusing duplicate keys (which
/// `serde_json::Map` would silently merge).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out: Vec<(String, Value)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                    }
                    if out.len() > 4 * crate::spec::MAX_STAGES {
                        return Err(serde::de::Error::custom("too many entries"));
                    }
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(arch: &str) -> ModelParams {
        let model = LocalModel::new(
            &Arch::parse(arch).expect("arch"),
            3,
            OptimizerSpec::Sgd { lr: 0.1 },
        )
        .expect("model");
        ModelParams::from_model(&model)
    }

    /// A file with the given header (as JSON) and data.
    fn file(header: &Value, data: &[u8]) -> Vec<u8> {
        let json = header.to_string();
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn header_of(bytes: &[u8]) -> (Value, Vec<u8>) {
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        let v = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
        (v, bytes[8 + n..].to_vec())
    }

    #[test]
    fn names_follow_the_sequential() {
        let names = tensor_names(&Arch::parse("mlp:784-128-64-10").expect("arch"));
        let got: Vec<_> = names
            .iter()
            .map(|n| (n.weight.as_str(), n.bias.as_deref(), n.weight_shape.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("0.weight", Some("0.bias"), vec![128, 784]),
                ("2.weight", Some("2.bias"), vec![64, 128]),
                ("4.weight", Some("4.bias"), vec![10, 64]),
            ]
        );
        // LeNet-5 as nn.Sequential(Conv2d, ReLU, MaxPool2d, Conv2d, ReLU,
        // MaxPool2d, Flatten, Linear, ReLU, Linear, ReLU, Linear).
        let names = tensor_names(&Arch::parse("lenet5").expect("arch"));
        let got: Vec<_> = names
            .iter()
            .map(|n| (n.weight.as_str(), n.weight_shape.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("0.weight", vec![6, 1, 5, 5]),
                ("3.weight", vec![16, 6, 5, 5]),
                ("7.weight", vec![120, 400]),
                ("9.weight", vec![84, 120]),
                ("11.weight", vec![10, 84]),
            ]
        );
        let no_bias = tensor_names(
            &Arch::parse("seq:1x8x8|conv(2,3,bias=false) relu|flatten linear(4)").expect("arch"),
        );
        assert_eq!(no_bias[0].bias, None);
        assert_eq!(no_bias[1].bias.as_deref(), Some("3.bias"));
    }

    #[test]
    fn convolutions_round_trip() {
        for arch in [
            "lenet5",
            "seq:1x8x8|conv(2,3,bias=false) relu|flatten linear(4)",
        ] {
            let p = sample(arch);
            let back = ModelParams::from_bytes(&p.to_bytes(), None).expect("reads");
            assert_eq!(back, p);
            assert_eq!(back.digest(), p.digest());
        }
    }

    #[test]
    fn round_trips_with_the_documented_layout() {
        let p = sample("mlp:784-128-10");
        let bytes = p.to_bytes();
        let (header, data) = header_of(&bytes);
        assert_eq!(header["__metadata__"]["arch"], "mlp:784-128-10");
        assert_eq!(header["0.weight"]["shape"], serde_json::json!([128, 784]));
        assert_eq!(header["0.bias"]["shape"], serde_json::json!([128]));
        assert_eq!(header["2.weight"]["shape"], serde_json::json!([10, 128]));
        assert_eq!(header["2.bias"]["dtype"], "F32");
        assert_eq!((8 + bytes.len() - data.len() - 8) % 8, 0, "header padded");
        // Row-major [outputs, inputs]: element (1, 2) of 0.weight.
        let begin = header["0.weight"]["data_offsets"][0].as_u64().expect("u64") as usize;
        let at = begin + 4 * (784 + 2);
        let x = f32::from_le_bytes(data[at..at + 4].try_into().expect("4"));
        assert_eq!(x, p.stages[0].weight[784 + 2]);
        let back = ModelParams::from_bytes(&bytes, Some(&p.arch)).expect("reads");
        assert_eq!(back, p);
        assert_eq!(back.digest(), p.digest());
        let model = back
            .to_model(OptimizerSpec::Sgd { lr: 0.1 })
            .expect("model");
        assert_eq!(model.params_digest(), p.digest());
        let other = Arch::parse("mlp:784-64-10").expect("arch");
        assert!(matches!(
            ModelParams::from_bytes(&bytes, Some(&other)),
            Err(SafetensorsError::ArchMismatch { .. })
        ));
    }

    #[test]
    fn slot_states_are_fresh_and_hold_the_parameters() {
        let p = sample("mlp:20-8-4");
        let opt = OptimizerSpec::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let states = p.slot_states(opt).expect("states");
        assert_eq!(states.len(), 2);
        for (bytes, sp) in states.iter().zip(&p.stages) {
            let slot = Slot::from_bytes(bytes).expect("slot");
            assert_eq!(slot.steps_applied(), 0);
            assert_eq!(*slot.optimizer(), opt);
            assert_eq!(slot.weight(), &sp.weight[..]);
            assert_eq!(slot.bias(), &sp.bias[..]);
        }
        assert_eq!(ModelParams::from_states(&p.arch, &states).expect("p"), p);
    }

    #[test]
    fn refuses_bad_headers_with_clear_errors() {
        let p = sample("mlp:6-4-2");
        let (header, data) = header_of(&p.to_bytes());
        let err = |h: &Value, d: &[u8]| {
            ModelParams::from_bytes(&file(h, d), None)
                .expect_err("refused")
                .to_string()
        };
        let mut missing = header.clone();
        missing
            .as_object_mut()
            .expect("obj")
            .remove("2.bias")
            .expect("had it");
        let msg = err(&missing, &data[..data.len() - 8]);
        assert!(msg.contains("2.bias is missing"), "{msg}");

        let mut extra = header.clone();
        let end = data.len() as u64;
        extra["3.weight"] =
            serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]});
        let mut d = data.clone();
        d.extend_from_slice(&[0; 4]);
        assert!(err(&extra, &d).contains("unexpected tensor 3.weight"));

        let mut shape = header.clone();
        shape["0.weight"]["shape"] = serde_json::json!([6, 4]);
        let msg = err(&shape, &data);
        assert!(msg.contains("0.weight: shape [6, 4]"), "{msg}");

        let mut dtype = header.clone();
        dtype["0.bias"]["dtype"] = serde_json::json!("F16");
        assert!(err(&dtype, &data).contains("dtype F16"));

        let mut overlap = header.clone();
        overlap["0.bias"]["data_offsets"] = serde_json::json!([0, 16]);
        let msg = err(&overlap, &data);
        assert!(msg.contains("overlap tensor 0.bias"), "{msg}");

        let mut no_arch = header.clone();
        no_arch["__metadata__"] = serde_json::json!({});
        assert!(err(&no_arch, &data).contains("no architecture"));

        let mut bad_arch = header.clone();
        bad_arch["__metadata__"]["arch"] = serde_json::json!("cnn:1-2");
        assert!(err(&bad_arch, &data).contains("cnn"));

        let msg = err(&header, &[&data[..], &[0u8; 4]].concat());
        assert!(msg.contains("belong to no tensor"), "{msg}");

        let mut nan = data.clone();
        nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(err(&header, &nan).contains("non-finite"));

        let dup = br#"{"__metadata__":{"arch":"mlp:1-1"},"0.bias":{},"0.bias":{}}"#;
        let mut f = (dup.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(dup);
        let msg = ModelParams::from_bytes(&f, None)
            .expect_err("dup")
            .to_string();
        assert!(msg.contains("duplicate key"), "{msg}");

        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            ModelParams::from_bytes(&huge, None),
            Err(SafetensorsError::HeaderLength { .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample("mlp:6-4-2").to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                ModelParams::from_bytes(&bytes[..cut], None).is_err(),
                "cut at {cut}"
            );
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ModelParams::from_bytes(&bytes, None);
        }

        #[test]
        fn flipped_bytes_never_panic(at in 0usize..400, bit in 0u8..8) {
            let mut bytes = sample("mlp:6-4-2").to_bytes();
            let i = at % bytes.len();
            bytes[i] ^= 1 << bit;
            let _ = ModelParams::from_bytes(&bytes, None);
        }

        #[test]
        fn random_headers_never_panic(json in "\\{[ -~]{0,120}\\}", data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut f = (json.len() as u64).to_le_bytes().to_vec();
            f.extend_from_slice(json.as_bytes());
            f.extend_from_slice(&data);
            let _ = ModelParams::from_bytes(&f, None);
        }
    }
}
