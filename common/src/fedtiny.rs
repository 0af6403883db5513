//! FedTiny's building blocks, pure and deterministic: candidate masks (layer-wise densities by
//! noise, ERK or uniform allocation, top-|w0| within each tensor), the adjustment schedule, the
//! streaming top-K of gradients, and prune-and-grow. The coordinator's strategy and the client
//! wire them into rounds.
//!
//! Decisions (where the specification leaves room):
//! - A candidate is fully defined by `(w0, d, allocation, seed)`: clients rebuild it locally
//!   from the weights they were sent once plus the seed, and never receive the mask itself.
//! - Noise allocation redraws all layer densities until the overall density is within 2 %
//!   (relative) of `d`, at most [`MAX_DRAWS`] times, then fails with a clear error.
//! - ERK follows RigL: a conv `[k, k, cin, cout]` scores `(k + k + cin + cout) / (k·k·cin·cout)`,
//!   a linear `[in, out]` scores `(in + out) / (in·out)`; densities are `ε·score`, capped at 1,
//!   with ε solved so the total kept count equals `d·P` (capped layers are fixed and ε re-solved).
//! - Top-K ties are broken by the lower index, everywhere.
//! - Prune-and-grow keeps every tensor's active count exactly: if fewer than `K` pruned
//!   positions were reported with a non-zero aggregated gradient, only that many are grown and
//!   the same number pruned.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::RngExt;
use serde::{Deserialize, Serialize};

use crate::mask::{Mask, MaskSet};
use crate::pruning::{check_density, top_k};
use crate::rng;
use crate::{Error, Result};

/// Redraws allowed for noise allocation.
pub const MAX_DRAWS: usize = 10_000;

/// How a candidate's density is spread over the prunable tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Allocation {
    /// FedTiny's default: `d_l = d + (u_l − 0.5)·d`, `u_l ~ U(0, 1)`, overall within 2 % of d.
    Noise,
    /// RigL's Erdős–Rényi-kernel rule, layers capped at dense.
    Erk,
    /// The same density in every tensor.
    Uniform,
}

/// A prunable tensor's name and shape, in model order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorShape {
    /// Dotted name.
    pub name: String,
    /// Shape (`[k, k, cin, cout]` for convs, `[in, out]` for linears).
    pub shape: Vec<usize>,
}

impl TensorShape {
    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Kept counts per tensor for a candidate.
pub fn budgets(
    tensors: &[TensorShape],
    density: f64,
    allocation: Allocation,
    seed: u64,
) -> Result<Vec<usize>> {
    check_density(density)?;
    let sizes: Vec<usize> = tensors.iter().map(TensorShape::numel).collect();
    let total: usize = sizes.iter().sum();
    let keep = |d: f64, n: usize| ((d * n as f64).floor() as usize).clamp(1.min(n), n);
    match allocation {
        Allocation::Uniform => Ok(sizes.iter().map(|&n| keep(density, n)).collect()),
        Allocation::Noise => {
            let mut r = rng::derived(seed, "candidate-noise", 0);
            for _ in 0..MAX_DRAWS {
                let k: Vec<usize> = sizes
                    .iter()
                    .map(|&n| {
                        let u: f64 = r.random();
                        keep((density + (u - 0.5) * density).min(1.0), n)
                    })
                    .collect();
                let overall = k.iter().sum::<usize>() as f64 / total.max(1) as f64;
                if ((overall - density) / density).abs() <= 0.02 {
                    return Ok(k);
                }
            }
            Err(Error::InvalidConfig(format!(
                "no noise allocation within 2 % of density {density} after {MAX_DRAWS} draws"
            )))
        }
        Allocation::Erk => {
            let score: Vec<f64> = tensors
                .iter()
                .map(|t| {
                    let n = t.numel() as f64;
                    t.shape.iter().map(|&d| d as f64).sum::<f64>() / n.max(1.0)
                })
                .collect();
            let target = density * total as f64;
            let mut dense = vec![false; sizes.len()];
            loop {
                let fixed: f64 = (0..sizes.len())
                    .filter(|&i| dense[i])
                    .map(|i| sizes[i] as f64)
                    .sum();
                let weighted: f64 = (0..sizes.len())
                    .filter(|&i| !dense[i])
                    .map(|i| score[i] * sizes[i] as f64)
                    .sum();
                if weighted <= 0.0 {
                    break;
                }
                let eps = (target - fixed) / weighted;
                let mut changed = false;
                for i in 0..sizes.len() {
                    if !dense[i] && eps * score[i] > 1.0 {
                        dense[i] = true;
                        changed = true;
                    }
                }
                if !changed {
                    return Ok((0..sizes.len())
                        .map(|i| {
                            if dense[i] {
                                sizes[i]
                            } else {
                                keep(eps * score[i], sizes[i])
                            }
                        })
                        .collect());
                }
            }
            Ok(sizes)
        }
    }
}

/// A candidate mask: per tensor, the `k_l` entries of largest |w0| (`weights[i]` are the values
/// of `tensors[i]`).
pub fn candidate_mask(
    tensors: &[TensorShape],
    weights: &[&[f32]],
    density: f64,
    allocation: Allocation,
    seed: u64,
) -> Result<MaskSet> {
    if tensors.len() != weights.len() {
        return Err(Error::StateMismatch(format!(
            "{} tensors but {} weight arrays",
            tensors.len(),
            weights.len()
        )));
    }
    let k = budgets(tensors, density, allocation, seed)?;
    let mut set = MaskSet::default();
    for ((t, w), &k) in tensors.iter().zip(weights).zip(&k) {
        if w.len() != t.numel() {
            return Err(Error::shape(&t.name, t.numel(), w.len()));
        }
        let score: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        set.masks.insert(
            t.name.clone(),
            Mask::from_indices(w.len(), &top_k(&score, k))?,
        );
    }
    Ok(set)
}

/// The prunable tensors of a model (names, shapes, current values), in model order.
pub fn prunable_tensors(model: &crate::models::Model) -> (Vec<TensorShape>, Vec<Vec<f32>>) {
    let mut shapes = Vec::new();
    let mut values = Vec::new();
    model.visit(&mut |name, slot| {
        if let crate::layers::Slot::Param(p) = slot
            && p.prunable
        {
            shapes.push(TensorShape {
                name: name.to_string(),
                shape: p.shape().to_vec(),
            });
            values.push(p.value_dense().iter().copied().collect());
        }
    });
    (shapes, values)
}

/// The candidate mask `seed` of a model's current (dense) weights: the function both the
/// coordinator and the clients call, so both sides build the same masks.
pub fn model_candidate(
    model: &crate::models::Model,
    density: f64,
    allocation: Allocation,
    seed: u64,
) -> Result<MaskSet> {
    let (shapes, values) = prunable_tensors(model);
    let refs: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
    candidate_mask(&shapes, &refs, density, allocation, seed)
}

/// The cosine adjustment schedule `α_t = (α/2)(1 + cos(π t / T_end))`, 0 after `T_end`.
pub fn alpha_at(alpha: f64, t: u64, t_end: u64) -> f64 {
    if t > t_end || t_end == 0 {
        return 0.0;
    }
    0.5 * alpha * (1.0 + (std::f64::consts::PI * t as f64 / t_end as f64).cos())
}

/// Positions to adjust in a tensor with `active` weights: `⌈α_t · active⌉`.
pub fn adjust_count(alpha_t: f64, active: usize) -> usize {
    ((alpha_t * active as f64).ceil() as usize).min(active)
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    index: u32,
    value: f32,
}

impl Eq for Entry {}

impl Ord for Entry {
    /// "Greater" = more important: larger |value|, then lower index. The heap keeps the least
    /// important on top (reversed), so it can be evicted.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .value
            .abs()
            .total_cmp(&self.value.abs())
            .then(self.index.cmp(&other.index))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The `k` entries of largest |value| seen in a stream, in O(k) memory.
pub struct StreamingTopK {
    k: usize,
    heap: BinaryHeap<Entry>,
}

impl StreamingTopK {
    /// An empty selector for `k` entries.
    pub fn new(k: usize) -> Self {
        StreamingTopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Offers one entry.
    #[inline]
    pub fn push(&mut self, index: u32, value: f32) {
        if self.k == 0 || !value.is_finite() {
            return;
        }
        let e = Entry { index, value };
        if self.heap.len() < self.k {
            self.heap.push(e);
        } else if let Some(top) = self.heap.peek()
            && e < *top
        {
            // `e` is more important than the least important kept entry.
            self.heap.pop();
            self.heap.push(e);
        }
    }

    /// The kept entries, by ascending index.
    pub fn into_sorted(self) -> Vec<(u32, f32)> {
        let mut v: Vec<(u32, f32)> = self.heap.into_iter().map(|e| (e.index, e.value)).collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    }
}

/// Top-K of the gradient at the *pruned* positions of one tensor.
pub fn top_k_pruned_gradient(grad: &[f32], mask: &Mask, k: usize) -> Vec<(u32, f32)> {
    let mut t = StreamingTopK::new(k);
    for (i, &g) in grad.iter().enumerate() {
        if !mask.get(i) {
            t.push(i as u32, g);
        }
    }
    t.into_sorted()
}

/// Prunes the `k` active positions of smallest |w| and grows the `k` pruned positions of
/// largest |g| (`grad` is the aggregated sparse gradient: (index, value) pairs at pruned
/// positions). Returns the new mask and the grown indices (whose weights must start at 0).
/// The active count is preserved exactly.
pub fn prune_and_grow(
    weights: &[f32],
    mask: &Mask,
    grad: &[(u32, f32)],
    k: usize,
) -> Result<(Mask, Vec<usize>)> {
    if weights.len() != mask.len() {
        return Err(Error::shape("prune_and_grow", mask.len(), weights.len()));
    }
    let mut g = StreamingTopK::new(k);
    for &(i, v) in grad {
        let i_us = i as usize;
        if i_us >= mask.len() {
            return Err(Error::InvalidConfig(format!(
                "gradient index {i} out of range for {} elements",
                mask.len()
            )));
        }
        if !mask.get(i_us) && v != 0.0 {
            g.push(i, v);
        }
    }
    let grow: Vec<usize> = g
        .into_sorted()
        .into_iter()
        .map(|(i, _)| i as usize)
        .collect();
    let n = grow.len();
    // Prune: the n active positions of smallest |w| (ties: lower index first).
    let mut active: Vec<usize> = mask.iter_active().collect();
    active.sort_by(|&a, &b| {
        weights[a]
            .abs()
            .total_cmp(&weights[b].abs())
            .then(a.cmp(&b))
    });
    let mut m = mask.clone();
    for &i in active.iter().take(n) {
        m.set(i, false);
    }
    for &i in &grow {
        m.set(i, true);
    }
    debug_assert_eq!(m.active(), mask.active());
    Ok((m, grow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shapes() -> Vec<TensorShape> {
        vec![
            TensorShape {
                name: "a".into(),
                shape: vec![3, 3, 16, 32],
            },
            TensorShape {
                name: "b".into(),
                shape: vec![3, 3, 32, 64],
            },
            TensorShape {
                name: "c".into(),
                shape: vec![1, 1, 16, 64],
            },
            TensorShape {
                name: "fc".into(),
                shape: vec![64, 10],
            },
        ]
    }

    #[test]
    fn candidates_are_reproducible_and_within_two_percent() {
        let t = shapes();
        let total: usize = t.iter().map(TensorShape::numel).sum();
        let mut r = rng::seeded(1);
        let w: Vec<Vec<f32>> = t
            .iter()
            .map(|s| (0..s.numel()).map(|_| r.random_range(-1.0..1.0)).collect())
            .collect();
        let refs: Vec<&[f32]> = w.iter().map(Vec::as_slice).collect();
        for d in [0.05, 0.1, 0.3] {
            let mut distinct = std::collections::BTreeSet::new();
            for seed in 0..5 {
                let a = candidate_mask(&t, &refs, d, Allocation::Noise, seed).unwrap();
                let b = candidate_mask(&t, &refs, d, Allocation::Noise, seed).unwrap();
                assert_eq!(a, b, "a candidate is a pure function of (w0, d, seed)");
                let (kept, n) = a.counts();
                assert_eq!(n, total);
                let overall = kept as f64 / n as f64;
                assert!(
                    ((overall - d) / d).abs() <= 0.02,
                    "d={d} seed={seed}: {overall}"
                );
                distinct.insert(format!(
                    "{:?}",
                    a.masks.values().map(Mask::active).collect::<Vec<_>>()
                ));
                // Within a tensor, the kept entries are the largest |w0|.
                for (i, s) in t.iter().enumerate() {
                    let m = &a.masks[&s.name];
                    let min_kept = m
                        .iter_active()
                        .map(|j| w[i][j].abs())
                        .fold(f32::INFINITY, f32::min);
                    let max_drop = (0..s.numel())
                        .filter(|&j| !m.get(j))
                        .map(|j| w[i][j].abs())
                        .fold(0.0, f32::max);
                    assert!(min_kept >= max_drop);
                }
            }
            assert!(
                distinct.len() > 1,
                "seeds should give different layer densities"
            );
        }
    }

    #[test]
    fn erk_and_uniform_budgets() {
        let t = shapes();
        let total: usize = t.iter().map(TensorShape::numel).sum();
        let u = budgets(&t, 0.1, Allocation::Uniform, 0).unwrap();
        assert_eq!(u, t.iter().map(|s| s.numel() / 10).collect::<Vec<_>>());
        let e = budgets(&t, 0.1, Allocation::Erk, 0).unwrap();
        let kept: usize = e.iter().sum();
        assert!((kept as f64 - 0.1 * total as f64).abs() <= t.len() as f64);
        // ERK keeps small layers denser than large ones.
        let dens: Vec<f64> = e
            .iter()
            .zip(&t)
            .map(|(k, s)| *k as f64 / s.numel() as f64)
            .collect();
        assert!(dens[3] > dens[1], "{dens:?}");
        // At high density small layers cap at dense.
        let e = budgets(&t, 0.9, Allocation::Erk, 0).unwrap();
        assert_eq!(e[3], t[3].numel());
        assert!(e.iter().zip(&t).all(|(k, s)| *k <= s.numel()));
    }

    #[test]
    fn schedule_values() {
        assert!((alpha_at(0.1, 0, 100) - 0.1).abs() < 1e-12);
        assert!((alpha_at(0.1, 50, 100) - 0.05).abs() < 1e-12);
        assert!(alpha_at(0.1, 100, 100).abs() < 1e-12);
        assert_eq!(alpha_at(0.1, 101, 100), 0.0);
        assert_eq!(adjust_count(0.05, 1000), 50);
        assert_eq!(adjust_count(0.0501, 1000), 51);
        assert_eq!(adjust_count(0.0, 1000), 0);
    }

    proptest! {
        #[test]
        fn streaming_top_k_equals_a_full_sort(
            v in proptest::collection::vec(-50.0f32..50.0, 0..300),
            k in 0usize..40,
        ) {
            let mut t = StreamingTopK::new(k);
            for (i, x) in v.iter().enumerate() {
                t.push(i as u32, *x);
            }
            let got: Vec<u32> = t.into_sorted().into_iter().map(|e| e.0).collect();
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b)));
            let mut want: Vec<u32> = order.into_iter().take(k).map(|i| i as u32).collect();
            want.sort_unstable();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn prune_and_grow_keeps_density_and_grows_only_pruned_positions(
            bits in proptest::collection::vec(any::<bool>(), 10..200),
            seed in 0u64..1000,
            k in 0usize..20,
        ) {
            let mask = Mask::from_fn(bits.len(), |i| bits[i]);
            let mut r = rng::seeded(seed);
            let w: Vec<f32> = (0..bits.len())
                .map(|i| if bits[i] { r.random_range(-1.0..1.0) } else { 0.0 })
                .collect();
            let grad: Vec<(u32, f32)> = (0..bits.len())
                .filter(|&i| !bits[i])
                .map(|i| (i as u32, r.random_range(-1.0..1.0)))
                .collect();
            let k = k.min(mask.active());
            let (m, grown) = prune_and_grow(&w, &mask, &grad, k).unwrap();
            prop_assert_eq!(m.active(), mask.active());
            prop_assert!(grown.len() <= k);
            for &i in &grown {
                prop_assert!(!mask.get(i) && m.get(i));
            }
            // Exactly as many pruned as grown, and the pruned ones had the smallest |w|.
            let pruned: Vec<usize> = (0..bits.len()).filter(|&i| mask.get(i) && !m.get(i)).collect();
            prop_assert_eq!(pruned.len(), grown.len());
            let max_pruned = pruned.iter().map(|&i| w[i].abs()).fold(0.0f32, f32::max);
            let min_kept = (0..bits.len()).filter(|&i| mask.get(i) && m.get(i)).map(|i| w[i].abs()).fold(f32::INFINITY, f32::min);
            prop_assert!(max_pruned <= min_kept);
        }
    }

    #[test]
    fn prune_and_grow_by_hand() {
        // Active: 0 (w .5), 1 (w .1), 2 (w .9). Pruned: 3, 4, 5 with gradients .2, .0, -.7.
        let mask = Mask::from_indices(6, &[0, 1, 2]).unwrap();
        let w = [0.5, 0.1, 0.9, 0.0, 0.0, 0.0];
        let (m, grown) = prune_and_grow(&w, &mask, &[(3, 0.2), (4, 0.0), (5, -0.7)], 2).unwrap();
        assert_eq!(grown, vec![3, 5]);
        assert_eq!(m.iter_active().collect::<Vec<_>>(), vec![2, 3, 5]);
        // Only one non-zero gradient reported: one grown, one pruned.
        let (m, grown) = prune_and_grow(&w, &mask, &[(5, 0.3)], 2).unwrap();
        assert_eq!(grown, vec![5]);
        assert_eq!(m.iter_active().collect::<Vec<_>>(), vec![0, 2, 5]);
        assert!(prune_and_grow(&w, &mask, &[(9, 1.0)], 1).is_err());
    }
}
