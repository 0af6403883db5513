//! Dense matrix multiplication, `C = A·B + beta·C`, split across the thread pool.

use ndarray::{ArrayView2, ArrayViewMut2, Axis, linalg::general_mat_mul};

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `c = a·b + beta·c`. `a` is `[m, k]`, `b` is `[k, n]`, `c` is `[m, n]`; any strides (so
/// transposed views cost nothing). The product is split along the larger of `m` and `n` across
/// the current rayon pool; each element's reduction over `k` runs in one task in the same order,
/// so the result does not depend on the thread count.
///
/// Panics only if the shapes disagree, which every caller checks first (an invariant of the
/// layers, whose shapes are validated at their entry).
pub fn gemm(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, beta: f32, c: ArrayViewMut2<'_, f32>) {
    let threads = rayon::current_num_threads();
    let (m, k) = a.dim();
    let n = b.ncols();
    if threads <= 1 || m * n * k < PARALLEL_MIN_MACS {
        let mut c = c;
        general_mat_mul(1.0, &a, &b, beta, &mut c);
        return;
    }
    split(a, b, beta, c, threads);
}

fn split(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    mut c: ArrayViewMut2<'_, f32>,
    parts: usize,
) {
    let (m, n) = c.dim();
    if parts <= 1 || (m < 16 && n < 16) {
        general_mat_mul(1.0, &a, &b, beta, &mut c);
        return;
    }
    let left = parts / 2;
    if m >= n {
        // Split rows at a multiple of 8 to keep the microkernel's panels whole.
        let mid = ((m * left / parts) / 8 * 8).clamp(1, m - 1);
        let (a0, a1) = a.split_at(Axis(0), mid);
        let (c0, c1) = c.split_at(Axis(0), mid);
        rayon::join(
            || split(a0, b, beta, c0, left),
            || split(a1, b, beta, c1, parts - left),
        );
    } else {
        let mid = ((n * left / parts) / 8 * 8).clamp(1, n - 1);
        let (b0, b1) = b.split_at(Axis(1), mid);
        let (c0, c1) = c.split_at(Axis(1), mid);
        rayon::join(
            || split(a, b0, beta, c0, left),
            || split(a, b1, beta, c1, parts - left),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;
    use ndarray::Array2;
    use rand::RngExt;

    fn naive(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f32> {
        let (m, k) = a.dim();
        let n = b.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| {
            (0..k)
                .map(|p| f64::from(a[[i, p]]) * f64::from(b[[p, j]]))
                .sum::<f64>() as f32
        })
    }

    fn random(r: &mut rng::Rng, m: usize, n: usize) -> Array2<f32> {
        Array2::from_shape_fn((m, n), |_| r.random_range(-1.0f32..1.0))
    }

    #[test]
    fn matches_naive_reference_on_odd_shapes_and_transposes() {
        let mut r = rng::seeded(3);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 3, 5),
            (130, 70, 9),
            (9, 300, 130),
            (257, 33, 129),
        ] {
            let a = random(&mut r, m, k);
            let b = random(&mut r, k, n);
            let expect = naive(&a, &b);
            let mut c = Array2::<f32>::zeros((m, n));
            pool.install(|| gemm(a.view(), b.view(), 0.0, c.view_mut()));
            for (x, y) in c.iter().zip(expect.iter()) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
            // Transposed operands and accumulation.
            let at = a.t().to_owned();
            let bt = b.t().to_owned();
            let mut c2 = expect.clone();
            pool.install(|| gemm(at.t(), bt.t(), 1.0, c2.view_mut()));
            for (x, y) in c2.iter().zip(expect.iter()) {
                assert!((x - 2.0 * y).abs() <= 2e-4 * (1.0 + y.abs()));
            }
        }
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let mut r = rng::seeded(4);
        let a = random(&mut r, 300, 200);
        let b = random(&mut r, 200, 100);
        let run = |t: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap();
            let mut c = Array2::<f32>::zeros((300, 100));
            pool.install(|| gemm(a.view(), b.view(), 0.0, c.view_mut()));
            c
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }
}
