//! A trainable tensor: its value, its gradient, its role and, for prunable weights, its mask.
//!
//! # Storage
//!
//! A parameter is stored in one of two ways:
//!
//! - **Dense** (the default): `value` and `grad` hold every element; a mask, if any, is an
//!   invariant kept by zeroing (inactive values are exactly zero after every change).
//! - **Lean** (opt-in per parameter with [`Param::set_lean_allowed`], per model with
//!   [`crate::models::Model::set_lean_storage`]): a masked parameter whose layer runs its sparse
//!   kernels holds only its active values, in mask order (ascending dense index), inside the
//!   [`SparseWeight`] the kernels read, plus one gradient value per active entry. The mask is
//!   shared (an [`Arc`]) between the parameter, the sparse weight and the optimizer's state
//!   layout ([`StateLayout`]), so it is held once. `value` and `grad` are then empty tensors;
//!   [`Param::value_dense`] and [`Param::grad_dense`] scatter into a transient dense tensor
//!   (for state dicts and mask rules at task boundaries, never at steady state).
//!
//! A parameter allowed to be lean becomes lean when a mask is installed and follows its layer's
//! kernel choice on every forward pass ([`Param::follow_kernels`]): lean while the layer runs
//! sparse, dense while the policy picks dense kernels (high density). Every conversion is exact
//! (a gather or a scatter of the active values), and a training step computes the same active
//! values and gradients, with the same float operations in the same order, in both storages.
//!
//! The full dense gradient that FedTiny's adjustment rounds need is requested per tensor with
//! [`Param::request_pruned_grad_top_k`]: the layer's backward pass computes it for that tensor
//! only, feeds its pruned positions to a streaming top-K and drops it, so the extra memory is
//! one tensor plus K entries ([`Param::take_pruned_grad_top_k`] hands the entries over).

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fedtiny::top_k_pruned_gradient;
use crate::kernels::sparse::SparseWeight;
use crate::mask::Mask;
use crate::tensor::{Tensor, contiguous};
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

/// A trainable tensor. The mask, when present, is an invariant: inactive positions of the value
/// are exactly zero after every call that changes it ([`Param::set_mask`], optimizer steps); in
/// lean storage they are not stored at all (see the module documentation).
#[derive(Clone, Debug)]
pub struct Param {
    /// The current value, in dense storage. An empty tensor while the parameter is lean
    /// ([`Param::is_lean`]): use [`Param::value_dense`] and [`Param::set_value`], which work in
    /// both storages.
    pub value: Tensor,
    /// The gradient of the last backward pass, in dense storage (same shape as the value). While
    /// the parameter is lean it is empty, except after a backward pass with `dense_grad` set,
    /// when it holds that full dense gradient; [`Param::grad_dense`] works in both storages.
    pub grad: Tensor,
    /// What the tensor is.
    pub role: Role,
    /// Whether pruning may mask this tensor (conv and linear weights except the stem).
    pub prunable: bool,
    /// When set, backward writes the full dense gradient (pruned positions included) into
    /// `grad` even where a sparse kernel computes the forward pass. Otherwise only the gradient
    /// at active positions is meaningful. (FedTiny's adjustment rounds use the leaner
    /// [`Param::request_pruned_grad_top_k`] instead.)
    pub dense_grad: bool,
    shape: Vec<usize>,
    mask: Option<Arc<Mask>>,
    lean: Option<Lean>,
    lean_allowed: bool,
    top_k: Option<TopKRequest>,
}

/// Lean storage: the active values (inside the sparse weight) and their gradient.
#[derive(Clone, Debug)]
struct Lean {
    /// Pattern (the shared mask) and the active values in mask order.
    weight: SparseWeight,
    /// The gradient at the active entries, in mask order.
    grad: Vec<f32>,
}

/// A pending request for the top-K gradient entries at pruned positions.
#[derive(Clone, Debug)]
struct TopKRequest {
    k: usize,
    entries: Option<Vec<(u32, f32)>>,
}

/// How an optimizer's per-value state must be laid out to match a parameter's storage.
#[derive(Clone, Debug)]
pub enum StateLayout {
    /// One value per element of the tensor.
    Dense,
    /// One value per active element of the mask, in mask order.
    Active(Arc<Mask>),
}

impl StateLayout {
    /// Whether `self` and `other` describe the same layout (cheap when the masks are shared).
    pub fn same_as(&self, other: &StateLayout) -> bool {
        match (self, other) {
            (StateLayout::Dense, StateLayout::Dense) => true,
            (StateLayout::Active(a), StateLayout::Active(b)) => Arc::ptr_eq(a, b) || **a == **b,
            _ => false,
        }
    }

    /// Rewrites `state`, laid out as `self`, in the layout `to` with `len` values: values at
    /// elements active in both layouts are kept, the others start at zero (exactly what a
    /// masked dense state holds at newly active positions). State of an unexpected length is
    /// reset to zeros.
    pub fn convert(&self, to: &StateLayout, len: usize, state: &mut Vec<f32>) {
        let fresh = match (self, to) {
            (StateLayout::Dense, StateLayout::Dense) => None,
            (StateLayout::Dense, StateLayout::Active(m)) if state.len() == m.len() => {
                Some(gather_active(state, m))
            }
            (StateLayout::Active(a), StateLayout::Active(b)) if state.len() == a.active() => {
                (!self.same_as(to)).then(|| remap_active(a, state, b))
            }
            (StateLayout::Active(a), StateLayout::Dense) if state.len() == a.active() => {
                Some(scatter_active(state, a))
            }
            _ => Some(vec![0.0; len]),
        };
        if let Some(f) = fresh {
            *state = f;
        }
        if state.len() != len {
            *state = vec![0.0; len];
        }
    }
}

/// What an optimizer step sees of a parameter: its stored values and gradient (dense or in mask
/// order), the mask to re-apply after the update (dense storage of a masked tensor only), and the
/// layout its state must have.
pub struct ParamUpdate<'a> {
    /// The stored values.
    pub values: &'a mut [f32],
    /// The gradient, one value per stored value.
    pub grad: &'a [f32],
    /// The mask whose inactive values (and state) must be zeroed after the update; `None` when
    /// every stored value is active.
    pub mask: Option<&'a Mask>,
    /// The layout the optimizer's per-value state must have.
    pub layout: StateLayout,
}

/// Bytes a parameter holds, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldBytes {
    /// Values, plus the mask and the sparse indices when it has them.
    pub values: usize,
    /// Gradient.
    pub grad: usize,
}

fn empty() -> Tensor {
    Tensor::zeros(ndarray::IxDyn(&[0]))
}

/// The values of `dense` at the active elements of `mask`, in mask order.
pub(crate) fn gather_active(dense: &[f32], mask: &Mask) -> Vec<f32> {
    mask.iter_active().map(|i| dense[i]).collect()
}

/// The dense vector (zeros at inactive elements) of values given in mask order.
pub(crate) fn scatter_active(active: &[f32], mask: &Mask) -> Vec<f32> {
    let mut dense = vec![0.0; mask.len()];
    for (i, &v) in mask.iter_active().zip(active) {
        dense[i] = v;
    }
    dense
}

/// Values in the mask order of `from`, re-laid in the mask order of `to`: kept where active in
/// both, zero where only `to` is active.
pub(crate) fn remap_active(from: &Mask, vals: &[f32], to: &Mask) -> Vec<f32> {
    let mut src = from.iter_active().zip(vals.iter().copied()).peekable();
    to.iter_active()
        .map(|i| {
            while src.next_if(|&(j, _)| j < i).is_some() {}
            match src.peek() {
                Some(&(j, v)) if j == i => v,
                _ => 0.0,
            }
        })
        .collect()
}

impl Param {
    /// A parameter with a zero gradient and no mask, in dense storage.
    pub fn new(value: Tensor, role: Role) -> Self {
        let grad = Tensor::zeros(value.raw_dim());
        Param {
            shape: value.shape().to_vec(),
            value,
            grad,
            role,
            prunable: false,
            dense_grad: false,
            mask: None,
            lean: None,
            lean_allowed: false,
            top_k: None,
        }
    }

    /// Marks the parameter as prunable.
    pub fn prunable(mut self) -> Self {
        self.prunable = true;
        self
    }

    /// Number of elements (of the dense tensor, whatever the storage).
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the parameter has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape of the dense tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The mask, if the parameter is masked.
    pub fn mask(&self) -> Option<&Mask> {
        self.mask.as_deref()
    }

    /// Active elements (all of them when unmasked).
    pub fn active(&self) -> usize {
        self.mask().map_or(self.len(), Mask::active)
    }

    /// Whether the parameter is held lean (active values only).
    pub fn is_lean(&self) -> bool {
        self.lean.is_some()
    }

    /// Whether lean storage is allowed.
    pub fn lean_allowed(&self) -> bool {
        self.lean_allowed
    }

    /// Allows lean storage (the parameter becomes lean now if it is masked and, later, whenever
    /// a mask is installed) or forbids it (a lean parameter goes back to dense storage).
    pub fn set_lean_allowed(&mut self, allowed: bool) -> Result<()> {
        self.lean_allowed = allowed;
        if allowed && self.mask.is_some() {
            self.make_lean()
        } else {
            self.make_dense();
            Ok(())
        }
    }

    /// Puts the storage where a layer's kernels want it: lean when `sparse` (if lean storage is
    /// allowed and the parameter is masked), dense otherwise. Conversions are exact.
    pub fn follow_kernels(&mut self, sparse: bool) -> Result<()> {
        if sparse && self.lean_allowed && self.mask.is_some() {
            self.make_lean()
        } else {
            self.make_dense();
            Ok(())
        }
    }

    /// The rows and columns of the `[fan_in, fan_out]` matrix view of the tensor.
    fn matrix(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1).max(1);
        (self.len() / cols, cols)
    }

    /// Converts dense storage of a masked tensor to lean (nothing to do when already lean).
    fn make_lean(&mut self) -> Result<()> {
        let Some(mask) = &self.mask else {
            return Ok(());
        };
        if self.lean.is_some() || self.is_empty() {
            return Ok(());
        }
        let (rows, cols) = self.matrix();
        let values = self.value.as_slice().ok_or_else(layout_error)?;
        let weight = SparseWeight::from_dense(values, mask.clone(), rows, cols)?;
        let grad = match self.grad.as_slice() {
            Some(g) if g.len() == mask.len() => gather_active(g, mask),
            _ => vec![0.0; mask.active()],
        };
        self.lean = Some(Lean { weight, grad });
        self.value = empty();
        self.grad = empty();
        Ok(())
    }

    /// Converts lean storage back to dense (nothing to do when already dense).
    fn make_dense(&mut self) {
        let Some(lean) = self.lean.take() else {
            return;
        };
        let mask = lean.weight.mask();
        let value = scatter_active(lean.weight.values(), mask);
        let grad = if self.grad.len() == self.len() {
            std::mem::replace(&mut self.grad, empty())
        } else {
            Tensor::from_shape_vec(self.shape.as_slice(), scatter_active(&lean.grad, mask))
                .unwrap_or_else(|_| Tensor::zeros(self.shape.as_slice()))
        };
        self.value = Tensor::from_shape_vec(self.shape.as_slice(), value)
            .unwrap_or_else(|_| Tensor::zeros(self.shape.as_slice()));
        self.grad = grad;
    }

    /// Installs a mask (or removes it with `None`) and zeroes the inactive values. A lean
    /// parameter keeps its values at positions active in both masks; newly active positions
    /// start at zero, as in dense storage. A parameter allowed to be lean becomes lean.
    pub fn set_mask(&mut self, mask: Option<Mask>) -> Result<()> {
        let Some(m) = mask else {
            self.make_dense();
            self.mask = None;
            return Ok(());
        };
        if m.len() != self.len() {
            return Err(Error::shape(
                "mask",
                self.len(),
                format!("{} elements", m.len()),
            ));
        }
        let m = Arc::new(m);
        if let Some(lean) = &mut self.lean {
            let (rows, cols) = (lean.weight.rows(), lean.weight.cols());
            let old = lean.weight.shared_mask().clone();
            let values = remap_active(&old, lean.weight.values(), &m);
            lean.weight = SparseWeight::from_active(values, m.clone(), rows, cols)?;
            lean.grad = remap_active(&old, &lean.grad, &m);
            self.mask = Some(m);
            return Ok(());
        }
        if let Some(v) = self.value.as_slice_mut() {
            m.apply(v);
        }
        self.mask = Some(m);
        if self.lean_allowed {
            self.make_lean()?;
        }
        Ok(())
    }

    /// Replaces the value (same shape); inactive entries are dropped (zeroed), as
    /// [`Param::set_mask`] would. Works in both storages.
    pub fn set_value(&mut self, value: Tensor) -> Result<()> {
        if value.shape() != self.shape.as_slice() {
            return Err(Error::shape("parameter value", &self.shape, value.shape()));
        }
        if let Some(lean) = &mut self.lean {
            let value = contiguous(value);
            return lean
                .weight
                .refresh(value.as_slice().ok_or_else(layout_error)?);
        }
        self.value = contiguous(value);
        if let (Some(m), Some(v)) = (&self.mask, self.value.as_slice_mut()) {
            m.apply(v);
        }
        Ok(())
    }

    /// The value as a dense tensor: borrowed in dense storage, scattered (a transient copy) when
    /// lean.
    pub fn value_dense(&self) -> Cow<'_, Tensor> {
        match &self.lean {
            None => Cow::Borrowed(&self.value),
            Some(l) => {
                Cow::Owned(self.dense_tensor(scatter_active(l.weight.values(), l.weight.mask())))
            }
        }
    }

    /// The gradient as a dense tensor (zero at pruned positions unless a dense gradient was
    /// computed): borrowed in dense storage or when a `dense_grad` backward left it, scattered
    /// (a transient copy) when lean.
    pub fn grad_dense(&self) -> Cow<'_, Tensor> {
        match &self.lean {
            Some(l) if self.grad.len() != self.len() => {
                Cow::Owned(self.dense_tensor(scatter_active(&l.grad, l.weight.mask())))
            }
            _ => Cow::Borrowed(&self.grad),
        }
    }

    fn dense_tensor(&self, values: Vec<f32>) -> Tensor {
        Tensor::from_shape_vec(self.shape.as_slice(), values)
            .unwrap_or_else(|_| Tensor::zeros(self.shape.as_slice()))
    }

    /// What an optimizer step updates (see [`ParamUpdate`]).
    pub fn update_view(&mut self) -> Result<ParamUpdate<'_>> {
        match &mut self.lean {
            Some(l) => Ok(ParamUpdate {
                layout: StateLayout::Active(l.weight.shared_mask().clone()),
                values: l.weight.values_mut(),
                grad: &l.grad,
                mask: None,
            }),
            None => {
                let values = self.value.as_slice_mut().ok_or_else(layout_error)?;
                let grad = self.grad.as_slice().ok_or_else(layout_error)?;
                if grad.len() != values.len() {
                    return Err(Error::shape("parameter gradient", values.len(), grad.len()));
                }
                Ok(ParamUpdate {
                    values,
                    grad,
                    mask: self.mask.as_deref(),
                    layout: StateLayout::Dense,
                })
            }
        }
    }

    /// Zeroes the gradient.
    pub fn zero_grad(&mut self) {
        self.grad.fill(0.0);
        if let Some(l) = &mut self.lean {
            l.grad.fill(0.0);
        }
    }

    /// Asks the next backward passes for the `k` gradient entries of largest magnitude at the
    /// pruned positions of this (masked) tensor, by ascending index (FedTiny's adjustment). The
    /// layer computes the full dense gradient of this tensor only, hands it to a streaming
    /// top-K and drops it.
    pub fn request_pruned_grad_top_k(&mut self, k: usize) {
        self.top_k = Some(TopKRequest { k, entries: None });
    }

    /// The entries the last backward pass selected for [`Param::request_pruned_grad_top_k`],
    /// ending the request; `None` without a request, before a backward pass, or for an unmasked
    /// tensor.
    pub fn take_pruned_grad_top_k(&mut self) -> Option<Vec<(u32, f32)>> {
        self.top_k.take().and_then(|r| r.entries)
    }

    /// Whether the next backward pass must compute the full dense gradient of this tensor
    /// (`dense_grad` or a top-K request).
    pub fn wants_dense_grad(&self) -> bool {
        self.dense_grad || self.top_k.is_some()
    }

    /// The buffer a layer writes the full dense gradient into (for [`Param::wants_dense_grad`]):
    /// `grad` itself in dense storage, a dense tensor allocated for this pass when lean. Call
    /// [`Param::finish_dense_grad`] once it is written.
    pub(crate) fn dense_grad_buffer(&mut self) -> Result<&mut [f32]> {
        if self.lean.is_some() && self.grad.len() != self.len() {
            self.grad = Tensor::zeros(self.shape.as_slice());
        }
        self.grad.as_slice_mut().ok_or_else(layout_error)
    }

    /// After the layer wrote the full dense gradient into [`Param::dense_grad_buffer`]: feeds a
    /// pending top-K request; when lean, gathers the active gradient and, unless `dense_grad`
    /// asks to keep it, drops the dense buffer.
    pub(crate) fn finish_dense_grad(&mut self) {
        if let (Some(req), Some(mask), Some(g)) =
            (&mut self.top_k, &self.mask, self.grad.as_slice())
            && g.len() == mask.len()
        {
            req.entries = Some(top_k_pruned_gradient(g, mask, req.k));
        }
        if let Some(l) = &mut self.lean {
            if let Some(g) = self.grad.as_slice()
                && g.len() == l.weight.mask().len()
            {
                l.grad = gather_active(g, l.weight.mask());
            }
            if !self.dense_grad {
                self.grad = empty();
            }
        }
    }

    /// Drops a dense gradient buffer a lean parameter kept from an earlier `dense_grad` pass.
    pub(crate) fn release_dense_grad(&mut self) {
        if self.lean.is_some() && !self.grad.is_empty() {
            self.grad = empty();
        }
    }

    /// The sparse weight of a lean parameter with its column values up to date (for a forward
    /// product).
    pub(crate) fn lean_weight(&mut self) -> Option<&SparseWeight> {
        let l = self.lean.as_mut()?;
        l.weight.sync_columns();
        Some(&l.weight)
    }

    /// The sparse weight and the active gradient of a lean parameter (for a backward pass).
    pub(crate) fn lean_parts(&mut self) -> Option<(&SparseWeight, &mut [f32])> {
        let l = self.lean.as_mut()?;
        l.weight.sync_columns();
        Some((&l.weight, l.grad.as_mut_slice()))
    }

    /// Bytes held for the value (with the mask and the sparse indices) and for the gradient.
    pub fn held_bytes(&self) -> HeldBytes {
        let mask = self.mask.as_ref().map_or(0, |m| 8 * m.words().len());
        match &self.lean {
            None => HeldBytes {
                values: 4 * self.value.len() + mask,
                grad: 4 * self.grad.len(),
            },
            Some(l) => HeldBytes {
                values: l.weight.value_bytes() + l.weight.index_bytes() + mask,
                // Plus a dense gradient a `dense_grad` pass left (empty otherwise).
                grad: 4 * (l.grad.len() + self.grad.len()),
            },
        }
    }
}

fn layout_error() -> Error {
    Error::StateMismatch("parameter is not in standard layout".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::from_vec;

    fn param(n: usize) -> Param {
        let v: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
        Param::new(from_vec(&[n / 4, 4], v).unwrap(), Role::Weight).prunable()
    }

    #[test]
    fn lean_storage_round_trips_and_follows_masks() {
        let mut p = param(24);
        p.set_lean_allowed(true).unwrap();
        assert!(!p.is_lean(), "unmasked stays dense");
        let m1 = Mask::from_fn(24, |i| i % 3 == 0);
        p.set_mask(Some(m1.clone())).unwrap();
        assert!(p.is_lean());
        assert_eq!(p.value.len() + p.grad.len(), 0, "no dense copy");
        let want: Vec<f32> = (0..24)
            .map(|i| if i % 3 == 0 { i as f32 + 1.0 } else { 0.0 })
            .collect();
        assert_eq!(p.value_dense().as_slice().unwrap(), want.as_slice());
        // A new mask keeps the values active in both, zero for the grown ones.
        let m2 = Mask::from_fn(24, |i| i % 2 == 0);
        p.set_mask(Some(m2)).unwrap();
        let got = p.value_dense().into_owned();
        for i in 0..24 {
            let w = if i % 6 == 0 { i as f32 + 1.0 } else { 0.0 };
            assert_eq!(got[[i / 4, i % 4]], w, "{i}");
        }
        // set_value drops inactive entries; dense conversion is exact.
        let all: Vec<f32> = (0..24).map(|i| -(i as f32)).collect();
        p.set_value(from_vec(&[6, 4], all).unwrap()).unwrap();
        let lean = p.value_dense().into_owned();
        p.set_lean_allowed(false).unwrap();
        assert!(!p.is_lean());
        assert_eq!(p.value, lean);
        assert!(
            p.set_value(from_vec(&[24], vec![0.0; 24]).unwrap())
                .is_err()
        );
        p.set_lean_allowed(true).unwrap();
        assert!(p.is_lean());
        p.set_mask(None).unwrap();
        assert!(!p.is_lean() && p.mask().is_none());
        assert_eq!(p.value, lean);
    }

    #[test]
    fn state_layouts_convert_like_masked_dense_state() {
        let a = Arc::new(Mask::from_fn(10, |i| i % 2 == 0));
        let b = Arc::new(Mask::from_fn(10, |i| i % 3 == 0));
        let dense: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let mut s = dense.clone();
        StateLayout::Dense.convert(&StateLayout::Active(a.clone()), 5, &mut s);
        assert_eq!(s, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        let la = StateLayout::Active(a.clone());
        la.convert(&StateLayout::Active(b.clone()), 4, &mut s);
        assert_eq!(
            s,
            vec![0.0, 0.0, 6.0, 0.0],
            "kept at 0 and 6, zero at 3 and 9"
        );
        StateLayout::Active(b).convert(&StateLayout::Dense, 10, &mut s);
        assert_eq!(s, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 0.0]);
        let mut wrong = vec![1.0; 3];
        la.convert(&StateLayout::Dense, 10, &mut wrong);
        assert_eq!(wrong, vec![0.0; 10]);
        assert!(la.same_as(&StateLayout::Active(Arc::new((*a).clone()))));
    }
}
