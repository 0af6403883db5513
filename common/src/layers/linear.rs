//! Fully connected layer: a GEMM, or the sparse kernels when the weight is masked below the
//! crossover density ([`crate::kernels::sparse::policy`]).

use rand::RngExt;

use super::conv::{view2, view2_mut, weight_slice};
use super::{OpInfo, OpKind, Slot, SlotMut, compressed, expect_grad, expect_input, join};
use crate::kernels::sparse::policy::{self, LayerShape, SparseMode};
use crate::kernels::sparse::{MatrixPlan, SparseWeight, Workspace};
use crate::kernels::{gemm, reduce};
use crate::param::{Param, Role};
use crate::rng::Rng;
use crate::tensor::{Mode, Tensor, contiguous, from_vec};
use crate::{Error, Result};

/// `y = x·W + b` with `W` stored `[in, out]`. Weights and bias start uniform in
/// `±1/√in` (PyTorch's default for linear layers).
///
/// When the weight is masked and [`policy::use_sparse`] says so for this shape and density, the
/// three products run on the sparse kernels ([`MatrixPlan`]); the weight gradient is then zero at
/// pruned positions unless the weight wants the full dense gradient
/// ([`Param::wants_dense_grad`]). With lean storage allowed on the weight, it holds only its
/// active values and gradient while the sparse kernels run (see [`crate::param`]); results are
/// bit-identical to dense storage with the same kernels.
///
/// The input kept for the backward pass becomes the buffer of the input gradient, so a step
/// allocates one input-sized buffer fewer.
pub struct Linear {
    weight: Param,
    bias: Param,
    fan_in: usize,
    fan_out: usize,
    cache: Option<Cache>,
    sparse_mode: SparseMode,
    sparse: SparseState,
    last_sparse: bool,
}

enum Cache {
    Dense(Tensor),
    Sparse {
        /// The input (for a dense weight gradient, then reused for the input gradient).
        x: Tensor,
        /// The packed input (the layout of the plan kept in [`SparseState::plan`]).
        packed: Vec<f32>,
    },
}

/// What the sparse path keeps between steps.
#[derive(Default)]
struct SparseState {
    /// The compressed weight of dense storage (lean storage holds its own).
    weight: Option<SparseWeight>,
    plan: Option<MatrixPlan>,
    work: Workspace,
}

impl Linear {
    /// A linear layer `fan_in → fan_out`.
    pub fn new(fan_in: usize, fan_out: usize, rng: &mut Rng) -> Result<Self> {
        if fan_in == 0 || fan_out == 0 {
            return Err(Error::InvalidConfig(format!(
                "linear {fan_in}->{fan_out}: sizes must be positive"
            )));
        }
        let bound = 1.0 / (fan_in as f32).sqrt();
        let w: Vec<f32> = (0..fan_in * fan_out)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let b: Vec<f32> = (0..fan_out)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Linear {
            weight: Param::new(from_vec(&[fan_in, fan_out], w)?, Role::Weight),
            bias: Param::new(from_vec(&[fan_out], b)?, Role::Bias),
            fan_in,
            fan_out,
            cache: None,
            sparse_mode: SparseMode::Auto,
            sparse: SparseState::default(),
            last_sparse: false,
        })
    }

    /// Marks the weight as prunable.
    pub fn prunable(mut self) -> Self {
        self.weight.prunable = true;
        self
    }

    /// Chooses between sparse and dense kernels (default [`SparseMode::Auto`]).
    pub fn with_sparse_mode(mut self, mode: SparseMode) -> Self {
        self.sparse_mode = mode;
        self
    }

    /// Whether the last forward pass ran the sparse kernels.
    pub fn ran_sparse(&self) -> bool {
        self.last_sparse
    }

    /// The sparse plan for a batch of `n` rows when the sparse kernels should run.
    fn sparse_plan(&mut self, n: usize) -> Result<Option<MatrixPlan>> {
        let Some(mask) = self.weight.mask() else {
            return Ok(None);
        };
        let shape = LayerShape::Linear {
            weights: self.fan_in * self.fan_out,
        };
        if !policy::use_sparse(self.sparse_mode, &shape, mask.density()) {
            return Ok(None);
        }
        match self.sparse.plan.take() {
            Some(p) if p.m() == n => Ok(Some(p)),
            _ => MatrixPlan::new(n, self.fan_in).map(Some),
        }
    }

    /// Brings the compressed weight up to date with the weight's values and mask (all entries
    /// if the mask was removed since the forward pass).
    fn sync_sparse_weight(&mut self) -> Result<()> {
        let (rows, cols) = (self.fan_in, self.fan_out);
        compressed::sync(&self.weight, &mut self.sparse.weight, rows, cols)
    }

    fn forward_sparse(&mut self, x: Tensor, plan: MatrixPlan, mode: Mode) -> Result<Tensor> {
        let (rows, cols) = (self.fan_in, self.fan_out);
        let lean = compressed::prepare(&mut self.weight, &mut self.sparse.weight, rows, cols)?;
        let n = x.shape()[0];
        let mut packed = std::mem::take(&mut self.sparse.work.src);
        let mut out = vec![0.0f32; n * self.fan_out];
        let b = self.bias.value.as_slice().unwrap_or(&[]);
        for row in out.chunks_mut(self.fan_out) {
            row.copy_from_slice(b);
        }
        let w = if lean {
            self.weight.lean_weight()
        } else {
            self.sparse.weight.as_ref()
        }
        .ok_or_else(sparse_state_error)?;
        let result = plan
            .pack_input(x.as_slice().unwrap_or(&[]), &mut packed)
            .and_then(|()| plan.forward(w, &packed, &mut self.sparse.work.out, &mut out, true));
        self.sparse.plan = Some(plan);
        if let Err(e) = result {
            self.sparse.work.src = packed;
            return Err(e);
        }
        if mode.caches() {
            self.cache = Some(Cache::Sparse { x, packed });
        } else {
            self.sparse.work.src = packed;
        }
        from_vec(&[n, self.fan_out], out)
    }

    fn backward_sparse(&mut self, grad: Tensor, x: Tensor, packed: &[f32]) -> Result<Tensor> {
        let n = x.shape()[0];
        let (fi, fo) = (self.fan_in, self.fan_out);
        expect_grad("linear", &grad, &[n, fo])?;
        let plan = match self.sparse.plan.take() {
            Some(p) if p.m() == n => p,
            _ => MatrixPlan::new(n, fi)?,
        };
        let result = self.backward_sparse_with(grad, x, &plan, packed);
        self.sparse.plan = Some(plan);
        result
    }

    fn backward_sparse_with(
        &mut self,
        grad: Tensor,
        x: Tensor,
        plan: &MatrixPlan,
        packed: &[f32],
    ) -> Result<Tensor> {
        let n = plan.m();
        let (fi, fo) = (self.fan_in, self.fan_out);
        let grad = contiguous(grad);
        let dy = grad.as_slice().unwrap_or(&[]);
        let lean = self.weight.is_lean();
        if !lean {
            self.sync_sparse_weight()?;
        }
        let dense_grad = self.weight.wants_dense_grad();
        let work = &mut self.sparse.work;
        plan.pack_output_grad(dy, fo, &mut work.out_grad)?;
        if dense_grad {
            let dw = self.weight.dense_grad_buffer()?;
            let xv = view2(x.as_slice().unwrap_or(&[]), n, fi)?;
            gemm(xv.t(), view2(dy, n, fo)?, 0.0, view2_mut(dw, fi, fo)?);
            self.weight.finish_dense_grad();
        } else {
            self.weight.release_dense_grad();
        }
        bias_grad(&mut self.bias, dy, n, fo);
        // The input is no longer needed: its buffer receives the input gradient (overwritten).
        let mut dx = crate::tensor::into_vec(x);
        dx.resize(n * fi, 0.0);
        if lean {
            let (w, dw) = self.weight.lean_parts().ok_or_else(sparse_state_error)?;
            if !dense_grad {
                plan.weight_grad_active(w, packed, &work.out_grad, dw)?;
            }
            plan.input_grad(w, &work.out_grad, &mut work.src_grad, &mut dx)?;
        } else {
            let w = self.sparse.weight.as_ref().ok_or_else(sparse_state_error)?;
            if !dense_grad {
                let dw = self
                    .weight
                    .grad
                    .as_slice_mut()
                    .ok_or_else(grad_layout_error)?;
                plan.weight_grad(w, packed, &work.out_grad, &mut work.weight_grad, dw)?;
            }
            plan.input_grad(w, &work.out_grad, &mut work.src_grad, &mut dx)?;
        }
        from_vec(&[n, fi], dx)
    }
}

fn grad_layout_error() -> Error {
    Error::StateMismatch("linear grad layout".into())
}

fn sparse_state_error() -> Error {
    Error::StateMismatch("linear: sparse state missing".into())
}

/// The bias gradient: per-feature sums of the output gradient.
fn bias_grad(b: &mut Param, dy: &[f32], n: usize, fo: usize) {
    let sums = reduce::channel_sums(n, fo, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&dy[r * fo..(r + 1) * fo]) {
            *a += v;
        }
    });
    for (g, s) in b.grad.iter_mut().zip(sums) {
        *g = s as f32;
    }
}

impl super::Layer for Linear {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        expect_input("linear", &x, 2, self.fan_in)?;
        let x = contiguous(x);
        let n = x.shape()[0];
        if let Some(plan) = self.sparse_plan(n)? {
            self.last_sparse = true;
            return self.forward_sparse(x, plan, mode);
        }
        self.last_sparse = false;
        self.weight.follow_kernels(false)?;
        self.sparse.weight = None;
        let mut out = vec![0.0f32; n * self.fan_out];
        let b = self.bias.value.as_slice().unwrap_or(&[]);
        for row in out.chunks_mut(self.fan_out) {
            row.copy_from_slice(b);
        }
        {
            let a = view2(x.as_slice().unwrap_or(&[]), n, self.fan_in)?;
            let w = view2(weight_slice(&self.weight)?, self.fan_in, self.fan_out)?;
            gemm(a, w, 1.0, view2_mut(&mut out, n, self.fan_out)?);
        }
        if mode.caches() {
            self.cache = Some(Cache::Dense(x));
        }
        from_vec(&[n, self.fan_out], out)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let cache = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("linear".into()))?;
        let x = match cache {
            Cache::Dense(x) => x,
            Cache::Sparse { x, packed } => {
                let result = self.backward_sparse(grad, x, &packed);
                self.sparse.work.src = packed;
                return result;
            }
        };
        let n = x.shape()[0];
        expect_grad("linear", &grad, &[n, self.fan_out])?;
        let grad = contiguous(grad);
        let dy = grad.as_slice().unwrap_or(&[]);
        let (fi, fo) = (self.fan_in, self.fan_out);
        {
            // Dense kernels: the weight is in dense storage, its gradient is the full one.
            self.weight.follow_kernels(false)?;
            let xv = view2(x.as_slice().unwrap_or(&[]), n, fi)?;
            let dyv = view2(dy, n, fo)?;
            let dw = view2_mut(self.weight.dense_grad_buffer()?, fi, fo)?;
            gemm(xv.t(), dyv, 0.0, dw);
            self.weight.finish_dense_grad();
        }
        bias_grad(&mut self.bias, dy, n, fo);
        // The input is no longer needed: its buffer receives the input gradient (overwritten).
        let mut dx = crate::tensor::into_vec(x);
        dx.resize(n * fi, 0.0);
        {
            let dyv = view2(dy, n, fo)?;
            let w = view2(weight_slice(&self.weight)?, fi, fo)?;
            gemm(dyv, w.t(), 0.0, view2_mut(&mut dx, n, fi)?);
        }
        from_vec(&[n, fi], dx)
    }

    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        f(&join(prefix, "weight"), Slot::Param(&self.weight));
        f(&join(prefix, "bias"), Slot::Param(&self.bias));
    }

    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, SlotMut<'_>)) {
        f(&join(prefix, "weight"), SlotMut::Param(&mut self.weight));
        f(&join(prefix, "bias"), SlotMut::Param(&mut self.bias));
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        if input != [self.fan_in] {
            return Err(Error::shape(prefix, [self.fan_in], input));
        }
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::Linear,
            macs: (self.fan_in * self.fan_out) as u64,
            weight: Some(join(prefix, "weight")),
            input_elems: self.fan_in,
            output_elems: self.fan_out,
            cached_elems: self.fan_in,
        });
        Ok(vec![self.fan_out])
    }

    fn clear_cache(&mut self) {
        self.cache = None;
        self.sparse.work = Workspace::default();
    }
}
