//! Strategies: the federated-learning policy, free of I/O.
//!
//! Shaped like the strategies federated-learning users know: the engine asks the strategy to
//! configure each sampled client's task and to aggregate the round's results (with the failures,
//! as values). A strategy is deterministic given the run seed and the round, so a resumed
//! coordinator replays it from the checkpointed global model and [`Strategy::state`].

mod fedavg;

pub use fedavg::FedAvg;

use fedtiny_common::task::{ClientId, Task, TrainResult};

use crate::error::Result;
use crate::global::GlobalModel;
use crate::proxy::Failure;

/// A federated-learning policy.
pub trait Strategy: Send + Sync {
    /// Short name for logs and reports.
    fn name(&self) -> &str;

    /// Prepares the global model before round 1 (for example, chooses the masks).
    fn initialize(&mut self, global: &mut GlobalModel) -> Result<()>;

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
