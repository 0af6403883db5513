//! SGD with momentum, Nesterov and L2 weight decay (PyTorch's update rule).

use std::collections::HashMap;

use super::{Optimizer, ParamState, masked, param_error};
use crate::Result;
use crate::models::Model;

/// `v ← μv + (g + λw)`; `w ← w − lr·(g + λw + μv)` with Nesterov, `w ← w − lr·v` without. The
/// velocity is held for the stored values only (active values of lean parameters).
pub struct Sgd {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
    velocity: HashMap<String, ParamState>,
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
            let u = match p.update_view() {
                Ok(u) => u,
                Err(e) => {
                    err.get_or_insert(param_error(name, &e));
                    return;
                }
            };
            let (w, g, mask) = (u.values, u.grad, u.mask);
            if mu == 0.0 {
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= lr * (g + wd * *w);
                }
            } else {
                let s = self
                    .velocity
                    .entry(name.to_string())
                    .or_insert_with(|| ParamState::new(&u.layout, w.len(), 1));
                s.adapt(&u.layout, w.len());
                if let [v] = s.slots.as_mut_slice() {
                    for ((w, g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
                        let d = g + wd * *w;
                        *v = mu * *v + d;
                        *w -= lr * if nesterov { d + mu * *v } else { *v };
                    }
                    masked(mask, v);
                }
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
        self.velocity.values().map(ParamState::bytes).sum()
    }
}
