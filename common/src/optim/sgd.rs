//! SGD with momentum, Nesterov and L2 weight decay (PyTorch's update rule).

use std::collections::HashMap;

use super::{Optimizer, masked};
use crate::models::Model;
use crate::{Error, Result};

/// `v ← μv + (g + λw)`; `w ← w − lr·(g + λw + μv)` with Nesterov, `w ← w − lr·v` without.
pub struct Sgd {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
    velocity: HashMap<String, Vec<f32>>,
}

impl Sgd {
    /// A fresh optimizer.
    pub fn new(lr: f32, momentum: f32, weight_decay: f32, nesterov: bool) -> Self {
        Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov,
            velocity: HashMap::new(),
        }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, model: &mut Model) -> Result<()> {
        let (lr, mu, wd, nesterov) = (self.lr, self.momentum, self.weight_decay, self.nesterov);
        let mut err = None;
        model.for_each_param(&mut |name, p| {
            let (value, grad, mask) = p.split_mut();
            let (Some(w), Some(g)) = (value.as_slice_mut(), grad.as_slice()) else {
                err.get_or_insert(Error::StateMismatch(format!("`{name}` not contiguous")));
                return;
            };
            if mu == 0.0 {
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= lr * (g + wd * *w);
                }
            } else {
                let v = self
                    .velocity
                    .entry(name.to_string())
                    .or_insert_with(|| vec![0.0; w.len()]);
                for ((w, g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
                    let d = g + wd * *w;
                    *v = mu * *v + d;
                    *w -= lr * if nesterov { d + mu * *v } else { *v };
                }
                masked(mask, v);
            }
            masked(mask, w);
        });
        err.map_or(Ok(()), Err)
    }

    fn lr(&self) -> f32 {
        self.lr
    }

    fn set_lr(&mut self, lr: f32) {
        self.lr = lr;
    }

    fn state_bytes(&self) -> usize {
        self.velocity.values().map(|v| v.len() * 4).sum()
    }
}
