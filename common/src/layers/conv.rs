//! 2-D convolution over NHWC batches: im2col + GEMM, or the sparse kernels when the weight is
//! masked below the crossover density or the patch is tiny ([`crate::kernels::sparse::policy`]).

use std::ops::Range;
use std::sync::Arc;

use ndarray::{ArrayView2, ArrayViewMut2};
use rand_distr::{Distribution, Normal};

use super::{OpInfo, OpKind, Slot, SlotMut, compressed, expect_grad, expect_input, join};
use crate::kernels::sparse::policy::{self, LayerShape, SparseMode};
use crate::kernels::sparse::{ConvPlan, MatrixPlan, SparseWeight, WeightGrad, Workspace};
use crate::kernels::{ConvGeometry, gemm, im2col, reduce};
use crate::mask::Mask;
use crate::param::{Param, Role};
use crate::rng::Rng;
use crate::tensor::{Mode, Tensor, contiguous, from_vec, into_vec, zeros};
use crate::{Error, Result};

/// A square-kernel 2-D convolution. The weight is stored `[k, k, cin, cout]`, which is the
/// `[k·k·cin, cout]` GEMM operand without a copy.
///
/// When the weight is masked and [`policy::use_sparse`] says so for this shape and density, the
/// forward pass, the input gradient and the weight gradient run on the sparse kernels
/// ([`ConvPlan`]): only active weights are touched, and the weight gradient is computed at active
/// positions only (zero elsewhere) unless the weight wants the full dense gradient
/// ([`Param::wants_dense_grad`]). Either way the results equal the masked dense computation up
/// to float rounding.
///
/// With lean storage allowed on the weight ([`Param::set_lean_allowed`]), the weight follows the
/// kernel choice ([`Param::follow_kernels`]): while the sparse kernels run, its active values
/// (inside the [`SparseWeight`] the kernels read) and their gradient are all it holds; the
/// results are bit-identical to dense storage with the same kernels.
///
/// A single-pixel input whose output is a single pixel too is read by one tap only (the
/// others read padding): the layer then runs as a linear layer on that tap's weight rows, a
/// GEMM or the sparse matrix kernels ([`MatrixPlan`]), and the other taps' gradient is zero.
///
/// The im2col matrix or packed input lives in a scratch buffer kept from one step to the next.
/// On the sparse kernels, when the output is as long as the input (same pixels and channels,
/// most of `resnet18`'s convolutions), the output is written over the input and the input
/// gradient over the output gradient, block by block ([`ConvPlan::forward_in_place`]): no
/// buffer is allocated or zero-filled, and each block's lines are written while still in
/// cache from being read (`resnet18` width 1 at d = 0.01: +13 % samples/s). Otherwise the
/// output and the input gradient are fresh buffers each step, on purpose: keeping the output
/// gradient's buffer for the next forward's output held one output-sized buffer per
/// convolution through the backward pass and raised the measured peak RSS of a `resnet18`
/// width-1 step at d = 0.01 from 385 to 459 MiB with no measurable speed gain. The input's
/// buffer is released (or written over) during the forward pass rather than held until the
/// backward pass, which would add one input-sized buffer per convolution to the peak.
pub struct Conv2d {
    weight: Param,
    bias: Option<Param>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    input_grad: bool,
    cache: Option<Cache>,
    scratch: Vec<f32>,
    sparse_mode: SparseMode,
    sparse: SparseState,
    last_sparse: bool,
}

enum Cache {
    Dense {
        geom: ConvGeometry,
        /// The im2col matrix of the input (or the input itself for pointwise convolutions).
        cols: Vec<f32>,
    },
    Sparse {
        /// The geometry of the forward pass (its plan stays in [`SparseState::plan`]).
        geom: ConvGeometry,
        /// The packed input (the plan's layout).
        packed: Vec<f32>,
    },
    /// A single-pixel input read by one tap only (see [`Conv2d::live_rows`]).
    Centre {
        geom: ConvGeometry,
        /// The input, `[n, cin]`.
        x: Vec<f32>,
        /// The packed input when the sparse kernels ran (the layout of
        /// [`SparseState::matrix`]).
        packed: Option<Vec<f32>>,
    },
}

/// What the sparse path keeps between steps.
#[derive(Default)]
struct SparseState {
    /// The compressed weight of dense storage (lean storage holds its own).
    weight: Option<SparseWeight>,
    plan: Option<ConvPlan>,
    /// The plan of the single-pixel case (a product with `[n, cin]`).
    matrix: Option<MatrixPlan>,
    /// The live tap's rows of the compressed weight (single-pixel case).
    centre: Option<CentreWeight>,
    work: Workspace,
}

/// Rows of a compressed weight cut out as a weight of their own.
struct CentreWeight {
    /// The mask of the weight they were cut from (the pattern is rebuilt when it changes).
    parent: Arc<Mask>,
    weight: SparseWeight,
}

/// The rows `rows` of `parent` in `slot`, rebuilt when the parent's pattern changed since the
/// last cut, else only given the parent's current values.
fn cut_rows<'a>(
    slot: &'a mut Option<CentreWeight>,
    parent: &SparseWeight,
    rows: Range<usize>,
) -> Result<&'a SparseWeight> {
    match slot {
        Some(c) if Arc::ptr_eq(&c.parent, parent.shared_mask()) => {
            c.weight.refresh_rows(parent, rows)?;
        }
        _ => {
            *slot = Some(CentreWeight {
                parent: Arc::clone(parent.shared_mask()),
                weight: parent.row_block(rows)?,
            });
        }
    }
    slot.as_ref()
        .map(|c| &c.weight)
        .ok_or_else(sparse_state_error)
}

impl Conv2d {
    /// A convolution with Kaiming-normal weights (fan-out, ReLU gain) and an optional zero bias.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
        rng: &mut Rng,
    ) -> Result<Self> {
        if cin == 0 || cout == 0 || k == 0 || stride == 0 {
            return Err(Error::InvalidConfig(format!(
                "conv {cin}->{cout} k{k} s{stride}: sizes must be positive"
            )));
        }
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let normal =
            Normal::new(0.0, std).map_err(|e| Error::InvalidConfig(format!("conv init: {e}")))?;
        let values: Vec<f32> = (0..k * k * cin * cout)
            .map(|_| normal.sample(rng) as f32)
            .collect();
        let weight = Param::new(from_vec(&[k, k, cin, cout], values)?, Role::Weight);
        let bias = if bias {
            Some(Param::new(
                Tensor::zeros(ndarray::IxDyn(&[cout])),
                Role::Bias,
            ))
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            cin,
            cout,
            k,
            stride,
            pad,
            input_grad: true,
            cache: None,
            scratch: Vec::new(),
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

    /// Skips the input gradient (for the first layer of a model, whose input is data).
    pub fn without_input_grad(mut self) -> Self {
        self.input_grad = false;
        self
    }

    /// The weight parameter.
    pub fn weight(&self) -> &Param {
        &self.weight
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

    fn patch(&self) -> usize {
        self.k * self.k * self.cin
    }

    /// The sparse plan for `g` when the sparse kernels should run, building it if needed.
    /// Unmasked weights run them only when the patch is small enough for the direct kernels
    /// to beat the GEMM at full density ([`policy::SMALL_PATCH`]).
    fn sparse_plan(&mut self, g: &ConvGeometry) -> Result<Option<ConvPlan>> {
        let density = match self.weight.mask() {
            Some(mask) => mask.density(),
            None if self.patch() <= policy::SMALL_PATCH => 1.0,
            None => return Ok(None),
        };
        let shape = LayerShape::Conv {
            pixels: g.oh * g.ow,
            taps: self.k * self.k,
            patch: self.patch(),
        };
        if !policy::use_sparse(self.sparse_mode, &shape, density) {
            return Ok(None);
        }
        match self.sparse.plan.take() {
            Some(p) if p.geometry() == g => Ok(Some(p)),
            _ => ConvPlan::new(g).map(Some),
        }
    }

    /// Puts the weight where the sparse kernels want it: lean storage when allowed (then the
    /// layer keeps no compressed copy), else a compressed copy synced with the dense values.
    /// Returns whether the weight is lean.
    fn weight_for_sparse_kernels(&mut self) -> Result<bool> {
        let (rows, cols) = (self.patch(), self.cout);
        compressed::prepare(&mut self.weight, &mut self.sparse.weight, rows, cols)
    }

    /// Brings the compressed weight up to date with the weight's values and mask (all entries
    /// if the mask was removed since the forward pass).
    fn sync_sparse_weight(&mut self) -> Result<()> {
        let (rows, cols) = (self.patch(), self.cout);
        compressed::sync(&self.weight, &mut self.sparse.weight, rows, cols)
    }

    fn forward_sparse(
        &mut self,
        x: Tensor,
        g: ConvGeometry,
        plan: ConvPlan,
        mode: Mode,
    ) -> Result<Tensor> {
        let lean = self.weight_for_sparse_kernels()?;
        let mut packed = std::mem::take(&mut self.sparse.work.src);
        let w = if lean {
            self.weight.lean_weight()
        } else {
            self.sparse.weight.as_ref()
        }
        .ok_or_else(sparse_state_error)?;
        let bias = self.bias.as_ref().and_then(|b| b.value.as_slice());
        // An output as long as the input is written over it (see [`Conv2d`]).
        let (out, result) = if plan.in_place(self.cout) {
            let mut buf = into_vec(x);
            let result = plan.forward_in_place(w, &mut buf, bias, &mut packed);
            (buf, result)
        } else {
            let x = contiguous(x);
            let mut out = zeros(g.rows() * self.cout);
            let x = x.as_slice().unwrap_or(&[]);
            let result = plan.forward(w, x, bias, &mut packed, &mut out);
            (out, result)
        };
        self.sparse.plan = Some(plan);
        if let Err(e) = result {
            self.sparse.work.src = packed;
            return Err(e);
        }
        if mode.caches() {
            self.cache = Some(Cache::Sparse { geom: g, packed });
        } else {
            self.sparse.work.src = packed;
        }
        from_vec(&[g.n, g.oh, g.ow, self.cout], out)
    }

    fn backward_sparse(
        &mut self,
        grad: Tensor,
        g: ConvGeometry,
        packed: Vec<f32>,
    ) -> Result<Tensor> {
        let plan = match self.sparse.plan.take() {
            Some(p) if *p.geometry() == g => p,
            _ => ConvPlan::new(&g)?,
        };
        let result = expect_grad("conv2d", &grad, &[g.n, g.oh, g.ow, self.cout])
            .and_then(|()| self.backward_sparse_with(into_vec(grad), &packed, &plan));
        self.sparse.plan = Some(plan);
        self.sparse.work.src = packed;
        let dx = result?;
        if !self.input_grad {
            return Ok(Tensor::zeros(ndarray::IxDyn(&[0])));
        }
        from_vec(&[g.n, g.h, g.w, g.c], dx)
    }

    /// The sparse backward pass from the output gradient `dy` (whose buffer becomes the input
    /// gradient's when they are as long, see [`Conv2d`]).
    fn backward_sparse_with(
        &mut self,
        mut dy: Vec<f32>,
        packed: &[f32],
        plan: &ConvPlan,
    ) -> Result<Vec<f32>> {
        let g = *plan.geometry();
        let (rows, patch, cout) = (g.rows(), self.patch(), self.cout);
        let lean = self.weight.is_lean();
        if !lean {
            self.sync_sparse_weight()?;
        }
        let dense_grad = self.weight.wants_dense_grad();
        if dense_grad {
            // The full gradient, pruned positions included: im2col of the (unpacked) input.
            let dw = self.weight.dense_grad_buffer()?;
            let mut x = zeros(g.n * g.image_len());
            plan.unpack_input(packed, &mut x)?;
            let cols = if g.is_pointwise() {
                x
            } else {
                let mut cols = std::mem::take(&mut self.scratch);
                cols.resize(rows * patch, 0.0);
                im2col::im2col(&x, &g, &mut cols);
                cols
            };
            gemm(
                view2(&cols, rows, patch)?.t(),
                view2(&dy, rows, cout)?,
                0.0,
                view2_mut(dw, patch, cout)?,
            );
            if !g.is_pointwise() {
                self.scratch = cols;
            }
            self.weight.finish_dense_grad();
        } else {
            self.weight.release_dense_grad();
        }
        if let Some(b) = &mut self.bias {
            bias_grad(b, &dy, rows, cout);
        }
        let partials = &mut self.sparse.work.weight_grad;
        let (w, dw_out) = if lean {
            let (w, dw) = self.weight.lean_parts().ok_or_else(sparse_state_error)?;
            (w, (!dense_grad).then_some(WeightGrad::Active(dw)))
        } else {
            let w = self.sparse.weight.as_ref().ok_or_else(sparse_state_error)?;
            let dw = self.weight.grad.as_slice_mut().ok_or_else(layout_error)?;
            (w, (!dense_grad).then_some(WeightGrad::Dense(dw)))
        };
        if self.input_grad && plan.in_place(self.cout) {
            plan.backward_in_place(w, packed, &mut dy, dw_out, partials)?;
            return Ok(dy);
        }
        // Overwritten by the kernel; a fresh buffer (see [`Conv2d`]).
        let mut dx = if self.input_grad {
            zeros(g.n * g.image_len())
        } else {
            Vec::new()
        };
        let dx_out = self.input_grad.then_some(dx.as_mut_slice());
        plan.backward_with(w, packed, &dy, dx_out, dw_out, partials)?;
        Ok(dx)
    }
}

impl Conv2d {
    /// When the input is a single pixel and so is the output, the weight rows
    /// `t·cin..(t + 1)·cin` of the one tap `t` that reads it (the window's centre for a
    /// convolution that keeps the size). Every other tap reads padding only, so the convolution
    /// is the linear layer `y = x·W[t] (+ b)` and runs as one: `vgg11`'s last convolutions on
    /// a 28×28 input would otherwise spend 8/9 of their products on padding.
    fn live_rows(&self, g: &ConvGeometry) -> Option<Range<usize>> {
        let single = g.h == 1 && g.w == 1 && g.oh == 1 && g.ow == 1;
        (single && g.pad < g.kh && g.pad < g.kw).then(|| {
            let t = g.pad * g.kw + g.pad;
            t * g.c..(t + 1) * g.c
        })
    }

    /// The output buffer of `rows` pixels, holding the bias in every row if there is one
    /// (then products accumulate into it), and whether there is.
    fn output_with_bias(&self, rows: usize) -> (Vec<f32>, bool) {
        let mut out = zeros(rows * self.cout);
        let bias = self.bias.as_ref().and_then(|b| b.value.as_slice());
        if let Some(b) = bias {
            for row in out.chunks_mut(self.cout) {
                row.copy_from_slice(b);
            }
        }
        (out, bias.is_some())
    }

    /// The kept plan of the single-pixel case for a batch of `n`, or a new one.
    fn centre_plan(&mut self, n: usize) -> Result<MatrixPlan> {
        match self.sparse.matrix.take() {
            Some(p) if p.m() == n => Ok(p),
            _ => MatrixPlan::new(n, self.cin),
        }
    }

    /// The forward pass of the single-pixel case (see [`Conv2d::live_rows`]): a GEMM with the
    /// live rows, or the sparse matrix kernels on those rows when the weight is masked below
    /// the crossover of [`LayerShape::SinglePixel`] (judged by the density of the whole
    /// weight).
    fn forward_centre(
        &mut self,
        x: Tensor,
        g: ConvGeometry,
        rows: Range<usize>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (n, cin, cout) = (g.n, self.cin, self.cout);
        let x = into_vec(x);
        let (mut out, has_bias) = self.output_with_bias(n);
        let shape = LayerShape::SinglePixel;
        let sparse = self
            .weight
            .mask()
            .is_some_and(|m| policy::use_sparse(self.sparse_mode, &shape, m.density()));
        let packed = if sparse {
            let plan = self.centre_plan(n)?;
            let lean = self.weight_for_sparse_kernels()?;
            let parent = if lean {
                self.weight.lean_weight()
            } else {
                self.sparse.weight.as_ref()
            }
            .ok_or_else(sparse_state_error)?;
            let w = cut_rows(&mut self.sparse.centre, parent, rows)?;
            let mut packed = std::mem::take(&mut self.sparse.work.src);
            let result = plan.pack_input(&x, &mut packed).and_then(|()| {
                plan.forward(w, &packed, &mut self.sparse.work.out, &mut out, has_bias)
            });
            self.sparse.matrix = Some(plan);
            if let Err(e) = result {
                self.sparse.work.src = packed;
                return Err(e);
            }
            Some(packed)
        } else {
            self.weight.follow_kernels(false)?;
            self.sparse.weight = None;
            let live = &weight_slice(&self.weight)?[rows.start * cout..rows.end * cout];
            let beta = if has_bias { 1.0 } else { 0.0 };
            gemm(
                view2(&x, n, cin)?,
                view2(live, cin, cout)?,
                beta,
                view2_mut(&mut out, n, cout)?,
            );
            None
        };
        self.last_sparse = sparse;
        if mode.caches() {
            self.cache = Some(Cache::Centre { geom: g, x, packed });
        } else if let Some(p) = packed {
            self.sparse.work.src = p;
        }
        from_vec(&[n, 1, 1, cout], out)
    }

    /// The backward pass of the single-pixel case: the weight gradient is zero outside the live
    /// rows (those taps read padding only).
    fn backward_centre(
        &mut self,
        grad: Tensor,
        g: ConvGeometry,
        x: Vec<f32>,
        packed: Option<Vec<f32>>,
    ) -> Result<Tensor> {
        let result = expect_grad("conv2d", &grad, &[g.n, 1, 1, self.cout]).and_then(|()| {
            let grad = contiguous(grad);
            self.backward_centre_with(grad.as_slice().unwrap_or(&[]), &g, &x, packed.as_deref())
        });
        if let Some(p) = packed {
            self.sparse.work.src = p;
        }
        let dx = result?;
        if !self.input_grad {
            return Ok(Tensor::zeros(ndarray::IxDyn(&[0])));
        }
        from_vec(&[g.n, 1, 1, g.c], dx)
    }

    fn backward_centre_with(
        &mut self,
        dy: &[f32],
        g: &ConvGeometry,
        x: &[f32],
        packed: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let rows = self.live_rows(g).ok_or_else(sparse_state_error)?;
        let (n, cin, cout) = (g.n, self.cin, self.cout);
        let live = rows.start * cout..rows.end * cout;
        let full_grad = packed.is_none() || self.weight.wants_dense_grad();
        if full_grad {
            let dw = self.weight.dense_grad_buffer()?;
            dw.fill(0.0);
            gemm(
                view2(x, n, cin)?.t(),
                view2(dy, n, cout)?,
                0.0,
                view2_mut(&mut dw[live.clone()], cin, cout)?,
            );
            self.weight.finish_dense_grad();
        } else {
            self.weight.release_dense_grad();
        }
        if let Some(b) = &mut self.bias {
            bias_grad(b, dy, n, cout);
        }
        let Some(packed) = packed else {
            if !self.input_grad {
                return Ok(Vec::new());
            }
            let mut dx = vec![0.0f32; n * cin];
            gemm(
                view2(dy, n, cout)?,
                view2(&weight_slice(&self.weight)?[live], cin, cout)?.t(),
                0.0,
                view2_mut(&mut dx, n, cin)?,
            );
            return Ok(dx);
        };
        let plan = self.centre_plan(n)?;
        let result = self.centre_sparse_grads(dy, packed, &plan, rows, !full_grad);
        self.sparse.matrix = Some(plan);
        result
    }

    /// The sparse kernels' gradients of the single-pixel case: the active weight gradient of
    /// the live rows (if `weight_grad`, zero at every other entry) and the input gradient.
    fn centre_sparse_grads(
        &mut self,
        dy: &[f32],
        packed: &[f32],
        plan: &MatrixPlan,
        rows: Range<usize>,
        weight_grad: bool,
    ) -> Result<Vec<f32>> {
        let (cin, cout) = (self.cin, self.cout);
        let lean = self.weight.is_lean();
        if !lean {
            self.sync_sparse_weight()?;
        }
        let work = &mut self.sparse.work;
        plan.pack_output_grad(dy, cout, &mut work.out_grad)?;
        let w = if lean {
            let (parent, dw) = self.weight.lean_parts().ok_or_else(sparse_state_error)?;
            let entries = parent.row_entries(rows.clone())?;
            let w = cut_rows(&mut self.sparse.centre, parent, rows)?;
            if weight_grad {
                dw.fill(0.0);
                plan.weight_grad_active(w, packed, &work.out_grad, &mut dw[entries])?;
            }
            w
        } else {
            let parent = self.sparse.weight.as_ref().ok_or_else(sparse_state_error)?;
            let live = rows.start * cout..rows.end * cout;
            let w = cut_rows(&mut self.sparse.centre, parent, rows)?;
            if weight_grad {
                let dw = self.weight.grad.as_slice_mut().ok_or_else(layout_error)?;
                dw.fill(0.0);
                plan.weight_grad(
                    w,
                    packed,
                    &work.out_grad,
                    &mut work.weight_grad,
                    &mut dw[live],
                )?;
            }
            w
        };
        if !self.input_grad {
            return Ok(Vec::new());
        }
        let mut dx = vec![0.0f32; plan.m() * cin];
        plan.input_grad(w, &work.out_grad, &mut work.src_grad, &mut dx)?;
        Ok(dx)
    }

    /// The dense kernels' backward pass from the output gradient `dy` and the kept columns.
    fn backward_dense(
        &mut self,
        dy: &[f32],
        g: ConvGeometry,
        mut cols: Vec<f32>,
    ) -> Result<Tensor> {
        let (rows, patch, cout) = (g.rows(), self.patch(), self.cout);
        {
            // Dense kernels: the weight is in dense storage, its gradient is the full one.
            self.weight.follow_kernels(false)?;
            let a = view2(&cols, rows, patch)?;
            let dyv = view2(dy, rows, cout)?;
            let dw = view2_mut(self.weight.dense_grad_buffer()?, patch, cout)?;
            gemm(a.t(), dyv, 0.0, dw);
            self.weight.finish_dense_grad();
        }
        if let Some(b) = &mut self.bias {
            bias_grad(b, dy, rows, cout);
        }
        if !self.input_grad {
            if !g.is_pointwise() {
                self.scratch = cols;
            }
            return Ok(Tensor::zeros(ndarray::IxDyn(&[0])));
        }
        // Reuse the column buffer for the column gradient.
        {
            let dyv = view2(dy, rows, cout)?;
            let w = view2(weight_slice(&self.weight)?, patch, cout)?;
            let dc = view2_mut(&mut cols, rows, patch)?;
            gemm(dyv, w.t(), 0.0, dc);
        }
        if g.is_pointwise() {
            return from_vec(&[g.n, g.h, g.w, g.c], cols);
        }
        // Overwritten by col2im; the one fresh buffer of the step (see [`Conv2d`]).
        let mut dx = zeros(g.n * g.image_len());
        im2col::col2im(&cols, &g, &mut dx);
        self.scratch = cols;
        from_vec(&[g.n, g.h, g.w, g.c], dx)
    }
}

fn sparse_state_error() -> Error {
    Error::StateMismatch("conv2d: sparse state missing".into())
}

/// The bias gradient: per-channel sums of the output gradient.
fn bias_grad(b: &mut Param, dy: &[f32], rows: usize, cout: usize) {
    let sums = reduce::channel_sums(rows, cout, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&dy[r * cout..(r + 1) * cout]) {
            *a += v;
        }
    });
    for (g, s) in b.grad.iter_mut().zip(sums) {
        *g = s as f32;
    }
}

impl super::Layer for Conv2d {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        expect_input("conv2d", &x, 4, self.cin)?;
        let s = x.shape();
        let g = ConvGeometry::new(
            s[0],
            s[1],
            s[2],
            s[3],
            self.k,
            self.k,
            self.stride,
            self.pad,
        )?;
        if let Some(rows) = self.live_rows(&g) {
            return self.forward_centre(x, g, rows, mode);
        }
        if let Some(plan) = self.sparse_plan(&g)? {
            self.last_sparse = true;
            return self.forward_sparse(x, g, plan, mode);
        }
        self.last_sparse = false;
        self.weight.follow_kernels(false)?;
        self.sparse.weight = None;
        let patch = self.patch();
        let cols = if g.is_pointwise() {
            crate::tensor::into_vec(x)
        } else {
            let x = contiguous(x);
            let mut cols = std::mem::take(&mut self.scratch);
            cols.resize(g.rows() * patch, 0.0);
            im2col::im2col(x.as_slice().unwrap_or(&[]), &g, &mut cols);
            cols
        };
        let rows = g.rows();
        let (mut out, has_bias) = self.output_with_bias(rows);
        let beta = if has_bias { 1.0 } else { 0.0 };
        {
            let a = view2(&cols, rows, patch)?;
            let w = view2(weight_slice(&self.weight)?, patch, self.cout)?;
            let c = view2_mut(&mut out, rows, self.cout)?;
            gemm(a, w, beta, c);
        }
        if mode.caches() {
            self.cache = Some(Cache::Dense { geom: g, cols });
        } else if !g.is_pointwise() {
            self.scratch = cols;
        }
        from_vec(&[g.n, g.oh, g.ow, self.cout], out)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let cache = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("conv2d".into()))?;
        let (g, cols) = match cache {
            Cache::Dense { geom, cols } => (geom, cols),
            Cache::Sparse { geom, packed } => return self.backward_sparse(grad, geom, packed),
            Cache::Centre { geom, x, packed } => {
                return self.backward_centre(grad, geom, x, packed);
            }
        };
        if let Err(e) = expect_grad("conv2d", &grad, &[g.n, g.oh, g.ow, self.cout]) {
            if !g.is_pointwise() {
                self.scratch = cols;
            }
            return Err(e);
        }
        let grad = contiguous(grad);
        self.backward_dense(grad.as_slice().unwrap_or(&[]), g, cols)
    }

    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        f(&join(prefix, "weight"), Slot::Param(&self.weight));
        if let Some(b) = &self.bias {
            f(&join(prefix, "bias"), Slot::Param(b));
        }
    }

    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, SlotMut<'_>)) {
        f(&join(prefix, "weight"), SlotMut::Param(&mut self.weight));
        if let Some(b) = &mut self.bias {
            f(&join(prefix, "bias"), SlotMut::Param(b));
        }
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        let &[h, w, c] = input else {
            return Err(Error::shape(prefix, "[h, w, c]", input));
        };
        if c != self.cin {
            return Err(Error::shape(prefix, self.cin, c));
        }
        let g = ConvGeometry::new(1, h, w, c, self.k, self.k, self.stride, self.pad)?;
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::Conv,
            macs: (g.oh * g.ow * self.patch() * self.cout) as u64,
            weight: Some(join(prefix, "weight")),
            input_elems: h * w * c,
            output_elems: g.oh * g.ow * self.cout,
            cached_elems: g.oh * g.ow * self.patch(),
        });
        Ok(vec![g.oh, g.ow, self.cout])
    }

    fn clear_cache(&mut self) {
        self.cache = None;
        self.scratch = Vec::new();
        self.sparse.work = Workspace::default();
    }
}

fn layout_error() -> Error {
    Error::StateMismatch("parameter is not in standard layout".into())
}

pub(super) fn weight_slice(p: &Param) -> Result<&[f32]> {
    p.value.as_slice().ok_or_else(layout_error)
}

pub(super) fn view2(s: &[f32], r: usize, c: usize) -> Result<ArrayView2<'_, f32>> {
    ArrayView2::from_shape((r, c), s)
        .map_err(|e| Error::shape("matrix view", (r, c), e.to_string()))
}

pub(super) fn view2_mut(s: &mut [f32], r: usize, c: usize) -> Result<ArrayViewMut2<'_, f32>> {
    ArrayViewMut2::from_shape((r, c), s)
        .map_err(|e| Error::shape("matrix view", (r, c), e.to_string()))
}
