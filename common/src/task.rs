//! The work a coordinator hands to a client and what comes back, independent of any transport.
//!
//! The gRPC adapters (crate `fedtiny-proto`) and the in-process simulation carry exactly these
//! values, so a client computes the same thing whichever way a task reaches it.

use serde::{Deserialize, Serialize};

use crate::data::Augment;
use crate::fedtiny::Allocation;
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
    /// At most this many optimizer steps per task over all epochs (`None`: every batch of every
    /// epoch). Local work per round then no longer grows with a client's data size.
    #[serde(default)]
    pub max_steps: Option<usize>,
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
    /// Mask adjustment: per tensor (name, K), what [`TrainTask::adjust_kind`] says. Empty
    /// outside adjustment rounds.
    #[serde(default)]
    pub adjust: Vec<(String, usize)>,
    /// What the client does with [`TrainTask::adjust`].
    #[serde(default)]
    pub adjust_kind: AdjustKind,
}

/// What an adjustment request asks of a client, per requested tensor with its K.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustKind {
    /// FedTiny: report the K pruned positions of largest |gradient| on the last mini-batch of
    /// the last local epoch (a streaming top-K over that one tensor's dense gradient).
    #[default]
    PrunedTopK,
    /// PruneFL: report the squared gradient summed over every local step at every pruned
    /// position (K is the pruned count): the dense importance PruneFL uploads.
    SquaredGradientSum,
    /// FedDST: halfway through local training, prune the K active weights of smallest |w| and
    /// grow the K pruned positions of largest |gradient| on that step's mini-batch (grown
    /// weights start at 0), then train on under the client's own mask, and return that mask
    /// with the weights ([`TrainResult::masks`]).
    ClientPruneGrow,
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
    /// Top-K gradient lists answering [`TrainTask::adjust`]: per tensor, (index, gradient)
    /// pairs at pruned positions, ascending by index.
    #[serde(default)]
    pub topk: Vec<(String, Vec<(u32, f32)>)>,
    /// The client's own masks of the tensors it adjusted ([`AdjustKind::ClientPruneGrow`]):
    /// those tensors of `state` are masked by these instead of the task's masks.
    #[serde(default)]
    pub masks: Vec<(String, crate::mask::Mask)>,
}

/// The candidate masks of FedTiny's adaptive BatchNorm selection, each rebuilt by the client
/// from the dense weights `w0` it was sent, the density, the allocation and a seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateSet {
    /// Target density of every candidate.
    pub density: f64,
    /// Layer-wise allocation rule.
    pub allocation: Allocation,
    /// One seed per candidate.
    pub seeds: Vec<u64>,
}

/// Which of its samples a client uses for validation: a seeded shuffle of its training
/// indices, of which the first `fraction` (at least 2 samples) are taken.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// Fraction of the client's samples.
    pub fraction: f64,
    /// Seed of the shuffle (the same in both ABNS stages, so both use the same subset).
    pub seed: u64,
}

/// ABNS stage 1a: for each candidate, re-estimate BatchNorm running statistics on the local
/// validation subset (train-mode forward passes, no gradients, γ/β unchanged).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrateTask {
    /// The round (0 for the bootstrap before round 1).
    pub round: u64,
    /// The dense pre-trained model `w0` (masks: the empty set).
    pub model: ModelPayload,
    /// The candidates.
    pub candidates: CandidateSet,
    /// Passes over the validation subset.
    pub passes: usize,
    /// Samples per forward pass.
    pub batch_size: usize,
    /// The validation subset.
    pub validation: Validation,
}

/// ABNS stage 1a's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrateResult {
    /// The round of the task.
    pub round: u64,
    /// Validation samples used (the weight of this client's statistics).
    pub val_count: usize,
    /// Per candidate, the BatchNorm running means and variances.
    pub bn: Vec<StateDict>,
}

/// ABNS stage 1c: evaluate every candidate with the averaged BatchNorm statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateEvalTask {
    /// The round (0 for the bootstrap).
    pub round: u64,
    /// The dense pre-trained model `w0`, or `None` for the `w0` of the client's own stage-1a
    /// [`CalibrateTask`], which the client keeps until this task: `w0` then travels once.
    pub model: Option<ModelPayload>,
    /// The candidates.
    pub candidates: CandidateSet,
    /// Per candidate, the averaged BatchNorm running statistics.
    pub bn: Vec<StateDict>,
    /// Samples per evaluation batch.
    pub batch_size: usize,
    /// The validation subset.
    pub validation: Validation,
}

/// ABNS stage 1c's answer: per candidate, (loss sum, correct, count) on the validation subset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateEvalResult {
    /// The round of the task.
    pub round: u64,
    /// Per candidate.
    pub stats: Vec<EvaluateResult>,
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
    /// BatchNorm re-estimation per candidate mask.
    Calibrate(CalibrateTask),
    /// Evaluation of candidate masks with averaged BatchNorm statistics.
    EvaluateCandidates(CandidateEvalTask),
}

impl Task {
    /// The round the task belongs to.
    pub fn round(&self) -> u64 {
        match self {
            Task::Train(t) => t.round,
            Task::Evaluate(t) => t.round,
            Task::Calibrate(t) => t.round,
            Task::EvaluateCandidates(t) => t.round,
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
    /// Answer to [`Task::Calibrate`].
    Calibrate(CalibrateResult),
    /// Answer to [`Task::EvaluateCandidates`].
    EvaluateCandidates(CandidateEvalResult),
}

/// A client's validation subset: the first `fraction` (at least 2, at most all) of its training
/// indices after a shuffle seeded by `v.seed`.
pub fn validation_indices(train: &[usize], v: &Validation) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut idx = train.to_vec();
    idx.shuffle(&mut crate::rng::derived(v.seed, "validation", 0));
    let n = ((v.fraction * train.len() as f64).ceil() as usize)
        .max(2)
        .min(train.len());
    idx.truncate(n);
    idx.sort_unstable();
    idx
}
