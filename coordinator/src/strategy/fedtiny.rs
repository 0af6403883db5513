//! FedTiny (see `shared/FEDTINY.md`): stage-0 pre-training on the server set, adaptive BatchNorm
//! selection of a coarse mask among seeded candidates over two client round trips, then sparse
//! FedAvg with progressive prune-and-grow every ΔT rounds until T_end.
//!
//! Decisions:
//! - Candidates are rebuilt by clients from `(w0, d, allocation, seed)`; seeds derive from the
//!   run seed, so a resumed run rebuilds the same ones.
//! - BN statistics are averaged per candidate weighted by the clients' validation counts (the
//!   weighted mean, not the public code's last-client value).
//! - If no client answers a stage of the selection, the first candidate is taken (with the
//!   server's or the averaged statistics); this is logged and recorded in the strategy state.
//! - The adjustment counter `j` (which block is next) is checkpointed, so a resumed run continues
//!   the cycle; it advances only when an adjustment was applied.
//! - `w0` travels once: stage 1c goes only to the clients that answered stage 1a, which keep
//!   `w0` between the two round trips (one dense model, the size of what they received) and
//!   release it after 1c; a 1c task carries no model. A client that lost it answers with a typed
//!   error and is left out of the selection's mean.
//! - The bootstrap scratch (w0, averaged statistics) is not checkpointed: a coordinator stopped
//!   during the selection redoes it.

use fedtiny_common::aggregate::{check_layout, fedavg};
use fedtiny_common::fedtiny::{adjust_count, alpha_at, model_candidate, prune_and_grow};
use fedtiny_common::mask::MaskSet;
use fedtiny_common::param::Role;
use fedtiny_common::rng;
use fedtiny_common::state::StateDict;
use fedtiny_common::task::{
    CalibrateTask, CandidateEvalTask, CandidateSet, ClientId, LocalTraining, ModelPayload, Task,
    TaskResult, TrainResult, Validation,
};
use serde::{Deserialize, Serialize};

use super::Strategy;
use super::blocks::{adjustment_groups, group_at};
use crate::config::{FedTinySection, Stage0Section};
use crate::error::{CoordinatorError, Result};
use crate::global::GlobalModel;
use crate::proxy::Failure;
use crate::stage0::{ServerSet, pre_train};

/// What FedTiny checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct State {
    bootstrapped: bool,
    adjustments: u64,
    selected: Option<usize>,
    candidate_losses: Vec<f64>,
    fallback: Option<String>,
}

/// The FedTiny strategy.
pub struct FedTiny {
    seed: u64,
    density: f64,
    rounds: u64,
    cfg: FedTinySection,
    training: LocalTraining,
    stage0: Stage0Section,
    server: Option<ServerSet>,
    state: State,
    stage: u8,
    w0: Option<StateDict>,
    bn_bar: Vec<StateDict>,
}

impl FedTiny {
    /// A FedTiny run.
    pub fn new(
        seed: u64,
        density: f64,
        rounds: u64,
        cfg: FedTinySection,
        training: LocalTraining,
        stage0: Stage0Section,
        server: Option<ServerSet>,
    ) -> Self {
        FedTiny {
            seed,
            density,
            rounds,
            cfg,
            training,
            stage0,
            server,
            state: State::default(),
            stage: 0,
            w0: None,
            bn_bar: Vec::new(),
        }
    }

    fn candidates(&self) -> CandidateSet {
        CandidateSet {
            density: self.density,
            allocation: self.cfg.allocation,
            seeds: (0..self.cfg.candidates as u64)
                .map(|c| rng::derive(self.seed, "candidate", c))
                .collect(),
        }
    }

    fn validation(&self) -> Validation {
        Validation {
            fraction: self.cfg.val_fraction,
            seed: rng::derive(self.seed, "validation", 0),
        }
    }

    fn payload(&self, global: &GlobalModel, w0: &StateDict) -> ModelPayload {
        ModelPayload {
            spec: global.spec.clone(),
            mask_version: global.masks.version,
            masks: Some(global.masks.clone()),
            state: w0.clone(),
        }
    }

    /// Installs candidate `c` (rebuilt from w0) with the given BN statistics, if any.
    fn select(&mut self, global: &mut GlobalModel, c: usize, bn: Option<&StateDict>) -> Result<()> {
        let w0 = self.w0.clone().unwrap_or_else(|| global.state.clone());
        let mut dense = global.clone();
        dense.state = w0;
        dense.masks = MaskSet::default();
        let model = dense.to_model()?;
        let set = self.candidates();
        let seed = set
            .seeds
            .get(c)
            .copied()
            .ok_or_else(|| CoordinatorError::Config {
                origin: "fedtiny".into(),
                message: format!("candidate {c} does not exist"),
            })?;
        let masks = model_candidate(&model, set.density, set.allocation, seed)?;
        global.state = dense.state;
        global.set_masks(masks)?;
        if let Some(bn) = bn {
            for (name, e) in &bn.entries {
                if let Some(dst) = global.state.entries.get_mut(name)
                    && matches!(dst.role, Role::RunningMean | Role::RunningVar)
                    && dst.values.len() == e.values.len()
                {
                    dst.values.clone_from(&e.values);
                }
            }
        }
        self.state.selected = Some(c);
        self.state.bootstrapped = true;
        tracing::info!(
            candidate = c,
            density = global.density(),
            losses = ?self.state.candidate_losses,
            "FedTiny mask selected"
        );
        Ok(())
    }

    fn is_adjust_round(&self, round: u64) -> bool {
        let t_end = self.cfg.t_end(self.rounds);
        round.is_multiple_of(self.cfg.adjust_every)
            && round <= t_end
            && alpha_at(self.cfg.alpha, round, t_end) > 0.0
    }

    fn adjust_request(&self, round: u64, global: &GlobalModel) -> Vec<(String, usize)> {
        if !self.is_adjust_round(round) {
            return Vec::new();
        }
        let alpha_t = alpha_at(self.cfg.alpha, round, self.cfg.t_end(self.rounds));
        let prunable: Vec<String> = global.masks.masks.keys().cloned().collect();
        // Model order, not alphabetical: the state's prunable tensors in visit order.
        let order = global
            .to_model()
            .map(|m| m.prunable_names())
            .unwrap_or(prunable);
        let groups = adjustment_groups(&order, self.cfg.granularity);
        group_at(&groups, self.state.adjustments)
            .iter()
            .filter_map(|name| {
                let m = global.masks.get(name)?;
                let k = adjust_count(alpha_t, m.active()).min(m.len() - m.active());
                (k > 0).then(|| (name.clone(), k))
            })
            .collect()
    }
}

impl Strategy for FedTiny {
    fn name(&self) -> &str {
        "fedtiny"
    }

    fn initialize(&mut self, global: &mut GlobalModel) -> Result<()> {
        if let Some(set) = &self.server {
            pre_train(
                global,
                set,
                self.stage0.pre_train_epochs,
                &self.training.optimizer,
                self.seed,
            )?;
        }
        self.w0 = Some(global.state.clone());
        if !self.cfg.abns {
            self.state.fallback =
                Some("ABNS disabled: first candidate, server BN statistics".into());
            self.select(global, 0, None)?;
        }
        Ok(())
    }

    fn bootstrap(
        &mut self,
        global: &mut GlobalModel,
        clients: &[ClientId],
        replies: Option<Vec<(ClientId, Result<TaskResult, Failure>)>>,
    ) -> Result<Option<Vec<(ClientId, Task)>>> {
        if self.state.bootstrapped {
            return Ok(None);
        }
        let w0 = match &self.w0 {
            Some(w) => w.clone(),
            None => {
                self.w0 = Some(global.state.clone());
                global.state.clone()
            }
        };
        let c = self.cfg.candidates;
        match (self.stage, replies) {
            (0, _) => {
                self.stage = 1;
                let task = |_: &ClientId| {
                    Task::Calibrate(CalibrateTask {
                        round: 0,
                        model: self.payload(global, &w0),
                        candidates: self.candidates(),
                        passes: self.cfg.bn_passes,
                        batch_size: self.cfg.bn_batch_size,
                        validation: self.validation(),
                    })
                };
                Ok(Some(
                    clients.iter().map(|id| (id.clone(), task(id))).collect(),
                ))
            }
            (1, replies) => {
                let ok: Vec<(ClientId, usize, Vec<StateDict>)> = replies
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(id, r)| match r {
                        Ok(TaskResult::Calibrate(r)) if r.bn.len() == c && r.val_count > 0 => {
                            Some((id, r.val_count, r.bn))
                        }
                        _ => None,
                    })
                    .collect();
                let reference = crate::global::running_stats(&w0);
                let ok: Vec<_> = ok
                    .into_iter()
                    .filter(|(_, _, bn)| bn.iter().all(|s| check_layout(&reference, s).is_ok()))
                    .collect();
                if ok.is_empty() {
                    self.state.fallback = Some("no client answered BN re-estimation".into());
                    tracing::warn!("ABNS: no BN statistics received; taking the first candidate");
                    self.select(global, 0, None)?;
                    return Ok(None);
                }
                self.bn_bar = (0..c)
                    .map(|k| {
                        let contributions: Vec<(usize, &StateDict)> =
                            ok.iter().map(|(_, n, bn)| (*n, &bn[k])).collect();
                        fedavg(&reference, &contributions)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.stage = 2;
                let bn = self.bn_bar.clone();
                Ok(Some(
                    ok.iter()
                        .map(|(id, _, _)| {
                            (
                                id.clone(),
                                Task::EvaluateCandidates(CandidateEvalTask {
                                    round: 0,
                                    // The client kept w0 from stage 1a: it travels once.
                                    model: None,
                                    candidates: self.candidates(),
                                    bn: bn.clone(),
                                    batch_size: self.cfg.bn_batch_size,
                                    validation: self.validation(),
                                }),
                            )
                        })
                        .collect(),
                ))
            }
            (_, replies) => {
                let mut loss = vec![0.0f64; c];
                let mut count = 0usize;
                for (_, r) in replies.unwrap_or_default() {
                    if let Ok(TaskResult::EvaluateCandidates(r)) = r
                        && r.stats.len() == c
                        && r.stats.iter().all(|s| s.loss_sum.is_finite())
                        && r.stats.windows(2).all(|w| w[0].count == w[1].count)
                    {
                        for (l, s) in loss.iter_mut().zip(&r.stats) {
                            *l += s.loss_sum;
                        }
                        count += r.stats.first().map_or(0, |s| s.count);
                    }
                }
                let bn_bar = std::mem::take(&mut self.bn_bar);
                if count == 0 {
                    self.state.fallback = Some("no client answered candidate evaluation".into());
                    self.select(global, 0, bn_bar.first())?;
                    return Ok(None);
                }
                self.state.candidate_losses = loss.iter().map(|l| l / count as f64).collect();
                let best = loss
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(&b.0)))
                    .map_or(0, |(i, _)| i);
                self.select(global, best, bn_bar.get(best))?;
                Ok(None)
            }
        }
    }

    fn configure_train(
        &mut self,
        round: u64,
        global: &GlobalModel,
        clients: &[ClientId],
    ) -> Result<Vec<(ClientId, Task)>> {
        let adjust = self.adjust_request(round, global);
        Ok(super::train_tasks(
            round,
            global,
            clients,
            &self.training,
            self.seed,
            &adjust,
            fedtiny_common::task::AdjustKind::PrunedTopK,
        ))
    }

    fn aggregate_train(
        &mut self,
        round: u64,
        global: &mut GlobalModel,
        results: &[(ClientId, TrainResult)],
        _failures: &[(ClientId, Failure)],
    ) -> Result<()> {
        global.state = super::average_states(&global.state, results)?;
        let request = self.adjust_request(round, global);
        if request.is_empty() {
            return Ok(());
        }
        let mut masks = global.masks.clone();
        let mut adjusted = 0usize;
        for (name, k) in &request {
            // ḡ_i = Σ_k p_k g_{k,i}, 0 where a client did not report i.
            let grad = super::aggregate_lists(results, name);
            let (Some(mask), Some(w)) = (masks.masks.get(name), global.state.entries.get(name))
            else {
                continue;
            };
            let (new_mask, grown) = prune_and_grow(&w.values, mask, &grad, *k)?;
            adjusted += grown.len();
            masks.masks.insert(name.clone(), new_mask);
        }
        tracing::info!(
            round,
            tensors = request.len(),
            regrown = adjusted,
            "FedTiny adjustment"
        );
        global.set_masks(masks)?;
        self.state.adjustments += 1;
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        if state.is_null() {
            return Ok(());
        }
        self.state =
            serde_json::from_value(state.clone()).map_err(|e| CoordinatorError::Config {
                origin: "fedtiny checkpoint state".into(),
                message: e.to_string(),
            })?;
        Ok(())
    }
}
