//! Per-channel reductions over a row-major `[rows, channels]` matrix, deterministic whatever the
//! thread count: rows are cut into fixed blocks, each block sums in `f32` (vectorised), and the
//! block sums are added in block order in `f64`.

use rayon::prelude::*;

/// Rows per block: small enough that an `f32` block sum stays accurate, large enough to vectorise.
const BLOCK_ROWS: usize = 256;

/// Returns, per channel, the sum over rows of `f(row_index, row, acc)` contributions. The closure
/// receives the block's accumulator (`channels` wide, `f32`) and adds one row into it.
pub fn channel_sums<F>(rows: usize, channels: usize, f: F) -> Vec<f64>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let blocks = rows.div_ceil(BLOCK_ROWS);
    let partials: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0.0f32; channels];
            for r in b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f64; channels];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += f64::from(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_match_reference_and_thread_count() {
        let (rows, ch) = (1000, 3);
        let x: Vec<f32> = (0..rows * ch)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 3.0)
            .collect();
        let run = |t: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap();
            pool.install(|| {
                channel_sums(rows, ch, |r, acc| {
                    for (a, v) in acc.iter_mut().zip(&x[r * ch..(r + 1) * ch]) {
                        *a += v;
                    }
                })
            })
        };
        let s = run(1);
        assert_eq!(s, run(2));
        for c in 0..ch {
            let reference: f64 = (0..rows).map(|r| f64::from(x[r * ch + c])).sum();
            assert!((s[c] - reference).abs() < 1e-3, "{} vs {}", s[c], reference);
        }
    }
}
