//! Sparse convolution over NHWC batches without an im2col matrix ("direct" sparse convolution).
//!
//! Each image is packed channel-major with its zero padding, split into the `s × s` phases of
//! the stride `s` (phase `(ry, rx)` holds padded pixel `(s·a + ry, s·b + rx)` at `(a, b)`): an
//! `Hq × Wq` plane per phase, image and channel, `Hq = ⌈(h + 2p)/s⌉`. With stride 1 there is
//! one phase and neighbours share their padding: a row's right padding is the next row's left
//! padding and an image's bottom padding the next image's top padding (`Hq = h + p`,
//! `Wq = w + p`), which is sound because what the last rows and columns read beyond the image
//! is then zero padding of the next one. Output pixel `(oy, ox)`
//! of an image is position `oy·Wq + ox` of its `Hq × Wq` grid, and tap `(ky, kx)` of channel `c`
//! reads phase `(ky mod s, kx mod s)` of channel `c` at that position plus
//! `(ky div s)·Wq + kx div s`. A block packs `G` images: per channel, per phase, their planes
//! one after another, so the grids of the `G` images are one run of `G·Hq·Wq` positions and
//! weight row `k = (ky·kw + kx)·cin + c` is that run shifted. The kernels in
//! [`super::products`] vectorise along the run; `G` is chosen so that runs hold at least
//! [`TARGET_RUN`] positions (small feature maps would otherwise give short runs, whose
//! per-entry overheads dominate).
//!
//! Grid positions outside an `oh × ow` output (right and bottom margins) are computed and
//! dropped; their output gradient is packed as zero, so they add nothing to the gradients, and
//! valid positions only ever read their own image. The margins are the plan's
//! [`ConvPlan::waste`]: for a 3×3 convolution with padding 1, 1.15 on 14×14, 1.31 on 7×7,
//! 1.78 on 3×3 and 4 on 1×1 (each plane padded on its own, they were 1.31, 1.65, 2.8 and 9).
//!
//! Packing moves `n·h·w·cin` values in and `n·oh·ow·cout` out per product (what im2col would
//! move is `kh·kw` times the former). The forward and backward passes are fused per block
//! (pack, multiply, unpack while the block's buffers are in cache), so packed outputs and
//! gradients never go through memory as whole batches.

use rayon::prelude::*;

use super::layout::{Layout, round_up};
use super::products;
use super::simd::{self, Isa, LANES, Lanes};
use super::transpose::{transpose_block, transpose_copy};
use super::weight::SparseWeight;
use crate::kernels::ConvGeometry;
use crate::{Error, Result};

/// Positions per run that the number of images per block aims for.
const TARGET_RUN: usize = 256;

/// Images that the backward pass's tasks take at least (a fixed number, so that the order of
/// the weight-gradient sums does not depend on the thread count).
const IMAGES_PER_TASK: usize = 4;

/// The packed layout of one convolution's input and the sparse products over it.
#[derive(Clone, Debug)]
pub struct ConvPlan {
    g: ConvGeometry,
    /// Phases used along each axis: `min(stride, kh)` and `min(stride, kw)`.
    phases: (usize, usize),
    /// Grid of one phase plane and of one image's output.
    hq: usize,
    wq: usize,
    /// Images per block (`G`).
    images: usize,
    layout: Layout,
    isa: Isa,
}

impl ConvPlan {
    /// A plan for the geometry `g`, using the best instruction set of this CPU.
    pub fn new(g: &ConvGeometry) -> Result<Self> {
        let s = g.stride;
        let (hq, wq) = if s == 1 {
            // Neighbours share their padding: the bottom (right) padding that the last rows
            // (columns) read is the next plane's (row's) top (left) padding.
            (g.h + g.pad, g.w + g.pad)
        } else {
            ((g.h + 2 * g.pad).div_ceil(s), (g.w + 2 * g.pad).div_ceil(s))
        };
        let phases = (s.min(g.kh), s.min(g.kw));
        let plane = hq * wq;
        let images = TARGET_RUN.div_ceil(plane.max(1)).clamp(1, g.n.max(1));
        let out_len = round_up((images * plane).max(1), LANES);
        let mut row_group = Vec::with_capacity(g.patch());
        let mut shift = Vec::with_capacity(g.patch());
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let phase = (ky % s) * phases.1 + kx % s;
                let sh = phase * images * plane + (ky / s) * wq + kx / s;
                for c in 0..g.c {
                    row_group.push(c);
                    shift.push(sh);
                }
            }
        }
        let max_shift = shift.iter().copied().max().unwrap_or(0);
        let group_len = round_up(max_shift + out_len, 8);
        let blocks = g.n.div_ceil(images);
        let layout = Layout::new(blocks, g.c, group_len, out_len, &row_group, shift)?;
        Ok(ConvPlan {
            g: *g,
            phases,
            hq,
            wq,
            images,
            layout,
            isa: Isa::detect(),
        })
    }

    /// Uses `isa` instead of the detected instruction set.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// The geometry planned for.
    pub fn geometry(&self) -> &ConvGeometry {
        &self.g
    }

    /// The packed layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Images per block.
    pub fn images_per_block(&self) -> usize {
        self.images
    }

    /// Grid positions computed per output pixel (≥ 1): the cost factor of the margins.
    pub fn waste(&self) -> f64 {
        self.layout.out_len() as f64 / (self.images * self.g.oh * self.g.ow).max(1) as f64
    }

    fn plane(&self) -> usize {
        self.hq * self.wq
    }

    /// Calls `f(iy, ix0, count, pos)` for every run of input pixels that the packing stores
    /// contiguously: pixels `ix0, ix0 + s, …` (`count` of them) of input row `iy` of the first
    /// image of a block sit at positions `pos, pos + 1, …` of each channel's region (image `i`
    /// of the block: `pos + i·Hq·Wq`). Pixels that no tap reads (a stride larger than the
    /// window) are in no run.
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let g = &self.g;
        let s = g.stride;
        let phase_len = self.images * self.plane();
        for iy in 0..g.h {
            let py = iy + g.pad;
            if py % s >= self.phases.0 {
                continue;
            }
            for rx in 0..self.phases.1 {
                // The first ix ≥ 0 with (ix + pad) mod s == rx.
                let ix0 = (rx + s - g.pad % s) % s;
                if ix0 >= g.w {
                    continue;
                }
                let count = (g.w - 1 - ix0) / s + 1;
                let phase = (py % s) * self.phases.1 + rx;
                f(
                    iy,
                    ix0,
                    count,
                    phase * phase_len + (py / s) * self.wq + (ix0 + g.pad) / s,
                );
            }
        }
    }

    /// Packs the NHWC images of one block (up to `G`; missing ones stay zero) into the block
    /// (overwritten).
    fn pack_block(&self, images: &[f32], block: &mut [f32]) {
        let (g, gl, plane) = (&self.g, self.layout.group_len, self.plane());
        block.fill(0.0);
        for (i, img) in images.chunks(g.image_len().max(1)).enumerate() {
            self.for_each_run(|iy, ix0, count, pos| {
                let src = &img[(iy * g.w + ix0) * g.c..];
                let dst = &mut block[pos + i * plane..];
                let step = g.stride * g.c;
                transpose_copy(self.isa, src, step, dst, gl, g.c, count);
            });
        }
    }

    /// Unpacks a block into its NHWC images (overwritten; pixels no tap reads become zero).
    fn unpack_block(&self, block: &[f32], images: &mut [f32]) {
        let (g, gl, plane) = (&self.g, self.layout.group_len, self.plane());
        if self.phases != (g.stride, g.stride) {
            images.fill(0.0);
        }
        for (i, img) in images.chunks_mut(g.image_len().max(1)).enumerate() {
            self.for_each_run(|iy, ix0, count, pos| {
                let src = &block[pos + i * plane..];
                let dst = &mut img[(iy * g.w + ix0) * g.c..];
                let step = g.stride * g.c;
                transpose_copy(self.isa, src, gl, dst, step, count, g.c);
            });
        }
    }

    /// A block's output `[N][out_len]` → its images' NHWC pixels `[oh·ow][N]` (+ bias).
    fn unpack_output(&self, t: &[f32], cols: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        let (g, len, plane) = (&self.g, self.layout.out_len(), self.plane());
        for (i, yi) in y.chunks_mut((g.oh * g.ow * cols).max(1)).enumerate() {
            for oy in 0..g.oh {
                let (src, dst) = (&t[i * plane + oy * self.wq..], &mut yi[oy * g.ow * cols..]);
                match bias {
                    Some(b) => transpose_block(src, len, dst, cols, g.ow, cols, |d, v, c| {
                        *d = v + b[c];
                    }),
                    None => transpose_copy(self.isa, src, len, dst, cols, g.ow, cols),
                }
            }
        }
    }

    /// A block's NHWC output gradient → `[N][out_len]` (resized), zero at the grid margins.
    fn pack_output_grad(&self, dy: &[f32], cols: usize, t: &mut Vec<f32>) {
        let (g, len, plane) = (&self.g, self.layout.out_len(), self.plane());
        t.clear();
        t.resize(cols * len, 0.0);
        for (i, di) in dy.chunks((g.oh * g.ow * cols).max(1)).enumerate() {
            for oy in 0..g.oh {
                let (src, dst) = (&di[oy * g.ow * cols..], &mut t[i * plane + oy * self.wq..]);
                transpose_copy(self.isa, src, cols, dst, len, cols, g.ow);
            }
        }
    }

    /// Packs the NHWC input `x` into `s` (resized). [`ConvPlan::forward`] does this itself.
    pub fn pack_input(&self, x: &[f32], s: &mut Vec<f32>) -> Result<()> {
        let g = &self.g;
        check("input", g.n * g.image_len(), x.len())?;
        s.resize(self.layout.src_len(), 0.0);
        s.par_chunks_mut(self.layout.block_len().max(1))
            .zip(x.par_chunks((self.images * g.image_len()).max(1)))
            .for_each(|(sb, imgs)| self.pack_block(imgs, sb));
        Ok(())
    }

    /// Unpacks a packed input `s` back to NHWC `x` (`[n, h, w, cin]`, overwritten). Pixels that
    /// no tap reads (a stride larger than the window skips them) come back as zero, which is
    /// also what im2col makes of them.
    pub fn unpack_input(&self, s: &[f32], x: &mut [f32]) -> Result<()> {
        let g = &self.g;
        check("packed input", self.layout.src_len(), s.len())?;
        check("input", g.n * g.image_len(), x.len())?;
        x.par_chunks_mut((self.images * g.image_len()).max(1))
            .zip(s.par_chunks(self.layout.block_len().max(1)))
            .for_each(|(imgs, sb)| self.unpack_block(sb, imgs));
        Ok(())
    }

    /// Whether the output of an image is as long as its input (same pixels, as many output as
    /// input channels), so that [`ConvPlan::forward_in_place`] and
    /// [`ConvPlan::backward_in_place`] apply.
    pub fn in_place(&self, cols: usize) -> bool {
        let g = &self.g;
        g.image_len() == g.oh * g.ow * cols
    }

    /// `y = conv(x, W) (+ bias)` for the NHWC batch `x`, into NHWC `y` (`[n, oh, ow, cout]`,
    /// overwritten). The packed input is left in `s` (resized) for [`ConvPlan::backward`].
    /// Blocks are independent tasks: each is packed, multiplied and unpacked while it is in
    /// cache.
    pub fn forward(
        &self,
        w: &SparseWeight,
        x: &[f32],
        bias: Option<&[f32]>,
        s: &mut Vec<f32>,
        y: &mut [f32],
    ) -> Result<()> {
        let (g, cols) = (&self.g, w.cols());
        self.begin_forward(w, bias, s)?;
        check("input", g.n * g.image_len(), x.len())?;
        check("output", g.n * g.oh * g.ow * cols, y.len())?;
        y.par_chunks_mut((self.images * g.oh * g.ow * cols).max(1))
            .zip(s.par_chunks_mut(self.layout.block_len().max(1)))
            .zip(x.par_chunks((self.images * g.image_len()).max(1)))
            .for_each_init(Vec::new, |t, ((yb, sb), xb)| {
                self.pack_block(xb, sb);
                self.block_output(w, sb, bias, t, yb);
            });
        Ok(())
    }

    /// [`ConvPlan::forward`] with the output written over the input: `buf` holds the NHWC
    /// input on entry and the NHWC output on exit, block by block (a block's images are packed
    /// before their outputs are written), so no output buffer is allocated and the output's
    /// lines are written while in cache. Needs [`ConvPlan::in_place`].
    pub fn forward_in_place(
        &self,
        w: &SparseWeight,
        buf: &mut [f32],
        bias: Option<&[f32]>,
        s: &mut Vec<f32>,
    ) -> Result<()> {
        let g = &self.g;
        self.check_in_place(w.cols())?;
        self.begin_forward(w, bias, s)?;
        check("input", g.n * g.image_len(), buf.len())?;
        buf.par_chunks_mut((self.images * g.image_len()).max(1))
            .zip(s.par_chunks_mut(self.layout.block_len().max(1)))
            .for_each_init(Vec::new, |t, (b, sb)| {
                self.pack_block(b, sb);
                self.block_output(w, sb, bias, t, b);
            });
        Ok(())
    }

    /// Fails unless [`ConvPlan::in_place`] holds for `cols` output channels.
    fn check_in_place(&self, cols: usize) -> Result<()> {
        let g = &self.g;
        if self.in_place(cols) {
            return Ok(());
        }
        Err(Error::shape(
            "sparse conv in place",
            format!(
                "{} output values per image (as many as input values)",
                g.image_len()
            ),
            g.oh * g.ow * cols,
        ))
    }

    /// The checks shared by the forward passes, then `s` resized to the packed input.
    fn begin_forward(
        &self,
        w: &SparseWeight,
        bias: Option<&[f32]>,
        s: &mut Vec<f32>,
    ) -> Result<()> {
        check("weight rows", self.layout.rows(), w.rows())?;
        products::check_columns(w)?;
        if let Some(b) = bias {
            check("bias", w.cols(), b.len())?;
        }
        s.resize(self.layout.src_len(), 0.0);
        Ok(())
    }

    /// The products of one packed block `sb` into `t` (scratch) and their NHWC output into
    /// `yb` (+ bias).
    fn block_output(
        &self,
        w: &SparseWeight,
        sb: &[f32],
        bias: Option<&[f32]>,
        t: &mut Vec<f32>,
        yb: &mut [f32],
    ) {
        let (l, cols) = (&self.layout, w.cols());
        t.resize(cols * l.out_len(), 0.0);
        products::forward_block(self.isa, l, w, sb, t);
        self.unpack_output(t, cols, bias, yb);
    }

    /// The gradients of [`ConvPlan::forward`] from the packed input `s` and the NHWC output
    /// gradient `dy`: the NHWC input gradient into `dx` and the weight gradient at the active
    /// entries of `w` into `dw` (the dense `[kh·kw·cin, cout]` matrix, zero elsewhere), each
    /// only if asked for. `partials` is scratch.
    ///
    /// Tasks take fixed runs of blocks (at least 4 images), and each block is
    /// packed, used for both gradients and unpacked while it is in cache. Each task sums its
    /// blocks' weight gradients (lanes in block order, then reduced); the tasks' sums are added
    /// in task order.
    pub fn backward(
        &self,
        w: &SparseWeight,
        s: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: Option<&mut [f32]>,
        partials: &mut Vec<f32>,
    ) -> Result<()> {
        self.backward_with(w, s, dy, dx, dw.map(WeightGrad::Dense), partials)
    }

    /// [`ConvPlan::backward`] with the weight gradient written where `dw` says: the dense
    /// matrix, or one value per active entry in mask order (`w.nnz()` values, the same sums
    /// without a dense matrix).
    pub fn backward_with(
        &self,
        w: &SparseWeight,
        s: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: Option<WeightGrad<'_>>,
        partials: &mut Vec<f32>,
    ) -> Result<()> {
        self.backward_into(w, s, Gradients::Apart { dy, dx }, dw, partials)
    }

    /// [`ConvPlan::backward`] (`dw` a [`WeightGrad`]) with the input gradient written over the
    /// output gradient: `buf` holds the NHWC output gradient on entry and the NHWC input
    /// gradient on exit, block by block (a block's output gradient is packed before its input
    /// gradient is written). Needs [`ConvPlan::in_place`].
    pub fn backward_in_place(
        &self,
        w: &SparseWeight,
        s: &[f32],
        buf: &mut [f32],
        dw: Option<WeightGrad<'_>>,
        partials: &mut Vec<f32>,
    ) -> Result<()> {
        self.check_in_place(w.cols())?;
        self.backward_into(w, s, Gradients::InPlace(buf), dw, partials)
    }

    fn backward_into(
        &self,
        w: &SparseWeight,
        s: &[f32],
        io: Gradients<'_>,
        dw: Option<WeightGrad<'_>>,
        partials: &mut Vec<f32>,
    ) -> Result<()> {
        let (g, cols, l) = (&self.g, w.cols(), &self.layout);
        let (block, nnz) = (l.block_len(), w.nnz());
        check("weight rows", l.rows(), w.rows())?;
        check("packed input", l.src_len(), s.len())?;
        let dy_len = g.n * g.oh * g.ow * cols;
        let per_task = IMAGES_PER_TASK.div_ceil(self.images);
        let tasks = l.blocks().div_ceil(per_task);
        let (block_in, block_out) = (
            self.images * g.image_len(),
            self.images * g.oh * g.ow * cols,
        );
        // Per task: its part of the input gradient, or of the buffer that holds both.
        let (dy, parts): (&[f32], Vec<TaskIo<'_>>) = match io {
            Gradients::Apart { dy, dx } => {
                check("output gradient", dy_len, dy.len())?;
                let parts = match dx {
                    Some(d) => {
                        check("input gradient", g.n * g.image_len(), d.len())?;
                        d.chunks_mut((per_task * block_in).max(1))
                            .map(|c| TaskIo::Apart(Some(c)))
                            .collect()
                    }
                    None if dw.is_none() => return Ok(()),
                    None => (0..tasks).map(|_| TaskIo::Apart(None)).collect(),
                };
                (dy, parts)
            }
            Gradients::InPlace(buf) => {
                check("output gradient", dy_len, buf.len())?;
                let parts = buf
                    .chunks_mut((per_task * block_out).max(1))
                    .map(TaskIo::InPlace)
                    .collect();
                (&[], parts)
            }
        };
        let want_dw = dw.is_some() && nnz > 0;
        partials.clear();
        partials.resize(if want_dw { tasks * nnz } else { 0 }, 0.0);
        let dw_parts: Vec<Option<&mut [f32]>> = if want_dw {
            partials.chunks_mut(nnz).map(Some).collect()
        } else {
            (0..tasks).map(|_| None).collect()
        };
        let isa = self.isa;
        parts
            .into_par_iter()
            .zip(dw_parts)
            .enumerate()
            .for_each_init(TaskScratch::default, |sc, (task, (mut io, dwp))| {
                let b0 = task * per_task;
                let b1 = (b0 + per_task).min(l.blocks());
                if dwp.is_some() {
                    sc.lanes.clear();
                    sc.lanes.resize(nnz, [0.0; LANES]);
                }
                for b in b0..b1 {
                    // This block's input gradient (written after its output gradient is packed).
                    let dx = match &mut io {
                        TaskIo::Apart(dxp) => {
                            let dyb =
                                &dy[b * block_out..][..block_out.min(dy.len() - b * block_out)];
                            self.pack_output_grad(dyb, cols, &mut sc.dt);
                            dxp.as_deref_mut().map(|d| {
                                let at = (b - b0) * block_in;
                                let end = (at + block_in).min(d.len());
                                &mut d[at..end]
                            })
                        }
                        TaskIo::InPlace(buf) => {
                            let at = (b - b0) * block_out;
                            let end = (at + block_out).min(buf.len());
                            self.pack_output_grad(&buf[at..end], cols, &mut sc.dt);
                            Some(&mut buf[at..end])
                        }
                    };
                    if let Some(imgs) = dx {
                        sc.ds.resize(block, 0.0);
                        products::input_grad_block(isa, l, w, &sc.dt, &mut sc.ds);
                        self.unpack_block(&sc.ds, imgs);
                    }
                    if dwp.is_some() {
                        let sb = &s[b * block..][..block];
                        products::weight_grad_block(isa, l, w, sb, &sc.dt, &mut sc.lanes);
                    }
                }
                if let Some(p) = dwp {
                    for (o, lanes) in p.iter_mut().zip(&sc.lanes) {
                        *o = simd::reduce(lanes);
                    }
                }
            });
        let parts = if want_dw { tasks } else { 0 };
        match dw {
            Some(WeightGrad::Dense(dw)) => w.scatter_csr_sum(partials, parts, dw)?,
            Some(WeightGrad::Active(dw)) => w.sum_parts(partials, parts, dw)?,
            None => {}
        }
        Ok(())
    }
}

/// Where [`ConvPlan::backward_with`] and [`ConvPlan::backward_in_place`] write the weight
/// gradient.
pub enum WeightGrad<'a> {
    /// The dense `[kh·kw·cin, cout]` matrix, zero at inactive positions.
    Dense(&'a mut [f32]),
    /// One value per active entry, in mask order (`w.nnz()` values).
    Active(&'a mut [f32]),
}

/// Where the backward pass reads the output gradient and writes the input gradient.
enum Gradients<'a> {
    /// Separate buffers; no input gradient without `dx`.
    Apart {
        dy: &'a [f32],
        dx: Option<&'a mut [f32]>,
    },
    /// One buffer: the output gradient on entry, the input gradient on exit.
    InPlace(&'a mut [f32]),
}

/// One backward task's part of [`Gradients`]: its blocks' input gradients (if wanted), or its
/// blocks' part of the shared buffer.
enum TaskIo<'a> {
    Apart(Option<&'a mut [f32]>),
    InPlace(&'a mut [f32]),
}

/// Per-task buffers of [`ConvPlan::backward`].
#[derive(Default)]
struct TaskScratch {
    dt: Vec<f32>,
    ds: Vec<f32>,
    lanes: Vec<Lanes>,
}

fn check(what: &str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::shape(
            format!("sparse conv {what}"),
            expected,
            actual,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sparse::tests::{random, random_mask, thread_pool};

    /// The definition, in f64: `y[n, oy, ox, co] = Σ w[ky, kx, ci, co] · x[n, iy, ix, ci]`.
    struct Naive<'a> {
        g: &'a ConvGeometry,
        cout: usize,
    }

    impl Naive<'_> {
        fn taps(&self, mut f: impl FnMut(usize, usize, usize)) {
            // f(output pixel index, input element index, weight row k)
            let g = self.g;
            for n in 0..g.n {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                for c in 0..g.c {
                                    let xi =
                                        ((n * g.h + iy as usize) * g.w + ix as usize) * g.c + c;
                                    let k = (ky * g.kw + kx) * g.c + c;
                                    f((n * g.oh + oy) * g.ow + ox, xi, k);
                                }
                            }
                        }
                    }
                }
            }
        }

        fn forward(&self, x: &[f32], w: &[f32]) -> Vec<f64> {
            let co = self.cout;
            let mut y = vec![0.0; self.g.rows() * co];
            self.taps(|p, xi, k| {
                for o in 0..co {
                    y[p * co + o] += f64::from(x[xi]) * f64::from(w[k * co + o]);
                }
            });
            y
        }

        fn input_grad(&self, dy: &[f32], w: &[f32]) -> Vec<f64> {
            let co = self.cout;
            let mut dx = vec![0.0; self.g.n * self.g.image_len()];
            self.taps(|p, xi, k| {
                for o in 0..co {
                    dx[xi] += f64::from(dy[p * co + o]) * f64::from(w[k * co + o]);
                }
            });
            dx
        }

        fn weight_grad(&self, x: &[f32], dy: &[f32]) -> Vec<f64> {
            let co = self.cout;
            let mut dw = vec![0.0; self.g.patch() * co];
            self.taps(|p, xi, k| {
                for o in 0..co {
                    dw[k * co + o] += f64::from(x[xi]) * f64::from(dy[p * co + o]);
                }
            });
            dw
        }
    }

    fn assert_close(got: &[f32], want: &[f64], scale: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-5 * scale.max(1.0) + 1e-5 * w.abs(),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    fn geometries() -> Vec<(ConvGeometry, usize)> {
        vec![
            (ConvGeometry::new(2, 5, 6, 3, 3, 3, 1, 1).unwrap(), 4),
            (ConvGeometry::new(3, 7, 7, 2, 3, 3, 2, 1).unwrap(), 5),
            (ConvGeometry::new(2, 8, 6, 5, 1, 1, 2, 0).unwrap(), 3),
            (ConvGeometry::new(1, 4, 4, 5, 1, 1, 1, 0).unwrap(), 7),
            (ConvGeometry::new(2, 8, 8, 1, 5, 5, 1, 2).unwrap(), 2),
            (ConvGeometry::new(2, 3, 3, 2, 3, 3, 1, 0).unwrap(), 3),
            (ConvGeometry::new(1, 9, 7, 4, 3, 3, 3, 1).unwrap(), 6),
            (ConvGeometry::new(3, 1, 1, 9, 3, 3, 1, 1).unwrap(), 5),
            (ConvGeometry::new(2, 10, 9, 3, 2, 2, 2, 0).unwrap(), 4),
            // Stride 1 with more padding than the window reaches past, and less.
            (ConvGeometry::new(2, 4, 5, 2, 3, 3, 1, 2).unwrap(), 3),
            (ConvGeometry::new(3, 6, 6, 2, 5, 5, 1, 1).unwrap(), 2),
            // Several images per block, the last block partly filled.
            (ConvGeometry::new(23, 3, 3, 4, 3, 3, 1, 1).unwrap(), 5),
            (ConvGeometry::new(37, 4, 5, 3, 3, 3, 2, 1).unwrap(), 3),
            (ConvGeometry::new(70, 1, 1, 3, 3, 3, 1, 1).unwrap(), 2),
            // Outputs as long as the inputs (the in-place passes apply): stride 1, several
            // images per block with the last one partly filled, stride 2 with four times the
            // channels, and a strided 1×1 convolution (pixels no tap reads).
            (ConvGeometry::new(2, 6, 5, 4, 3, 3, 1, 1).unwrap(), 4),
            (ConvGeometry::new(23, 3, 3, 4, 3, 3, 1, 1).unwrap(), 4),
            (ConvGeometry::new(2, 4, 4, 2, 3, 3, 2, 1).unwrap(), 8),
            (ConvGeometry::new(2, 8, 6, 2, 1, 1, 2, 0).unwrap(), 8),
        ]
    }

    #[test]
    fn products_match_the_definition() {
        let pool = thread_pool(2);
        let mut in_place = 0;
        for (i, (g, cout)) in geometries().into_iter().enumerate() {
            let (k, xs, ys) = (g.patch(), g.n * g.image_len(), g.rows() * cout);
            for density in [0.0, -1.0, 0.01, 0.1, 0.5, 1.0] {
                for isa in [Isa::portable(), Isa::detect()] {
                    let seed = 100 * i as u64;
                    let x = random(xs, seed);
                    let dy = random(ys, seed + 1);
                    let bias = random(cout, seed + 2);
                    let mask = random_mask(k * cout, density, seed + 3);
                    let mut wv = random(k * cout, seed + 4);
                    mask.apply(&mut wv);
                    let w = SparseWeight::new(&wv, &mask, k, cout).unwrap();
                    let plan = ConvPlan::new(&g).unwrap().with_isa(isa);
                    assert!(plan.waste() >= 1.0);
                    if g.n > 10 {
                        let per = plan.images_per_block();
                        assert!(per > 1 && g.n % per != 0, "{g:?}: {per} images per block");
                    }
                    let naive = Naive { g: &g, cout };
                    let what = format!("{g:?} cout {cout} d{density} {}", isa.name());
                    let (mut s, mut s2, mut parts) = (Vec::new(), Vec::new(), Vec::new());
                    let (mut y, mut dx, mut dw) = (
                        vec![f32::NAN; ys],
                        vec![f32::NAN; xs],
                        vec![f32::NAN; k * cout],
                    );
                    let (mut dx2, mut dw2) = (vec![f32::NAN; xs], vec![f32::NAN; k * cout]);
                    pool.install(|| {
                        plan.pack_input(&x, &mut s).unwrap();
                        let mut back = vec![f32::NAN; xs];
                        plan.unpack_input(&s, &mut back).unwrap();
                        if g.stride <= g.kh {
                            assert_eq!(back, x, "unpack inverts pack");
                        }
                        plan.forward(&w, &x, Some(&bias), &mut s2, &mut y).unwrap();
                        assert_eq!(s, s2, "forward packs as pack_input does");
                        plan.backward(&w, &s2, &dy, Some(&mut dx), Some(&mut dw), &mut parts)
                            .unwrap();
                        // Each gradient alone gives the same result.
                        plan.backward(&w, &s2, &dy, Some(&mut dx2), None, &mut parts)
                            .unwrap();
                        plan.backward(&w, &s2, &dy, None, Some(&mut dw2), &mut parts)
                            .unwrap();
                    });
                    assert_eq!((&dx, &dw), (&dx2, &dw2), "{what}");
                    // Written over the input (output gradient): the same bits.
                    let mut buf = x.clone();
                    let mut s3 = Vec::new();
                    let fwd =
                        pool.install(|| plan.forward_in_place(&w, &mut buf, Some(&bias), &mut s3));
                    if plan.in_place(cout) {
                        in_place += 1;
                        fwd.unwrap();
                        assert_eq!((&buf, &s3), (&y, &s2), "in-place forward {what}");
                        let mut buf = dy.clone();
                        let mut dw3 = vec![f32::NAN; k * cout];
                        pool.install(|| {
                            let dw = Some(WeightGrad::Dense(&mut dw3));
                            plan.backward_in_place(&w, &s2, &mut buf, dw, &mut parts)
                        })
                        .unwrap();
                        assert_eq!((&buf, &dw3), (&dx, &dw), "in-place backward {what}");
                    } else {
                        assert!(fwd.is_err(), "{what}: in place with other lengths");
                        let mut buf = dy.clone();
                        let back = plan.backward_in_place(&w, &s2, &mut buf, None, &mut parts);
                        assert!(back.is_err(), "{what}: in place with other lengths");
                    }
                    let mut want = naive.forward(&x, &wv);
                    for (p, v) in want.iter_mut().enumerate() {
                        *v += f64::from(bias[p % cout]);
                    }
                    assert_close(&y, &want, 3.0, &format!("forward {what}"));
                    let want = naive.input_grad(&dy, &wv);
                    assert_close(&dx, &want, 3.0, &format!("dx {what}"));
                    let mut want = naive.weight_grad(&x, &dy);
                    for (p, v) in want.iter_mut().enumerate() {
                        if !mask.get(p) {
                            *v = 0.0;
                        }
                    }
                    assert_close(&dw, &want, 3.0, &format!("dw {what}"));
                }
            }
        }
        // Four geometries × six densities × two instruction sets ran in place.
        assert_eq!(in_place, 4 * 6 * 2);
    }

    #[test]
    fn stride_one_planes_share_their_padding() {
        // 3×3 maps with padding 1: a 4×4 grid per image (not 5×5), 16 images per block.
        let g = ConvGeometry::new(64, 3, 3, 8, 3, 3, 1, 1).unwrap();
        let plan = ConvPlan::new(&g).unwrap();
        assert_eq!(plan.images_per_block(), 16);
        assert!((plan.waste() - 16.0 / 9.0).abs() < 1e-9, "{}", plan.waste());
        // A 1×1 map: 2×2 per image.
        let g = ConvGeometry::new(64, 1, 1, 8, 3, 3, 1, 1).unwrap();
        assert!((ConvPlan::new(&g).unwrap().waste() - 4.0).abs() < 1e-9);
        // Strided planes keep their own padding: 14×14, stride 2, padding 1 → 8×8 per phase
        // for a 7×7 output.
        let g = ConvGeometry::new(64, 14, 14, 8, 3, 3, 2, 1).unwrap();
        assert!((ConvPlan::new(&g).unwrap().waste() - 64.0 / 49.0).abs() < 1e-9);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let g = ConvGeometry::new(5, 9, 9, 6, 3, 3, 1, 1).unwrap();
        let cout = 7;
        let x = random(g.n * g.image_len(), 1);
        let dy = random(g.rows() * cout, 2);
        let mask = random_mask(g.patch() * cout, 0.3, 3);
        let mut wv = random(g.patch() * cout, 4);
        mask.apply(&mut wv);
        let w = SparseWeight::new(&wv, &mask, g.patch(), cout).unwrap();
        let plan = ConvPlan::new(&g).unwrap();
        let run = |threads: usize| {
            thread_pool(threads).install(|| {
                let (mut s, mut parts) = (Vec::new(), Vec::new());
                let mut y = vec![0.0; g.rows() * cout];
                let mut dx = vec![0.0; x.len()];
                let mut dw = vec![0.0; wv.len()];
                plan.forward(&w, &x, None, &mut s, &mut y).unwrap();
                plan.backward(&w, &s, &dy, Some(&mut dx), Some(&mut dw), &mut parts)
                    .unwrap();
                (y, dx, dw)
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }

    #[test]
    fn shape_errors_are_reported() {
        let g = ConvGeometry::new(1, 4, 4, 2, 3, 3, 1, 1).unwrap();
        let plan = ConvPlan::new(&g).unwrap();
        let mut s = Vec::new();
        assert!(plan.pack_input(&[0.0; 3], &mut s).is_err());
        let mask = crate::mask::Mask::ones(18 * 2);
        let w = SparseWeight::new(&[0.0; 36], &mask, 18, 2).unwrap();
        let x = [0.0; 32];
        let mut y = vec![0.0; 5];
        assert!(plan.forward(&w, &x, None, &mut s, &mut y).is_err());
        let wrong = SparseWeight::new(&[0.0; 36], &mask, 9, 4).unwrap();
        let mut y = vec![0.0; 16 * 4];
        assert!(plan.forward(&wrong, &x, None, &mut s, &mut y).is_err());
        let mut y = vec![0.0; 16 * 2];
        plan.forward(&w, &x, Some(&[0.0; 2]), &mut s, &mut y)
            .unwrap();
        assert!(
            plan.forward(&w, &x, Some(&[0.0; 3]), &mut s, &mut y)
                .is_err()
        );
        let mut parts = Vec::new();
        assert!(
            plan.backward(&w, &s, &[0.0; 5], None, None, &mut parts)
                .is_err()
        );
        let mut dx = vec![0.0; 31];
        assert!(
            plan.backward(&w, &s, &y, Some(&mut dx), None, &mut parts)
                .is_err()
        );
    }
}
