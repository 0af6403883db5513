//! The coordinator's configuration: TOML with unknown keys refused, validated before use.
//!
//! [`FederatedConfig`] is the run itself (what the round engine needs, whatever the transport);
//! [`ServeConfig`] adds the network and TLS settings of the gRPC server.

use std::path::{Path, PathBuf};

use fedtiny_common::data::DatasetKind;
use fedtiny_common::models::{Arch, ModelSpec};
use fedtiny_common::task::LocalTraining;
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// Round structure and fault tolerance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Seed of every random choice (initial weights, masks, client sampling, client training).
    pub seed: u64,
    /// Rounds to run.
    pub rounds: u64,
    /// Clients sampled per round (M).
    pub clients_per_round: usize,
    /// Clients that must have joined before the first round starts.
    pub min_clients: usize,
    /// Seconds a round waits for results before closing with what it has.
    #[serde(default = "default_deadline")]
    pub round_deadline_secs: f64,
    /// Results needed to aggregate a round; with fewer the global model stays unchanged.
    pub quorum: usize,
    /// Evaluate the global model on the server's test set every N rounds (and after the last).
    #[serde(default = "one")]
    pub eval_every: u64,
    /// Write a checkpoint every N rounds (and at shutdown); 0 = only at shutdown.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Seconds to wait for `min_clients` before giving up.
    #[serde(default = "default_join_wait")]
    pub join_timeout_secs: f64,
}

fn default_deadline() -> f64 {
    600.0
}
fn default_join_wait() -> f64 {
    600.0
}
fn one() -> u64 {
    1
}

/// Which federated-learning method runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// FedAvg on a mask fixed before round 1 (`mask.rule`; dense at `mask.density = 1`).
    #[default]
    Fedavg,
    /// FedTiny: adaptive BatchNorm selection, then progressive prune-and-grow.
    Fedtiny,
    /// Iterative magnitude pruning of the global model (LotteryFL-like): every `adjust_every`
    /// rounds until `t_end`, prune to density `1 − (1 − d)·t / t_end`.
    IterativeMagnitude,
    /// PruneFL (fixed-density variant): every `adjust_every` rounds until `t_end`, clients
    /// upload the squared gradients of all pruned positions; the server swaps `⌊α·active⌋`
    /// smallest weights for the most important pruned positions.
    Prunefl,
    /// FedDST: every `adjust_every` rounds until `t_end`, clients prune and grow their own
    /// masks; the server averages over keeping clients and prunes the union back.
    Feddst,
}

/// The method.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySection {
    /// Which method.
    #[serde(default)]
    pub kind: StrategyKind,
}

/// FedTiny's stage 0: the server's labelled set and dense pre-training (used by every method, so
/// all start from the same `w0` and no client holds the server's samples).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage0Section {
    /// Images per class in the server set (0 = no server set, no pre-training).
    #[serde(default = "five")]
    pub n_shots: usize,
    /// Epochs of dense pre-training on the server set.
    #[serde(default = "three")]
    pub pre_train_epochs: usize,
}

fn five() -> usize {
    5
}
fn three() -> usize {
    3
}

impl Default for Stage0Section {
    fn default() -> Self {
        Stage0Section {
            n_shots: 5,
            pre_train_epochs: 3,
        }
    }
}

/// Tensor groups adjusted together in one adjustment round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Every prunable tensor at every adjustment.
    Entire,
    /// One block per adjustment (ResNet stages with the classifier in the last; otherwise pairs
    /// of consecutive tensors), from the output back to the input.
    Block,
    /// One tensor per adjustment, from the output back to the input.
    Layer,
}

/// FedTiny's settings (defaults from the specification).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedTinySection {
    /// Run adaptive BatchNorm selection (off: take the first candidate with the server's BN
    /// statistics).
    #[serde(default = "yes")]
    pub abns: bool,
    /// Number of candidate masks.
    #[serde(default = "five")]
    pub candidates: usize,
    /// Layer-wise density allocation of the candidates.
    #[serde(default = "noise")]
    pub allocation: fedtiny_common::fedtiny::Allocation,
    /// BatchNorm re-estimation passes over each client's validation subset.
    #[serde(default = "ten")]
    pub bn_passes: usize,
    /// Fraction of a client's data used for validation.
    #[serde(default = "tenth")]
    pub val_fraction: f64,
    /// Samples per batch in BN re-estimation and candidate evaluation.
    #[serde(default = "sixty_four")]
    pub bn_batch_size: usize,
    /// Adjust the mask after every this many rounds (ΔT).
    #[serde(default = "ten_u64")]
    pub adjust_every: u64,
    /// Last round that adjusts (T_end); 0 = 0.6 × rounds.
    #[serde(default)]
    pub t_end: u64,
    /// Initial adjustment fraction α.
    #[serde(default = "alpha")]
    pub alpha: f64,
    /// Which tensors an adjustment touches.
    #[serde(default = "block")]
    pub granularity: Granularity,
}

fn yes() -> bool {
    true
}
fn noise() -> fedtiny_common::fedtiny::Allocation {
    fedtiny_common::fedtiny::Allocation::Noise
}
fn ten() -> usize {
    10
}
fn ten_u64() -> u64 {
    10
}
fn tenth() -> f64 {
    0.1
}
fn sixty_four() -> usize {
    64
}
fn alpha() -> f64 {
    0.1
}
fn block() -> Granularity {
    Granularity::Block
}

impl Default for FedTinySection {
    fn default() -> Self {
        FedTinySection {
            abns: true,
            candidates: 5,
            allocation: noise(),
            bn_passes: 10,
            val_fraction: 0.1,
            bn_batch_size: 64,
            adjust_every: 10,
            t_end: 0,
            alpha: 0.1,
            granularity: Granularity::Block,
        }
    }
}

impl FedTinySection {
    /// T_end resolved against the run length.
    pub fn t_end(&self, rounds: u64) -> u64 {
        if self.t_end == 0 {
            ((rounds as f64) * 0.6).round() as u64
        } else {
            self.t_end
        }
    }
}

/// The model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Architecture.
    pub arch: Arch,
    /// Width multiplier.
    #[serde(default = "width_one")]
    pub width: f64,
    /// The dataset (fixes the input shape and class count).
    pub dataset: DatasetKind,
}

fn width_one() -> f64 {
    1.0
}

/// How the fixed mask of sparse FedAvg is chosen (all layer-wise, at `mask.density`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskRule {
    /// Uniformly random per layer.
    Random,
    /// Largest magnitude per layer, on the stage-0 pre-trained weights.
    Magnitude,
    /// SNIP: |w ⊙ ∂L/∂w| on the server set, pruned from dense to the density in 5 iterations.
    Snip,
    /// SynFlow: data-free |w ⊙ ∂R/∂w| of the linearised network on an all-ones input, pruned
    /// from dense to the density in 5 iterations.
    Synflow,
}

/// The mask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSection {
    /// Fraction of prunable weights kept (1 = dense).
    pub density: f64,
    /// How the mask is chosen.
    #[serde(default = "default_rule")]
    pub rule: MaskRule,
}

fn default_rule() -> MaskRule {
    MaskRule::Random
}

/// Server-side evaluation data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Directory of the dataset whose test split the coordinator evaluates on.
    pub data_dir: PathBuf,
    /// Samples per evaluation batch.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Evaluate on the first N test samples only.
    #[serde(default)]
    pub test_limit: Option<usize>,
}

fn default_eval_batch() -> usize {
    500
}

/// Where results go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Parent directory of run folders.
    #[serde(default = "default_runs")]
    pub dir: PathBuf,
    /// Run folder name.
    #[serde(default)]
    pub name: Option<String>,
}

fn default_runs() -> PathBuf {
    PathBuf::from("runs")
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            dir: default_runs(),
            name: None,
        }
    }
}

/// How the coordinator applies the memory budgets clients declare when they join (a budget of 0
/// means none). A client's training task fits when its predicted peak
/// ([`fedtiny_common::cost::predict_train_peak`], masked-dense storage as clients train) is within
/// the budget. A client that cannot fit even the smallest allowed batch is left out of sampling;
/// a sampled client whose task does not fit is not sent it. Both are recorded in the round's
/// metrics with the reason.
///
/// This is coordinator policy, not part of the task a client receives, so it lives here rather
/// than in `[training]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    /// When set, a client whose budget cannot hold `training.batch_size` gets a smaller batch:
    /// halved (and at last this minimum) until the predicted peak fits. Unset: the batch size is
    /// never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_batch_size: Option<usize>,
}

impl MemorySection {
    /// True for the defaults (which the resolved config leaves out).
    pub fn is_default(&self) -> bool {
        *self == MemorySection::default()
    }
}

/// A federated run, independent of the transport.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedConfig {
    /// Rounds and fault tolerance.
    pub run: RunSection,
    /// The model.
    pub model: ModelSection,
    /// Local training on clients.
    pub training: LocalTraining,
    /// The fixed mask.
    pub mask: MaskSection,
    /// Server-side evaluation.
    pub eval: EvalSection,
    /// The method.
    #[serde(default)]
    pub strategy: StrategySection,
    /// Stage 0 (server set and pre-training).
    #[serde(default)]
    pub stage0: Stage0Section,
    /// FedTiny's settings (also the schedule of iterative magnitude pruning).
    #[serde(default)]
    pub fedtiny: FedTinySection,
    /// Output folder.
    #[serde(default)]
    pub output: OutputSection,
    /// How clients' declared memory budgets are applied.
    #[serde(default, skip_serializing_if = "MemorySection::is_default")]
    pub memory: MemorySection,
}

impl FederatedConfig {
    /// The model spec.
    pub fn model_spec(&self) -> Result<ModelSpec> {
        let (input, classes) = self.model.dataset.shape();
        Ok(ModelSpec::new(
            self.model.arch,
            input,
            classes,
            self.model.width,
        )?)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| -> Result<()> {
            Err(CoordinatorError::Config {
                origin: "values".into(),
                message: m,
            })
        };
        self.model_spec()?;
        self.training.optimizer.validate()?;
        fedtiny_common::pruning::check_density(self.mask.density)?;
        let r = &self.run;
        if r.rounds == 0 {
            return bad("run.rounds must be at least 1".into());
        }
        if r.clients_per_round == 0 {
            return bad("run.clients_per_round must be at least 1".into());
        }
        if r.min_clients < r.clients_per_round {
            return bad(format!(
                "run.min_clients ({}) must be at least run.clients_per_round ({})",
                r.min_clients, r.clients_per_round
            ));
        }
        if r.quorum == 0 || r.quorum > r.clients_per_round {
            return bad(format!(
                "run.quorum ({}) must be in 1..=clients_per_round ({})",
                r.quorum, r.clients_per_round
            ));
        }
        if !(r.round_deadline_secs.is_finite() && r.round_deadline_secs > 0.0) {
            return bad("run.round_deadline_secs must be positive".into());
        }
        if !(r.join_timeout_secs.is_finite() && r.join_timeout_secs > 0.0) {
            return bad("run.join_timeout_secs must be positive".into());
        }
        if r.eval_every == 0 {
            return bad("run.eval_every must be at least 1".into());
        }
        if self.training.epochs == 0 || self.training.batch_size < 2 {
            return bad("training.epochs must be >= 1 and training.batch_size >= 2".into());
        }
        if self.training.max_steps == Some(0) {
            return bad(
                "training.max_steps must be at least 1 (leave it out for whole epochs)".into(),
            );
        }
        if let Some(m) = self.memory.min_batch_size
            && !(2..=self.training.batch_size).contains(&m)
        {
            return bad(format!(
                "memory.min_batch_size ({m}) must be in 2..=training.batch_size ({})",
                self.training.batch_size
            ));
        }
        if self.eval.batch_size == 0 || self.eval.test_limit == Some(0) {
            return bad("eval.batch_size and eval.test_limit must be positive".into());
        }
        let f = &self.fedtiny;
        if f.candidates == 0 || f.candidates > 64 {
            return bad("fedtiny.candidates must be in 1..=64".into());
        }
        if !(f.val_fraction > 0.0 && f.val_fraction <= 1.0) {
            return bad("fedtiny.val_fraction must be in (0, 1]".into());
        }
        if f.bn_passes == 0 || f.bn_batch_size < 2 || f.adjust_every == 0 {
            return bad(
                "fedtiny.bn_passes, bn_batch_size (>= 2) and adjust_every must be positive".into(),
            );
        }
        if !(f.alpha.is_finite() && (0.0..=1.0).contains(&f.alpha)) {
            return bad("fedtiny.alpha must be in [0, 1]".into());
        }
        if self.strategy.kind == StrategyKind::Fedtiny && self.stage0.n_shots == 0 && f.abns {
            // ABNS itself needs no server data, but w0 without pre-training is random: allowed,
            // just unusual; nothing to refuse.
        }
        Ok(())
    }
}

/// Limits and timing of the gRPC server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on, e.g. `0.0.0.0:7443` (port 0 = chosen by the OS).
    pub listen: String,
    /// Largest gRPC message accepted or sent, in bytes (tonic's default is 4 MiB).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Chunk size of large payloads, in bytes (must fit in a message).
    #[serde(default = "default_chunk")]
    pub chunk_bytes: usize,
    /// Largest task result a client may upload, in bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// How long a long-poll waits for a task before answering "idle", in milliseconds.
    #[serde(default = "default_poll")]
    pub poll_timeout_ms: u64,
    /// How often clients must send heartbeats, in milliseconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// A client silent for this many heartbeat intervals is considered gone.
    #[serde(default = "default_missed")]
    pub missed_heartbeats: u32,
}

fn default_max_message() -> usize {
    4 << 20
}
fn default_chunk() -> usize {
    1 << 20
}
fn default_max_payload() -> usize {
    1 << 30
}
fn default_poll() -> u64 {
    20_000
}
fn default_heartbeat() -> u64 {
    2_000
}
fn default_missed() -> u32 {
    5
}

/// TLS material of the server (PEM files).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The server certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// The CA that signs client certificates (clients without one are refused).
    pub client_ca: PathBuf,
}

/// The gRPC coordinator: a federated run plus the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The server.
    pub server: ServerSection,
    /// TLS.
    pub tls: TlsSection,
    /// The run.
    #[serde(flatten)]
    pub federation: FederatedConfig,
}

impl ServeConfig {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let c: ServeConfig = toml::from_str(text).map_err(|e| CoordinatorError::Config {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        c.validate().map_err(|e| CoordinatorError::Config {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        Ok(c)
    }

    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CoordinatorError::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<()> {
        self.federation.validate()?;
        let s = &self.server;
        let bad = |m: &str| {
            Err(CoordinatorError::Config {
                origin: "values".into(),
                message: m.into(),
            })
        };
        if s.max_message_bytes < 64 << 10 {
            return bad("server.max_message_bytes must be at least 64 KiB");
        }
        if s.chunk_bytes == 0 || s.chunk_bytes + (16 << 10) > s.max_message_bytes {
            return bad(
                "server.chunk_bytes must be positive and leave 16 KiB of room in a message",
            );
        }
        if s.poll_timeout_ms == 0 || s.heartbeat_interval_ms == 0 || s.missed_heartbeats == 0 {
            return bad("server poll and heartbeat settings must be positive");
        }
        Ok(())
    }

    /// The resolved config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| CoordinatorError::Config {
            origin: "serialising".into(),
            message: e.to_string(),
        })
    }
}
