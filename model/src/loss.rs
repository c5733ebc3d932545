//! The loss, computed by the client (labels never leave it), and accuracy.
//!
//! [`crate::LocalModel`] backpropagates the gradient from this same function,
//! so the network and local training see identical gradients.

use crate::stage::{check_batch, check_finite};
use crate::tensor::HostTensor;
use crate::ModelError;

/// Mean softmax cross-entropy over the batch, and its gradient with respect
/// to the logits (`(softmax - onehot) / batch`).
///
/// `logits` is `[batch, classes]`, `labels` has `batch` entries `< classes`.
pub fn softmax_cross_entropy(
    logits: &HostTensor,
    labels: &[u8],
) -> Result<(f32, HostTensor), ModelError> {
    let classes = match logits.shape.as_slice() {
        [_, c] if *c > 0 => *c,
        _ => {
            return Err(ModelError::Shape {
                what: "logits",
                expected: "[batch, classes]".into(),
                got: logits.shape.clone(),
            })
        }
    };
    let batch = check_batch(logits, classes, "logits")?;
    check_labels(batch, classes, labels)?;
    check_finite(&logits.data, "logits")?;
    let inv_batch = 1.0 / batch as f32;
    let mut grad = vec![0.0f32; logits.data.len()];
    let mut total = 0.0f64;
    for ((row, g), &label) in logits
        .data
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for (gi, &x) in g.iter_mut().zip(row) {
            let e = (x - max).exp();
            *gi = e;
            sum += e;
        }
        let label = usize::from(label);
        total += f64::from(sum.ln() - (row[label] - max));
        let inv_sum = 1.0 / sum;
        for gi in g.iter_mut() {
            *gi = *gi * inv_sum * inv_batch;
        }
        g[label] -= inv_batch;
    }
    let loss = (total / batch as f64) as f32;
    Ok((
        loss,
        HostTensor {
            shape: logits.shape.clone(),
            data: grad,
        },
    ))
}

/// Fraction of rows whose largest logit (first one on ties) is the label;
/// 0 when `logits` is not `[labels.len(), classes]`.
pub fn accuracy(logits: &HostTensor, labels: &[u8]) -> f32 {
    if labels.is_empty() {
        return 0.0;
    }
    correct(logits, labels).map_or(0.0, |c| c as f32 / labels.len() as f32)
}

/// Rows whose largest logit is the label.
pub(crate) fn correct(logits: &HostTensor, labels: &[u8]) -> Option<usize> {
    let [batch, classes] = *logits.shape.as_slice() else {
        return None;
    };
    if batch != labels.len() || classes == 0 || logits.data.len() != batch * classes {
        return None;
    }
    let hits = logits
        .data
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &label)| argmax(row) == usize::from(label))
        .count();
    Some(hits)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

fn check_labels(batch: usize, classes: usize, labels: &[u8]) -> Result<(), ModelError> {
    if labels.len() != batch {
        return Err(ModelError::Labels(format!(
            "{} labels for a batch of {batch}",
            labels.len()
        )));
    }
    if let Some((i, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= classes)
    {
        return Err(ModelError::Labels(format!(
            "label {l} at {i} is not below {classes} classes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_gradient() {
        let logits = HostTensor::new(vec![2, 3], vec![0.0, 0.0, 0.0, 1.0, 2.0, 3.0]).expect("ok");
        let (loss, grad) = softmax_cross_entropy(&logits, &[1, 2]).expect("ok");
        let l0 = 3f32.ln();
        let l1 = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln() - 3.0;
        assert!((loss - (l0 + l1) / 2.0).abs() < 1e-6, "{loss}");
        assert!((grad.data[0] - 1.0 / 6.0).abs() < 1e-6);
        assert!((grad.data[1] - (1.0 / 3.0 - 1.0) / 2.0).abs() < 1e-6);
        for row in grad.data.chunks(3) {
            assert!(row.iter().sum::<f32>().abs() < 1e-6);
        }
        // Numerical check of one gradient entry.
        let eps = 1e-2;
        let mut bumped = logits.clone();
        bumped.data[4] += eps;
        let (l2, _) = softmax_cross_entropy(&bumped, &[1, 2]).expect("ok");
        assert!(((l2 - loss) / eps - grad.data[4]).abs() < 1e-2);
        assert_eq!(accuracy(&logits, &[1, 2]), 0.5);
        assert_eq!(accuracy(&logits, &[0, 2]), 1.0);
    }

    #[test]
    fn rejects_bad_input() {
        let logits = HostTensor::new(vec![2, 3], vec![0.0; 6]).expect("ok");
        assert!(softmax_cross_entropy(&logits, &[1]).is_err());
        assert!(softmax_cross_entropy(&logits, &[1, 3]).is_err());
        let flat = HostTensor::new(vec![6], vec![0.0; 6]).expect("ok");
        assert!(softmax_cross_entropy(&flat, &[1]).is_err());
        let nan = HostTensor::new(vec![1, 2], vec![f32::NAN, 0.0]).expect("ok");
        assert!(softmax_cross_entropy(&nan, &[0]).is_err());
        assert_eq!(accuracy(&logits, &[1]), 0.0);
    }
}
