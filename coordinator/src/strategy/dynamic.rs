//! The dynamic-mask baselines of FEDTINY.md, on the same fixed-density schedule as FedTiny
//! (an adjustment after every ΔT-th round while t ≤ T_end; every prunable tensor each time):
//!
//! - **PruneFL** (fixed-density variant): clients report, for every pruned position, the squared
//!   gradient summed over their local steps (a dense upload); the server aggregates it
//!   sample-weighted, removes the `⌊α·active⌋` smallest-|w| weights of each tensor and
//!   re-activates as many pruned positions of largest aggregated importance (weights start at 0).
//! - **FedDST**: each client prunes `⌈α_t·active⌉` of its weights by magnitude and grows as many
//!   by |gradient| mid-way through local training, and uploads its own mask; the server takes,
//!   per position, the sample-weighted mean over the clients whose mask keeps it, the union of
//!   the masks, then magnitude-prunes each tensor back to its active count.
//!
//! Decisions:
//! - Both start from the fixed mask rule of `[mask]` (after the stage-0 pre-training when there
//!   is a server set), exactly like the fixed-mask baselines; the experiment uses a random mask
//!   for FedDST (its paper's start) and the magnitude mask for PruneFL (its initial pruning).
//! - PruneFL's α is constant (FEDTINY.md), FedDST's follows FedTiny's cosine schedule α_t.
//! - Per-tensor active counts never change (fixed density); ties go to the lower index.

use std::collections::BTreeMap;

use fedtiny_common::fedtiny::{adjust_count, alpha_at, prune_and_grow};
use fedtiny_common::mask::Mask;
use fedtiny_common::state::StateDict;
use fedtiny_common::task::{AdjustKind, ClientId, LocalTraining, Task, TrainResult};

use super::{FedAvg, Strategy};
use crate::error::{CoordinatorError, Result};
use crate::global::GlobalModel;
use crate::proxy::Failure;

/// Which dynamic baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DynamicKind {
    /// PruneFL, fixed-density variant.
    PruneFl,
    /// FedDST.
    FedDst,
}

/// A dynamic-mask baseline.
pub struct Dynamic {
    kind: DynamicKind,
    inner: FedAvg,
    seed: u64,
    training: LocalTraining,
    alpha: f64,
    adjust_every: u64,
    t_end: u64,
    adjustments: u64,
}

impl Dynamic {
    /// A run of `kind` starting from `inner`'s fixed mask.
    pub fn new(
        kind: DynamicKind,
        inner: FedAvg,
        seed: u64,
        training: LocalTraining,
        alpha: f64,
        adjust_every: u64,
        t_end: u64,
    ) -> Self {
        Dynamic {
            kind,
            inner,
            seed,
            training,
            alpha,
            adjust_every: adjust_every.max(1),
            t_end,
            adjustments: 0,
        }
    }

    fn is_adjust_round(&self, round: u64) -> bool {
        round.is_multiple_of(self.adjust_every)
            && round <= self.t_end
            && alpha_at(self.alpha, round, self.t_end) > 0.0
    }

    /// Per prunable tensor: K (PruneFL: every pruned position; FedDST: ⌈α_t·active⌉).
    fn request(&self, round: u64, global: &GlobalModel) -> Vec<(String, usize)> {
        if !self.is_adjust_round(round) {
            return Vec::new();
        }
        global
            .masks
            .masks
            .iter()
            .filter_map(|(name, m)| {
                let pruned = m.len() - m.active();
                let k = match self.kind {
                    DynamicKind::PruneFl => pruned,
                    DynamicKind::FedDst => {
                        adjust_count(alpha_at(self.alpha, round, self.t_end), m.active())
                            .min(pruned)
                    }
                };
                (k > 0).then(|| (name.clone(), k))
            })
            .collect()
    }

    fn adjust_kind(&self) -> AdjustKind {
        match self.kind {
            DynamicKind::PruneFl => AdjustKind::SquaredGradientSum,
            DynamicKind::FedDst => AdjustKind::ClientPruneGrow,
        }
    }
}

/// PruneFL's server step: per tensor, aggregate the importance lists sample-weighted, then
/// prune `⌊α·active⌋` by magnitude and grow as many by importance.
fn prunefl_masks(
    global: &GlobalModel,
    results: &[(ClientId, TrainResult)],
    alpha: f64,
) -> Result<BTreeMap<String, Mask>> {
    let mut out = BTreeMap::new();
    for (name, mask) in &global.masks.masks {
        let Some(w) = global.state.entries.get(name) else {
            continue;
        };
        let grad = super::aggregate_lists(results, name);
        let k = ((alpha * mask.active() as f64).floor() as usize).min(mask.len() - mask.active());
        let (m, _) = prune_and_grow(&w.values, mask, &grad, k)?;
        out.insert(name.clone(), m);
    }
    Ok(out)
}

/// FedDST's server step on the averaged state `avg` (plain FedAvg for every other tensor):
/// per prunable tensor, the sample-weighted mean of each position over the clients whose own
/// mask keeps it, the union of those masks, then the `active` largest |w| of the union.
fn feddst_merge(
    global: &GlobalModel,
    avg: &mut StateDict,
    results: &[(ClientId, TrainResult)],
) -> Result<BTreeMap<String, Mask>> {
    let mut out = BTreeMap::new();
    for (name, held) in &global.masks.masks {
        let n = held.len();
        let mut num = vec![0.0f64; n];
        let mut den = vec![0.0f64; n];
        for (_, r) in results {
            let own = r
                .masks
                .iter()
                .find(|(m, _)| m == name)
                .map_or(held, |(_, m)| m);
            let values = r
                .state
                .entries
                .get(name)
                .map(|e| &e.values)
                .ok_or_else(|| CoordinatorError::Config {
                    origin: "FedDST aggregation".into(),
                    message: format!("a result lacks `{name}`"),
                })?;
            let p = r.num_samples as f64;
            for i in own.iter_active() {
                num[i] += p * f64::from(values[i]);
                den[i] += p;
            }
        }
        let mean: Vec<f32> = num
            .iter()
            .zip(&den)
            .map(|(a, d)| if *d > 0.0 { (a / d) as f32 } else { 0.0 })
            .collect();
        let union: Vec<usize> = (0..n).filter(|&i| den[i] > 0.0).collect();
        let keep = held.active().min(union.len());
        let mut ranked = union;
        ranked.sort_by(|&a, &b| mean[b].abs().total_cmp(&mean[a].abs()).then(a.cmp(&b)));
        ranked.truncate(keep);
        // Fewer positions than before can only happen if no client answered: keep the old mask.
        let mask = if keep == held.active() {
            Mask::from_indices(n, &ranked)?
        } else {
            held.clone()
        };
        if let Some(e) = avg.entries.get_mut(name) {
            for (i, v) in e.values.iter_mut().enumerate() {
                *v = if mask.get(i) { mean[i] } else { 0.0 };
            }
        }
        out.insert(name.clone(), mask);
    }
    Ok(out)
}

impl Strategy for Dynamic {
    fn name(&self) -> &str {
        match self.kind {
            DynamicKind::PruneFl => "prunefl",
            DynamicKind::FedDst => "feddst",
        }
    }

    fn initialize(&mut self, global: &mut GlobalModel) -> Result<()> {
        self.inner.initialize(global)
    }

    fn configure_train(
        &mut self,
        round: u64,
        global: &GlobalModel,
        clients: &[ClientId],
    ) -> Result<Vec<(ClientId, Task)>> {
        let request = self.request(round, global);
        Ok(super::train_tasks(
            round,
            global,
            clients,
            &self.training,
            self.seed,
            &request,
            self.adjust_kind(),
        ))
    }

    fn aggregate_train(
        &mut self,
        round: u64,
        global: &mut GlobalModel,
        results: &[(ClientId, TrainResult)],
        _failures: &[(ClientId, Failure)],
    ) -> Result<()> {
        let mut avg = super::average_states(&global.state, results)?;
        if self.request(round, global).is_empty() || results.is_empty() {
            global.state = avg;
            return Ok(());
        }
        let masks = match self.kind {
            DynamicKind::PruneFl => {
                global.state = avg;
                prunefl_masks(global, results, self.alpha)?
            }
            DynamicKind::FedDst => {
                let m = feddst_merge(global, &mut avg, results)?;
                global.state = avg;
                m
            }
        };
        let changed: usize = masks
            .iter()
            .filter_map(|(n, m)| {
                let old = global.masks.masks.get(n)?;
                Some(m.iter_active().filter(|&i| !old.get(i)).count())
            })
            .sum();
        tracing::info!(
            round,
            strategy = self.name(),
            regrown = changed,
            "mask adjustment"
        );
        let mut set = global.masks.clone();
        set.masks = masks;
        global.set_masks(set)?;
        self.adjustments += 1;
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "adjustments": self.adjustments })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        if let Some(a) = state.get("adjustments").and_then(serde_json::Value::as_u64) {
            self.adjustments = a;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtiny_common::mask::MaskSet;
    use fedtiny_common::param::Role;
    use fedtiny_common::state::StateEntry;

    fn global(values: Vec<f32>, active: &[usize]) -> GlobalModel {
        let n = values.len();
        let mut entries = BTreeMap::new();
        entries.insert(
            "w".to_string(),
            StateEntry {
                role: Role::Weight,
                prunable: true,
                shape: vec![n],
                values,
            },
        );
        let mut masks = MaskSet::default();
        masks
            .masks
            .insert("w".into(), Mask::from_indices(n, active).unwrap());
        GlobalModel {
            spec: fedtiny_common::models::ModelSpec::new(
                fedtiny_common::models::Arch::Cnn,
                [8, 8, 1],
                2,
                0.25,
            )
            .unwrap(),
            state: StateDict { entries },
            masks,
        }
    }

    fn result(values: Vec<f32>, samples: usize, own: Option<Mask>) -> (ClientId, TrainResult) {
        let n = values.len();
        let mut entries = BTreeMap::new();
        entries.insert(
            "w".to_string(),
            StateEntry {
                role: Role::Weight,
                prunable: true,
                shape: vec![n],
                values,
            },
        );
        (
            ClientId("c".into()),
            TrainResult {
                round: 1,
                mask_version: 0,
                num_samples: samples,
                state: StateDict { entries },
                train_loss: 0.0,
                train_accuracy: 0.0,
                seconds: 0.0,
                peak_rss_bytes: None,
                topk: Vec::new(),
                masks: own.map(|m| vec![("w".to_string(), m)]).unwrap_or_default(),
            },
        )
    }

    /// Two clients over 6 positions, global mask {0, 1, 2}. Client A (3 samples) swapped 2 for
    /// 4; client B (1 sample) kept the global mask. Means over the clients keeping a position:
    /// 0 → 1.0 (both), 1 → (3·0.1 + 1·0.5)/4 = 0.2 (both), 2 → 2.0 (B), 4 → 3.0 (A). The union
    /// {0, 1, 2, 4} is cut back to 3 positions by magnitude: {0, 2, 4}.
    #[test]
    fn feddst_means_over_keeping_clients_then_prunes_the_union_back() {
        let g = global(vec![0.0; 6], &[0, 1, 2]);
        let a = result(
            vec![1.0, 0.1, 0.0, 0.0, 3.0, 0.0],
            3,
            Some(Mask::from_indices(6, &[0, 1, 4]).unwrap()),
        );
        let b = result(vec![1.0, 0.5, 2.0, 0.0, 0.0, 0.0], 1, None);
        let mut avg = g.state.clone();
        let masks = feddst_merge(&g, &mut avg, &[a, b]).unwrap();
        let m = &masks["w"];
        assert_eq!(m.iter_active().collect::<Vec<_>>(), vec![0, 2, 4]);
        let v = &avg.entries["w"].values;
        assert_eq!(v, &vec![1.0, 0.0, 2.0, 0.0, 3.0, 0.0]);
    }

    /// PruneFL: active {0, 1, 2, 3} with |w| 4, 1, 3, 2; α = 0.5 → 2 swaps. Importance (sample
    /// weighted) at pruned 4, 5, 6, 7: 0.1, 0.9, 0.5, 0.0 → grow 5 and 6, prune 1 and 3.
    #[test]
    fn prunefl_swaps_smallest_weights_for_largest_importance() {
        let g = global(vec![4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0], &[0, 1, 2, 3]);
        let mut a = result(vec![0.0; 8], 1, None);
        a.1.topk = vec![("w".into(), vec![(4, 0.2), (5, 1.0), (6, 0.0), (7, 0.0)])];
        let mut b = result(vec![0.0; 8], 1, None);
        b.1.topk = vec![("w".into(), vec![(4, 0.0), (5, 0.8), (6, 1.0), (7, 0.0)])];
        let masks = prunefl_masks(&g, &[a, b], 0.5).unwrap();
        assert_eq!(
            masks["w"].iter_active().collect::<Vec<_>>(),
            vec![0, 2, 5, 6]
        );
    }
}
