//! Mask-adjustment requests on the client ([`AdjustKind`]): what a training task measures or
//! changes besides training.
//!
//! - FedTiny (`PrunedTopK`): on the last step, the dense gradient of each requested tensor —
//!   one tensor at a time, inside its layer's backward pass — feeds a streaming top-K over its
//!   pruned positions and is dropped ([`fedtiny_common::param::Param::request_pruned_grad_top_k`]).
//! - PruneFL (`SquaredGradientSum`): on every step, the squared dense gradient of each requested
//!   tensor is added to a dense accumulator (PruneFL's own memory cost), and every pruned
//!   position's sum is reported.
//! - FedDST (`ClientPruneGrow`): the same top-K as FedTiny on the last step of the first half of
//!   local training, then the client prunes as many of its smallest-|w| active weights and grows
//!   those positions (weights start at 0) before training on. Decision: FEDTINY.md has the
//!   client adjust on "its last mini-batch" with grown weights at 0; adjusting at the very end
//!   would upload the grown weights as zeros, and the server's magnitude prune-back would drop
//!   every one of them, so (as FedDST's own code) the readjustment happens mid-training and the
//!   grown weights get the second half. The optimizer restarts after it (its moments belong to
//!   the old mask).
//!
//! Splitting local training: the step counts of each call of [`train::train_steps`] are planned
//! up front ([`plan`]), so hooks know which step is the last one of a segment.

use std::collections::BTreeMap;

use fedtiny_common::fedtiny::prune_and_grow;
use fedtiny_common::layers::SlotMut;
use fedtiny_common::mask::Mask;
use fedtiny_common::models::Model;
use fedtiny_common::optim::Optimizer;
use fedtiny_common::task::AdjustKind;
use fedtiny_common::train::StepHooks;

/// One call of the training loop: at most `steps` steps over one shuffled epoch; `capture`
/// when the adjustment hook acts on its last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Steps of this call (`None`: the whole epoch).
    pub steps: Option<usize>,
    /// Whether the gradient is captured on the segment's last step (or on every step, for
    /// the squared-gradient sum).
    pub capture: bool,
    /// Whether the client's masks are readjusted after this segment.
    pub readjust_after: bool,
}

/// The segments of a task: `epochs` epochs of `per_epoch` steps, at most `max_steps` steps in
/// all, split for the adjustment `kind` when `adjust` is true.
pub(crate) fn plan(
    per_epoch: usize,
    epochs: usize,
    max_steps: Option<usize>,
    kind: AdjustKind,
    adjust: bool,
) -> Vec<Segment> {
    let per_epoch = per_epoch.max(1);
    let total = max_steps
        .map_or(usize::MAX, |m| m.max(1))
        .min(per_epoch.saturating_mul(epochs.max(1)));
    let mut steps = Vec::new();
    let mut left = total;
    while left > 0 {
        let s = left.min(per_epoch);
        steps.push(s);
        left -= s;
    }
    let whole = |s: usize| (max_steps.is_some() || s < per_epoch).then_some(s);
    let mut out: Vec<Segment> = steps
        .iter()
        .map(|&s| Segment {
            steps: whole(s),
            capture: false,
            readjust_after: false,
        })
        .collect();
    if !adjust {
        return out;
    }
    match kind {
        AdjustKind::PrunedTopK => {
            if let Some(last) = out.last_mut() {
                last.capture = true;
            }
        }
        AdjustKind::SquaredGradientSum => out.iter_mut().for_each(|s| s.capture = true),
        AdjustKind::ClientPruneGrow => {
            // Split at step ⌈total/2⌉ (at least one step before the readjustment).
            let split = total.div_ceil(2).max(1);
            out.clear();
            let mut done = 0;
            for s in steps {
                if done < split && done + s > split {
                    let first = split - done;
                    out.push(Segment {
                        steps: Some(first),
                        capture: true,
                        readjust_after: true,
                    });
                    out.push(Segment {
                        steps: Some(s - first),
                        capture: false,
                        readjust_after: false,
                    });
                } else {
                    out.push(Segment {
                        steps: whole(s),
                        capture: done + s == split,
                        readjust_after: done + s == split,
                    });
                }
                done += s;
            }
        }
    }
    out
}

/// Sets or clears the dense-gradient flag of the requested tensors.
fn flag_dense(model: &mut Model, requests: &[(String, usize)], on: bool) {
    model.visit_mut(&mut |name, slot| {
        if let SlotMut::Param(p) = slot
            && requests.iter().any(|(n, _)| n == name)
        {
            p.dense_grad = on;
        }
    });
}

/// The hook that measures what an adjustment request asks for.
pub(crate) struct AdjustHook<'a> {
    requests: &'a [(String, usize)],
    kind: AdjustKind,
    /// Whether the current segment captures.
    pub capture: bool,
    /// Top-K lists of the last capture (FedTiny, FedDST).
    pub topk: Vec<(String, Vec<(u32, f32)>)>,
    /// Dense squared-gradient sums (PruneFL).
    sums: BTreeMap<String, Vec<f32>>,
}

impl<'a> AdjustHook<'a> {
    /// A hook for `requests` of `kind`.
    pub fn new(requests: &'a [(String, usize)], kind: AdjustKind) -> Self {
        AdjustHook {
            requests,
            kind,
            capture: false,
            topk: Vec::new(),
            sums: BTreeMap::new(),
        }
    }

    fn every_step(&self) -> bool {
        self.kind == AdjustKind::SquaredGradientSum
    }

    /// PruneFL's answer: every pruned position of each requested tensor with its summed squared
    /// gradient (ascending index).
    pub fn squared_sums(&self, model: &Model) -> Vec<(String, Vec<(u32, f32)>)> {
        let masks = model.masks();
        self.requests
            .iter()
            .filter_map(|(name, _)| {
                let sums = self.sums.get(name)?;
                let mask = masks.masks.get(name)?;
                let pairs = sums
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !mask.get(*i))
                    .map(|(i, &v)| (i as u32, v))
                    .collect();
                Some((name.clone(), pairs))
            })
            .collect()
    }

    /// FedDST's readjustment after the capture: per requested tensor, prune the K active
    /// weights of smallest |w| and grow the captured top-K positions. Returns the new masks.
    pub fn readjust(&mut self, model: &mut Model) -> fedtiny_common::Result<Vec<(String, Mask)>> {
        let state = model.state_dict();
        let masks = model.masks();
        let mut out = Vec::new();
        for (name, k) in self.requests {
            let (Some(mask), Some(entry), Some((_, grad))) = (
                masks.masks.get(name),
                state.entries.get(name),
                self.topk.iter().find(|(n, _)| n == name),
            ) else {
                continue;
            };
            let (new_mask, _grown) = prune_and_grow(&entry.values, mask, grad, *k)?;
            model.set_mask(name, new_mask.clone())?;
            out.push((name.clone(), new_mask));
        }
        self.topk.clear();
        Ok(out)
    }
}

impl StepHooks for AdjustHook<'_> {
    fn before_step(
        &mut self,
        _step: usize,
        last: bool,
        model: &mut Model,
        _optimizer: &mut dyn Optimizer,
    ) {
        if !self.capture {
            return;
        }
        if self.every_step() {
            flag_dense(model, self.requests, true);
        } else if last {
            // One tensor at a time: each layer streams its dense gradient into a top-K and
            // drops it.
            let requests = self.requests;
            model.visit_mut(&mut |name, slot| {
                if let SlotMut::Param(p) = slot
                    && let Some((_, k)) = requests.iter().find(|(n, _)| n == name)
                {
                    p.request_pruned_grad_top_k(*k);
                }
            });
        }
    }

    fn before_optimizer_step(
        &mut self,
        last: bool,
        model: &mut Model,
    ) -> fedtiny_common::Result<()> {
        if !self.capture || !(last || self.every_step()) {
            return Ok(());
        }
        let requests = self.requests;
        if !self.every_step() {
            let mut lists = Vec::new();
            model.visit_mut(&mut |name, slot| {
                if let SlotMut::Param(p) = slot
                    && requests.iter().any(|(n, _)| n == name)
                    && let Some(list) = p.take_pruned_grad_top_k()
                {
                    lists.push((name.to_string(), list));
                }
            });
            self.topk = lists;
            return Ok(());
        }
        let sums = &mut self.sums;
        model.visit_mut(&mut |name, slot| {
            if let SlotMut::Param(p) = slot
                && requests.iter().any(|(n, _)| n == name)
                && p.mask().is_some()
                && let Some(g) = p.grad.as_slice()
                && g.len() == p.len()
            {
                let acc = sums
                    .entry(name.to_string())
                    .or_insert_with(|| vec![0.0; g.len()]);
                for (a, v) in acc.iter_mut().zip(g) {
                    *a += v * v;
                }
            }
        });
        if last {
            flag_dense(model, requests, false);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(p: &[Segment]) -> Vec<Option<usize>> {
        p.iter().map(|s| s.steps).collect()
    }

    #[test]
    fn plans_whole_epochs_caps_and_splits() {
        let k = AdjustKind::PrunedTopK;
        assert_eq!(steps(&plan(10, 3, None, k, false)), vec![None, None, None]);
        assert_eq!(
            steps(&plan(10, 3, Some(25), k, false)),
            vec![Some(10), Some(10), Some(5)]
        );
        assert_eq!(steps(&plan(10, 1, Some(4), k, false)), vec![Some(4)]);
        // FedTiny captures on the last step of the last segment only.
        let p = plan(10, 2, None, k, true);
        assert_eq!(
            p.iter().map(|s| s.capture).collect::<Vec<_>>(),
            [false, true]
        );
        // PruneFL captures everywhere.
        let p = plan(10, 2, None, AdjustKind::SquaredGradientSum, true);
        assert!(p.iter().all(|s| s.capture && !s.readjust_after));
        // FedDST splits at ⌈total/2⌉: mid-epoch …
        let p = plan(10, 1, Some(5), AdjustKind::ClientPruneGrow, true);
        assert_eq!(steps(&p), vec![Some(3), Some(2)]);
        assert!(p[0].capture && p[0].readjust_after && !p[1].capture);
        // … or at an epoch boundary, keeping whole epochs whole.
        let p = plan(10, 2, None, AdjustKind::ClientPruneGrow, true);
        assert_eq!(steps(&p), vec![None, None]);
        assert!(p[0].readjust_after && !p[1].readjust_after);
        // One step: the readjustment follows it and nothing trains after.
        let p = plan(10, 1, Some(1), AdjustKind::ClientPruneGrow, true);
        assert_eq!(steps(&p), vec![Some(1)]);
        assert!(p[0].readjust_after);
    }

    #[test]
    fn step_totals_are_kept_by_every_plan() {
        for per in 1..6 {
            for epochs in 1..4 {
                for cap in [None, Some(1), Some(3), Some(7), Some(100)] {
                    for kind in [
                        AdjustKind::PrunedTopK,
                        AdjustKind::SquaredGradientSum,
                        AdjustKind::ClientPruneGrow,
                    ] {
                        let p = plan(per, epochs, cap, kind, true);
                        let total: usize = p.iter().map(|s| s.steps.unwrap_or(per)).sum();
                        let want = cap.unwrap_or(usize::MAX).min(per * epochs);
                        assert_eq!(total, want, "{per} {epochs} {cap:?} {kind:?}");
                        let readjusts = p.iter().filter(|s| s.readjust_after).count();
                        assert_eq!(readjusts, usize::from(kind == AdjustKind::ClientPruneGrow));
                    }
                }
            }
        }
    }
}
