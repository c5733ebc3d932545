//! Architectures and the stages (volunteer slots) they split into.
//!
//! An [`Arch`] is a list of stages; each [`StageSpec`] is what one volunteer
//! slot holds: exactly one layer with parameters (a linear layer or a 2-D
//! convolution) and the parameter-free layers around it (flatten before it;
//! activations, pooling and flatten after it).
//!
//! Architectures are written three ways, all giving the same [`Arch`]:
//!
//! - `mlp:784-512-256-10`: linear layers between consecutive widths, ReLU
//!   after every one but the last;
//! - a built-in name: `lenet5`;
//! - `seq:` and the layers, stages separated by `|`, e.g.
//!   `seq:1x28x28|conv(6,5,p=2) relu maxpool(2)|flatten linear(10)`, or the
//!   same as a model file ([`Arch::from_model_file`], TOML or JSON).
//!
//! [`Arch`]'s `Display` gives the shortest of these forms, and parsing it
//! gives the same architecture back (the model map stores it so).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Largest width of a linear layer.
pub const MAX_DIM: usize = 1 << 16;
/// Largest number of stages in an architecture.
pub const MAX_STAGES: usize = 64;
/// Largest number of parameters in one stage.
pub const MAX_STAGE_PARAMS: usize = 1 << 26;
/// Largest number of layers in one stage.
pub const MAX_STAGE_LAYERS: usize = 8;
/// Most values per example anywhere in a stage (an image's channels ×
/// height × width).
pub const MAX_FEATURES: usize = 1 << 20;
/// Most channels of a convolution.
pub const MAX_CHANNELS: usize = 4096;
/// Largest kernel side (and stride) of a convolution or pooling layer.
pub const MAX_KERNEL: usize = 32;
/// Largest height or width of an image.
pub const MAX_SIDE: usize = 4096;
/// Most values per example a convolution unfolds its input into (output
/// positions × input channels × kernel area).
pub const MAX_UNFOLDED: usize = 1 << 24;
/// Largest model file read.
pub const MAX_MODEL_FILE: u64 = 1 << 20;

/// Errors in architecture strings, model files and stage descriptions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "architecture {input:?}: expected `mlp:<in>-<hidden>-...-<out>` (e.g. `mlp:784-512-256-10`), \
         `lenet5`, or `seq:<input>|<layers>|...` (e.g. `seq:1x28x28|conv(6,5,p=2) relu maxpool(2)|flatten linear(10)`)"
    )]
    BadFormat { input: String },
    #[error("architecture {input:?}: unknown kind {kind:?} (supported: mlp, seq, lenet5)")]
    UnknownKind { input: String, kind: String },
    #[error("architecture {input:?}: {token:?} is not a layer width (a positive integer)")]
    BadDim { input: String, token: String },
    #[error("architecture {input:?}: needs at least an input and an output width")]
    TooShallow { input: String },
    #[error("too many stages: {got} (limit {MAX_STAGES})")]
    TooDeep { got: usize },
    #[error("layer width {got} is out of range 1..={MAX_DIM}")]
    DimOutOfRange { got: usize },
    #[error("stage has {got} parameters (limit {MAX_STAGE_PARAMS})")]
    TooManyParams { got: usize },
    #[error("invalid stage: {0}")]
    BadStage(String),
    #[error("invalid optimizer: {0}")]
    BadOptimizer(String),
    #[error("architecture {input:?}: layer {token:?}: {why}")]
    BadLayer {
        input: String,
        token: String,
        why: String,
    },
    #[error("stage {stage} takes {takes} values per example, stage {previous} gives {gives}")]
    Mismatch {
        previous: usize,
        stage: usize,
        gives: String,
        takes: String,
    },
    #[error("model file {path}: {why}")]
    ModelFile { path: String, why: String },
}

/// One layer operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LayerSpec {
    /// `y = x W^T + b`, `W` is `[outputs, inputs]`.
    Linear {
        inputs: usize,
        outputs: usize,
    },
    Relu,
    Tanh,
    /// Flattens all but the batch dimension: `[N, C, H, W]` to
    /// `[N, C·H·W]` (the values stay where they are).
    Flatten,
    /// 2-D convolution over a `[N, in_channels, height, width]` input with
    /// a square kernel, PyTorch's `nn.Conv2d`: weight `[out_channels,
    /// in_channels, kernel, kernel]`, zero padding on every side, and a
    /// bias per output channel when `bias` is set.
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        /// The input's height and width.
        height: usize,
        width: usize,
    },
    /// The largest value of each `kernel × kernel` window, windows
    /// `stride` apart, no padding (PyTorch's `nn.MaxPool2d`).
    MaxPool2d {
        kernel: usize,
        stride: usize,
    },
    /// The mean of each window (PyTorch's `nn.AvgPool2d`, no padding).
    AvgPool2d {
        kernel: usize,
        stride: usize,
    },
}

/// The values of one example at some point of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Features {
    /// A vector of this many values.
    Flat(usize),
    /// An image, channels first (`[channels, height, width]`).
    Image {
        channels: usize,
        height: usize,
        width: usize,
    },
}

impl Features {
    /// Number of values.
    pub fn len(&self) -> usize {
        match *self {
            Features::Flat(n) => n,
            Features::Image {
                channels,
                height,
                width,
            } => channels * height * width,
        }
    }

    /// Never true for a valid stage; here for completeness.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape of one example (`[n]` or `[c, h, w]`).
    pub fn dims(&self) -> Vec<usize> {
        match *self {
            Features::Flat(n) => vec![n],
            Features::Image {
                channels,
                height,
                width,
            } => vec![channels, height, width],
        }
    }

    /// The shape of a batch of `rows` examples.
    pub fn batch_shape(&self, rows: usize) -> Vec<usize> {
        let mut s = Vec::with_capacity(4);
        s.push(rows);
        s.extend(self.dims());
        s
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Features::Flat(n) => write!(f, "{n}"),
            Features::Image {
                channels,
                height,
                width,
            } => write!(f, "{channels}x{height}x{width}"),
        }
    }
}

/// Output side of a window of `kernel` moved `stride` at a time over
/// `side + 2·padding` values (`None` when the window does not fit).
fn window_out(side: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    let span = side.checked_add(padding.checked_mul(2)?)?;
    if stride == 0 || kernel == 0 || span < kernel {
        return None;
    }
    Some((span - kernel) / stride + 1)
}

/// What one volunteer slot holds: one layer with parameters (linear or
/// convolution) and the parameter-free layers around it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StageSpec {
    pub layers: Vec<LayerSpec>,
}

/// A stage's shapes, worked out by [`StageSpec::walk`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Walk {
    input: Features,
    output: Features,
    /// Values per example of the convolution's unfolded input (0 without
    /// a convolution).
    unfolded: usize,
    /// Values per example of every layer's output, summed.
    activations: usize,
    /// What one example looks like after each layer (`None` for a flatten
    /// before the layer with parameters).
    after: Vec<Option<Features>>,
}

impl StageSpec {
    /// Checks the shape rules: flattens, then exactly one linear or
    /// convolution layer, then activations, pooling and flattens; every
    /// size within its limit, every window fitting its input.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.walk().map(|_| ())
    }

    fn walk(&self) -> Result<Walk, SpecError> {
        let bad = |m: String| Err(SpecError::BadStage(m));
        if self.layers.is_empty() || self.layers.len() > MAX_STAGE_LAYERS {
            return bad(format!(
                "{} layers (expected 1..={MAX_STAGE_LAYERS})",
                self.layers.len()
            ));
        }
        let mut input = None;
        let mut cur: Option<Features> = None;
        let mut flattened = false;
        let mut unfolded = 0;
        let mut activations = 0usize;
        let mut after = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let Some(now) = cur else {
                // Before the layer with parameters.
                match *layer {
                    LayerSpec::Flatten => flattened = true,
                    LayerSpec::Linear { inputs, outputs } => {
                        check_dim(inputs)?;
                        check_dim(outputs)?;
                        let params = inputs * outputs + outputs;
                        if params > MAX_STAGE_PARAMS {
                            return Err(SpecError::TooManyParams { got: params });
                        }
                        input = Some(Features::Flat(inputs));
                        cur = Some(Features::Flat(outputs));
                    }
                    LayerSpec::Conv2d {
                        in_channels,
                        out_channels,
                        kernel,
                        stride,
                        padding,
                        bias,
                        height,
                        width,
                    } => {
                        if flattened {
                            return bad("flatten before a convolution".into());
                        }
                        let (i, o) = conv_shapes(
                            in_channels,
                            out_channels,
                            kernel,
                            stride,
                            padding,
                            height,
                            width,
                        )?;
                        let k = in_channels * kernel * kernel;
                        let params = out_channels * k + if bias { out_channels } else { 0 };
                        if params > MAX_STAGE_PARAMS {
                            return Err(SpecError::TooManyParams { got: params });
                        }
                        unfolded = k * (o.len() / out_channels);
                        if unfolded > MAX_UNFOLDED {
                            return bad(format!(
                                "the convolution unfolds each example into {unfolded} values (limit {MAX_UNFOLDED})"
                            ));
                        }
                        input = Some(i);
                        cur = Some(o);
                    }
                    LayerSpec::Relu | LayerSpec::Tanh => {
                        return bad("activation before the linear or convolution layer".into())
                    }
                    LayerSpec::MaxPool2d { .. } | LayerSpec::AvgPool2d { .. } => {
                        return bad("pooling before the linear or convolution layer".into())
                    }
                }
                if let Some(o) = cur {
                    activations += o.len();
                }
                after.push(cur);
                continue;
            };
            let next = match *layer {
                LayerSpec::Linear { .. } | LayerSpec::Conv2d { .. } => {
                    return bad(
                        "more than one layer with parameters (linear or convolution)".into(),
                    )
                }
                LayerSpec::Relu | LayerSpec::Tanh => now,
                LayerSpec::Flatten => Features::Flat(now.len()),
                LayerSpec::MaxPool2d { kernel, stride }
                | LayerSpec::AvgPool2d { kernel, stride } => {
                    let Features::Image {
                        channels,
                        height,
                        width,
                    } = now
                    else {
                        return bad(
                            "pooling needs an image ([channels, height, width]), not a vector"
                                .into(),
                        );
                    };
                    if !(1..=MAX_KERNEL).contains(&kernel) || !(1..=MAX_KERNEL).contains(&stride) {
                        return bad(format!(
                            "pooling kernel {kernel} and stride {stride} must be in 1..={MAX_KERNEL}"
                        ));
                    }
                    match (
                        window_out(height, kernel, stride, 0),
                        window_out(width, kernel, stride, 0),
                    ) {
                        (Some(h), Some(w)) => Features::Image {
                            channels,
                            height: h,
                            width: w,
                        },
                        _ => {
                            return bad(format!(
                                "a {kernel}x{kernel} pooling window does not fit a {height}x{width} image"
                            ))
                        }
                    }
                }
            };
            activations += next.len();
            cur = Some(next);
            after.push(cur);
        }
        match (input, cur) {
            (Some(input), Some(output)) => Ok(Walk {
                input,
                output,
                unfolded,
                activations,
                after,
            }),
            _ => bad("no linear or convolution layer".into()),
        }
    }

    /// Values per example going in (0 for an invalid stage).
    pub fn input_dim(&self) -> usize {
        self.walk().map_or(0, |w| w.input.len())
    }

    /// Values per example coming out (0 for an invalid stage).
    pub fn output_dim(&self) -> usize {
        self.walk().map_or(0, |w| w.output.len())
    }

    /// What one example looks like going in (`Flat(0)` for an invalid stage).
    pub fn input_features(&self) -> Features {
        self.walk().map_or(Features::Flat(0), |w| w.input)
    }

    /// What one example looks like coming out (`Flat(0)` for an invalid stage).
    pub fn output_features(&self) -> Features {
        self.walk().map_or(Features::Flat(0), |w| w.output)
    }

    /// Values per example a training pass keeps besides its input: every
    /// layer's output, and a convolution's unfolded input (0 for an
    /// invalid stage). Memory budgets count it.
    pub fn work_per_example(&self) -> usize {
        self.walk().map_or(0, |w| w.activations + w.unfolded)
    }

    /// What one example looks like after each layer, in order: `None`
    /// for a flatten before the layer with parameters (empty for an
    /// invalid stage).
    pub(crate) fn layer_outputs(&self) -> Vec<Option<Features>> {
        self.walk().map_or_else(|_| Vec::new(), |w| w.after)
    }

    /// The layer with parameters.
    pub(crate) fn param_layer(&self) -> Option<LayerSpec> {
        self.layers
            .iter()
            .copied()
            .find(|l| matches!(l, LayerSpec::Linear { .. } | LayerSpec::Conv2d { .. }))
    }

    /// True when the stage's parameter layer is a convolution.
    pub fn is_conv(&self) -> bool {
        matches!(self.param_layer(), Some(LayerSpec::Conv2d { .. }))
    }

    /// The weight's shape in PyTorch's layout: `[outputs, inputs]` for a
    /// linear layer, `[out, in, kernel, kernel]` for a convolution (empty
    /// for an invalid stage).
    pub fn weight_shape(&self) -> Vec<usize> {
        match self.param_layer() {
            Some(LayerSpec::Linear { inputs, outputs }) => vec![outputs, inputs],
            Some(LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            }) => vec![out_channels, in_channels, kernel, kernel],
            _ => vec![],
        }
    }

    /// Values in the weight.
    pub fn weight_len(&self) -> usize {
        let s = self.weight_shape();
        if s.is_empty() {
            0
        } else {
            s.iter().product()
        }
    }

    /// Values in the bias (0 for a convolution without one).
    pub fn bias_len(&self) -> usize {
        match self.param_layer() {
            Some(LayerSpec::Linear { outputs, .. }) => outputs,
            Some(LayerSpec::Conv2d {
                out_channels,
                bias: true,
                ..
            }) => out_channels,
            _ => 0,
        }
    }

    /// Fan-in of the parameter layer (inputs, or in_channels·kernel²):
    /// initial values are uniform in `±1/sqrt(fan_in)`.
    pub fn fan_in(&self) -> usize {
        match self.param_layer() {
            Some(LayerSpec::Linear { inputs, .. }) => inputs,
            Some(LayerSpec::Conv2d {
                in_channels,
                kernel,
                ..
            }) => in_channels * kernel * kernel,
            _ => 0,
        }
    }

    /// True when the stage ends with a ReLU: wherever its output is `+0.0`
    /// the ReLU was inactive, so the gradient there never reaches the
    /// parameters (see [`crate::InputGrad::SkipZeroInputs`]).
    pub fn ends_with_relu(&self) -> bool {
        matches!(self.layers.last(), Some(LayerSpec::Relu))
    }

    /// Number of trainable parameters (weight and bias).
    pub fn param_count(&self) -> usize {
        self.weight_len() + self.bias_len()
    }
}

/// Input and output of a convolution, after checking its sizes.
fn conv_shapes(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    height: usize,
    width: usize,
) -> Result<(Features, Features), SpecError> {
    let bad = |m: String| Err(SpecError::BadStage(m));
    if !(1..=MAX_CHANNELS).contains(&in_channels) || !(1..=MAX_CHANNELS).contains(&out_channels) {
        return bad(format!(
            "convolution channels {in_channels}->{out_channels} must be in 1..={MAX_CHANNELS}"
        ));
    }
    if !(1..=MAX_KERNEL).contains(&kernel) || !(1..=MAX_KERNEL).contains(&stride) {
        return bad(format!(
            "convolution kernel {kernel} and stride {stride} must be in 1..={MAX_KERNEL}"
        ));
    }
    if padding >= kernel {
        return bad(format!(
            "convolution padding {padding} must be smaller than its kernel {kernel}"
        ));
    }
    if !(1..=MAX_SIDE).contains(&height) || !(1..=MAX_SIDE).contains(&width) {
        return bad(format!(
            "image side {height}x{width} must be in 1..={MAX_SIDE}"
        ));
    }
    let input = Features::Image {
        channels: in_channels,
        height,
        width,
    };
    if input.len() > MAX_FEATURES {
        return bad(format!(
            "a {input} image has {} values (limit {MAX_FEATURES})",
            input.len()
        ));
    }
    let (Some(h), Some(w)) = (
        window_out(height, kernel, stride, padding),
        window_out(width, kernel, stride, padding),
    ) else {
        return bad(format!(
            "a {kernel}x{kernel} kernel does not fit a {height}x{width} image padded by {padding}"
        ));
    };
    let output = Features::Image {
        channels: out_channels,
        height: h,
        width: w,
    };
    if output.len() > MAX_FEATURES {
        return bad(format!(
            "the convolution gives {} values per example (limit {MAX_FEATURES})",
            output.len()
        ));
    }
    Ok((input, output))
}

fn check_dim(d: usize) -> Result<(), SpecError> {
    if d == 0 || d > MAX_DIM {
        Err(SpecError::DimOutOfRange { got: d })
    } else {
        Ok(())
    }
}

/// A whole model: its stages, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Arch {
    stages: Vec<StageSpec>,
}

/// LeNet-5 for 28×28 grey images, one stage per `|`.
const LENET5: &str = "seq:1x28x28|conv(6,5,p=2) relu maxpool(2)|conv(16,5) relu maxpool(2)|flatten linear(120) relu|linear(84) relu|linear(10)";

/// The built-in architectures by name, with what they are.
pub const BUILTIN: &[(&str, &str)] = &[(
    "lenet5",
    "conv(1->6, 5x5, padding 2) ReLU maxpool(2) | conv(6->16, 5x5) ReLU maxpool(2) | flatten linear(400->120) ReLU | linear(120->84) ReLU | linear(84->10)",
)];

impl Arch {
    /// Parses an architecture: `mlp:784-512-256-10`, a built-in name
    /// (`lenet5`), or `seq:<input>|<layers>|...` (see the module docs).
    pub fn parse(s: &str) -> Result<Arch, SpecError> {
        let t = s.trim();
        if t == "lenet5" {
            return Arch::parse_seq(LENET5, LENET5);
        }
        let (kind, rest) = t.split_once(':').ok_or_else(|| SpecError::BadFormat {
            input: s.to_string(),
        })?;
        match kind.trim() {
            "mlp" => Arch::parse_mlp(s, rest),
            "seq" => Arch::parse_seq(s, rest),
            other => Err(SpecError::UnknownKind {
                input: s.to_string(),
                kind: other.to_string(),
            }),
        }
    }

    fn parse_mlp(s: &str, rest: &str) -> Result<Arch, SpecError> {
        let input = s.to_string();
        let tokens: Vec<&str> = rest.split('-').collect();
        if tokens.len() > MAX_STAGES + 1 {
            return Err(SpecError::TooDeep {
                got: tokens.len() - 1,
            });
        }
        let mut dims = Vec::with_capacity(tokens.len());
        for tok in tokens {
            let d = parse_count(tok).ok_or_else(|| SpecError::BadDim {
                input: input.clone(),
                token: tok.to_string(),
            })?;
            check_dim(d)?;
            dims.push(d);
        }
        Arch::from_dims(dims).map_err(|e| match e {
            SpecError::TooShallow { .. } => SpecError::TooShallow {
                input: s.to_string(),
            },
            other => other,
        })
    }

    /// `<input>|<stage>|...` after `seq:`; `s` is the whole string, for
    /// error messages.
    fn parse_seq(s: &str, rest: &str) -> Result<Arch, SpecError> {
        let rest = rest.strip_prefix("seq:").unwrap_or(rest);
        let mut parts = rest.split('|');
        let head = parts.next().unwrap_or("").trim();
        let input = parse_input(head).ok_or_else(|| SpecError::BadLayer {
            input: s.to_string(),
            token: head.to_string(),
            why: "the input is `<features>` or `<channels>x<height>x<width>`, e.g. `784` or `1x28x28`"
                .into(),
        })?;
        let mut stages = Vec::new();
        for part in parts {
            if stages.len() >= MAX_STAGES {
                return Err(SpecError::TooDeep {
                    got: rest.split('|').count() - 1,
                });
            }
            let tokens = split_layers(part).map_err(|why| SpecError::BadLayer {
                input: s.to_string(),
                token: part.trim().to_string(),
                why,
            })?;
            if tokens.len() > MAX_STAGE_LAYERS {
                return Err(SpecError::BadStage(format!(
                    "{} layers (expected 1..={MAX_STAGE_LAYERS})",
                    tokens.len()
                )));
            }
            let mut layers = Vec::with_capacity(tokens.len());
            for tok in tokens {
                let desc = LayerDesc::parse(tok).map_err(|why| SpecError::BadLayer {
                    input: s.to_string(),
                    token: tok.to_string(),
                    why,
                })?;
                layers.push(desc);
            }
            stages.push(layers);
        }
        if stages.is_empty() {
            return Err(SpecError::BadFormat {
                input: s.to_string(),
            });
        }
        Arch::build(input, &stages).map_err(|(stage, layer, why)| SpecError::BadLayer {
            input: s.to_string(),
            token: format!("stage {stage}, layer {layer}"),
            why,
        })
    }

    /// Reads a model file: TOML, or JSON when the name ends in `.json`.
    /// It gives the input's shape and each stage's layers:
    ///
    /// ```toml
    /// input = [1, 28, 28]
    /// [[stage]]
    /// layers = [{ op = "conv2d", out_channels = 6, kernel = 5, padding = 2 },
    ///           { op = "relu" }, { op = "maxpool2d", kernel = 2 }]
    /// [[stage]]
    /// layers = [{ op = "flatten" }, { op = "linear", outputs = 10 }]
    /// ```
    pub fn from_model_file(path: &Path) -> Result<Arch, SpecError> {
        use std::io::Read;
        let err = |why: String| SpecError::ModelFile {
            path: path.display().to_string(),
            why,
        };
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let mut text = String::new();
        file.take(MAX_MODEL_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| err(e.to_string()))?;
        if text.len() as u64 > MAX_MODEL_FILE {
            return Err(err(format!("larger than {MAX_MODEL_FILE} bytes")));
        }
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Arch::from_model_text(&text, json).map_err(err)
    }

    /// [`Arch::from_model_file`] on text already read.
    pub fn from_model_text(text: &str, json: bool) -> Result<Arch, String> {
        let file: ModelFile = if json {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            toml::from_str(text).map_err(|e| e.to_string())?
        };
        let input = match file.input.as_slice() {
            [n] => Features::Flat(*n),
            [c, h, w] => Features::Image {
                channels: *c,
                height: *h,
                width: *w,
            },
            other => {
                return Err(format!(
                    "input {other:?}: expected [features] or [channels, height, width]"
                ))
            }
        };
        if input.is_empty() || input.len() > MAX_FEATURES {
            return Err(format!(
                "input {:?} must have 1..={MAX_FEATURES} values",
                file.input
            ));
        }
        if file.stage.is_empty() {
            return Err("no [[stage]]".into());
        }
        if file.stage.len() > MAX_STAGES {
            return Err(SpecError::TooDeep {
                got: file.stage.len(),
            }
            .to_string());
        }
        let stages: Vec<Vec<LayerDesc>> = file.stage.into_iter().map(|s| s.layers).collect();
        Arch::build(input, &stages)
            .map_err(|(stage, layer, why)| format!("stage {stage}, layer {layer}: {why}"))
    }

    /// The stages of `layers`, each layer's inputs worked out from the one
    /// before; errors name the stage and layer (from 0).
    fn build(input: Features, layers: &[Vec<LayerDesc>]) -> Result<Arch, (usize, usize, String)> {
        let mut cur = input;
        let mut stages = Vec::with_capacity(layers.len());
        for (si, descs) in layers.iter().enumerate() {
            let mut stage = Vec::with_capacity(descs.len());
            let mut before_params = true;
            for (li, d) in descs.iter().enumerate() {
                let fail = |why: String| (si, li, why);
                let spec = if before_params {
                    d.resolve(cur).map_err(fail)?
                } else {
                    d.resolve_after().map_err(fail)?
                };
                if matches!(spec, LayerSpec::Flatten) && before_params {
                    cur = Features::Flat(cur.len());
                }
                if matches!(spec, LayerSpec::Linear { .. } | LayerSpec::Conv2d { .. }) {
                    before_params = false;
                }
                stage.push(spec);
            }
            let spec = StageSpec { layers: stage };
            let walk = spec
                .walk()
                .map_err(|e| (si, descs.len().saturating_sub(1), e.to_string()))?;
            cur = walk.output;
            stages.push(spec);
        }
        Arch::from_stages(stages).map_err(|e| (layers.len(), 0, e.to_string()))
    }

    /// An architecture from its stages, each valid and each taking what
    /// the one before gives.
    pub fn from_stages(stages: Vec<StageSpec>) -> Result<Arch, SpecError> {
        if stages.is_empty() {
            return Err(SpecError::BadStage("an architecture needs a stage".into()));
        }
        if stages.len() > MAX_STAGES {
            return Err(SpecError::TooDeep { got: stages.len() });
        }
        let mut previous: Option<Features> = None;
        for (i, stage) in stages.iter().enumerate() {
            let walk = stage.walk()?;
            if let Some(gives) = previous {
                let conv_first = stage.is_conv();
                let fits = gives.len() == walk.input.len()
                    && (!conv_first
                        || !matches!(gives, Features::Image { .. })
                        || gives == walk.input);
                if !fits {
                    return Err(SpecError::Mismatch {
                        previous: i - 1,
                        stage: i,
                        gives: gives.to_string(),
                        takes: walk.input.to_string(),
                    });
                }
            }
            previous = Some(walk.output);
        }
        Ok(Arch { stages })
    }

    /// An MLP with the given widths (input first, output last).
    pub fn from_dims(dims: Vec<usize>) -> Result<Arch, SpecError> {
        if dims.len() < 2 {
            return Err(SpecError::TooShallow {
                input: format!("{dims:?}"),
            });
        }
        if dims.len() > MAX_STAGES + 1 {
            return Err(SpecError::TooDeep {
                got: dims.len() - 1,
            });
        }
        let n = dims.len() - 1;
        let stages = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let mut layers = vec![LayerSpec::Linear {
                    inputs: w[0],
                    outputs: w[1],
                }];
                if i + 1 < n {
                    layers.push(LayerSpec::Relu);
                }
                StageSpec { layers }
            })
            .collect();
        Arch::from_stages(stages)
    }

    /// The widths when this is an MLP as `mlp:` writes it (linear and ReLU
    /// per stage, the last without ReLU).
    fn mlp_dims(&self) -> Option<Vec<usize>> {
        let n = self.stages.len();
        let mut dims = Vec::with_capacity(n + 1);
        for (i, s) in self.stages.iter().enumerate() {
            let LayerSpec::Linear { inputs, outputs } = *s.layers.first()? else {
                return None;
            };
            let want = if i + 1 < n { 2 } else { 1 };
            if s.layers.len() != want || (want == 2 && s.layers[1] != LayerSpec::Relu) {
                return None;
            }
            if dims.is_empty() {
                dims.push(inputs);
            }
            dims.push(outputs);
        }
        Some(dims)
    }

    /// Features per example of the model's input.
    pub fn input_dim(&self) -> usize {
        self.stages[0].input_dim()
    }

    /// What one example looks like going in.
    pub fn input_features(&self) -> Features {
        self.stages[0].input_features()
    }

    pub fn output_dim(&self) -> usize {
        self.stages[self.stages.len() - 1].output_dim()
    }

    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    /// Total trainable parameters.
    pub fn param_count(&self) -> usize {
        self.stages.iter().map(StageSpec::param_count).sum()
    }

    /// The stages in order; each is one volunteer slot.
    pub fn stages(&self) -> Vec<StageSpec> {
        self.stages.clone()
    }

    /// The `seq:` form, which every architecture has.
    pub fn to_seq(&self) -> String {
        let mut s = format!("seq:{}", self.input_features());
        for stage in &self.stages {
            s.push('|');
            let mut first = true;
            for layer in &stage.layers {
                if !first {
                    s.push(' ');
                }
                first = false;
                s.push_str(&layer_token(layer));
            }
        }
        s
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(dims) = self.mlp_dims() {
            f.write_str("mlp:")?;
            for (i, d) in dims.iter().enumerate() {
                if i > 0 {
                    f.write_str("-")?;
                }
                write!(f, "{d}")?;
            }
            return Ok(());
        }
        let seq = self.to_seq();
        for (name, _) in BUILTIN {
            if Arch::parse(name).is_ok_and(|b| b.to_seq() == seq) {
                return f.write_str(name);
            }
        }
        f.write_str(&seq)
    }
}

impl FromStr for Arch {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::parse(s)
    }
}

impl TryFrom<String> for Arch {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Arch::parse(&s)
    }
}

impl From<Arch> for String {
    fn from(a: Arch) -> String {
        a.to_string()
    }
}

/// A model file ([`Arch::from_model_file`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    /// `[features]` or `[channels, height, width]`.
    input: Vec<usize>,
    #[serde(alias = "stages")]
    stage: Vec<FileStage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStage {
    layers: Vec<LayerDesc>,
}

/// A layer as a model file or a `seq:` string gives it: sizes that follow
/// from the layer before may be left out.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum LayerDesc {
    Linear {
        outputs: usize,
        #[serde(default)]
        inputs: Option<usize>,
    },
    Conv2d {
        out_channels: usize,
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
        #[serde(default = "yes")]
        bias: bool,
        #[serde(default)]
        in_channels: Option<usize>,
    },
    Maxpool2d {
        kernel: usize,
        #[serde(default)]
        stride: Option<usize>,
    },
    Avgpool2d {
        kernel: usize,
        #[serde(default)]
        stride: Option<usize>,
    },
    Relu,
    Tanh,
    Flatten,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

impl LayerDesc {
    /// `linear(10)`, `conv(6,5,p=2)`, `maxpool(2)`, `relu`, ...
    fn parse(tok: &str) -> Result<LayerDesc, String> {
        let tok = tok.trim();
        let (name, args) = match tok.split_once('(') {
            Some((name, rest)) => {
                let args = rest
                    .strip_suffix(')')
                    .ok_or_else(|| "missing `)`".to_string())?;
                (name.trim(), Some(args))
            }
            None => (tok, None),
        };
        let mut positional = Vec::new();
        let mut named: Vec<(&str, &str)> = Vec::new();
        for arg in args.into_iter().flat_map(|a| a.split(',')) {
            let arg = arg.trim();
            if arg.is_empty() {
                continue;
            }
            match arg.split_once('=') {
                Some((k, v)) => named.push((k.trim(), v.trim())),
                None if named.is_empty() => positional.push(arg),
                None => return Err(format!("{arg:?} comes after a named argument")),
            }
        }
        let count =
            |v: &str| parse_count(v).ok_or_else(|| format!("{v:?} is not a positive integer"));
        let mut take = |keys: &[&str]| -> Option<&str> {
            let i = named.iter().position(|(k, _)| keys.contains(k))?;
            Some(named.remove(i).1)
        };
        let no_args = |d: LayerDesc| match args {
            Some(a) if !a.trim().is_empty() => Err(format!("{name} takes no arguments")),
            _ => Ok(d),
        };
        let desc = match name {
            "relu" => return no_args(LayerDesc::Relu),
            "tanh" => return no_args(LayerDesc::Tanh),
            "flatten" => return no_args(LayerDesc::Flatten),
            "linear" => {
                let [outputs] = positional[..] else {
                    return Err("expected linear(<outputs>[,in=<inputs>])".into());
                };
                LayerDesc::Linear {
                    outputs: count(outputs)?,
                    inputs: take(&["in", "inputs"]).map(count).transpose()?,
                }
            }
            "conv" | "conv2d" => {
                let [out, kernel] = positional[..] else {
                    return Err(
                        "expected conv(<out_channels>,<kernel>[,s=<stride>][,p=<padding>][,bias=false])"
                            .into(),
                    );
                };
                let stride = take(&["s", "stride"]).map(count).transpose()?.unwrap_or(1);
                let padding = match take(&["p", "padding"]) {
                    Some("0") => 0,
                    Some(v) => count(v)?,
                    None => 0,
                };
                let bias = match take(&["bias"]) {
                    None | Some("true") => true,
                    Some("false") => false,
                    Some(v) => return Err(format!("bias={v}: expected true or false")),
                };
                LayerDesc::Conv2d {
                    out_channels: count(out)?,
                    kernel: count(kernel)?,
                    stride,
                    padding,
                    bias,
                    in_channels: take(&["in", "in_channels"]).map(count).transpose()?,
                }
            }
            "maxpool" | "maxpool2d" | "avgpool" | "avgpool2d" => {
                let [kernel] = positional[..] else {
                    return Err(format!("expected {name}(<kernel>[,s=<stride>])"));
                };
                let kernel = count(kernel)?;
                let stride = take(&["s", "stride"]).map(count).transpose()?;
                if name.starts_with("max") {
                    LayerDesc::Maxpool2d { kernel, stride }
                } else {
                    LayerDesc::Avgpool2d { kernel, stride }
                }
            }
            other => {
                return Err(format!(
                    "unknown layer {other:?} (known: linear, conv, maxpool, avgpool, relu, tanh, flatten)"
                ))
            }
        };
        if let Some((k, _)) = named.first() {
            return Err(format!("unknown argument {k:?}"));
        }
        Ok(desc)
    }

    /// The layer, given what comes into it, before the stage's layer with
    /// parameters.
    fn resolve(&self, cur: Features) -> Result<LayerSpec, String> {
        match *self {
            LayerDesc::Linear { outputs, inputs } => {
                let Features::Flat(n) = cur else {
                    return Err(format!(
                        "a linear layer takes a vector, and a {cur} image comes in: put `flatten` before it"
                    ));
                };
                if inputs.is_some_and(|i| i != n) {
                    return Err(format!(
                        "says {} inputs, and {n} come in",
                        inputs.unwrap_or(0)
                    ));
                }
                Ok(LayerSpec::Linear { inputs: n, outputs })
            }
            LayerDesc::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
                bias,
                in_channels,
            } => {
                let Features::Image {
                    channels,
                    height,
                    width,
                } = cur
                else {
                    return Err(format!(
                        "a convolution takes an image, and a vector of {cur} comes in (give the input as <channels>x<height>x<width>)"
                    ));
                };
                if in_channels.is_some_and(|i| i != channels) {
                    return Err(format!(
                        "says {} input channels, and {channels} come in",
                        in_channels.unwrap_or(0)
                    ));
                }
                Ok(LayerSpec::Conv2d {
                    in_channels: channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    bias,
                    height,
                    width,
                })
            }
            _ => self.resolve_after(),
        }
    }

    /// The layer after the stage's layer with parameters (or a layer that
    /// needs no sizes).
    fn resolve_after(&self) -> Result<LayerSpec, String> {
        Ok(match *self {
            LayerDesc::Relu => LayerSpec::Relu,
            LayerDesc::Tanh => LayerSpec::Tanh,
            LayerDesc::Flatten => LayerSpec::Flatten,
            LayerDesc::Maxpool2d { kernel, stride } => LayerSpec::MaxPool2d {
                kernel,
                stride: stride.unwrap_or(kernel),
            },
            LayerDesc::Avgpool2d { kernel, stride } => LayerSpec::AvgPool2d {
                kernel,
                stride: stride.unwrap_or(kernel),
            },
            LayerDesc::Linear { .. } | LayerDesc::Conv2d { .. } => {
                return Err(
                    "a stage holds one layer with parameters (linear or convolution); start a new stage with `|`"
                        .into(),
                )
            }
        })
    }
}

/// The `seq:` token of a layer (sizes that follow from the input left out).
fn layer_token(layer: &LayerSpec) -> String {
    match *layer {
        LayerSpec::Linear { outputs, .. } => format!("linear({outputs})"),
        LayerSpec::Relu => "relu".into(),
        LayerSpec::Tanh => "tanh".into(),
        LayerSpec::Flatten => "flatten".into(),
        LayerSpec::Conv2d {
            out_channels,
            kernel,
            stride,
            padding,
            bias,
            ..
        } => {
            let mut s = format!("conv({out_channels},{kernel}");
            if stride != 1 {
                s.push_str(&format!(",s={stride}"));
            }
            if padding != 0 {
                s.push_str(&format!(",p={padding}"));
            }
            if !bias {
                s.push_str(",bias=false");
            }
            s.push(')');
            s
        }
        LayerSpec::MaxPool2d { kernel, stride } | LayerSpec::AvgPool2d { kernel, stride } => {
            let name = if matches!(layer, LayerSpec::MaxPool2d { .. }) {
                "maxpool"
            } else {
                "avgpool"
            };
            if stride == kernel {
                format!("{name}({kernel})")
            } else {
                format!("{name}({kernel},s={stride})")
            }
        }
    }
}

/// The layers of one `seq:` stage: tokens separated by spaces outside
/// parentheses.
fn split_layers(part: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = None;
    for (i, c) in part.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced `)`")?,
            c if c.is_whitespace() && depth == 0 => {
                if let Some(s) = start.take() {
                    out.push(&part[s..i]);
                }
                continue;
            }
            _ => {}
        }
        if start.is_none() {
            start = Some(i);
        }
    }
    if depth != 0 {
        return Err("unbalanced `(`".into());
    }
    if let Some(s) = start {
        out.push(&part[s..]);
    }
    if out.is_empty() {
        return Err("an empty stage".into());
    }
    Ok(out)
}

/// `784` or `1x28x28`.
fn parse_input(s: &str) -> Option<Features> {
    let dims: Vec<usize> = s.split('x').map(parse_count).collect::<Option<_>>()?;
    let f = match dims[..] {
        [n] => Features::Flat(n),
        [c, h, w] => Features::Image {
            channels: c,
            height: h,
            width: w,
        },
        _ => return None,
    };
    (f.len() <= MAX_FEATURES).then_some(f)
}

/// A positive decimal integer of at most 9 digits.
fn parse_count(tok: &str) -> Option<usize> {
    let t = tok.trim();
    let ok = !t.is_empty() && t.len() <= 9 && t.bytes().all(|b| b.is_ascii_digit());
    t.parse().ok().filter(|&n| ok && n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let a = Arch::parse("mlp:784-512-256-10").expect("valid");
        assert_eq!(a.to_string(), "mlp:784-512-256-10");
        assert_eq!(a.input_dim(), 784);
        assert_eq!(a.output_dim(), 10);
        let stages = a.stages();
        assert_eq!(stages.len(), 3);
        assert_eq!(
            stages[0].layers,
            vec![
                LayerSpec::Linear {
                    inputs: 784,
                    outputs: 512
                },
                LayerSpec::Relu
            ]
        );
        assert_eq!(
            stages[2].layers,
            vec![LayerSpec::Linear {
                inputs: 256,
                outputs: 10
            }]
        );
        assert_eq!(stages[1].param_count(), 512 * 256 + 256);
        assert_eq!(
            a.param_count(),
            784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10
        );
        for s in &stages {
            s.validate().expect("valid stage");
        }
        assert_eq!(Arch::parse("mlp:4-2").expect("valid").num_stages(), 1);
        // The same MLP written as layers displays as `mlp:`.
        let seq = Arch::parse("seq:784|linear(512) relu|linear(256) relu|linear(10)").expect("seq");
        assert_eq!(seq, a);
        assert_eq!(seq.to_string(), "mlp:784-512-256-10");
    }

    #[test]
    fn rejects_bad_strings() {
        let bad = [
            "",
            "mlp",
            "784-10",
            "cnn:784-10",
            "mlp:",
            "mlp:784",
            "mlp:784--10",
            "mlp:784-0-10",
            "mlp:784-x-10",
            "mlp:784-+5-10",
            "mlp:784-10-",
            "mlp:-784-10",
            "mlp:784-99999999999999999999-10",
            "mlp:784-65537-10",
            "mlp:65536-65536",
            "lenet",
            "seq:",
            "seq:784",
            "seq:1x28x28|",
            "seq:1x28x28|linear(10)",
            "seq:784|conv(6,5)",
            "seq:1x28x28|conv(6,5) linear(10)",
            "seq:1x28x28|conv(6,5) relu maxpool(30)",
            "seq:1x28x28|conv(6,29)",
            "seq:1x28x28|conv(6,5,p=5)",
            "seq:1x28x28|conv(6,5,q=1)",
            "seq:1x28x28|conv(6)",
            "seq:1x28x28|conv(6,5,in=3)",
            "seq:1x28x28|relu conv(6,5)",
            "seq:1x28x28|conv(6,5 relu",
            "seq:1x28x28|flatten conv(6,5)",
            "seq:784|linear(10) maxpool(2)",
            "seq:784|linear(10) softmax",
            "seq:2x2|linear(4)",
            "seq:1x28x28|conv(6,5)|linear(10)",
            "seq:1x28x28|conv(6,5,bias=maybe)",
        ];
        for s in bad {
            assert!(Arch::parse(s).is_err(), "{s:?} should be rejected");
        }
        let deep = format!("mlp:{}", vec!["8"; MAX_STAGES + 2].join("-"));
        assert!(matches!(Arch::parse(&deep), Err(SpecError::TooDeep { .. })));
        let ok_deep = format!("mlp:{}", vec!["8"; MAX_STAGES + 1].join("-"));
        assert!(Arch::parse(&ok_deep).is_ok());
        let msg = Arch::parse("mlp:784-x-10").expect_err("bad").to_string();
        assert!(msg.contains("\"x\""), "{msg}");
        let msg = Arch::parse("seq:1x28x28|conv(6,5)|linear(10)")
            .expect_err("no flatten")
            .to_string();
        assert!(msg.contains("flatten"), "{msg}");
    }

    #[test]
    fn lenet5_has_the_documented_stages() {
        let a = Arch::parse("lenet5").expect("lenet5");
        assert_eq!(a.to_string(), "lenet5");
        assert_eq!(a.num_stages(), 5);
        assert_eq!(
            a.input_features(),
            Features::Image {
                channels: 1,
                height: 28,
                width: 28
            }
        );
        let s = a.stages();
        assert_eq!(s[0].output_features().dims(), vec![6, 14, 14]);
        assert_eq!(s[1].output_features().dims(), vec![16, 5, 5]);
        assert_eq!(s[2].input_dim(), 400);
        assert_eq!(s[2].output_dim(), 120);
        assert_eq!(s[4].output_dim(), 10);
        assert_eq!(s[0].weight_shape(), vec![6, 1, 5, 5]);
        assert_eq!(s[1].weight_shape(), vec![16, 6, 5, 5]);
        assert_eq!(s[1].fan_in(), 150);
        let dims = |st: &StageSpec| -> Vec<Option<Vec<usize>>> {
            st.layer_outputs()
                .iter()
                .map(|f| f.map(|f| f.dims()))
                .collect()
        };
        assert_eq!(
            dims(&s[0]),
            vec![
                Some(vec![6, 28, 28]),
                Some(vec![6, 28, 28]),
                Some(vec![6, 14, 14])
            ]
        );
        assert_eq!(dims(&s[2]), vec![None, Some(vec![120]), Some(vec![120])]);
        let params = [156, 2416, 48120, 10164, 850];
        for (stage, want) in s.iter().zip(params) {
            assert_eq!(stage.param_count(), want);
        }
        assert_eq!(a.param_count(), 61706);
        assert_eq!(
            s[0].layers[0],
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 6,
                kernel: 5,
                stride: 1,
                padding: 2,
                bias: true,
                height: 28,
                width: 28
            }
        );
        // Its `seq:` form parses back to it, and displays by name.
        let back = Arch::parse(&a.to_seq()).expect("seq form");
        assert_eq!(back, a);
        assert_eq!(back.to_string(), "lenet5");
    }

    #[test]
    fn seq_forms_round_trip() {
        for s in [
            "seq:3x32x32|conv(8,3,s=2,p=1,bias=false) tanh avgpool(3,s=2)|conv(4,3) relu maxpool(2,s=1) flatten|linear(7)",
            "seq:1x8x8|conv(2,3)|conv(2,3) relu|flatten linear(5) tanh",
            "seq:16|linear(8) tanh|linear(3)",
        ] {
            let a = Arch::parse(s).expect(s);
            assert_eq!(a.to_string(), s);
            assert_eq!(Arch::parse(&a.to_string()).expect("again"), a);
        }
        let spaced = Arch::parse(" seq: 1x8x8 | conv( 2, 3, p = 1 )  relu | flatten  linear(4) ")
            .expect("spaces");
        assert_eq!(
            spaced.to_string(),
            "seq:1x8x8|conv(2,3,p=1) relu|flatten linear(4)"
        );
        let a = Arch::parse("seq:3x32x32|conv(8,3,s=2,p=1,bias=false) tanh avgpool(3,s=2)|conv(4,3) relu maxpool(2,s=1) flatten|linear(7)").expect("a");
        let s = a.stages();
        // 32 + 2 - 3 = 31 / 2 + 1 = 16; (16 - 3) / 2 + 1 = 7; 7 - 3 + 1 = 5; 5 - 2 + 1 = 4.
        assert_eq!(s[0].output_features().dims(), vec![8, 7, 7]);
        assert_eq!(s[0].bias_len(), 0);
        assert_eq!(s[1].output_features(), Features::Flat(4 * 4 * 4));
        assert_eq!(s[2].input_dim(), 64);
    }

    #[test]
    fn model_files_give_the_same_architecture() {
        let toml = r#"
            # LeNet-5
            input = [1, 28, 28]
            [[stage]]
            layers = [
              { op = "conv2d", out_channels = 6, kernel = 5, padding = 2 },
              { op = "relu" },
              { op = "maxpool2d", kernel = 2 },
            ]
            [[stage]]
            layers = [{ op = "conv2d", in_channels = 6, out_channels = 16, kernel = 5 }, { op = "relu" }, { op = "maxpool2d", kernel = 2, stride = 2 }]
            [[stage]]
            layers = [{ op = "flatten" }, { op = "linear", outputs = 120 }, { op = "relu" }]
            [[stage]]
            layers = [{ op = "linear", inputs = 120, outputs = 84 }, { op = "relu" }]
            [[stage]]
            layers = [{ op = "linear", outputs = 10 }]
        "#;
        let lenet = Arch::parse("lenet5").expect("lenet5");
        assert_eq!(Arch::from_model_text(toml, false).expect("toml"), lenet);
        let json = r#"{"input": [784], "stages": [
            {"layers": [{"op": "linear", "outputs": 32}, {"op": "relu"}]},
            {"layers": [{"op": "linear", "outputs": 10}]}]}"#;
        assert_eq!(
            Arch::from_model_text(json, true).expect("json").to_string(),
            "mlp:784-32-10"
        );
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("lenet.toml");
        std::fs::write(&path, toml).expect("write");
        assert_eq!(Arch::from_model_file(&path).expect("file"), lenet);
        for (text, needle) in [
            ("input = [1, 28, 28]\n[[stage]]\nlayers = [{ op = \"conv3d\", out_channels = 6, kernel = 5 }]", "conv3d"),
            ("input = [1, 28, 28]\n[[stage]]\nlayers = [{ op = \"conv2d\", out_channels = 6, kernel = 5, dilation = 2 }]", "dilation"),
            ("input = [1, 28]\n[[stage]]\nlayers = [{ op = \"relu\" }]", "input"),
            ("input = [784]", "stage"),
            ("input = [1, 28, 28]\n[[stage]]\nlayers = [{ op = \"linear\", outputs = 10 }]", "flatten"),
            ("input = [784]\n[[stage]]\nlayers = [{ op = \"linear\", outputs = 10 }, { op = \"linear\", outputs = 10 }]", "one layer with parameters"),
        ] {
            let err = Arch::from_model_text(text, false).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
        let missing = Arch::from_model_file(&dir.path().join("nope.toml")).expect_err("missing");
        assert!(missing.to_string().contains("nope.toml"), "{missing}");
    }

    #[test]
    fn serde_as_string() {
        for s in [
            "mlp:3-4-5",
            "lenet5",
            "seq:1x8x8|conv(2,3) relu|flatten linear(4)",
        ] {
            let a = Arch::parse(s).expect("valid");
            let bytes = postcard::to_allocvec(&a).expect("encode");
            let back: Arch = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(a, back);
        }
    }

    #[test]
    fn stage_validation() {
        use LayerSpec::*;
        let lin = Linear {
            inputs: 3,
            outputs: 2,
        };
        let conv = Conv2d {
            in_channels: 1,
            out_channels: 2,
            kernel: 3,
            stride: 1,
            padding: 0,
            bias: true,
            height: 6,
            width: 6,
        };
        let pool = MaxPool2d {
            kernel: 2,
            stride: 2,
        };
        let good = [
            vec![lin],
            vec![Flatten, lin, Relu],
            vec![lin, Tanh, Relu],
            vec![conv],
            vec![conv, Relu, pool, Flatten],
            vec![
                conv,
                AvgPool2d {
                    kernel: 4,
                    stride: 1,
                },
            ],
        ];
        for layers in good {
            StageSpec { layers }.validate().expect("valid");
        }
        let bad = [
            vec![],
            vec![Relu],
            vec![Relu, lin],
            vec![lin, lin],
            vec![lin, Flatten, lin],
            vec![conv, lin],
            vec![lin, pool],
            vec![conv, Flatten, pool],
            vec![Flatten, conv],
            vec![pool, conv],
            vec![
                conv,
                MaxPool2d {
                    kernel: 5,
                    stride: 1,
                },
            ],
            vec![
                conv,
                MaxPool2d {
                    kernel: 2,
                    stride: 0,
                },
            ],
            vec![Linear {
                inputs: 0,
                outputs: 2,
            }],
            vec![Linear {
                inputs: MAX_DIM,
                outputs: MAX_DIM,
            }],
            vec![Conv2d {
                in_channels: 0,
                out_channels: 2,
                kernel: 3,
                stride: 1,
                padding: 0,
                bias: true,
                height: 6,
                width: 6,
            }],
            vec![lin; MAX_STAGE_LAYERS + 1],
        ];
        for layers in bad {
            assert!(
                StageSpec {
                    layers: layers.clone()
                }
                .validate()
                .is_err(),
                "{layers:?}"
            );
        }
        let big = StageSpec {
            layers: vec![Conv2d {
                in_channels: 64,
                out_channels: 64,
                kernel: 9,
                stride: 1,
                padding: 4,
                bias: true,
                height: 512,
                width: 512,
            }],
        };
        assert!(big.validate().is_err(), "unfolds too much");
    }
}
