//! Aggregation of client states: sample-weighted federated averaging.
//!
//! Every state entry is averaged (weights, biases, BatchNorm γ/β and running statistics), with
//! weights `p_k = n_k / Σ n_j`, accumulated in f64 in the order given. Callers pass the
//! contributions sorted by client id, so the result does not depend on arrival order. With one
//! shared mask every client sends zeros at pruned positions, so they average to exactly zero.

use crate::state::StateDict;
use crate::{Error, Result};

/// `Σ_k p_k · state_k` with `p_k = n_k / Σ n_j`. Every state must have the same tensors and
/// shapes as `reference` (usually the global state), and every weight must be positive.
pub fn fedavg(reference: &StateDict, contributions: &[(usize, &StateDict)]) -> Result<StateDict> {
    if contributions.is_empty() {
        return Err(Error::InvalidConfig("fedavg of no contributions".into()));
    }
    let total: f64 = contributions.iter().map(|(n, _)| *n as f64).sum();
    if contributions.iter().any(|(n, _)| *n == 0) {
        return Err(Error::InvalidConfig(
            "a contribution has zero samples".into(),
        ));
    }
    for (_, s) in contributions {
        check_layout(reference, s)?;
    }
    let mut out = reference.clone();
    for (name, entry) in out.entries.iter_mut() {
        let mut acc = vec![0.0f64; entry.values.len()];
        for (n, s) in contributions {
            let p = *n as f64 / total;
            let src = &s.entries[name].values;
            for (a, v) in acc.iter_mut().zip(src) {
                *a += p * f64::from(*v);
            }
        }
        for (v, a) in entry.values.iter_mut().zip(acc) {
            *v = a as f32;
        }
    }
    Ok(out)
}

/// Checks that `state` has exactly the tensors and shapes of `reference`.
pub fn check_layout(reference: &StateDict, state: &StateDict) -> Result<()> {
    if reference.entries.len() != state.entries.len() {
        return Err(Error::StateMismatch(format!(
            "{} tensors, expected {}",
            state.entries.len(),
            reference.entries.len()
        )));
    }
    for (name, r) in &reference.entries {
        let s = state
            .entries
            .get(name)
            .ok_or_else(|| Error::StateMismatch(format!("missing tensor `{name}`")))?;
        if s.shape != r.shape || s.values.len() != r.values.len() {
            return Err(Error::StateMismatch(format!(
                "tensor `{name}` has shape {:?}, expected {:?}",
                s.shape, r.shape
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::param::Role;
    use crate::state::StateEntry;
    use proptest::prelude::*;

    fn state(values: Vec<f32>) -> StateDict {
        let mut s = StateDict::default();
        s.entries.insert(
            "w".into(),
            StateEntry {
                role: Role::Weight,
                prunable: true,
                shape: vec![values.len()],
                values,
            },
        );
        s
    }

    #[test]
    fn weighted_mean_by_hand() {
        let a = state(vec![1.0, 0.0, 4.0]);
        let b = state(vec![3.0, 0.0, 0.0]);
        let avg = fedavg(&a, &[(1, &a), (3, &b)]).unwrap();
        assert_eq!(avg.entries["w"].values, vec![2.5, 0.0, 1.0]);
    }

    #[test]
    fn refuses_mismatched_layouts_and_empty_input() {
        let a = state(vec![1.0, 2.0]);
        let b = state(vec![1.0, 2.0, 3.0]);
        assert!(fedavg(&a, &[(1, &b)]).is_err());
        assert!(fedavg(&a, &[]).is_err());
        assert!(fedavg(&a, &[(0, &a)]).is_err());
    }

    proptest! {
        #[test]
        fn order_independent_and_masked_positions_stay_zero(
            rows in proptest::collection::vec(
                (1usize..1000, proptest::collection::vec(-10.0f32..10.0, 16)), 1..8),
            mask in proptest::collection::vec(any::<bool>(), 16),
        ) {
            let states: Vec<(usize, StateDict)> = rows
                .iter()
                .map(|(n, v)| {
                    let masked = v.iter().zip(&mask).map(|(x, m)| if *m { *x } else { 0.0 }).collect();
                    (*n, state(masked))
                })
                .collect();
            let refs: Vec<(usize, &StateDict)> = states.iter().map(|(n, s)| (*n, s)).collect();
            let mut rev = refs.clone();
            rev.reverse();
            let a = fedavg(&states[0].1, &refs).unwrap();
            let b = fedavg(&states[0].1, &rev).unwrap();
            for (x, y) in a.entries["w"].values.iter().zip(&b.entries["w"].values) {
                prop_assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()));
            }
            for (i, v) in a.entries["w"].values.iter().enumerate() {
                if !mask[i] {
                    prop_assert_eq!(v.to_bits(), 0.0f32.to_bits());
                }
                // A weighted mean lies within the contributions' range.
                let lo = states.iter().map(|(_, s)| s.entries["w"].values[i]).fold(f32::INFINITY, f32::min);
                let hi = states.iter().map(|(_, s)| s.entries["w"].values[i]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(*v >= lo - 1e-4 && *v <= hi + 1e-4);
            }
        }
    }
}
