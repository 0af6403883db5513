//! Adam with optional AMSGrad and L2 weight decay (PyTorch's `Adam` update rule).

use std::collections::HashMap;

use super::{Optimizer, ParamState, masked, param_error};
use crate::Result;
use crate::models::Model;

/// Adam: `m ← β₁m + (1−β₁)g'`, `v ← β₂v + (1−β₂)g'²` with `g' = g + λw`; AMSGrad keeps
/// `v̂ = max(v̂, v)`; `w ← w − lr/(1−β₁ᵗ) · m / (√(v̂/(1−β₂ᵗ)) + ε)`. The moments are held for the
/// stored values only (active values of lean parameters).
pub struct Adam {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    amsgrad: bool,
    t: i32,
    /// Per parameter: `m`, `v` and, with AMSGrad, `v̂`.
    state: HashMap<String, ParamState>,
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
        let slots = if ams { 3 } else { 2 };
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
            let s = self
                .state
                .entry(name.to_string())
                .or_insert_with(|| ParamState::new(&u.layout, w.len(), slots));
            s.adapt(&u.layout, w.len());
            match s.slots.as_mut_slice() {
                [m, v, vmax] => {
                    for ((((w, g), m), v), vm) in w
                        .iter_mut()
                        .zip(g)
                        .zip(m.iter_mut())
                        .zip(v.iter_mut())
                        .zip(vmax.iter_mut())
                    {
                        let g = g + wd * *w;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *vm = vm.max(*v);
                        *w -= step * *m / (vm.sqrt() / bc2_sqrt + eps);
                    }
                    masked(mask, vmax);
                    masked(mask, m);
                    masked(mask, v);
                }
                [m, v] => {
                    for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        let g = g + wd * *w;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *w -= step * *m / (v.sqrt() / bc2_sqrt + eps);
                    }
                    masked(mask, m);
                    masked(mask, v);
                }
                _ => {}
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
        self.state.values().map(ParamState::bytes).sum()
    }
}
