//! A trainable tensor: its value, its gradient, its role and, for prunable weights, its mask.

use serde::{Deserialize, Serialize};

use crate::mask::Mask;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// What a named tensor is, which decides how it is initialised, pruned, averaged and sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A conv or linear weight.
    Weight,
    /// A conv or linear bias.
    Bias,
    /// BatchNorm scale γ.
    BnScale,
    /// BatchNorm shift β.
    BnShift,
    /// BatchNorm running mean (a buffer, not trained by gradient).
    RunningMean,
    /// BatchNorm running variance (a buffer, not trained by gradient).
    RunningVar,
}

impl Role {
    /// True for tensors trained by gradient descent.
    pub fn is_trainable(self) -> bool {
        !matches!(self, Role::RunningMean | Role::RunningVar)
    }
}

/// A trainable tensor. The mask, when present, is an invariant: inactive positions of `value`
/// are exactly zero after every call that changes it ([`Param::set_mask`], optimizer steps).
#[derive(Clone, Debug)]
pub struct Param {
    /// The current value.
    pub value: Tensor,
    /// The gradient of the last backward pass (same shape as `value`).
    pub grad: Tensor,
    /// What the tensor is.
    pub role: Role,
    /// Whether pruning may mask this tensor (conv and linear weights except the stem).
    pub prunable: bool,
    /// When set, backward writes the full dense gradient (pruned positions included) even where
    /// a sparse kernel computes the forward pass: FedTiny's adjustment rounds need it for the
    /// selected tensors. Otherwise only the gradient at active positions is meaningful.
    pub dense_grad: bool,
    mask: Option<Mask>,
}

impl Param {
    /// A parameter with a zero gradient and no mask.
    pub fn new(value: Tensor, role: Role) -> Self {
        let grad = Tensor::zeros(value.raw_dim());
        Param {
            value,
            grad,
            role,
            prunable: false,
            dense_grad: false,
            mask: None,
        }
    }

    /// Marks the parameter as prunable.
    pub fn prunable(mut self) -> Self {
        self.prunable = true;
        self
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// True when the parameter has no elements.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }

    /// The mask, if the parameter is masked.
    pub fn mask(&self) -> Option<&Mask> {
        self.mask.as_ref()
    }

    /// Installs a mask (or removes it with `None`) and zeroes the inactive values.
    pub fn set_mask(&mut self, mask: Option<Mask>) -> Result<()> {
        if let Some(m) = &mask {
            if m.len() != self.value.len() {
                return Err(Error::shape(
                    "mask",
                    self.value.len(),
                    format!("{} elements", m.len()),
                ));
            }
            if let Some(v) = self.value.as_slice_mut() {
                m.apply(v);
            }
        }
        self.mask = mask;
        Ok(())
    }

    /// Active elements (all of them when unmasked).
    pub fn active(&self) -> usize {
        self.mask.as_ref().map_or(self.value.len(), Mask::active)
    }

    /// Borrows the value mutably together with the gradient and the mask.
    pub fn split_mut(&mut self) -> (&mut Tensor, &Tensor, Option<&Mask>) {
        (&mut self.value, &self.grad, self.mask.as_ref())
    }

    /// Zeroes the gradient.
    pub fn zero_grad(&mut self) {
        self.grad.fill(0.0);
    }
}
