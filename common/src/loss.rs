//! Softmax cross-entropy.

use crate::tensor::{Tensor, contiguous, from_vec};
use crate::{Error, Result};

/// The loss of a batch and its gradient.
#[derive(Debug)]
pub struct LossOutput {
    /// Sum of per-sample losses (divide by the batch size for the mean).
    pub loss_sum: f64,
    /// Gradient of the *mean* loss with respect to the logits.
    pub grad: Tensor,
    /// Samples whose arg-max logit is the label.
    pub correct: usize,
}

/// Mean softmax cross-entropy of `logits` (`[n, classes]`) against `labels`, computed with the
/// log-sum-exp shift for stability.
pub fn softmax_cross_entropy(logits: &Tensor, labels: &[usize]) -> Result<LossOutput> {
    if logits.ndim() != 2 || logits.shape()[0] != labels.len() {
        return Err(Error::shape(
            "cross_entropy",
            format!("[{}, classes]", labels.len()),
            logits.shape(),
        ));
    }
    let (n, k) = (logits.shape()[0], logits.shape()[1]);
    let l = contiguous(logits.clone());
    let ls = l.as_slice().unwrap_or(&[]);
    let mut grad = vec![0.0f32; n * k];
    let mut loss_sum = 0.0f64;
    let mut correct = 0;
    let inv_n = 1.0 / n.max(1) as f64;
    for (i, (&y, row)) in labels.iter().zip(ls.chunks(k.max(1))).enumerate() {
        if y >= k {
            return Err(Error::InvalidConfig(format!(
                "label {y} out of range for {k} classes"
            )));
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return Err(Error::NonFinite("logits".into()));
        }
        let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        let lse = f64::from(max) + sum.ln();
        loss_sum += lse - f64::from(row[y]);
        let argmax = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (j, &v)| if v > b.1 { (j, v) } else { b },
            )
            .0;
        if argmax == y {
            correct += 1;
        }
        let g = &mut grad[i * k..(i + 1) * k];
        for (j, (gv, &v)) in g.iter_mut().zip(row).enumerate() {
            let p = (f64::from(v) - lse).exp();
            let t = if j == y { 1.0 } else { 0.0 };
            *gv = ((p - t) * inv_n) as f32;
        }
    }
    Ok(LossOutput {
        loss_sum,
        grad: from_vec(&[n, k], grad)?,
        correct,
    })
}
