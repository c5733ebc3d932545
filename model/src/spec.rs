//! Architectures and the stages (volunteer slots) they split into.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Largest width of any layer.
pub const MAX_DIM: usize = 1 << 16;
/// Largest number of stages (linear layers) in an architecture.
pub const MAX_STAGES: usize = 64;
/// Largest number of parameters in one stage.
pub const MAX_STAGE_PARAMS: usize = 1 << 26;
/// Largest number of layers in one stage.
pub const MAX_STAGE_LAYERS: usize = 8;

/// Errors in architecture strings and stage descriptions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "architecture {input:?}: expected `mlp:<in>-<hidden>-...-<out>`, e.g. `mlp:784-512-256-10`"
    )]
    BadFormat { input: String },
    #[error("architecture {input:?}: unknown kind {kind:?} (supported: mlp)")]
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
}

/// One layer operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerSpec {
    /// `y = x W^T + b`, `W` is `[outputs, inputs]`.
    Linear {
        inputs: usize,
        outputs: usize,
    },
    Relu,
    Tanh,
    /// Flattens all but the batch dimension; inputs are always flattened to
    /// `[batch, features]`, so this is allowed only before the linear layer.
    Flatten,
}

/// What one volunteer slot holds: one linear layer and the activations after it
/// (optionally preceded by a flatten).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    pub layers: Vec<LayerSpec>,
}

impl StageSpec {
    /// Checks the shape rules: optional flattens, exactly one linear layer,
    /// then activations only; widths and parameter count within limits.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.layers.is_empty() || self.layers.len() > MAX_STAGE_LAYERS {
            return Err(SpecError::BadStage(format!(
                "{} layers (expected 1..={MAX_STAGE_LAYERS})",
                self.layers.len()
            )));
        }
        let mut linear = None;
        for layer in &self.layers {
            match *layer {
                LayerSpec::Flatten if linear.is_some() => {
                    return Err(SpecError::BadStage("flatten after the linear layer".into()))
                }
                LayerSpec::Flatten => {}
                LayerSpec::Linear { .. } if linear.is_some() => {
                    return Err(SpecError::BadStage("more than one linear layer".into()))
                }
                LayerSpec::Linear { inputs, outputs } => {
                    check_dim(inputs)?;
                    check_dim(outputs)?;
                    let params = inputs * outputs + outputs;
                    if params > MAX_STAGE_PARAMS {
                        return Err(SpecError::TooManyParams { got: params });
                    }
                    linear = Some(());
                }
                LayerSpec::Relu | LayerSpec::Tanh if linear.is_none() => {
                    return Err(SpecError::BadStage(
                        "activation before the linear layer".into(),
                    ))
                }
                LayerSpec::Relu | LayerSpec::Tanh => {}
            }
        }
        if linear.is_none() {
            return Err(SpecError::BadStage("no linear layer".into()));
        }
        Ok(())
    }

    /// `(inputs, outputs)` of the stage's linear layer.
    pub(crate) fn linear(&self) -> Option<(usize, usize)> {
        self.layers.iter().find_map(|l| match *l {
            LayerSpec::Linear { inputs, outputs } => Some((inputs, outputs)),
            _ => None,
        })
    }

    /// Features per example going in (0 for an invalid stage).
    pub fn input_dim(&self) -> usize {
        self.linear().map_or(0, |(i, _)| i)
    }

    /// Features per example coming out (0 for an invalid stage).
    pub fn output_dim(&self) -> usize {
        self.linear().map_or(0, |(_, o)| o)
    }

    /// Number of trainable parameters (weight and bias).
    /// True when the stage ends with a ReLU: wherever its output is `+0.0`
    /// the ReLU was inactive, so the gradient there never reaches the
    /// parameters (see [`crate::InputGrad::SkipZeroInputs`]).
    pub fn ends_with_relu(&self) -> bool {
        matches!(self.layers.last(), Some(LayerSpec::Relu))
    }

    pub fn param_count(&self) -> usize {
        self.linear().map_or(0, |(i, o)| i * o + o)
    }
}

fn check_dim(d: usize) -> Result<(), SpecError> {
    if d == 0 || d > MAX_DIM {
        Err(SpecError::DimOutOfRange { got: d })
    } else {
        Ok(())
    }
}

/// A whole model: for now a multilayer perceptron with ReLU between layers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Arch {
    dims: Vec<usize>,
}

impl Arch {
    /// Parses `mlp:784-512-256-10`: linear layers between consecutive widths,
    /// ReLU after every one but the last.
    pub fn parse(s: &str) -> Result<Arch, SpecError> {
        let input = s.to_string();
        let (kind, rest) = s.split_once(':').ok_or_else(|| SpecError::BadFormat {
            input: input.clone(),
        })?;
        if kind.trim() != "mlp" {
            return Err(SpecError::UnknownKind {
                input,
                kind: kind.to_string(),
            });
        }
        let tokens: Vec<&str> = rest.split('-').collect();
        if tokens.len() > MAX_STAGES + 1 {
            return Err(SpecError::TooDeep {
                got: tokens.len() - 1,
            });
        }
        let mut dims = Vec::with_capacity(tokens.len());
        for tok in tokens {
            let t = tok.trim();
            let ok = !t.is_empty() && t.len() <= 9 && t.bytes().all(|b| b.is_ascii_digit());
            let d: usize = match t.parse() {
                Ok(d) if ok => d,
                _ => {
                    return Err(SpecError::BadDim {
                        input,
                        token: tok.to_string(),
                    })
                }
            };
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
        let arch = Arch { dims };
        for stage in arch.stages() {
            stage.validate()?;
        }
        Ok(arch)
    }

    /// Layer widths, input first.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn input_dim(&self) -> usize {
        self.dims[0]
    }

    pub fn output_dim(&self) -> usize {
        self.dims[self.dims.len() - 1]
    }

    pub fn num_stages(&self) -> usize {
        self.dims.len() - 1
    }

    /// Total trainable parameters.
    pub fn param_count(&self) -> usize {
        self.stages().iter().map(StageSpec::param_count).sum()
    }

    /// The stages in order; each is one volunteer slot.
    pub fn stages(&self) -> Vec<StageSpec> {
        let n = self.num_stages();
        self.dims
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
            .collect()
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mlp:")?;
        for (i, d) in self.dims.iter().enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
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
    }

    #[test]
    fn serde_as_string() {
        let a = Arch::parse("mlp:3-4-5").expect("valid");
        let bytes = postcard::to_allocvec(&a).expect("encode");
        let back: Arch = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(a, back);
    }

    #[test]
    fn stage_validation() {
        use LayerSpec::*;
        let lin = Linear {
            inputs: 3,
            outputs: 2,
        };
        let good = [vec![lin], vec![Flatten, lin, Relu], vec![lin, Tanh, Relu]];
        for layers in good {
            StageSpec { layers }.validate().expect("valid");
        }
        let bad = [
            vec![],
            vec![Relu],
            vec![Relu, lin],
            vec![lin, lin],
            vec![lin, Flatten],
            vec![Linear {
                inputs: 0,
                outputs: 2,
            }],
            vec![Linear {
                inputs: MAX_DIM,
                outputs: MAX_DIM,
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
    }
}
