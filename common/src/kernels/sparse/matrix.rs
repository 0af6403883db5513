//! Sparse products with a row-major dense matrix `X[M, K]` (a linear layer's input).
//!
//! `X` is packed transposed in panels of at most [`MAX_PANEL`] rows: block `b` holds
//! `X[b·P .. b·P + P, :]ᵀ` as `K` runs of `P` values (zero past `M`), so every weight row `k` is
//! one contiguous run and the kernels vectorise along the batch. The packing costs `M·K` moves
//! once per forward pass, which the products reuse.

use super::layout::{Layout, round_up};
use super::products;
use super::simd::Isa;
use super::transpose::transpose;
use super::weight::SparseWeight;
use crate::{Error, Result};

/// Rows of `X` per packed panel.
pub const MAX_PANEL: usize = 256;

/// The packed layout of an `[M, K]` matrix and the products over it.
#[derive(Clone, Debug)]
pub struct MatrixPlan {
    m: usize,
    k: usize,
    panel: usize,
    layout: Layout,
    isa: Isa,
}

impl MatrixPlan {
    /// A plan for `X[m, k]`, using the best instruction set of this CPU.
    pub fn new(m: usize, k: usize) -> Result<Self> {
        let blocks = m.div_ceil(MAX_PANEL).max(1);
        let panel = round_up(m.div_ceil(blocks).max(1), 16);
        let layout = Layout::new(
            blocks,
            k,
            panel,
            panel,
            &(0..k).collect::<Vec<_>>(),
            vec![0; k],
        )?;
        Ok(MatrixPlan {
            m,
            k,
            panel,
            layout,
            isa: Isa::detect(),
        })
    }

    /// Uses `isa` instead of the detected instruction set.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// The packed layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Rows `M` of `X`.
    pub fn m(&self) -> usize {
        self.m
    }

    fn rows_in(&self, b: usize) -> usize {
        self.panel.min(self.m - b * self.panel)
    }

    /// Packs `x` (`[M, K]`) into `s` (resized to the layout's source length).
    pub fn pack_input(&self, x: &[f32], s: &mut Vec<f32>) -> Result<()> {
        check("input", self.m * self.k, x.len())?;
        s.resize(self.layout.src_len(), 0.0);
        for (b, sb) in s.chunks_mut(self.layout.block_len().max(1)).enumerate() {
            let (x, rows) = (&x[b * self.panel * self.k..], self.rows_in(b));
            transpose(x, self.k, sb, self.panel, self.k, rows, false);
            zero_tails(sb, self.panel, rows);
        }
        Ok(())
    }

    /// `y (+)= X·W`: `s` is the packed `X`, `t` a scratch buffer, `y` is `[M, N]` and is
    /// overwritten unless `accumulate`.
    pub fn forward(
        &self,
        w: &SparseWeight,
        s: &[f32],
        t: &mut Vec<f32>,
        y: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let n = w.cols();
        check("output", self.m * n, y.len())?;
        t.resize(self.layout.out_size(n), 0.0);
        products::forward(self.isa, &self.layout, w, s, t)?;
        for (b, tb) in t
            .chunks(n * self.panel)
            .enumerate()
            .take(self.layout.blocks)
        {
            let y = &mut y[b * self.panel * n..];
            transpose(tb, self.panel, y, n, self.rows_in(b), n, accumulate);
        }
        Ok(())
    }

    /// Packs the output gradient `dy` (`[M, N]`) into `dt` (resized).
    pub fn pack_output_grad(&self, dy: &[f32], n: usize, dt: &mut Vec<f32>) -> Result<()> {
        check("output gradient", self.m * n, dy.len())?;
        dt.resize(self.layout.out_size(n), 0.0);
        for (b, tb) in dt.chunks_mut((n * self.panel).max(1)).enumerate() {
            let (dy, rows) = (&dy[b * self.panel * n..], self.rows_in(b));
            transpose(dy, n, tb, self.panel, n, rows, false);
            zero_tails(tb, self.panel, rows);
        }
        Ok(())
    }

    /// `dx = dY·Wᵀ` (`[M, K]`, overwritten) from the packed output gradient `dt`; `ds` is
    /// scratch.
    pub fn input_grad(
        &self,
        w: &SparseWeight,
        dt: &[f32],
        ds: &mut Vec<f32>,
        dx: &mut [f32],
    ) -> Result<()> {
        check("input gradient", self.m * self.k, dx.len())?;
        ds.resize(self.layout.src_len(), 0.0);
        products::input_grad(self.isa, &self.layout, w, dt, ds)?;
        for (b, sb) in ds
            .chunks(self.layout.block_len().max(1))
            .enumerate()
            .take(self.layout.blocks)
        {
            let dx = &mut dx[b * self.panel * self.k..];
            transpose(sb, self.panel, dx, self.k, self.rows_in(b), self.k, false);
        }
        Ok(())
    }

    /// `dw[k, n] = Σ_m X[m, k]·dY[m, n]` at the active entries of `w`, zero elsewhere (`dw` is
    /// the dense `[K, N]` gradient); `g` is scratch.
    pub fn weight_grad(
        &self,
        w: &SparseWeight,
        s: &[f32],
        dt: &[f32],
        g: &mut Vec<f32>,
        dw: &mut [f32],
    ) -> Result<()> {
        g.resize(w.nnz(), 0.0);
        products::weight_grad(self.isa, &self.layout, w, s, dt, g)?;
        w.scatter_csr(g, dw)
    }

    /// [`MatrixPlan::weight_grad`] written one value per active entry, in mask order, into
    /// `out` (`w.nnz()` values, overwritten): the same sums, without a dense matrix.
    pub fn weight_grad_active(
        &self,
        w: &SparseWeight,
        s: &[f32],
        dt: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        products::weight_grad(self.isa, &self.layout, w, s, dt, out)
    }
}

/// Zeroes positions `rows..panel` of every run of a packed block (the panel's padding).
fn zero_tails(block: &mut [f32], panel: usize, rows: usize) {
    if rows < panel {
        for run in block.chunks_mut(panel) {
            run[rows..].fill(0.0);
        }
    }
}

fn check(what: &str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::shape(
            format!("sparse matrix {what}"),
            expected,
            actual,
        ))
    }
}

/// `y (+)= x·W` for a row-major `x[m, K]` and `y[m, N]` (allocates its scratch).
pub fn matmul(
    x: &[f32],
    m: usize,
    w: &SparseWeight,
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let plan = MatrixPlan::new(m, w.rows())?;
    let mut s = Vec::new();
    plan.pack_input(x, &mut s)?;
    plan.forward(w, &s, &mut Vec::new(), y, accumulate)
}

/// `dx = dy·Wᵀ` for a row-major `dy[m, N]` and `dx[m, K]` (allocates its scratch).
pub fn matmul_transposed(dy: &[f32], m: usize, w: &SparseWeight, dx: &mut [f32]) -> Result<()> {
    let plan = MatrixPlan::new(m, w.rows())?;
    let mut dt = Vec::new();
    plan.pack_output_grad(dy, w.cols(), &mut dt)?;
    plan.input_grad(w, &dt, &mut Vec::new(), dx)
}

/// `dw = xᵀ·dy` at the active entries of `w`, zero elsewhere (allocates its scratch).
pub fn weight_grad(
    x: &[f32],
    dy: &[f32],
    m: usize,
    w: &SparseWeight,
    dw: &mut [f32],
) -> Result<()> {
    let plan = MatrixPlan::new(m, w.rows())?;
    let (mut s, mut dt) = (Vec::new(), Vec::new());
    plan.pack_input(x, &mut s)?;
    plan.pack_output_grad(dy, w.cols(), &mut dt)?;
    plan.weight_grad(w, &s, &dt, &mut Vec::new(), dw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sparse::tests::{random, random_mask, thread_pool};

    fn naive_forward(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    y[i * n + j] += f64::from(x[i * k + p]) * f64::from(w[p * n + j]);
                }
            }
        }
        y
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

    #[test]
    fn products_match_naive_reference_on_odd_shapes_and_densities() {
        let pool = thread_pool(2);
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 7, 5),
            (17, 70, 9),
            (64, 300, 130),
            (300, 33, 7),
            (513, 20, 3),
        ] {
            for density in [0.0, -1.0, 0.01, 0.1, 0.5, 1.0] {
                for isa in [Isa::portable(), Isa::detect()] {
                    let seed = (m * 1000 + k * 10 + n) as u64;
                    let x = random(m * k, seed);
                    let dy = random(m * n, seed + 1);
                    let mask = random_mask(k * n, density, seed + 2);
                    let mut wv = random(k * n, seed + 3);
                    mask.apply(&mut wv);
                    let w = SparseWeight::new(&wv, &mask, k, n).unwrap();
                    let what = format!("{m}x{k}x{n} d{density} {}", isa.name());
                    let plan = MatrixPlan::new(m, k).unwrap().with_isa(isa);
                    let (mut s, mut t, mut dt, mut ds, mut g) =
                        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
                    pool.install(|| {
                        plan.pack_input(&x, &mut s).unwrap();
                        plan.pack_output_grad(&dy, n, &mut dt).unwrap();
                    });
                    // Forward, overwriting and accumulating.
                    let want = naive_forward(&x, &wv, m, k, n);
                    let scale = (k as f64).sqrt();
                    let mut y = vec![f32::NAN; m * n];
                    pool.install(|| plan.forward(&w, &s, &mut t, &mut y, false).unwrap());
                    assert_close(&y, &want, scale, &format!("forward {what}"));
                    let mut y2 = vec![1.0f32; m * n];
                    pool.install(|| plan.forward(&w, &s, &mut t, &mut y2, true).unwrap());
                    let plus_one: Vec<f64> = want.iter().map(|v| v + 1.0).collect();
                    assert_close(&y2, &plus_one, scale, &format!("forward+= {what}"));
                    // Input gradient: dx = dy·Wᵀ.
                    let wt: Vec<f32> = (0..n * k).map(|i| wv[(i % k) * n + i / k]).collect();
                    let want = naive_forward(&dy, &wt, m, n, k);
                    let mut dx = vec![f32::NAN; m * k];
                    pool.install(|| plan.input_grad(&w, &dt, &mut ds, &mut dx).unwrap());
                    assert_close(&dx, &want, (n as f64).sqrt(), &format!("dx {what}"));
                    // Weight gradient at active entries, zero elsewhere.
                    let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
                    let mut want = naive_forward(&xt, &dy, k, m, n);
                    for (i, v) in want.iter_mut().enumerate() {
                        if !mask.get(i) {
                            *v = 0.0;
                        }
                    }
                    let mut dw = vec![f32::NAN; k * n];
                    pool.install(|| plan.weight_grad(&w, &s, &dt, &mut g, &mut dw).unwrap());
                    assert_close(&dw, &want, (m as f64).sqrt(), &format!("dw {what}"));
                }
            }
        }
    }

    #[test]
    fn one_shot_functions_and_shape_errors() {
        let (m, k, n) = (5, 6, 4);
        let x = random(m * k, 1);
        let mask = random_mask(k * n, 0.5, 2);
        let mut wv = random(k * n, 3);
        mask.apply(&mut wv);
        let w = SparseWeight::new(&wv, &mask, k, n).unwrap();
        let mut y = vec![0.0; m * n];
        matmul(&x, m, &w, &mut y, false).unwrap();
        let want = naive_forward(&x, &wv, m, k, n);
        assert_close(&y, &want, 3.0, "matmul");
        let mut dx = vec![0.0; m * k];
        matmul_transposed(&y, m, &w, &mut dx).unwrap();
        let mut dw = vec![0.0; k * n];
        weight_grad(&x, &y, m, &w, &mut dw).unwrap();
        assert!(matmul(&x, m + 1, &w, &mut y, false).is_err());
        assert!(matmul_transposed(&y, m, &w, &mut dx[1..]).is_err());
        assert!(weight_grad(&x, &y, m, &w, &mut dw[1..]).is_err());
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, k, n) = (70, 500, 60);
        let x = random(m * k, 5);
        let dy = random(m * n, 6);
        let mask = random_mask(k * n, 0.2, 7);
        let mut wv = random(k * n, 8);
        mask.apply(&mut wv);
        let w = SparseWeight::new(&wv, &mask, k, n).unwrap();
        let run = |threads: usize| {
            thread_pool(threads).install(|| {
                let (mut y, mut dx, mut dw) =
                    (vec![0.0; m * n], vec![0.0; m * k], vec![0.0; k * n]);
                matmul(&x, m, &w, &mut y, false).unwrap();
                matmul_transposed(&dy, m, &w, &mut dx).unwrap();
                weight_grad(&x, &dy, m, &w, &mut dw).unwrap();
                (y, dx, dw)
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }
}
