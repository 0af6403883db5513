//! What a run records: one [`RoundMetrics`] per round (a line of `metrics.jsonl`) and a
//! [`RunSummary`] at the end (`summary.json`).

use serde::{Deserialize, Serialize};

/// The record of one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// The round, from 1.
    pub round: u64,
    /// Clients sampled.
    pub sampled: usize,
    /// Clients whose results were aggregated.
    pub participants: usize,
    /// Clients that failed, with the reason.
    pub failures: Vec<(String, String)>,
    /// Whether the round reached its quorum and changed the global model.
    pub aggregated: bool,
    /// Sample-weighted mean training loss of the participants.
    pub train_loss: Option<f64>,
    /// Server-side test accuracy after the round, when evaluated.
    pub test_accuracy: Option<f64>,
    /// Server-side test loss after the round, when evaluated.
    pub test_loss: Option<f64>,
    /// Density of the global model over prunable tensors.
    pub density: f64,
    /// Mask version after the round.
    pub mask_version: u64,
    /// Bytes sent to clients (task payloads).
    pub bytes_down: u64,
    /// Bytes received from clients (result payloads).
    pub bytes_up: u64,
    /// Largest peak RSS reported by a participant, in bytes.
    pub client_peak_rss_bytes: Option<u64>,
    /// Clients left out of sampling because their declared memory budget is below the smallest
    /// training task's predicted peak, with the reason.
    #[serde(default)]
    pub memory_excluded: Vec<(String, String)>,
    /// Sampled clients not sent their task because it would not fit their declared memory
    /// budget, with the reason (not counted as participants).
    #[serde(default)]
    pub memory_refused: Vec<(String, String)>,
    /// Sampled clients whose batch size was lowered to fit their memory budget, with the batch
    /// size they were sent.
    #[serde(default)]
    pub batch_lowered: Vec<(String, usize)>,
    /// Wall-clock seconds of the round.
    pub seconds: f64,
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run folder.
    pub run_dir: String,
    /// Strategy name.
    pub strategy: String,
    /// Seed of the run.
    pub seed: u64,
    /// Rounds completed.
    pub rounds: u64,
    /// Final server-side test accuracy.
    pub final_test_accuracy: Option<f64>,
    /// Final server-side test loss.
    pub final_test_loss: Option<f64>,
    /// Final density.
    pub density: f64,
    /// Prunable weights (P).
    pub prunable_weights: usize,
    /// Dense (non-prunable) elements of the state.
    pub dense_elements: usize,
    /// Mean bytes down per participating client per round, over rounds without a mask change.
    pub mean_bytes_down_per_client: f64,
    /// Mean bytes up per participating client per round.
    pub mean_bytes_up_per_client: f64,
    /// Total bytes down.
    pub total_bytes_down: u64,
    /// Total bytes up.
    pub total_bytes_up: u64,
    /// Whether the run stopped early (shutdown signal).
    pub interrupted: bool,
    /// Path of the exported final model.
    pub final_model: String,
    /// The strategy's own record (FedTiny: the selected candidate and the candidates' losses).
    pub strategy_state: serde_json::Value,
    /// Peak resident memory of the process that drove the run (the coordinator; in a simulation,
    /// the whole simulation), in bytes, where the OS reports it.
    #[serde(default)]
    pub process_peak_rss_bytes: Option<u64>,
}
