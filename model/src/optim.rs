//! Our own optimizers, on plain `f32` slices.
//!
//! dfdx keeps its optimizer state private, and a slot must serialize its
//! state; so the slots and the local trainer both use this code, which makes
//! their arithmetic identical. The update rules follow PyTorch's `SGD`
//! (with momentum, no dampening or Nesterov) and `Adam` (no weight decay).

use serde::{Deserialize, Serialize};

use crate::spec::SpecError;

/// Which optimizer a slot runs, with its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum OptimizerSpec {
    Sgd {
        lr: f32,
    },
    Momentum {
        lr: f32,
        momentum: f32,
    },
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
}

impl OptimizerSpec {
    /// `sgd`, `momentum` (0.9) or `adam` (0.9, 0.999, 1e-8) with learning rate `lr`.
    pub fn from_name(name: &str, lr: f32) -> Result<OptimizerSpec, SpecError> {
        let spec = match name.trim().to_ascii_lowercase().as_str() {
            "sgd" => OptimizerSpec::Sgd { lr },
            "momentum" => OptimizerSpec::Momentum { lr, momentum: 0.9 },
            "adam" => OptimizerSpec::Adam {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            other => {
                return Err(SpecError::BadOptimizer(format!(
                    "unknown optimizer {other:?} (expected sgd, momentum or adam)"
                )))
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Short name: `sgd`, `momentum` or `adam`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerSpec::Sgd { .. } => "sgd",
            OptimizerSpec::Momentum { .. } => "momentum",
            OptimizerSpec::Adam { .. } => "adam",
        }
    }

    pub fn lr(&self) -> f32 {
        match *self {
            OptimizerSpec::Sgd { lr }
            | OptimizerSpec::Momentum { lr, .. }
            | OptimizerSpec::Adam { lr, .. } => lr,
        }
    }

    /// Finite, positive learning rate; coefficients in `[0, 1)`; `eps > 0`.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::BadOptimizer(m));
        let lr = self.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return bad(format!("learning rate {lr} must be finite and positive"));
        }
        let unit = |x: f32| x.is_finite() && (0.0..1.0).contains(&x);
        match *self {
            OptimizerSpec::Sgd { .. } => Ok(()),
            OptimizerSpec::Momentum { momentum, .. } if !unit(momentum) => {
                bad(format!("momentum {momentum} must be in [0, 1)"))
            }
            OptimizerSpec::Momentum { .. } => Ok(()),
            OptimizerSpec::Adam {
                beta1, beta2, eps, ..
            } => {
                if !unit(beta1) || !unit(beta2) {
                    bad(format!("betas ({beta1}, {beta2}) must be in [0, 1)"))
                } else if !(eps.is_finite() && eps > 0.0) {
                    bad(format!("eps {eps} must be finite and positive"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Optimizer state for a list of parameter tensors (for a stage: weight, bias).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OptimizerState {
    Sgd,
    Momentum {
        velocity: Vec<Vec<f32>>,
    },
    Adam {
        t: u64,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    },
}

impl OptimizerState {
    /// Fresh (zero) state for parameter tensors of the given sizes.
    pub fn new(spec: &OptimizerSpec, sizes: &[usize]) -> OptimizerState {
        let zeros = || sizes.iter().map(|&n| vec![0.0f32; n]).collect::<Vec<_>>();
        match spec {
            OptimizerSpec::Sgd { .. } => OptimizerState::Sgd,
            OptimizerSpec::Momentum { .. } => OptimizerState::Momentum { velocity: zeros() },
            OptimizerSpec::Adam { .. } => OptimizerState::Adam {
                t: 0,
                m: zeros(),
                v: zeros(),
            },
        }
    }

    /// Whether this state belongs to `spec` and to tensors of `sizes`.
    pub fn matches(&self, spec: &OptimizerSpec, sizes: &[usize]) -> bool {
        let fits = |bufs: &[Vec<f32>]| {
            bufs.len() == sizes.len() && bufs.iter().zip(sizes).all(|(b, &n)| b.len() == n)
        };
        match (self, spec) {
            (OptimizerState::Sgd, OptimizerSpec::Sgd { .. }) => true,
            (OptimizerState::Momentum { velocity }, OptimizerSpec::Momentum { .. }) => {
                fits(velocity)
            }
            (OptimizerState::Adam { m, v, .. }, OptimizerSpec::Adam { .. }) => fits(m) && fits(v),
            _ => false,
        }
    }

    /// Starts an optimizer step (Adam counts steps for its bias correction).
    pub fn begin_step(&mut self) {
        if let OptimizerState::Adam { t, .. } = self {
            *t = t.saturating_add(1);
        }
    }

    /// Updates parameter tensor `index` in place from its gradient.
    /// `params` and `grads` must have the size given at construction.
    pub fn update(
        &mut self,
        spec: &OptimizerSpec,
        index: usize,
        params: &mut [f32],
        grads: &[f32],
    ) {
        debug_assert_eq!(params.len(), grads.len());
        match (spec, self) {
            (&OptimizerSpec::Sgd { lr }, _) => {
                for (p, &g) in params.iter_mut().zip(grads) {
                    *p -= lr * g;
                }
            }
            (&OptimizerSpec::Momentum { lr, momentum }, OptimizerState::Momentum { velocity }) => {
                let vel = &mut velocity[index];
                for ((p, &g), v) in params.iter_mut().zip(grads).zip(vel.iter_mut()) {
                    *v = momentum * *v + g;
                    *p -= lr * *v;
                }
            }
            (
                &OptimizerSpec::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                },
                OptimizerState::Adam { t, m, v },
            ) => {
                let step = i32::try_from(*t).unwrap_or(i32::MAX).max(1);
                let bc1 = 1.0 - beta1.powi(step);
                let bc2_sqrt = (1.0 - beta2.powi(step)).sqrt();
                let step_size = lr / bc1;
                let (m, v) = (&mut m[index], &mut v[index]);
                for (((p, &g), m), v) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(m.iter_mut())
                    .zip(v.iter_mut())
                {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p -= step_size * *m / denom;
                }
            }
            // Mismatched state never happens: constructors and `from_bytes`
            // check `matches`. Do nothing rather than panic.
            _ => debug_assert!(false, "optimizer state does not match its spec"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(matches!(
            OptimizerSpec::from_name("SGD", 0.1),
            Ok(OptimizerSpec::Sgd { .. })
        ));
        assert!(matches!(
            OptimizerSpec::from_name("momentum", 0.1),
            Ok(OptimizerSpec::Momentum { .. })
        ));
        assert!(matches!(
            OptimizerSpec::from_name("adam", 0.1),
            Ok(OptimizerSpec::Adam { .. })
        ));
        assert!(OptimizerSpec::from_name("rmsprop", 0.1).is_err());
        assert!(OptimizerSpec::from_name("sgd", 0.0).is_err());
        assert!(OptimizerSpec::from_name("sgd", f32::NAN).is_err());
        assert!(OptimizerSpec::Momentum {
            lr: 0.1,
            momentum: 1.0
        }
        .validate()
        .is_err());
    }

    #[test]
    fn updates() {
        let spec = OptimizerSpec::Sgd { lr: 0.5 };
        let mut st = OptimizerState::new(&spec, &[2]);
        let mut p = [1.0, 2.0];
        st.begin_step();
        st.update(&spec, 0, &mut p, &[1.0, -2.0]);
        assert_eq!(p, [0.5, 3.0]);

        let spec = OptimizerSpec::Momentum {
            lr: 1.0,
            momentum: 0.5,
        };
        let mut st = OptimizerState::new(&spec, &[1]);
        let mut p = [0.0];
        for _ in 0..2 {
            st.begin_step();
            st.update(&spec, 0, &mut p, &[1.0]);
        }
        assert_eq!(p, [-2.5]); // v = 1 then 1.5

        // Adam's first step moves each parameter by about lr * sign(g).
        let spec = OptimizerSpec::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut st = OptimizerState::new(&spec, &[2]);
        let mut p = [0.0, 0.0];
        st.begin_step();
        st.update(&spec, 0, &mut p, &[3.0, -0.001]);
        assert!(
            (p[0] + 0.01).abs() < 1e-6 && (p[1] - 0.01).abs() < 1e-4,
            "{p:?}"
        );
        assert!(st.matches(&spec, &[2]) && !st.matches(&spec, &[3]));
    }
}
