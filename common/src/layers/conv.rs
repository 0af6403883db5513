//! 2-D convolution over NHWC batches, as im2col + GEMM.

use ndarray::{ArrayView2, ArrayViewMut2};
use rand_distr::{Distribution, Normal};

use super::{OpInfo, OpKind, Slot, SlotMut, expect_grad, expect_input, join};
use crate::kernels::{ConvGeometry, gemm, im2col, reduce};
use crate::param::{Param, Role};
use crate::rng::Rng;
use crate::tensor::{Mode, Tensor, contiguous, from_vec};
use crate::{Error, Result};

/// A square-kernel 2-D convolution. The weight is stored `[k, k, cin, cout]`, which is the
/// `[k·k·cin, cout]` GEMM operand without a copy.
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
}

struct Cache {
    geom: ConvGeometry,
    /// The im2col matrix of the input (or the input itself for pointwise convolutions).
    cols: Vec<f32>,
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

    fn patch(&self) -> usize {
        self.k * self.k * self.cin
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
        let mut out = vec![0.0f32; rows * self.cout];
        let mut beta = 0.0;
        if let Some(b) = &self.bias {
            let bv = b.value.as_slice().unwrap_or(&[]);
            for row in out.chunks_mut(self.cout) {
                row.copy_from_slice(bv);
            }
            beta = 1.0;
        }
        {
            let a = view2(&cols, rows, patch)?;
            let w = view2(weight_slice(&self.weight)?, patch, self.cout)?;
            let c = view2_mut(&mut out, rows, self.cout)?;
            gemm(a, w, beta, c);
        }
        if mode.caches() {
            self.cache = Some(Cache { geom: g, cols });
        } else if !g.is_pointwise() {
            self.scratch = cols;
        }
        from_vec(&[g.n, g.oh, g.ow, self.cout], out)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let Cache { geom: g, mut cols } = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("conv2d".into()))?;
        expect_grad("conv2d", &grad, &[g.n, g.oh, g.ow, self.cout])?;
        let grad = contiguous(grad);
        let dy = grad.as_slice().unwrap_or(&[]);
        let (rows, patch, cout) = (g.rows(), self.patch(), self.cout);
        {
            let a = view2(&cols, rows, patch)?;
            let dyv = view2(dy, rows, cout)?;
            let dw = view2_mut(
                self.weight.grad.as_slice_mut().ok_or_else(layout_error)?,
                patch,
                cout,
            )?;
            gemm(a.t(), dyv, 0.0, dw);
        }
        if let Some(b) = &mut self.bias {
            let sums = reduce::channel_sums(rows, cout, |r, acc| {
                for (a, v) in acc.iter_mut().zip(&dy[r * cout..(r + 1) * cout]) {
                    *a += v;
                }
            });
            for (g, s) in b.grad.iter_mut().zip(sums) {
                *g = s as f32;
            }
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
        let mut dx = vec![0.0f32; g.n * g.image_len()];
        im2col::col2im(&cols, &g, &mut dx);
        self.scratch = cols;
        from_vec(&[g.n, g.h, g.w, g.c], dx)
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
