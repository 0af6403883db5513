//! Per-channel passes over row-major `[rows, C]` data (NHWC activations), vectorised whatever `C`.
//!
//! A loop over one row of `C` values indexed by channel runs a few lanes wide at best (16
//! channels are four SSE2 vectors, with loop set-up per row and bounds checks per parameter).
//! Here rows are taken `K` at a time: a *tile* of `W = K·C` contiguous values meets parameter
//! vectors repeated `K` times ([`Tiling::tile`]), so every inner loop is a zip of slices `W`
//! long that the compiler vectorises, with no per-channel indexing. `K` is a power of two with
//! `W ≥` [`MIN_TILE`]. A last, partial tile is a prefix of a tile, which the zips handle as is.
//!
//! Reductions are deterministic whatever the thread count: the rows are cut into fixed blocks
//! of [`ROWS_PER_SLOT`]` · K` rows, each block sums into `W` single-precision slots (so a slot
//! sums at most [`ROWS_PER_SLOT`] rows), the slots of a block are folded per channel in `f64`,
//! and the block sums are added in block order in `f64`. Elementwise passes compute each value
//! with the same operations whatever the split.

use rayon::prelude::*;

/// The smallest tile, in values.
pub const MIN_TILE: usize = 64;

/// Rows added into one single-precision slot of a reduction (at most).
pub const ROWS_PER_SLOT: usize = 256;

/// Values per parallel task of an elementwise pass (rounded to whole tiles).
const TASK_VALUES: usize = 1 << 15;

/// How `[rows, C]` data is cut into tiles of `K` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    channels: usize,
    rows: usize,
}

impl Tiling {
    /// The tiling for `channels` channels (at least 1).
    pub fn new(channels: usize) -> Self {
        let channels = channels.max(1);
        let rows = MIN_TILE.div_ceil(channels).next_power_of_two();
        Tiling { channels, rows }
    }

    /// Channels `C`.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Rows per tile `K`.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per tile `W = K·C`.
    pub fn width(&self) -> usize {
        self.rows * self.channels
    }

    /// `v` (one value per channel) repeated for each row of a tile.
    pub fn tile(&self, v: &[f32]) -> Vec<f32> {
        debug_assert_eq!(v.len(), self.channels);
        let mut out = Vec::with_capacity(self.width());
        for _ in 0..self.rows {
            out.extend_from_slice(v);
        }
        out
    }

    /// Values per parallel task of an elementwise pass: whole tiles.
    fn task(&self) -> usize {
        (TASK_VALUES / self.width()).max(1) * self.width()
    }

    /// Values per reduction block: whole tiles.
    fn block(&self) -> usize {
        ROWS_PER_SLOT * self.width()
    }

    /// Folds `W` slots into per-channel `f64` sums, added into `out`.
    fn fold(&self, slots: &[f32], out: &mut [f64]) {
        let mut block = vec![0.0f64; self.channels];
        for tile_row in slots.chunks(self.channels) {
            for (b, v) in block.iter_mut().zip(tile_row) {
                *b += f64::from(*v);
            }
        }
        for (o, b) in out.iter_mut().zip(block) {
            *o += b;
        }
    }
}

/// Per-channel sums over the data: `f(range, slots)` adds the contributions of the values in
/// `range` (one block, whole tiles) into `W` slots.
fn reduce<F>(t: &Tiling, len: usize, f: F) -> Vec<f64>
where
    F: Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
{
    let block = t.block();
    let partials: Vec<Vec<f32>> = (0..len.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let mut slots = vec![0.0f32; t.width()];
            f(b * block..((b + 1) * block).min(len), &mut slots);
            slots
        })
        .collect();
    let mut out = vec![0.0f64; t.channels];
    for p in &partials {
        t.fold(p, &mut out);
    }
    out
}

/// Per-channel `Σ x` and `Σ (x − mean)²` of `[rows, C]` data (two passes: the second is centred
/// on the first's mean, so no cancellation).
pub fn mean_and_centred_squares(t: &Tiling, x: &[f32]) -> (Vec<f32>, Vec<f64>) {
    let rows = (x.len() / t.channels).max(1) as f64;
    let w = t.width();
    let sums = reduce(t, x.len(), |range, slots| {
        for tile in x[range].chunks(w) {
            for (s, v) in slots.iter_mut().zip(tile) {
                *s += v;
            }
        }
    });
    let mean: Vec<f32> = sums.iter().map(|s| (s / rows) as f32).collect();
    let mt = t.tile(&mean);
    let sq = reduce(t, x.len(), |range, slots| {
        for tile in x[range].chunks(w) {
            for ((s, v), m) in slots.iter_mut().zip(tile).zip(&mt) {
                let d = v - m;
                *s += d * d;
            }
        }
    });
    (mean, sq)
}

/// Per-channel affine map in place, `y = y·scale + shift`, clamped at 0 when `relu`.
pub fn affine(t: &Tiling, y: &mut [f32], scale: &[f32], shift: &[f32], relu: bool) {
    let (st, bt) = (t.tile(scale), t.tile(shift));
    let w = t.width();
    y.par_chunks_mut(t.task()).for_each(|task| {
        for tile in task.chunks_mut(w) {
            for ((v, s), b) in tile.iter_mut().zip(&st).zip(&bt) {
                let a = *v * s + b;
                *v = if relu { a.max(0.0) } else { a };
            }
        }
    });
}

/// The normalising pass of batch normalisation: `x̂ = (y − mean)·inv_std` into `xhat` and
/// `y = x̂·γ + β` in place (clamped at 0 when `relu`). `xhat` is as long as `y`.
#[allow(clippy::too_many_arguments)]
pub fn normalise(
    t: &Tiling,
    y: &mut [f32],
    xhat: &mut [f32],
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    beta: &[f32],
    relu: bool,
) {
    let (mt, it) = (t.tile(mean), t.tile(inv_std));
    let (gt, bt) = (t.tile(gamma), t.tile(beta));
    let (w, task) = (t.width(), t.task());
    xhat.par_chunks_mut(task)
        .zip(y.par_chunks_mut(task))
        .for_each(|(xh, y)| {
            for (xr, yr) in xh.chunks_mut(w).zip(y.chunks_mut(w)) {
                for (((((x, v), m), i), g), b) in xr
                    .iter_mut()
                    .zip(yr.iter_mut())
                    .zip(&mt)
                    .zip(&it)
                    .zip(&gt)
                    .zip(&bt)
                {
                    let n = (*v - m) * i;
                    *x = n;
                    let o = n * g + b;
                    *v = if relu { o.max(0.0) } else { o };
                }
            }
        });
}

/// The first backward pass of batch normalisation: with `relu`, zeroes `dy` wherever the
/// forward output before clamping (`x̂·γ + β`, recomputed bit for bit) is not positive; returns
/// the per-channel `Σ dy` and `Σ dy·x̂` of the gated gradient.
pub fn gate_and_sums(
    t: &Tiling,
    dy: &mut [f32],
    xhat: &[f32],
    gamma: &[f32],
    beta: &[f32],
    relu: bool,
) -> (Vec<f64>, Vec<f64>) {
    let (gt, bt) = if relu {
        (t.tile(gamma), t.tile(beta))
    } else {
        (Vec::new(), Vec::new())
    };
    let w = t.width();
    let block = t.block();
    // Blocks own disjoint parts of `dy`, so they run in parallel; the fold is in block order.
    let partials: Vec<Vec<f32>> = dy
        .par_chunks_mut(block)
        .zip(xhat.par_chunks(block))
        .map(|(d, xh)| {
            let mut slots = vec![0.0f32; 2 * w];
            let (sb, sg) = slots.split_at_mut(w);
            for (dr, xr) in d.chunks_mut(w).zip(xh.chunks(w)) {
                if relu {
                    for (((v, x), g), b) in dr.iter_mut().zip(xr).zip(&gt).zip(&bt) {
                        let y = x * g + b;
                        // `!(y > 0)`: also gates a NaN output, as max(NaN, 0) = 0 would.
                        *v = if y > 0.0 { *v } else { 0.0 };
                    }
                }
                for (((b, g), v), x) in sb.iter_mut().zip(sg.iter_mut()).zip(&*dr).zip(xr) {
                    *b += v;
                    *g += v * x;
                }
            }
            slots
        })
        .collect();
    let mut db = vec![0.0f64; t.channels];
    let mut dg = vec![0.0f64; t.channels];
    for p in &partials {
        let (sb, sg) = p.split_at(w);
        t.fold(sb, &mut db);
        t.fold(sg, &mut dg);
    }
    (db, dg)
}

/// The input gradient of batch normalisation in place: `dx = k·(dy − a − x̂·b)` per channel.
pub fn input_gradient(t: &Tiling, dy: &mut [f32], xhat: &[f32], k: &[f32], a: &[f32], b: &[f32]) {
    let (kt, at, bt) = (t.tile(k), t.tile(a), t.tile(b));
    let (w, task) = (t.width(), t.task());
    dy.par_chunks_mut(task)
        .zip(xhat.par_chunks(task))
        .for_each(|(d, xh)| {
            for (dr, xr) in d.chunks_mut(w).zip(xh.chunks(w)) {
                for ((((v, x), k), a), b) in dr.iter_mut().zip(xr).zip(&kt).zip(&at).zip(&bt) {
                    *v = k * (*v - a - x * b);
                }
            }
        });
}

/// `dy ·= k` per channel, in place.
pub fn scale(t: &Tiling, dy: &mut [f32], k: &[f32]) {
    let kt = t.tile(k);
    let w = t.width();
    dy.par_chunks_mut(t.task()).for_each(|d| {
        for dr in d.chunks_mut(w) {
            for (v, k) in dr.iter_mut().zip(&kt) {
                *v *= k;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(rows: usize, c: usize) -> Vec<f32> {
        (0..rows * c)
            .map(|i| ((i * 37 + 11) % 101) as f32 / 13.0 - 3.0)
            .collect()
    }

    #[test]
    fn tiles_are_whole_rows_of_at_least_min_tile_values() {
        for c in [1, 3, 16, 17, 64, 100, 512] {
            let t = Tiling::new(c);
            assert!(t.width() >= MIN_TILE, "c {c}");
            assert_eq!(t.width() % c, 0);
            assert!(t.rows().is_power_of_two());
            assert_eq!(t.tile(&vec![1.0; c]).len(), t.width());
        }
        assert_eq!(Tiling::new(16).rows(), 4);
        assert_eq!(Tiling::new(100).rows(), 1);
    }

    #[test]
    fn statistics_match_the_f64_definition() {
        // Rows that fill several blocks and leave a partial tile at the end.
        for (rows, c) in [(5000, 3), (70_001, 16), (9, 100), (1, 1)] {
            let x = data(rows, c);
            let t = Tiling::new(c);
            let (mean, sq) = mean_and_centred_squares(&t, &x);
            for ch in 0..c {
                let col: Vec<f64> = (0..rows).map(|r| f64::from(x[r * c + ch])).collect();
                let m = col.iter().sum::<f64>() / rows as f64;
                let s: f64 = col.iter().map(|v| (v - m) * (v - m)).sum();
                assert!((f64::from(mean[ch]) - m).abs() < 1e-5, "mean {rows}x{c}");
                assert!((sq[ch] - s).abs() <= 1e-5 * s.max(1.0), "sq {rows}x{c}");
            }
        }
    }

    #[test]
    fn passes_match_naive_per_channel_loops() {
        let (rows, c) = (3001, 12);
        let t = Tiling::new(c);
        let x = data(rows, c);
        let p = |s: f32| (0..c).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
        let (mean, inv, gamma, beta) = (p(0.3), p(0.7), p(1.1), p(0.2));
        for relu in [false, true] {
            let mut y = x.clone();
            let mut xh = vec![f32::NAN; x.len()];
            normalise(&t, &mut y, &mut xh, &mean, &inv, &gamma, &beta, relu);
            let mut dy: Vec<f32> = data(rows, c).iter().map(|v| v * 0.5 - 0.1).collect();
            let dy0 = dy.clone();
            let (db, dg) = gate_and_sums(&t, &mut dy, &xh, &gamma, &beta, relu);
            let mut dx = dy.clone();
            input_gradient(&t, &mut dx, &xh, &inv, &gamma, &beta);
            let (mut rdb, mut rdg) = (vec![0.0f64; c], vec![0.0f64; c]);
            for r in 0..rows {
                for ch in 0..c {
                    let i = r * c + ch;
                    let n = (x[i] - mean[ch]) * inv[ch];
                    assert_eq!(xh[i].to_bits(), n.to_bits());
                    let o = n * gamma[ch] + beta[ch];
                    let o = if relu { o.max(0.0) } else { o };
                    assert_eq!(y[i].to_bits(), o.to_bits());
                    let g = if relu && o <= 0.0 { 0.0 } else { dy0[i] };
                    assert_eq!(dy[i].to_bits(), g.to_bits());
                    rdb[ch] += f64::from(g);
                    rdg[ch] += f64::from(g * n);
                    let d = inv[ch] * (g - gamma[ch] - n * beta[ch]);
                    assert_eq!(dx[i].to_bits(), d.to_bits());
                }
            }
            // Single-precision slots against f64 sums: relative error near f32 rounding.
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
            for ch in 0..c {
                assert!(close(db[ch], rdb[ch]), "{} vs {}", db[ch], rdb[ch]);
                assert!(close(dg[ch], rdg[ch]), "{} vs {}", dg[ch], rdg[ch]);
            }
            let mut a = x.clone();
            affine(&t, &mut a, &gamma, &beta, relu);
            let mut s = x.clone();
            scale(&t, &mut s, &gamma);
            for (i, v) in x.iter().enumerate() {
                let o = v * gamma[i % c] + beta[i % c];
                let o = if relu { o.max(0.0) } else { o };
                assert_eq!(a[i].to_bits(), o.to_bits());
                assert_eq!(s[i].to_bits(), (v * gamma[i % c]).to_bits());
            }
        }
    }

    #[test]
    fn reductions_do_not_depend_on_the_thread_count() {
        let (rows, c) = (40_000, 8);
        let t = Tiling::new(c);
        let x = data(rows, c);
        let xh: Vec<f32> = x.iter().map(|v| v * 0.3).collect();
        let g = vec![0.5; c];
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut d = x.clone();
                (
                    mean_and_centred_squares(&t, &x),
                    gate_and_sums(&t, &mut d, &xh, &g, &g, true),
                    d,
                )
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn a_nan_output_is_gated() {
        let t = Tiling::new(2);
        let mut dy = vec![1.0, 2.0];
        let xhat = vec![f32::NAN, 1.0];
        let (db, _) = gate_and_sums(&t, &mut dy, &xhat, &[1.0, 1.0], &[0.0, 0.0], true);
        assert_eq!(dy, vec![0.0, 2.0]);
        assert_eq!(db, vec![0.0, 2.0]);
    }
}
