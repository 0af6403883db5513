//! Optimizers. Both keep pruned weights exactly zero: after every step, weights *and* their
//! optimizer moments are multiplied by the mask, so a pruned position carries no momentum into a
//! later round in which it might be regrown.
//!
//! The moments follow the parameter's storage ([`crate::param::StateLayout`]): one value per
//! element for dense storage, one per active element (mask order) for lean storage. When the
//! storage or the mask changes, the moments are carried over where the element stays active and
//! start at zero elsewhere, which is what the masked dense moments hold; the update of every
//! active element is the same float computation in both layouts.

mod adam;
mod sgd;

pub use adam::Adam;
pub use sgd::Sgd;

use serde::{Deserialize, Serialize};

use crate::models::Model;
use crate::{Error, Result};

/// An optimizer that updates every trainable parameter of a model from its gradient.
pub trait Optimizer: Send {
    /// One update from the gradients of the last backward pass.
    fn step(&mut self, model: &mut Model) -> Result<()>;
    /// The current learning rate.
    fn lr(&self) -> f32;
    /// Changes the learning rate (for schedules).
    fn set_lr(&mut self, lr: f32);
    /// Bytes of optimizer state currently held.
    fn state_bytes(&self) -> usize;
}

/// Optimizer settings, as written in configs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Stochastic gradient descent with momentum.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum coefficient (0 disables momentum).
        #[serde(default)]
        momentum: f32,
        /// L2 weight decay added to the gradient.
        #[serde(default)]
        weight_decay: f32,
        /// Nesterov momentum.
        #[serde(default)]
        nesterov: bool,
    },
    /// Adam, optionally AMSGrad.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// Denominator epsilon.
        #[serde(default = "default_eps")]
        eps: f32,
        /// L2 weight decay added to the gradient.
        #[serde(default)]
        weight_decay: f32,
        /// Keep the running maximum of the second moment.
        #[serde(default)]
        amsgrad: bool,
    },
}

fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}

impl Default for OptimizerConfig {
    /// Adam, lr 1e-3, AMSGrad, weight decay 1e-4 (FedTiny's local-training default).
    fn default() -> Self {
        OptimizerConfig::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
            amsgrad: true,
        }
    }
}

impl OptimizerConfig {
    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidConfig(format!("optimizer: {what}")));
        match *self {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => {
                if !(lr.is_finite() && lr > 0.0) {
                    return bad("lr must be positive");
                }
                if !(0.0..1.0).contains(&momentum) {
                    return bad("momentum must be in [0, 1)");
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return bad("weight_decay must be >= 0");
                }
                if nesterov && momentum == 0.0 {
                    return bad("nesterov needs a positive momentum");
                }
            }
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                if !(lr.is_finite() && lr > 0.0) {
                    return bad("lr must be positive");
                }
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return bad("betas must be in [0, 1)");
                }
                if !(eps.is_finite() && eps > 0.0) {
                    return bad("eps must be positive");
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return bad("weight_decay must be >= 0");
                }
            }
        }
        Ok(())
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => lr,
        }
    }

    /// Optimizer state per trainable value, in values (momentum: 1, Adam: 2, AMSGrad: 3).
    pub fn state_per_value(&self) -> usize {
        match *self {
            OptimizerConfig::Sgd { momentum, .. } => usize::from(momentum > 0.0),
            OptimizerConfig::Adam { amsgrad, .. } => 2 + usize::from(amsgrad),
        }
    }

    /// Builds a fresh optimizer (no state).
    pub fn build(&self) -> Result<Box<dyn Optimizer>> {
        self.validate()?;
        Ok(match *self {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => Box::new(Sgd::new(lr, momentum, weight_decay, nesterov)),
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                amsgrad,
            } => Box::new(Adam::new(lr, beta1, beta2, eps, weight_decay, amsgrad)),
        })
    }
}

/// Multiplies `v` by the mask, if any.
fn masked(mask: Option<&crate::mask::Mask>, v: &mut [f32]) {
    if let Some(m) = mask {
        m.apply(v);
    }
}

/// One parameter's optimizer state: `slots` vectors laid out like the parameter's storage.
struct ParamState {
    layout: crate::param::StateLayout,
    slots: Vec<Vec<f32>>,
}

impl ParamState {
    /// Zeroed state of `slots` vectors of `len` values.
    fn new(layout: &crate::param::StateLayout, len: usize, slots: usize) -> Self {
        ParamState {
            layout: layout.clone(),
            slots: vec![vec![0.0; len]; slots],
        }
    }

    /// Re-lays the state for `layout` with `len` values per slot (see
    /// [`crate::param::StateLayout::convert`]).
    fn adapt(&mut self, layout: &crate::param::StateLayout, len: usize) {
        let same = self.layout.same_as(layout);
        for s in &mut self.slots {
            if !same || s.len() != len {
                self.layout.convert(layout, len, s);
            }
        }
        // Share the parameter's current mask (and release an older one).
        self.layout = layout.clone();
    }

    fn bytes(&self) -> usize {
        self.slots.iter().map(|s| 4 * s.len()).sum()
    }
}

/// The error for a parameter the optimizer cannot update.
fn param_error(name: &str, e: &Error) -> Error {
    Error::StateMismatch(format!("`{name}`: {e}"))
}

#[cfg(test)]
mod tests;
