//! Client memory budgets: a client declares how much memory it can give a task when it joins
//! (0 = no limit); the coordinator predicts each training task's peak
//! ([`fedtiny_common::cost::TrainFootprint`]) and sends only tasks that fit.
//!
//! - [`fit_batch`] is the rule: a task fits at `training.batch_size`, or, when
//!   `memory.min_batch_size` allows it, at a smaller batch (halved, and at last the minimum);
//!   otherwise it does not fit, with a reason that states the predicted peak and the budget.
//! - [`BudgetGate`] applies it for the round engine: clients that cannot fit even the smallest
//!   allowed batch are left out of sampling ([`BudgetGate::eligible`]); sampled clients get their
//!   batch lowered or no task ([`BudgetGate::apply`]). Both are logged and end up in the round's
//!   metrics.
//! - [`DeclaredBudgets`] is where a transport records the budgets clients declare, and where the
//!   engine reads them. The transport registers it under the run's id (the run folder's path)
//!   with [`register`]; the engine finds it by the same id. A run without a registered set (the
//!   in-process simulation) has no budgets and no overhead.
//!
//! The prediction assumes [`fedtiny_common::cost::CLIENT_STORAGE`], the storage clients train
//! with, and is the same computation the client makes before training, so a task the coordinator
//! sends is a task the client accepts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use fedtiny_common::cost::{CLIENT_STORAGE, TrainFootprint, human_bytes};
use fedtiny_common::task::{ClientId, LocalTraining, Task};

use crate::config::FederatedConfig;
use crate::error::Result;
use crate::global::GlobalModel;
use crate::proxy::ClientProxy;

/// How a training task fits a budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    /// No budget declared: nothing to check.
    Unlimited,
    /// Fits at the configured batch size.
    Fits {
        /// Predicted peak, bytes.
        peak: u64,
    },
    /// Fits once the batch size is lowered.
    Lowered {
        /// The configured batch size.
        from: usize,
        /// The batch size that fits.
        to: usize,
        /// Predicted peak at `to`, bytes.
        peak: u64,
    },
    /// Does not fit even at the smallest allowed batch size.
    TooBig {
        /// The smallest batch size tried.
        batch_size: usize,
        /// Predicted peak at that batch size, bytes.
        peak: u64,
        /// The budget, bytes.
        budget: u64,
        /// Whether the batch size may be lowered at all (`memory.min_batch_size` is set).
        lowering: bool,
    },
}

impl Fit {
    /// The batch size to send, if the task fits.
    pub fn batch_size(&self, configured: usize) -> Option<usize> {
        match *self {
            Fit::Unlimited | Fit::Fits { .. } => Some(configured),
            Fit::Lowered { to, .. } => Some(to),
            Fit::TooBig { .. } => None,
        }
    }

    /// Why the task does not fit (`None` when it does).
    pub fn reason(&self) -> Option<String> {
        match *self {
            Fit::TooBig {
                batch_size,
                peak,
                budget,
                lowering,
            } => Some(format!(
                "memory budget {} ({budget} B) is below the predicted peak {} ({peak} B) of training at batch size {batch_size}{}",
                human_bytes(budget),
                human_bytes(peak),
                if lowering {
                    ", the smallest allowed (memory.min_batch_size)"
                } else {
                    "; lowering the batch size is off (set memory.min_batch_size)"
                }
            )),
            _ => None,
        }
    }
}

/// The batch sizes the lowering rule tries, in order: `batch_size`, then (when `min_batch_size`
/// is set and smaller) halved until the minimum, which comes last. Halving rounds down and never
/// goes below the minimum.
pub fn candidate_batches(batch_size: usize, min_batch_size: Option<usize>) -> Vec<usize> {
    let mut out = vec![batch_size];
    if let Some(min) = min_batch_size {
        let mut b = batch_size;
        while b > min {
            b = (b / 2).max(min);
            out.push(b);
        }
    }
    out
}

/// The lowering rule: the first batch size of [`candidate_batches`] whose predicted peak fits
/// in `budget` bytes (0 = no budget).
pub fn fit_batch(
    footprint: &TrainFootprint,
    budget: u64,
    batch_size: usize,
    min_batch_size: Option<usize>,
) -> Fit {
    if budget == 0 {
        return Fit::Unlimited;
    }
    let candidates = candidate_batches(batch_size, min_batch_size);
    for &b in &candidates {
        let peak = footprint.peak_bytes(b);
        if peak <= budget {
            return if b == batch_size {
                Fit::Fits { peak }
            } else {
                Fit::Lowered {
                    from: batch_size,
                    to: b,
                    peak,
                }
            };
        }
    }
    let smallest = candidates.last().copied().unwrap_or(batch_size);
    Fit::TooBig {
        batch_size: smallest,
        peak: footprint.peak_bytes(smallest),
        budget,
        lowering: min_batch_size.is_some(),
    }
}

/// The memory budgets clients declared (bytes, 0 = none), shared between the transport that
/// hears them and the round engine that applies them.
#[derive(Debug, Default)]
pub struct DeclaredBudgets {
    inner: Mutex<Declared>,
}

#[derive(Debug, Default)]
struct Declared {
    budgets: BTreeMap<ClientId, u64>,
    /// The smallest task's predicted peak (bytes) and its batch size, once the engine knows it.
    minimum: Option<(u64, usize)>,
}

impl DeclaredBudgets {
    fn lock(&self) -> MutexGuard<'_, Declared> {
        // A poisoned lock only means a panic elsewhere mid-update of a plain map.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the budget a client declared (replacing an earlier one). Warns when it is below
    /// the smallest task of the run: such a client is never sampled.
    pub fn declare(&self, id: &ClientId, bytes: u64) {
        let mut d = self.lock();
        d.budgets.insert(id.clone(), bytes);
        if let Some((peak, batch)) = d.minimum
            && bytes > 0
            && bytes < peak
        {
            warn_never_fits(id, bytes, peak, batch);
        }
    }

    /// The budget a client declared (0 when none or unknown).
    pub fn budget(&self, id: &ClientId) -> u64 {
        self.lock().budgets.get(id).copied().unwrap_or(0)
    }

    /// Whether any client declared a budget.
    pub fn any(&self) -> bool {
        self.lock().budgets.values().any(|&b| b > 0)
    }

    /// Publishes the smallest task's predicted peak; warns about the clients already declared
    /// below it when it changes.
    pub fn set_minimum(&self, peak: u64, batch_size: usize) {
        let mut d = self.lock();
        if d.minimum == Some((peak, batch_size)) {
            return;
        }
        d.minimum = Some((peak, batch_size));
        for (id, &bytes) in &d.budgets {
            if bytes > 0 && bytes < peak {
                warn_never_fits(id, bytes, peak, batch_size);
            }
        }
    }
}

fn warn_never_fits(id: &ClientId, budget: u64, peak: u64, batch_size: usize) {
    tracing::warn!(
        client = %id,
        budget_bytes = budget,
        peak_bytes = peak,
        batch_size,
        "memory budget {} is below the smallest training task ({} at batch size {}): the client will not be sampled",
        human_bytes(budget),
        human_bytes(peak),
        batch_size
    );
}

type Registry = Vec<(String, Weak<DeclaredBudgets>)>;

static REGISTRY: Mutex<Registry> = Mutex::new(Vec::new());

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh set of declared budgets for the run `run_id` (the run folder's path), found by
/// [`lookup`] for as long as the returned handle lives. Replaces an earlier set of that run.
pub fn register(run_id: &str) -> Arc<DeclaredBudgets> {
    let set = Arc::new(DeclaredBudgets::default());
    let mut r = registry();
    r.retain(|(id, w)| id != run_id && w.strong_count() > 0);
    r.push((run_id.to_string(), Arc::downgrade(&set)));
    set
}

/// The declared budgets of the run `run_id`, if a transport registered them.
pub fn lookup(run_id: &str) -> Option<Arc<DeclaredBudgets>> {
    registry()
        .iter()
        .find(|(id, _)| id == run_id)
        .and_then(|(_, w)| w.upgrade())
}

/// Handles on clients, as the round engine samples them.
pub type Proxies = Vec<Arc<dyn ClientProxy>>;

/// What [`BudgetGate::apply`] did to a round's tasks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Clients whose task was withheld, with the reason.
    pub refused: Vec<(ClientId, String)>,
    /// Clients whose batch size was lowered, with the batch size sent.
    pub lowered: Vec<(ClientId, usize)>,
}

/// Applies clients' memory budgets to sampling and to training tasks (see the module docs).
pub struct BudgetGate {
    run_id: String,
    training: LocalTraining,
    min_batch_size: Option<usize>,
    /// The footprint of the last (mask version, optimizer state per value) it was computed for.
    cached: Option<((u64, usize), TrainFootprint)>,
}

impl BudgetGate {
    /// The gate of a run whose budgets are registered under `run_id`.
    pub fn new(cfg: &FederatedConfig, run_id: String) -> Self {
        BudgetGate {
            run_id,
            training: cfg.training.clone(),
            min_batch_size: cfg.memory.min_batch_size,
            cached: None,
        }
    }

    /// The declared budgets, when a transport registered some and any client declared one.
    fn budgets(&self) -> Option<Arc<DeclaredBudgets>> {
        lookup(&self.run_id).filter(|b| b.any())
    }

    /// The footprint of training the global model with `training`'s optimizer (computed once
    /// per mask version and optimizer).
    fn footprint(
        &mut self,
        global: &GlobalModel,
        training: &LocalTraining,
    ) -> Result<TrainFootprint> {
        let key = (global.masks.version, training.optimizer.state_per_value());
        if let Some((k, f)) = &self.cached
            && *k == key
        {
            return Ok(f.clone());
        }
        let f = TrainFootprint::of_spec(
            &global.spec,
            Some(&global.masks),
            &training.optimizer,
            CLIENT_STORAGE,
        )?;
        self.cached = Some((key, f.clone()));
        Ok(f)
    }

    /// The smallest training task of the run: the footprint, its batch size and its predicted
    /// peak.
    fn minimum(&mut self, global: &GlobalModel) -> Result<(TrainFootprint, usize, u64)> {
        let training = self.training.clone();
        let smallest = candidate_batches(training.batch_size, self.min_batch_size)
            .last()
            .copied()
            .unwrap_or(training.batch_size);
        let f = self.footprint(global, &training)?;
        let peak = f.peak_bytes(smallest);
        Ok((f, smallest, peak))
    }

    /// Publishes the smallest task's predicted peak to the declared budgets, so that a client
    /// joining with less is warned about at once. Does nothing without registered budgets.
    pub fn prepare(&mut self, global: &GlobalModel) -> Result<()> {
        if let Some(b) = lookup(&self.run_id) {
            let (_, batch, peak) = self.minimum(global)?;
            b.set_minimum(peak, batch);
        }
        Ok(())
    }

    /// Splits the available clients into those that can fit the smallest training task and
    /// those that cannot (with the reason); only the former may be sampled.
    pub fn eligible(
        &mut self,
        global: &GlobalModel,
        available: Vec<Arc<dyn ClientProxy>>,
    ) -> Result<(Proxies, Vec<(ClientId, String)>)> {
        let Some(budgets) = self.budgets() else {
            return Ok((available, Vec::new()));
        };
        let (f, smallest, peak) = self.minimum(global)?;
        budgets.set_minimum(peak, smallest);
        let (batch, min) = (self.training.batch_size, self.min_batch_size);
        let mut keep = Vec::with_capacity(available.len());
        let mut excluded = Vec::new();
        for p in available {
            let fit = fit_batch(&f, budgets.budget(p.id()), batch, min);
            match fit.reason() {
                None => keep.push(p),
                Some(why) => excluded.push((p.id().clone(), why)),
            }
        }
        if !excluded.is_empty() {
            tracing::info!(
                excluded = excluded.len(),
                smallest_task_bytes = peak,
                "clients left out of sampling: memory budget below the smallest training task"
            );
        }
        Ok((keep, excluded))
    }

    /// Applies each client's budget to its training task: lowers the batch size where that
    /// makes it fit and `memory.min_batch_size` allows it, and withholds tasks that do not fit.
    /// Other tasks pass unchanged.
    pub fn apply(
        &mut self,
        round: u64,
        global: &GlobalModel,
        tasks: Vec<(ClientId, Task)>,
    ) -> Result<(Vec<(ClientId, Task)>, Applied)> {
        let mut applied = Applied::default();
        let Some(budgets) = self.budgets() else {
            return Ok((tasks, applied));
        };
        let min = self.min_batch_size;
        let mut send = Vec::with_capacity(tasks.len());
        for (id, mut task) in tasks {
            let budget = budgets.budget(&id);
            let Task::Train(t) = &mut task else {
                send.push((id, task));
                continue;
            };
            if budget == 0 {
                send.push((id, task));
                continue;
            }
            let f = self.footprint(global, &t.training)?;
            let fit = fit_batch(&f, budget, t.training.batch_size, min);
            match fit {
                Fit::Unlimited | Fit::Fits { .. } => send.push((id, task)),
                Fit::Lowered { from, to, peak } => {
                    tracing::info!(
                        client = %id,
                        round,
                        from,
                        to,
                        peak_bytes = peak,
                        budget_bytes = budget,
                        "batch size lowered to fit the client's memory budget"
                    );
                    t.training.batch_size = to;
                    applied.lowered.push((id.clone(), to));
                    send.push((id, task));
                }
                Fit::TooBig { .. } => {
                    let why = fit.reason().unwrap_or_default();
                    tracing::warn!(client = %id, round, "task not sent: {why}");
                    applied.refused.push((id, why));
                }
            }
        }
        Ok((send, applied))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use fedtiny_common::cost::Storage;
    use fedtiny_common::models::{Arch, ModelSpec};
    use fedtiny_common::optim::OptimizerConfig;

    use super::*;

    fn footprint() -> TrainFootprint {
        let spec = ModelSpec::new(Arch::Cnn, [28, 28, 1], 10, 0.5).unwrap();
        TrainFootprint::of_spec(&spec, None, &OptimizerConfig::default(), Storage::Dense).unwrap()
    }

    #[test]
    fn candidates_halve_down_to_the_minimum() {
        assert_eq!(candidate_batches(32, None), vec![32]);
        assert_eq!(candidate_batches(32, Some(32)), vec![32]);
        assert_eq!(candidate_batches(32, Some(8)), vec![32, 16, 8]);
        assert_eq!(candidate_batches(32, Some(5)), vec![32, 16, 8, 5]);
        assert_eq!(candidate_batches(50, Some(2)), vec![50, 25, 12, 6, 3, 2]);
    }

    #[test]
    fn the_first_candidate_that_fits_is_taken() {
        let f = footprint();
        assert_eq!(fit_batch(&f, 0, 32, None), Fit::Unlimited);
        let at32 = f.peak_bytes(32);
        assert_eq!(fit_batch(&f, at32, 32, None), Fit::Fits { peak: at32 });
        // Just below the peak at 32: without lowering, refused; with it, 16.
        let tight = at32 - 1;
        let refused = fit_batch(&f, tight, 32, None);
        assert_eq!(
            refused,
            Fit::TooBig {
                batch_size: 32,
                peak: at32,
                budget: tight,
                lowering: false
            }
        );
        assert_eq!(refused.batch_size(32), None);
        let why = refused.reason().unwrap();
        assert!(why.contains(&format!("({tight} B)")), "{why}");
        assert!(why.contains(&format!("({at32} B)")), "{why}");
        assert!(why.contains("memory.min_batch_size"), "{why}");
        let lowered = fit_batch(&f, tight, 32, Some(4));
        assert_eq!(
            lowered,
            Fit::Lowered {
                from: 32,
                to: 16,
                peak: f.peak_bytes(16)
            }
        );
        assert_eq!(lowered.batch_size(32), Some(16));
        // Room for 5 samples: halving goes 32, 16, 8, 4; 4 fits.
        let room5 = f.peak_bytes(5);
        assert_eq!(fit_batch(&f, room5, 32, Some(4)).batch_size(32), Some(4));
        // ... but not below the minimum: with a minimum of 6 the last candidate is 6.
        assert_eq!(
            fit_batch(&f, room5, 32, Some(6)),
            Fit::TooBig {
                batch_size: 6,
                peak: f.peak_bytes(6),
                budget: room5,
                lowering: true
            }
        );
        // Below the model state, nothing fits.
        assert!(matches!(
            fit_batch(&f, f.model_state(), 32, Some(2)),
            Fit::TooBig { batch_size: 2, .. }
        ));
    }

    #[test]
    fn declared_budgets_are_found_by_run_id_while_held() {
        let id = ClientId("client-7".into());
        let run = format!("/tmp/budget-test-{}", std::process::id());
        assert!(lookup(&run).is_none());
        let set = register(&run);
        assert!(!set.any());
        set.declare(&id, 0);
        assert!(!set.any());
        set.declare(&id, 1 << 20);
        assert!(set.any());
        assert_eq!(lookup(&run).unwrap().budget(&id), 1 << 20);
        assert_eq!(set.budget(&ClientId("other".into())), 0);
        set.set_minimum(2 << 20, 8);
        drop(set);
        assert!(lookup(&run).is_none());
    }

    const RUN: &str = r#"
[run]
seed = 1
rounds = 2
clients_per_round = 2
min_clients = 2
quorum = 1

[model]
arch = "cnn"
dataset = "fashion_mnist"

[training]
epochs = 1
batch_size = 32

[training.optimizer]
kind = "adam"
lr = 0.001

[mask]
density = 0.1

[eval]
data_dir = "data"
"#;

    #[test]
    fn memory_section_parses_and_is_validated() {
        let cfg: FederatedConfig = toml::from_str(RUN).unwrap();
        assert_eq!(cfg.memory.min_batch_size, None);
        cfg.validate().unwrap();
        // Left out of the resolved config when unset, so existing runs resume unchanged.
        assert!(!toml::to_string(&cfg).unwrap().contains("memory"));
        let with = format!("{RUN}\n[memory]\nmin_batch_size = 4\n");
        let cfg: FederatedConfig = toml::from_str(&with).unwrap();
        assert_eq!(cfg.memory.min_batch_size, Some(4));
        cfg.validate().unwrap();
        assert!(
            toml::to_string(&cfg)
                .unwrap()
                .contains("min_batch_size = 4")
        );
        for bad in [1, 33] {
            let text = format!("{RUN}\n[memory]\nmin_batch_size = {bad}\n");
            let cfg: FederatedConfig = toml::from_str(&text).unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains("memory.min_batch_size"), "{e}");
        }
        assert!(
            toml::from_str::<FederatedConfig>(&format!("{RUN}\n[memory]\nmin_batch = 4\n"))
                .is_err()
        );
    }

    /// A proxy that is only ever asked its id.
    struct Idle(ClientId);

    impl ClientProxy for Idle {
        fn id(&self) -> &ClientId {
            &self.0
        }

        fn execute(
            &self,
            _task: Task,
            _masks: Arc<fedtiny_common::mask::MaskSet>,
        ) -> crate::proxy::ReplyFuture {
            Box::pin(async { Err(crate::proxy::Failure::Timeout) })
        }
    }

    fn names<T>(v: &[(ClientId, T)]) -> Vec<&str> {
        v.iter().map(|(id, _)| id.0.as_str()).collect()
    }

    fn batch_of(task: &Task) -> usize {
        match task {
            Task::Train(t) => t.training.batch_size,
            _ => 0,
        }
    }

    #[test]
    fn the_gate_lowers_withholds_and_excludes_by_declared_budget() {
        let mut cfg: FederatedConfig = toml::from_str(RUN).unwrap();
        let spec = cfg.model_spec().unwrap();
        let mut global = GlobalModel::initial(&spec, 1).unwrap();
        let mut strategy = crate::strategy::build(&cfg, None);
        strategy.initialize(&mut global).unwrap();
        let f = TrainFootprint::of_spec(
            &spec,
            Some(&global.masks),
            &cfg.training.optimizer,
            CLIENT_STORAGE,
        )
        .unwrap();
        let run = format!("gate-test-{}", std::process::id());
        let ids: Vec<ClientId> = ["fits", "free", "mid", "none"]
            .iter()
            .map(|s| ClientId(s.to_string()))
            .collect();
        let budgets = register(&run);
        for (id, b) in ids.iter().zip([
            f.peak_bytes(32),
            0,
            (f.peak_bytes(8) + f.peak_bytes(16)) / 2,
            f.model_state(),
        ]) {
            budgets.declare(id, b);
        }

        // Lowering off: the two that do not fit at 32 get no task.
        let mut gate = BudgetGate::new(&cfg, run.clone());
        let tasks = strategy.configure_train(1, &global, &ids).unwrap();
        let (send, applied) = gate.apply(1, &global, tasks).unwrap();
        assert_eq!(names(&send), ["fits", "free"]);
        assert!(send.iter().all(|(_, t)| batch_of(t) == 32));
        assert_eq!(names(&applied.refused), ["mid", "none"]);
        assert!(
            applied.refused[0]
                .1
                .contains("lowering the batch size is off")
        );
        assert!(applied.lowered.is_empty());
        let proxies: Vec<Arc<dyn ClientProxy>> = ids
            .iter()
            .map(|id| Arc::new(Idle(id.clone())) as Arc<dyn ClientProxy>)
            .collect();
        let (keep, excluded) = gate.eligible(&global, proxies.clone()).unwrap();
        assert_eq!(keep.len(), 2);
        assert_eq!(names(&excluded), ["mid", "none"]);

        // Lowering down to 4: "mid" gets a batch of 8; "none" cannot fit even 4 samples.
        cfg.memory.min_batch_size = Some(4);
        let mut gate = BudgetGate::new(&cfg, run.clone());
        let tasks = strategy.configure_train(2, &global, &ids).unwrap();
        let (send, applied) = gate.apply(2, &global, tasks).unwrap();
        assert_eq!(names(&send), ["fits", "free", "mid"]);
        assert_eq!(
            send.iter().map(|(_, t)| batch_of(t)).collect::<Vec<_>>(),
            [32, 32, 8]
        );
        assert_eq!(applied.lowered, vec![(ids[2].clone(), 8)]);
        assert_eq!(names(&applied.refused), ["none"]);
        assert!(
            applied.refused[0]
                .1
                .contains("at batch size 4, the smallest allowed"),
            "{}",
            applied.refused[0].1
        );
        let (keep, excluded) = gate.eligible(&global, proxies.clone()).unwrap();
        assert_eq!(
            keep.iter().map(|p| p.id().0.as_str()).collect::<Vec<_>>(),
            ["fits", "free", "mid"]
        );
        assert_eq!(names(&excluded), ["none"]);

        // Without declared budgets, tasks and clients pass unchanged.
        drop(budgets);
        let tasks = strategy.configure_train(3, &global, &ids).unwrap();
        let (send, applied) = gate.apply(3, &global, tasks).unwrap();
        assert_eq!(send.len(), 4);
        assert_eq!(applied, Applied::default());
        assert_eq!(gate.eligible(&global, proxies).unwrap().0.len(), 4);
    }
}
