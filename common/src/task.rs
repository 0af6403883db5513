//! The work a coordinator hands to a client and what comes back, independent of any transport.
//!
//! The gRPC adapters (crate `fedtiny-proto`) and the in-process simulation carry exactly these
//! values, so a client computes the same thing whichever way a task reaches it.

use serde::{Deserialize, Serialize};

use crate::data::Augment;
use crate::mask::MaskSet;
use crate::models::ModelSpec;
use crate::optim::OptimizerConfig;
use crate::state::StateDict;

/// A client's identity: the common name of its TLS certificate (or a name given by the
/// simulation). Never taken from a field the client sends.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub String);

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The global model as sent to a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelPayload {
    /// The architecture.
    pub spec: ModelSpec,
    /// Version of the global masks this state is masked with.
    pub mask_version: u64,
    /// The masks, present only when the client does not already hold `mask_version`.
    pub masks: Option<MaskSet>,
    /// Every tensor of the global state (masked tensors travel as their active values).
    pub state: StateDict,
}

/// How a client trains locally.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTraining {
    /// Local epochs over the client's training data.
    pub epochs: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// The optimizer, created afresh for every task.
    pub optimizer: OptimizerConfig,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: Option<Augment>,
}

/// Train the global model on local data and return the trained state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainTask {
    /// The round this task belongs to.
    pub round: u64,
    /// The global model.
    pub model: ModelPayload,
    /// Local training settings.
    pub training: LocalTraining,
    /// Seed of this client's randomness in this round (shuffling, augmentation).
    pub seed: u64,
}

/// What a client returns after training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainResult {
    /// The round of the task.
    pub round: u64,
    /// The mask version the state is masked with (must equal the task's).
    pub mask_version: u64,
    /// Training samples used (the FedAvg weight).
    pub num_samples: usize,
    /// The trained state (every tensor; masked tensors carry only active values on the wire).
    pub state: StateDict,
    /// Mean training loss over the local epochs.
    pub train_loss: f64,
    /// Training accuracy over the local epochs.
    pub train_accuracy: f64,
    /// Wall-clock seconds spent training.
    pub seconds: f64,
    /// Peak resident memory of the client process, where known.
    pub peak_rss_bytes: Option<u64>,
}

/// Evaluate the global model on local test data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluateTask {
    /// The round this task belongs to.
    pub round: u64,
    /// The global model.
    pub model: ModelPayload,
    /// Samples per evaluation batch.
    pub batch_size: usize,
}

/// What a client returns after evaluating.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluateResult {
    /// The round of the task.
    pub round: u64,
    /// Sum of per-sample losses.
    pub loss_sum: f64,
    /// Correct predictions.
    pub correct: usize,
    /// Samples evaluated.
    pub count: usize,
}

/// A unit of work for a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Task {
    /// Local training.
    Train(TrainTask),
    /// Local evaluation.
    Evaluate(EvaluateTask),
}

impl Task {
    /// The round the task belongs to.
    pub fn round(&self) -> u64 {
        match self {
            Task::Train(t) => t.round,
            Task::Evaluate(t) => t.round,
        }
    }
}

/// A client's answer to a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TaskResult {
    /// Answer to [`Task::Train`].
    Train(TrainResult),
    /// Answer to [`Task::Evaluate`].
    Evaluate(EvaluateResult),
}
