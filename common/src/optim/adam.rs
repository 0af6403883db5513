//! Adam with optional AMSGrad and L2 weight decay (PyTorch's `Adam` update rule).

use std::collections::HashMap;

use super::{Optimizer, masked};
use crate::models::Model;
use crate::{Error, Result};

/// Adam: `m ← β₁m + (1−β₁)g'`, `v ← β₂v + (1−β₂)g'²` with `g' = g + λw`; AMSGrad keeps
/// `v̂ = max(v̂, v)`; `w ← w − lr/(1−β₁ᵗ) · m / (√(v̂/(1−β₂ᵗ)) + ε)`.
pub struct Adam {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    amsgrad: bool,
    t: i32,
    state: HashMap<String, Moments>,
}

struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    vmax: Vec<f32>,
}

impl Adam {
    /// A fresh optimizer.
    pub fn new(
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        amsgrad: bool,
    ) -> Self {
        Adam {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            amsgrad,
            t: 0,
            state: HashMap::new(),
        }
    }
}

impl Optimizer for Adam {
    fn step(&mut self, model: &mut Model) -> Result<()> {
        self.t = self.t.saturating_add(1);
        let (b1, b2, eps, wd, ams) = (
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.amsgrad,
        );
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2_sqrt = (1.0 - b2.powi(self.t)).sqrt();
        let step = self.lr / bc1;
        let mut err = None;
        model.for_each_param(&mut |name, p| {
            let (value, grad, mask) = p.split_mut();
            let (Some(w), Some(g)) = (value.as_slice_mut(), grad.as_slice()) else {
                err.get_or_insert(Error::StateMismatch(format!("`{name}` not contiguous")));
                return;
            };
            let s = self
                .state
                .entry(name.to_string())
                .or_insert_with(|| Moments {
                    m: vec![0.0; w.len()],
                    v: vec![0.0; w.len()],
                    vmax: if ams { vec![0.0; w.len()] } else { Vec::new() },
                });
            if ams {
                for ((((w, g), m), v), vm) in w
                    .iter_mut()
                    .zip(g)
                    .zip(s.m.iter_mut())
                    .zip(s.v.iter_mut())
                    .zip(s.vmax.iter_mut())
                {
                    let g = g + wd * *w;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *vm = vm.max(*v);
                    *w -= step * *m / (vm.sqrt() / bc2_sqrt + eps);
                }
            } else {
                for (((w, g), m), v) in w.iter_mut().zip(g).zip(s.m.iter_mut()).zip(s.v.iter_mut())
                {
                    let g = g + wd * *w;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *w -= step * *m / (v.sqrt() / bc2_sqrt + eps);
                }
            }
            masked(mask, w);
            masked(mask, &mut s.m);
            masked(mask, &mut s.v);
            if ams {
                masked(mask, &mut s.vmax);
            }
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
        self.state
            .values()
            .map(|s| (s.m.len() + s.v.len() + s.vmax.len()) * 4)
            .sum()
    }
}
