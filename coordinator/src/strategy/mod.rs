//! Strategies: the federated-learning policy, free of I/O.
//!
//! Shaped like the strategies federated-learning users know: the engine asks the strategy to
//! configure each sampled client's task and to aggregate the round's results (with the failures,
//! as values). A strategy is deterministic given the run seed and the round, so a resumed
//! coordinator replays it from the checkpointed global model and [`Strategy::state`].

mod blocks;
mod dynamic;
mod fedavg;
mod fedtiny;
mod iterative;

pub use blocks::adjustment_groups;
pub use dynamic::{Dynamic, DynamicKind};
pub use fedavg::{FedAvg, client_seed};
pub use fedtiny::FedTiny;
pub use iterative::IterativeMagnitude;

use fedtiny_common::task::{ClientId, Task, TaskResult, TrainResult};

use crate::error::Result;
use crate::global::GlobalModel;
use crate::proxy::Failure;

/// A federated-learning policy.
pub trait Strategy: Send + Sync {
    /// Short name for logs and reports.
    fn name(&self) -> &str;

    /// Prepares the global model before round 1 (for example, chooses the masks).
    fn initialize(&mut self, global: &mut GlobalModel) -> Result<()>;

    /// Round trips before round 1 (FedTiny's adaptive BatchNorm selection). Called first with
    /// `None`, then with the replies to the tasks it returned, until it returns `None`. Must
    /// return `None` at once when there is nothing (left) to do, e.g. after a resume.
    fn bootstrap(
        &mut self,
        _global: &mut GlobalModel,
        _clients: &[ClientId],
        _replies: Option<Vec<(ClientId, Result<TaskResult, Failure>)>>,
    ) -> Result<Option<Vec<(ClientId, Task)>>> {
        Ok(None)
    }

    /// The task of each sampled client in `round` (clients sorted by id).
    fn configure_train(
        &mut self,
        round: u64,
        global: &GlobalModel,
        clients: &[ClientId],
    ) -> Result<Vec<(ClientId, Task)>>;

    /// Updates the global model from the round's validated results (sorted by client id).
    fn aggregate_train(
        &mut self,
        round: u64,
        global: &mut GlobalModel,
        results: &[(ClientId, TrainResult)],
        failures: &[(ClientId, Failure)],
    ) -> Result<()>;

    /// Strategy state to checkpoint (none by default).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restores [`Strategy::state`] from a checkpoint.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// One training task per client: the global model (masks attached later by the engine when the
/// client lacks them), the local-training settings, the client's seed for the round, and the
/// adjustment request (empty outside adjustment rounds) with its kind.
pub fn train_tasks(
    round: u64,
    global: &GlobalModel,
    clients: &[ClientId],
    training: &fedtiny_common::task::LocalTraining,
    seed: u64,
    adjust: &[(String, usize)],
    adjust_kind: fedtiny_common::task::AdjustKind,
) -> Vec<(ClientId, Task)> {
    clients
        .iter()
        .map(|c| {
            let task = Task::Train(fedtiny_common::task::TrainTask {
                round,
                model: fedtiny_common::task::ModelPayload {
                    spec: global.spec.clone(),
                    mask_version: global.masks.version,
                    masks: None,
                    state: global.state.clone(),
                },
                training: training.clone(),
                seed: client_seed(seed, c, round),
                adjust: adjust.to_vec(),
                adjust_kind,
            });
            (c.clone(), task)
        })
        .collect()
}

/// The sample-weighted FedAvg of every state entry of the round's results (`p_k = n_k / Σ n`),
/// checked against the layout of `reference` (the global state they trained from).
pub fn average_states(
    reference: &fedtiny_common::state::StateDict,
    results: &[(ClientId, TrainResult)],
) -> Result<fedtiny_common::state::StateDict> {
    let contributions: Vec<(usize, &fedtiny_common::state::StateDict)> = results
        .iter()
        .map(|(_, r)| (r.num_samples, &r.state))
        .collect();
    Ok(fedtiny_common::aggregate::fedavg(
        reference,
        &contributions,
    )?)
}

/// The sample-weighted sum `Σ_k p_k v_{k,i}` of the clients' lists for tensor `name` (0 where a
/// client did not report `i`; `p_k = n_k / Σ n`), ascending by index.
pub fn aggregate_lists(results: &[(ClientId, TrainResult)], name: &str) -> Vec<(u32, f32)> {
    let total: f64 = results.iter().map(|(_, r)| r.num_samples as f64).sum();
    let mut g: std::collections::BTreeMap<u32, f64> = Default::default();
    for (_, r) in results {
        let p = r.num_samples as f64 / total;
        if let Some((_, list)) = r.topk.iter().find(|(n, _)| n == name) {
            for &(i, v) in list {
                *g.entry(i).or_insert(0.0) += p * f64::from(v);
            }
        }
    }
    g.into_iter().map(|(i, v)| (i, v as f32)).collect()
}

/// Builds the strategy a config names; `server` is the stage-0 server set, when there is one.
pub fn build(
    cfg: &crate::config::FederatedConfig,
    server: Option<crate::stage0::ServerSet>,
) -> Box<dyn Strategy> {
    use crate::config::StrategyKind;
    let epochs = cfg.stage0.pre_train_epochs;
    match cfg.strategy.kind {
        StrategyKind::Fedavg => Box::new(
            FedAvg::new(
                cfg.run.seed,
                cfg.mask.density,
                cfg.mask.rule,
                cfg.training.clone(),
            )
            .with_server_set(server, epochs),
        ),
        StrategyKind::Fedtiny => Box::new(FedTiny::new(
            cfg.run.seed,
            cfg.mask.density,
            cfg.run.rounds,
            cfg.fedtiny.clone(),
            cfg.training.clone(),
            cfg.stage0.clone(),
            server,
        )),
        StrategyKind::Prunefl | StrategyKind::Feddst => Box::new(Dynamic::new(
            if cfg.strategy.kind == StrategyKind::Prunefl {
                DynamicKind::PruneFl
            } else {
                DynamicKind::FedDst
            },
            FedAvg::new(
                cfg.run.seed,
                cfg.mask.density,
                cfg.mask.rule,
                cfg.training.clone(),
            )
            .with_server_set(server, epochs),
            cfg.run.seed,
            cfg.training.clone(),
            cfg.fedtiny.alpha,
            cfg.fedtiny.adjust_every,
            cfg.fedtiny.t_end(cfg.run.rounds),
        )),
        StrategyKind::IterativeMagnitude => Box::new(IterativeMagnitude::new(
            cfg.run.seed,
            cfg.mask.density,
            cfg.fedtiny.adjust_every,
            cfg.fedtiny.t_end(cfg.run.rounds),
            cfg.training.clone(),
            server.map(|s| (s, epochs)),
        )),
    }
}
