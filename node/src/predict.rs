//! `mixnn predict`: the owner's own inputs through a model held locally
//! (from a safetensors file) or through its slots on the network.

use serde::Serialize;

use mixnn_model::{HostTensor, LocalModel, ModelError, EVAL_BATCH};

use crate::client::{Client, Inference, JobError, JobOptions, ModelMap};
use crate::discovery::Volunteer;
use crate::input::Inputs;

/// One input's prediction (one line of `mixnn predict --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub input: String,
    pub class: usize,
    pub probabilities: Vec<f32>,
}

/// Softmax of each row of `[rows, classes]` logits (computed in f64).
pub fn softmax_rows(logits: &HostTensor) -> Vec<Vec<f32>> {
    let classes = logits.shape.get(1).copied().unwrap_or(0).max(1);
    logits
        .data
        .chunks(classes)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f64> = row.iter().map(|&x| f64::from(x - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.iter().map(|e| (e / sum) as f32).collect()
        })
        .collect()
}

/// The index of the largest logit of each row (the first on ties), as
/// the trainer's accuracy counts it.
pub fn classes(logits: &HostTensor) -> Vec<usize> {
    let classes = logits.shape.get(1).copied().unwrap_or(0).max(1);
    logits
        .data
        .chunks(classes)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bx), (i, &x)| {
                    if x > bx {
                        (i, x)
                    } else {
                        (bi, bx)
                    }
                })
                .0
        })
        .collect()
}

fn predictions(names: &[String], logits: &HostTensor) -> Vec<Prediction> {
    names
        .iter()
        .zip(classes(logits))
        .zip(softmax_rows(logits))
        .map(|((input, class), probabilities)| Prediction {
            input: input.clone(),
            class,
            probabilities,
        })
        .collect()
}

/// Predictions of a local model, [`EVAL_BATCH`] inputs at a time.
pub fn predict_local(model: &LocalModel, inputs: &Inputs) -> Result<Vec<Prediction>, ModelError> {
    let mut out = Vec::with_capacity(inputs.len());
    let mut start = 0;
    while start < inputs.len() {
        let x = inputs.batch(start, EVAL_BATCH);
        let logits = model.infer(&x)?;
        let end = (start + EVAL_BATCH).min(inputs.len());
        out.extend(predictions(&inputs.names[start..end], &logits));
        start = end;
    }
    Ok(out)
}

/// Predictions of the model that `map` names, through fresh circuits to
/// its hosts, [`EVAL_BATCH`] inputs at a time.
pub async fn predict_network(
    client: &Client,
    volunteers: &[Volunteer],
    map: &ModelMap,
    opts: &JobOptions,
    inputs: &Inputs,
) -> Result<Vec<Prediction>, JobError> {
    let mut inference = Inference::open(client, volunteers, map, opts).await?;
    if inference.input_dim() != inputs.features {
        let features = inference.input_dim();
        inference.close().await;
        return Err(JobError::Invalid(format!(
            "the inputs have {} features, the model takes {features}",
            inputs.features
        )));
    }
    let mut out = Vec::with_capacity(inputs.len());
    let mut start = 0;
    while start < inputs.len() {
        let x = inputs.batch(start, EVAL_BATCH);
        let logits = match inference.logits(client.network(), x).await {
            Ok(l) => l,
            Err(e) => {
                inference.close().await;
                return Err(e);
            }
        };
        let end = (start + EVAL_BATCH).min(inputs.len());
        out.extend(predictions(&inputs.names[start..end], &logits));
        start = end;
    }
    inference.close().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_and_classes() {
        let logits = HostTensor {
            shape: vec![2, 3],
            data: vec![1.0, 3.0, 2.0, 1000.0, -1000.0, 1000.0],
        };
        assert_eq!(classes(&logits), vec![1, 0]);
        let p = softmax_rows(&logits);
        assert!((p[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[0][1] > p[0][2] && p[0][2] > p[0][0]);
        assert_eq!(p[1], vec![0.5, 0.0, 0.5]);
    }
}
