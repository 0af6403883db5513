//! Mask construction: layer-wise budgets and the simple mask rules (random, magnitude) that
//! fixed-mask training uses. FedTiny's candidate masks and prune-and-grow build on these.
//!
//! Decisions:
//! - Layer-wise scope: each prunable tensor keeps `max(⌊d·n⌋, 1)` entries under uniform
//!   allocation, so every layer keeps at least one weight and the overall density is within one
//!   weight per layer of `d`.
//! - Ties in magnitude are broken by the lower index, so a mask is a pure function of the
//!   weights.

use rand::seq::SliceRandom;

use crate::layers::Slot;
use crate::mask::{Mask, MaskSet};
use crate::models::Model;
use crate::rng::Rng;
use crate::{Error, Result};

/// Checks that a density is in (0, 1].
pub fn check_density(density: f64) -> Result<()> {
    if density.is_finite() && density > 0.0 && density <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "density {density} must be in (0, 1]"
        )))
    }
}

/// Entries kept in a tensor of `n` elements at density `d` (uniform allocation).
pub fn uniform_budget(n: usize, density: f64) -> usize {
    ((density * n as f64).floor() as usize).clamp(1.min(n), n)
}

/// The `k` indices of largest `score`, ties broken by the lower index, in ascending index order.
pub fn top_k(score: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(score.len());
    let mut idx: Vec<usize> = (0..score.len()).collect();
    let cmp = |a: &usize, b: &usize| score[*b].total_cmp(&score[*a]).then_with(|| a.cmp(b));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Layer-wise random masks at `density`.
pub fn random_masks(model: &Model, density: f64, rng: &mut Rng) -> Result<MaskSet> {
    check_density(density)?;
    let mut set = MaskSet::default();
    let mut sizes = Vec::new();
    model.visit(&mut |name, slot| {
        if let Slot::Param(p) = slot
            && p.prunable
        {
            sizes.push((name.to_string(), p.len()));
        }
    });
    for (name, n) in sizes {
        let k = uniform_budget(n, density);
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(rng);
        idx.truncate(k);
        set.masks.insert(name, Mask::from_indices(n, &idx)?);
    }
    Ok(set)
}

/// Scores one prunable tensor (by name) for [`masks_from_scores`]; `None` leaves it unmasked.
pub type TensorScores<'a> = dyn FnMut(&str, &crate::param::Param) -> Result<Option<Vec<f32>>> + 'a;

/// Layer-wise masks at `density` from per-tensor scores: every prunable tensor for which `score`
/// returns scores keeps its `uniform_budget` highest-scoring entries (ties to the lower index);
/// a tensor it returns `None` for stays unmasked. The first error stops the scoring.
pub fn masks_from_scores(
    model: &Model,
    density: f64,
    score: &mut TensorScores<'_>,
) -> Result<MaskSet> {
    check_density(density)?;
    let mut set = MaskSet::default();
    let mut err = None;
    model.visit(&mut |name, slot| {
        if err.is_some() {
            return;
        }
        if let Slot::Param(p) = slot
            && p.prunable
        {
            let mask = score(name, p).and_then(|s| {
                s.map(|s| Mask::from_indices(s.len(), &top_k(&s, uniform_budget(s.len(), density))))
                    .transpose()
            });
            match mask {
                Ok(Some(m)) => {
                    set.masks.insert(name.to_string(), m);
                }
                Ok(None) => {}
                Err(e) => err = Some(e),
            }
        }
    });
    err.map_or(Ok(set), Err)
}

/// Layer-wise magnitude masks at `density`: each tensor keeps its largest-|w| entries.
pub fn magnitude_masks(model: &Model, density: f64) -> Result<MaskSet> {
    masks_from_scores(model, density, &mut |_, p| {
        Ok(Some(p.value_dense().iter().map(|v| v.abs()).collect()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Arch, ModelSpec};
    use proptest::prelude::*;

    #[test]
    fn top_k_by_hand() {
        assert_eq!(top_k(&[0.1, 5.0, 3.0, 5.0, -1.0], 2), vec![1, 3]);
        assert_eq!(
            top_k(&[1.0, 1.0, 1.0], 2),
            vec![0, 1],
            "ties go to the lower index"
        );
        assert_eq!(top_k(&[1.0], 3), vec![0]);
        assert!(top_k(&[], 3).is_empty());
    }

    proptest! {
        #[test]
        fn top_k_equals_a_full_sort(v in proptest::collection::vec(-100.0f32..100.0, 0..200), k in 0usize..220) {
            let got = top_k(&v, k);
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|a, b| v[*b].total_cmp(&v[*a]).then(a.cmp(b)));
            let mut want: Vec<usize> = order.into_iter().take(k).collect();
            want.sort_unstable();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn masks_keep_exact_budgets_and_magnitude_keeps_the_largest() {
        let spec = ModelSpec::new(Arch::Cnn, [28, 28, 1], 10, 0.5).unwrap();
        let model = Model::new(&spec, 1).unwrap();
        for d in [1.0, 0.1, 0.01] {
            let r = random_masks(&model, d, &mut crate::rng::seeded(2)).unwrap();
            let m = magnitude_masks(&model, d).unwrap();
            assert_eq!(r.masks.len(), 3);
            for (name, mask) in &m.masks {
                assert_eq!(mask.active(), uniform_budget(mask.len(), d));
                assert_eq!(r.masks[name].active(), mask.active());
            }
        }
        let m = magnitude_masks(&model, 0.1).unwrap();
        let sd = model.state_dict();
        let w = &sd.get("fc1.weight").unwrap().values;
        let mask = &m.masks["fc1.weight"];
        let min_kept = mask
            .iter_active()
            .map(|i| w[i].abs())
            .fold(f32::INFINITY, f32::min);
        let max_dropped = (0..w.len())
            .filter(|i| !mask.get(*i))
            .map(|i| w[i].abs())
            .fold(0.0, f32::max);
        assert!(min_kept >= max_dropped);
        assert!(random_masks(&model, 0.0, &mut crate::rng::seeded(1)).is_err());
        assert!(magnitude_masks(&model, 1.5).is_err());
    }
}
