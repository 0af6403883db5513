//! Inverted dropout.

use rand::RngExt;

use super::{OpInfo, OpKind, expect_grad};
use crate::rng::Rng;
use crate::tensor::{Mode, Tensor, from_vec, into_vec};
use crate::{Error, Result};

/// Zeroes each element with probability `p` in training and scales the rest by `1/(1−p)`; the
/// identity in evaluation. Owns a seeded generator, so runs replay.
pub struct Dropout {
    p: f32,
    rng: Rng,
    cache: Option<(Vec<usize>, Vec<f32>)>,
}

impl Dropout {
    /// Dropout with drop probability `p ∈ [0, 1)`.
    pub fn new(p: f32, rng: Rng) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidConfig(format!(
                "dropout probability {p} not in [0, 1)"
            )));
        }
        Ok(Dropout {
            p,
            rng,
            cache: None,
        })
    }
}

impl super::Layer for Dropout {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        if mode != Mode::Train || self.p == 0.0 {
            return Ok(x);
        }
        let shape = x.shape().to_vec();
        let mut v = into_vec(x);
        let keep = 1.0 / (1.0 - self.p);
        let scale: Vec<f32> = (0..v.len())
            .map(|_| {
                if self.rng.random::<f32>() < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        for (x, s) in v.iter_mut().zip(&scale) {
            *x *= s;
        }
        self.cache = Some((shape.clone(), scale));
        from_vec(&shape, v)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        if self.p == 0.0 {
            return Ok(grad);
        }
        let (shape, scale) = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("dropout".into()))?;
        expect_grad("dropout", &grad, &shape)?;
        let mut g = into_vec(grad);
        for (x, s) in g.iter_mut().zip(&scale) {
            *x *= s;
        }
        from_vec(&shape, g)
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        let n = input.iter().product();
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::Dropout,
            macs: 0,
            weight: None,
            input_elems: n,
            output_elems: n,
            cached_elems: n,
        });
        Ok(input.to_vec())
    }

    fn clear_cache(&mut self) {
        self.cache = None;
    }
}
