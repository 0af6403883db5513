//! The round engine: sampling, dispatch under a deadline, validation, aggregation, evaluation,
//! metrics and checkpoints. It is the only place where rounds are driven, for the gRPC server and
//! the in-process simulation alike.
//!
//! Determinism: the clients of round `t` are sampled by a generator derived from (seed, `t`)
//! among the available clients sorted by id; results are aggregated in client-id order; each
//! client's training seed is derived from (seed, client, `t`). With the same clients available,
//! the same seed gives the same global model whatever the transport or arrival order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedtiny_common::aggregate::check_layout;
use fedtiny_common::rng;
use fedtiny_common::task::{ClientId, Task, TaskResult, TrainResult};
use rand::seq::IndexedRandom;
use tokio::sync::watch;

use crate::budget::{BudgetGate, Proxies};
use crate::checkpoint::{self, Checkpoint};
use crate::config::FederatedConfig;
use crate::error::{CoordinatorError, Result};
use crate::evaluate::Evaluator;
use crate::global::GlobalModel;
use crate::metrics::{RoundMetrics, RunSummary};
use crate::proxy::{ClientPool, ClientProxy, Failure, Reply};
use crate::run_dir::RunDir;
use crate::strategy::Strategy;

/// File name of the checkpoint in the run folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.bin";
/// File name of the exported final model in the run folder.
pub const FINAL_MODEL_FILE: &str = "final_model.bin";

/// Drives a federated run.
pub struct RoundEngine {
    cfg: FederatedConfig,
    config_toml: String,
    strategy: Option<Box<dyn Strategy>>,
    global: Option<GlobalModel>,
    evaluator: Evaluator,
    run: RunDir,
    history: Vec<RoundMetrics>,
    rounds_done: u64,
    held: HashMap<ClientId, u64>,
    budget: BudgetGate,
}

impl RoundEngine {
    /// A new run: initial weights from the seed, then the strategy's initialisation. Writes the
    /// resolved config into the run folder.
    pub fn new(
        cfg: FederatedConfig,
        config_toml: String,
        mut strategy: Box<dyn Strategy>,
        evaluator: Evaluator,
        run: RunDir,
    ) -> Result<Self> {
        cfg.validate()?;
        let spec = cfg.model_spec()?;
        let mut global = GlobalModel::initial(&spec, rng::derive(cfg.run.seed, "init", 0))?;
        strategy.initialize(&mut global)?;
        run.write("config.toml", config_toml.as_bytes())?;
        let budget = BudgetGate::new(&cfg, run.path().display().to_string());
        Ok(RoundEngine {
            budget,
            cfg,
            config_toml,
            strategy: Some(strategy),
            global: Some(global),
            evaluator,
            run,
            history: Vec::new(),
            rounds_done: 0,
            held: HashMap::new(),
        })
    }

    /// Continues a run from its checkpoint. The checkpoint must come from the same config.
    pub fn resume(
        cfg: FederatedConfig,
        config_toml: String,
        mut strategy: Box<dyn Strategy>,
        evaluator: Evaluator,
        run: RunDir,
        ckpt: Checkpoint,
    ) -> Result<Self> {
        cfg.validate()?;
        if ckpt.config_toml != config_toml {
            return Err(CoordinatorError::Checkpoint {
                path: run.path().join(CHECKPOINT_FILE),
                message: "the checkpoint was written by a run with a different config".into(),
            });
        }
        let state: serde_json::Value = serde_json::from_str(&ckpt.strategy_state).map_err(|e| {
            CoordinatorError::Checkpoint {
                path: run.path().join(CHECKPOINT_FILE),
                message: format!("strategy state: {e}"),
            }
        })?;
        strategy.restore(&state)?;
        ckpt.global.to_model()?;
        let budget = BudgetGate::new(&cfg, run.path().display().to_string());
        Ok(RoundEngine {
            budget,
            cfg,
            config_toml,
            strategy: Some(strategy),
            global: Some(ckpt.global),
            evaluator,
            run,
            history: ckpt.history,
            rounds_done: ckpt.rounds_done,
            held: HashMap::new(),
        })
    }

    /// The global model.
    pub fn global(&self) -> Option<&GlobalModel> {
        self.global.as_ref()
    }

    /// Metrics of the completed rounds.
    pub fn history(&self) -> &[RoundMetrics] {
        &self.history
    }

    /// Rounds completed.
    pub fn rounds_done(&self) -> u64 {
        self.rounds_done
    }

    /// The run folder.
    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    fn parts(&self) -> Result<(&dyn Strategy, &GlobalModel)> {
        match (&self.strategy, &self.global) {
            (Some(s), Some(g)) => Ok((s.as_ref(), g)),
            _ => Err(CoordinatorError::Join(
                "engine state lost by a failed task".into(),
            )),
        }
    }

    /// Runs the remaining rounds (stopping early when `stop` turns true), checkpoints, exports
    /// the final model and writes the summary.
    pub async fn run(
        &mut self,
        pool: Arc<dyn ClientPool>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<RunSummary> {
        let mut interrupted = false;
        if let Some(g) = &self.global {
            self.budget.prepare(g)?;
        }
        if self.rounds_done < self.cfg.run.rounds {
            interrupted = !self.wait_for_clients(pool.as_ref(), &mut stop).await?;
        }
        if !interrupted && self.rounds_done == 0 {
            interrupted = !self.bootstrap(pool.as_ref(), &mut stop).await?;
            if !interrupted {
                self.checkpoint()?;
            }
        }
        while !interrupted && self.rounds_done < self.cfg.run.rounds {
            let round = self.rounds_done + 1;
            match self.round(round, pool.as_ref(), &mut stop).await? {
                Some(m) => {
                    tracing::info!(
                        round,
                        participants = m.participants,
                        failures = m.failures.len(),
                        accuracy = m.test_accuracy,
                        bytes_down = m.bytes_down,
                        bytes_up = m.bytes_up,
                        "round done"
                    );
                    self.run.append_metric(&m)?;
                    self.history.push(m);
                    self.rounds_done = round;
                    let every = self.cfg.run.checkpoint_every;
                    if every > 0 && round.is_multiple_of(every) {
                        self.checkpoint()?;
                    }
                }
                None => interrupted = true,
            }
            if *stop.borrow() {
                interrupted = true;
            }
        }
        self.checkpoint()?;
        let summary = self.finish(interrupted)?;
        if !interrupted {
            pool.finish();
        }
        Ok(summary)
    }

    /// Waits for `min_clients`; false when stopped first.
    async fn wait_for_clients(
        &self,
        pool: &dyn ClientPool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let need = self.cfg.run.min_clients;
        let deadline = Instant::now() + Duration::from_secs_f64(self.cfg.run.join_timeout_secs);
        let mut last_logged = usize::MAX;
        loop {
            let have = pool.available().len();
            if have >= need {
                return Ok(true);
            }
            if have != last_logged {
                tracing::info!(have, need, "waiting for clients to join");
                last_logged = have;
            }
            if Instant::now() > deadline {
                return Err(CoordinatorError::NoQuorum {
                    round: self.rounds_done + 1,
                    got: have,
                    quorum: need,
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.changed() => if *stop.borrow() { return Ok(false) },
            }
        }
    }

    /// The strategy's round trips before round 1 (clients sampled as "round 0"); false when
    /// stopped. Recorded as round 0 in the metrics when any task ran.
    async fn bootstrap(
        &mut self,
        pool: &dyn ClientPool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let started = Instant::now();
        let (sampled, memory_excluded) = self.sample(0, pool.available())?;
        let ids: Vec<ClientId> = sampled.iter().map(|p| p.id().clone()).collect();
        let deadline = Duration::from_secs_f64(self.cfg.run.round_deadline_secs);
        let mut replies = None;
        let (mut bytes_down, mut bytes_up, mut steps) = (0u64, 0u64, 0usize);
        let mut failures: Vec<(String, String)> = Vec::new();
        let mut answered = 0usize;
        loop {
            let (tasks, masks) = match (self.strategy.as_mut(), self.global.as_mut()) {
                (Some(s), Some(g)) => (
                    s.bootstrap(g, &ids, replies.take())?,
                    Arc::new(g.masks.clone()),
                ),
                _ => return Err(CoordinatorError::Join("engine state lost".into())),
            };
            let Some(tasks) = tasks else { break };
            steps += 1;
            let mut calls = Vec::new();
            for (id, task) in tasks {
                let Some(proxy) = sampled.iter().find(|p| p.id() == &id) else {
                    continue;
                };
                let fut = proxy.execute(task, masks.clone());
                calls.push(async move {
                    let out = match tokio::time::timeout(deadline, fut).await {
                        Ok(r) => r,
                        Err(_) => Err(Failure::Timeout),
                    };
                    (id, out)
                });
            }
            let outcomes = tokio::select! {
                o = futures::future::join_all(calls) => o,
                _ = stop.changed() => return Ok(false),
            };
            let mut step_replies = Vec::new();
            for (id, out) in outcomes {
                match out {
                    Ok(Reply { result, traffic }) => {
                        bytes_down += traffic.bytes_down;
                        bytes_up += traffic.bytes_up;
                        answered += 1;
                        step_replies.push((id, Ok(result)));
                    }
                    Err(f) => {
                        tracing::warn!(client = %id, reason = %f, "bootstrap task failed");
                        failures.push((id.to_string(), f.to_string()));
                        step_replies.push((id, Err(f)));
                    }
                }
            }
            replies = Some(step_replies);
        }
        if steps > 0 {
            let (_, g) = self.parts()?;
            let m = RoundMetrics {
                round: 0,
                sampled: ids.len(),
                participants: answered.checked_div(steps).unwrap_or(0),
                failures,
                aggregated: true,
                train_loss: None,
                test_accuracy: None,
                test_loss: None,
                density: g.density(),
                mask_version: g.masks.version,
                bytes_down,
                bytes_up,
                client_peak_rss_bytes: None,
                memory_excluded,
                memory_refused: Vec::new(),
                batch_lowered: Vec::new(),
                seconds: started.elapsed().as_secs_f64(),
            };
            tracing::info!(
                steps,
                bytes_down,
                bytes_up,
                density = m.density,
                "bootstrap done"
            );
            self.run.append_metric(&m)?;
            self.history.push(m);
        }
        Ok(true)
    }

    /// The clients of a round, among the available ones whose memory budget can fit a training
    /// task; also returns those left out for their budget, with the reason.
    fn sample(
        &mut self,
        round: u64,
        available: Proxies,
    ) -> Result<(Proxies, Vec<(String, String)>)> {
        let (mut available, excluded) = match &self.global {
            Some(g) => self.budget.eligible(g, available)?,
            None => (available, Vec::new()),
        };
        let excluded = excluded
            .into_iter()
            .map(|(id, why)| (id.to_string(), why))
            .collect();
        available.sort_by(|a, b| a.id().cmp(b.id()));
        let m = self.cfg.run.clients_per_round.min(available.len());
        let mut r = rng::derived(self.cfg.run.seed, "sample", round);
        let mut chosen: Vec<Arc<dyn ClientProxy>> = available.sample(&mut r, m).cloned().collect();
        chosen.sort_by(|a, b| a.id().cmp(b.id()));
        Ok((chosen, excluded))
    }

    /// One round; `None` when stopped during dispatch (the round is discarded, nothing lost).
    async fn round(
        &mut self,
        round: u64,
        pool: &dyn ClientPool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<RoundMetrics>> {
        let started = Instant::now();
        let (sampled, memory_excluded) = self.sample(round, pool.available())?;
        let ids: Vec<ClientId> = sampled.iter().map(|p| p.id().clone()).collect();
        let (version, masks) = {
            let (_, g) = self.parts()?;
            (g.masks.version, Arc::new(g.masks.clone()))
        };
        let tasks = {
            let strategy = self.strategy.as_mut();
            let global = self.global.as_ref();
            match (strategy, global) {
                (Some(s), Some(g)) => s.configure_train(round, g, &ids)?,
                _ => return Err(CoordinatorError::Join("engine state lost".into())),
            }
        };
        // Memory budgets: lower batch sizes or withhold tasks that would not fit.
        let (tasks, memory) = match &self.global {
            Some(g) => self.budget.apply(round, g, tasks)?,
            None => return Err(CoordinatorError::Join("engine state lost".into())),
        };
        let deadline = Duration::from_secs_f64(self.cfg.run.round_deadline_secs);
        let mut calls = Vec::new();
        for (id, mut task) in tasks {
            let Some(proxy) = sampled.iter().find(|p| p.id() == &id) else {
                continue;
            };
            if self.held.get(&id) != Some(&version)
                && let Task::Train(t) = &mut task
            {
                t.model.masks = Some((*masks).clone());
            }
            let fut = proxy.execute(task, masks.clone());
            calls.push(async move {
                let out = match tokio::time::timeout(deadline, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure::Timeout),
                };
                (id, out)
            });
        }
        let outcomes = tokio::select! {
            o = futures::future::join_all(calls) => o,
            _ = stop.changed() => {
                tracing::warn!(round, "stopping: round discarded");
                return Ok(None);
            }
        };

        let mut results: Vec<(ClientId, TrainResult)> = Vec::new();
        let mut failures: Vec<(ClientId, Failure)> = Vec::new();
        let (mut bytes_down, mut bytes_up) = (0, 0);
        for (id, out) in outcomes {
            match out {
                Ok(Reply { result, traffic }) => {
                    bytes_down += traffic.bytes_down;
                    bytes_up += traffic.bytes_up;
                    let (_, g) = self.parts()?;
                    match validate(round, g, result) {
                        Ok(r) => results.push((id, r)),
                        Err(f) => {
                            tracing::warn!(client = %id, round, reason = %f, "result refused");
                            failures.push((id, f));
                        }
                    }
                }
                Err(f) => {
                    tracing::warn!(client = %id, round, reason = %f, "client failed");
                    failures.push((id, f));
                }
            }
        }
        results.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, _) in &results {
            self.held.insert(id.clone(), version);
        }
        let aggregated = results.len() >= self.cfg.run.quorum;
        let total: usize = results.iter().map(|(_, r)| r.num_samples).sum();
        let train_loss = (total > 0).then(|| {
            results
                .iter()
                .map(|(_, r)| r.train_loss * r.num_samples as f64)
                .sum::<f64>()
                / total as f64
        });
        let client_peak_rss_bytes = results.iter().filter_map(|(_, r)| r.peak_rss_bytes).max();
        if aggregated {
            let (mut strategy, mut global) = match (self.strategy.take(), self.global.take()) {
                (Some(s), Some(g)) => (s, g),
                _ => return Err(CoordinatorError::Join("engine state lost".into())),
            };
            let (strategy, global, outcome) = tokio::task::spawn_blocking(move || {
                let r = strategy.aggregate_train(round, &mut global, &results, &failures);
                (strategy, global, r.map(|_| failures))
            })
            .await
            .map_err(|e| CoordinatorError::Join(e.to_string()))?;
            self.strategy = Some(strategy);
            self.global = Some(global);
            failures = outcome?;
        } else {
            tracing::warn!(
                round,
                got = results.len(),
                quorum = self.cfg.run.quorum,
                "no quorum: global model unchanged"
            );
        }
        let (test_accuracy, test_loss) =
            if round.is_multiple_of(self.cfg.run.eval_every) || round == self.cfg.run.rounds {
                let (_, g) = self.parts()?;
                let (g, ev) = (g.clone(), self.evaluator.clone());
                let s = tokio::task::spawn_blocking(move || ev.evaluate(&g))
                    .await
                    .map_err(|e| CoordinatorError::Join(e.to_string()))??;
                (Some(s.accuracy()), Some(s.loss()))
            } else {
                (None, None)
            };
        let (_, g) = self.parts()?;
        Ok(Some(RoundMetrics {
            round,
            sampled: ids.len(),
            participants: if aggregated {
                ids.len() - failures.len() - memory.refused.len()
            } else {
                0
            },
            failures: failures
                .iter()
                .map(|(id, f)| (id.to_string(), f.to_string()))
                .collect(),
            aggregated,
            train_loss,
            test_accuracy,
            test_loss,
            density: g.density(),
            mask_version: g.masks.version,
            bytes_down,
            bytes_up,
            client_peak_rss_bytes,
            memory_excluded,
            memory_refused: memory
                .refused
                .into_iter()
                .map(|(id, why)| (id.to_string(), why))
                .collect(),
            batch_lowered: memory
                .lowered
                .into_iter()
                .map(|(id, b)| (id.to_string(), b))
                .collect(),
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// Writes the checkpoint atomically.
    pub fn checkpoint(&self) -> Result<()> {
        let (strategy, global) = self.parts()?;
        let ckpt = Checkpoint {
            config_toml: self.config_toml.clone(),
            rounds_done: self.rounds_done,
            global: global.clone(),
            history: self.history.clone(),
            strategy_state: strategy.state().to_string(),
        };
        checkpoint::save(&self.run.path().join(CHECKPOINT_FILE), &ckpt)
    }

    fn finish(&self, interrupted: bool) -> Result<RunSummary> {
        let (strategy, global) = self.parts()?;
        let model_path = self.run.path().join(FINAL_MODEL_FILE);
        checkpoint::save_model(&model_path, global)?;
        let (p, dense) = global.sizes();
        let strategy_state = strategy.state();
        let last_eval = self
            .history
            .iter()
            .rev()
            .find(|m| m.test_accuracy.is_some());
        let steady: Vec<&RoundMetrics> = self
            .history
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                m.round > 0
                    && m.participants > 0
                    && (*i == 0 || self.history[i - 1].mask_version == m.mask_version)
                    && *i > 0
            })
            .map(|(_, m)| m)
            .collect();
        let per_client = |f: &dyn Fn(&RoundMetrics) -> u64| {
            let (b, n) = steady
                .iter()
                .fold((0u64, 0usize), |(b, n), m| (b + f(m), n + m.participants));
            if n == 0 { 0.0 } else { b as f64 / n as f64 }
        };
        let summary = RunSummary {
            run_dir: self.run.path().display().to_string(),
            strategy: strategy.name().to_string(),
            seed: self.cfg.run.seed,
            rounds: self.rounds_done,
            final_test_accuracy: last_eval.and_then(|m| m.test_accuracy),
            final_test_loss: last_eval.and_then(|m| m.test_loss),
            density: global.density(),
            prunable_weights: p,
            dense_elements: dense,
            mean_bytes_down_per_client: per_client(&|m| m.bytes_down),
            mean_bytes_up_per_client: per_client(&|m| m.bytes_up),
            total_bytes_down: self.history.iter().map(|m| m.bytes_down).sum(),
            total_bytes_up: self.history.iter().map(|m| m.bytes_up).sum(),
            interrupted,
            final_model: model_path.display().to_string(),
            strategy_state,
            process_peak_rss_bytes: fedtiny_common::cost::peak_rss_bytes(),
        };
        self.run.write_json("summary.json", &summary)?;
        Ok(summary)
    }
}

/// Checks a result against the round and the global model; anything off is a [`Failure`].
fn validate(round: u64, global: &GlobalModel, result: TaskResult) -> Result<TrainResult, Failure> {
    let TaskResult::Train(r) = result else {
        return Err(Failure::Invalid("expected a training result".into()));
    };
    if r.round != round {
        return Err(Failure::Invalid(format!(
            "result for round {}, expected {round}",
            r.round
        )));
    }
    if r.mask_version != global.masks.version {
        return Err(Failure::Invalid(format!(
            "result for mask version {}, expected {}",
            r.mask_version, global.masks.version
        )));
    }
    if r.num_samples == 0 || r.num_samples > 1 << 32 {
        return Err(Failure::Invalid(format!(
            "implausible sample count {}",
            r.num_samples
        )));
    }
    check_layout(&global.state, &r.state).map_err(|e| Failure::Invalid(e.to_string()))?;
    // A client's own masks (FedDST) replace the global ones of the tensors it adjusted; they keep
    // each tensor's length and active count.
    for (name, own) in &r.masks {
        match global.masks.get(name) {
            Some(m) if m.len() == own.len() && m.active() == own.active() => {}
            _ => {
                return Err(Failure::Invalid(format!(
                    "own mask of `{name}` does not match a global mask's length and active count"
                )));
            }
        }
    }
    for (name, e) in &r.state.entries {
        if e.values.iter().any(|v| !v.is_finite()) {
            return Err(Failure::Invalid(format!("non-finite values in `{name}`")));
        }
        let own = r.masks.iter().find(|(n, _)| n == name).map(|(_, m)| m);
        if let Some(m) = own.or_else(|| global.masks.get(name))
            && e.values
                .iter()
                .enumerate()
                .any(|(i, v)| *v != 0.0 && !m.get(i))
        {
            return Err(Failure::Invalid(format!(
                "`{name}` has non-zero values at pruned positions"
            )));
        }
    }
    if !(r.train_loss.is_finite() && r.train_accuracy.is_finite()) {
        return Err(Failure::Invalid("non-finite training metrics".into()));
    }
    Ok(r)
}
