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

/// [`channel_sums`] over the rows of `data` (`width` values each) that lets the closure change
/// the row it reads: `f(row_index, row, acc)`. Rows are blocked exactly as in [`channel_sums`],
/// so for a closure that only reads its row both give the same bits.
pub fn channel_sums_mut<F>(data: &mut [f32], width: usize, channels: usize, f: F) -> Vec<f64>
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let mut out = vec![0.0f64; channels];
    if width == 0 {
        return out;
    }
    let partials: Vec<Vec<f32>> = data
        .par_chunks_mut(BLOCK_ROWS * width)
        .enumerate()
        .map(|(b, block)| {
            let mut acc = vec![0.0f32; channels];
            for (i, row) in block.chunks_mut(width).enumerate() {
                f(b * BLOCK_ROWS + i, row, &mut acc);
            }
            acc
        })
        .collect();
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
    fn mutable_sums_equal_read_only_sums_bit_for_bit_and_change_rows() {
        let (rows, ch) = (1000, 3);
        let x: Vec<f32> = (0..rows * ch)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 3.0)
            .collect();
        let reference = channel_sums(rows, 2 * ch, |r, acc| {
            let row = &x[r * ch..(r + 1) * ch];
            let (s, q) = acc.split_at_mut(ch);
            for ((a, b), v) in s.iter_mut().zip(q.iter_mut()).zip(row) {
                *a += v;
                *b += v * v;
            }
        });
        let mut y = x.clone();
        let sums = channel_sums_mut(&mut y, ch, 2 * ch, |r, row, acc| {
            assert_eq!(row, &x[r * ch..(r + 1) * ch]);
            let (s, q) = acc.split_at_mut(ch);
            for ((a, b), v) in s.iter_mut().zip(q.iter_mut()).zip(row.iter_mut()) {
                *a += *v;
                *b += *v * *v;
                *v = -*v;
            }
        });
        assert_eq!(sums, reference);
        assert!(y.iter().zip(&x).all(|(a, b)| *a == -*b));
        // Against the f64 definition.
        for c in 0..ch {
            let s: f64 = (0..rows).map(|r| f64::from(x[r * ch + c])).sum();
            assert!((sums[c] - s).abs() < 1e-3, "{} vs {s}", sums[c]);
        }
        assert_eq!(channel_sums_mut(&mut [], 0, 2, |_, _, _| {}), vec![0.0; 2]);
    }

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
