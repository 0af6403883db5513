//! The comparison experiment: methods × densities × seeds from one config, each run a federated
//! simulation on the same engine, clients, data split and budget; results as a Markdown and CSV
//! table (final accuracy mean ± sd over seeds, training FLOPs, client memory, bytes per round)
//! and accuracy-per-round SVG plots, all in the experiment folder beside every run's own folder.

use std::path::PathBuf;
use std::sync::Arc;

use fedtiny_common::cost::{self, Storage};
use fedtiny_common::data::Dataset;
use fedtiny_coordinator::checkpoint;
use fedtiny_coordinator::config::{Granularity, MaskRule, StrategyKind};
use fedtiny_coordinator::engine::FINAL_MODEL_FILE;
use fedtiny_coordinator::metrics::{RoundMetrics, RunSummary};
use fedtiny_coordinator::run_dir::RunDir;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::federated::{SimConfig, run_in_process};
use crate::plot::{Series, line_chart};
use crate::{Result, SimError};

/// The committed example: a short comparison on the embedded sample.
pub const DEFAULT_EXPERIMENT: &str = include_str!("../configs/experiment-sample.toml");

/// A method of the comparison (ablations of FedTiny included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// FedTiny with the configured settings.
    Fedtiny,
    /// FedTiny without adaptive BatchNorm selection.
    FedtinyNoAbns,
    /// FedTiny with a single candidate.
    FedtinyOneCandidate,
    /// FedTiny adjusting every tensor at every adjustment.
    FedtinyEntire,
    /// FedTiny adjusting one tensor per adjustment.
    FedtinyLayer,
    /// Dense FedAvg (density 1; run once per seed).
    FedavgDense,
    /// Fixed random mask.
    Random,
    /// Fixed magnitude mask after stage-0 pre-training.
    Magnitude,
    /// Fixed SNIP mask on the server set.
    Snip,
    /// Fixed SynFlow mask (data-free).
    Synflow,
    /// Iterative magnitude pruning of the global model.
    IterativeMagnitude,
    /// PruneFL, fixed-density variant (from the magnitude mask).
    Prunefl,
    /// FedDST (from a random mask).
    Feddst,
}

impl Method {
    /// True for the FedTiny ablations.
    pub fn is_ablation(self) -> bool {
        matches!(
            self,
            Method::FedtinyNoAbns
                | Method::FedtinyOneCandidate
                | Method::FedtinyEntire
                | Method::FedtinyLayer
        )
    }

    /// The name used in tables and folders.
    pub fn name(self) -> &'static str {
        match self {
            Method::Fedtiny => "fedtiny",
            Method::FedtinyNoAbns => "fedtiny_no_abns",
            Method::FedtinyOneCandidate => "fedtiny_one_candidate",
            Method::FedtinyEntire => "fedtiny_entire",
            Method::FedtinyLayer => "fedtiny_layer",
            Method::FedavgDense => "fedavg_dense",
            Method::Random => "random",
            Method::Magnitude => "magnitude",
            Method::Snip => "snip",
            Method::Synflow => "synflow",
            Method::IterativeMagnitude => "iterative_magnitude",
            Method::Prunefl => "prunefl",
            Method::Feddst => "feddst",
        }
    }

    /// The simulation config of this method at a density and seed.
    pub fn configure(self, base: &SimConfig, density: f64, seed: u64) -> SimConfig {
        let mut c = base.clone();
        let f = &mut c.federation;
        f.run.seed = seed;
        f.mask.density = density;
        f.strategy.kind = StrategyKind::Fedavg;
        match self {
            Method::Fedtiny => f.strategy.kind = StrategyKind::Fedtiny,
            Method::FedtinyNoAbns => {
                f.strategy.kind = StrategyKind::Fedtiny;
                f.fedtiny.abns = false;
            }
            Method::FedtinyOneCandidate => {
                f.strategy.kind = StrategyKind::Fedtiny;
                f.fedtiny.candidates = 1;
            }
            Method::FedtinyEntire => {
                f.strategy.kind = StrategyKind::Fedtiny;
                f.fedtiny.granularity = Granularity::Entire;
            }
            Method::FedtinyLayer => {
                f.strategy.kind = StrategyKind::Fedtiny;
                f.fedtiny.granularity = Granularity::Layer;
            }
            Method::FedavgDense => f.mask.density = 1.0,
            Method::Random => f.mask.rule = MaskRule::Random,
            Method::Magnitude => f.mask.rule = MaskRule::Magnitude,
            Method::Snip => f.mask.rule = MaskRule::Snip,
            Method::Synflow => f.mask.rule = MaskRule::Synflow,
            Method::IterativeMagnitude => f.strategy.kind = StrategyKind::IterativeMagnitude,
            Method::Prunefl => {
                f.strategy.kind = StrategyKind::Prunefl;
                f.mask.rule = MaskRule::Magnitude;
            }
            Method::Feddst => {
                f.strategy.kind = StrategyKind::Feddst;
                f.mask.rule = MaskRule::Random;
            }
        }
        f.output.name = Some(format!("{}-d{}-s{seed}", self.name(), f.mask.density));
        c
    }
}

/// What to compare.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    /// Folder name of the experiment under `output.dir`.
    pub name: String,
    /// Methods, in table order.
    pub methods: Vec<Method>,
    /// Densities (dense FedAvg ignores them).
    pub densities: Vec<f64>,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Densities of the FedTiny ablations (`fedtiny_no_abns`, `fedtiny_one_candidate`,
    /// `fedtiny_entire`, `fedtiny_layer`); absent: the same as `densities`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ablation_densities: Option<Vec<f64>>,
}

/// An experiment: the `[experiment]` table plus, at the top level, the base simulation every
/// run derives from (exactly a `fedtiny-sim run` config).
#[derive(Clone, Debug, PartialEq)]
pub struct ExperimentConfig {
    /// The comparison.
    pub experiment: ExperimentSection,
    /// Everything else, as in a `fedtiny-sim run` config.
    pub base: SimConfig,
}

impl ExperimentConfig {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let err = |m: String| SimError::Config {
            path: origin.into(),
            message: m,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let section = table
            .remove("experiment")
            .ok_or_else(|| err("missing the [experiment] table".into()))?;
        let experiment: ExperimentSection = section
            .try_into()
            .map_err(|e: toml::de::Error| err(format!("[experiment]: {e}")))?;
        let rest = toml::to_string(&table).map_err(|e| err(e.to_string()))?;
        let base = SimConfig::from_toml(&rest, origin)?;
        let c = ExperimentConfig { experiment, base };
        c.validate().map_err(|e| err(e.to_string()))?;
        Ok(c)
    }

    /// The config as TOML (the `[experiment]` table first).
    pub fn to_toml(&self) -> Result<String> {
        let ser = |e: toml::ser::Error| SimError::Serialize {
            what: "experiment config".into(),
            message: e.to_string(),
        };
        let mut head = toml::Table::new();
        head.insert(
            "experiment".into(),
            toml::Value::try_from(&self.experiment).map_err(ser)?,
        );
        Ok(format!(
            "{}\n{}",
            toml::to_string_pretty(&head).map_err(ser)?,
            self.base.to_toml()?
        ))
    }

    /// Checks the comparison and every derived run config.
    pub fn validate(&self) -> Result<()> {
        let e = &self.experiment;
        let bad = |m: &str| {
            Err(SimError::Core(fedtiny_common::Error::InvalidConfig(
                m.into(),
            )))
        };
        if e.methods.is_empty() || e.densities.is_empty() || e.seeds.is_empty() {
            return bad("experiment.methods, densities and seeds must not be empty");
        }
        if e.ablation_densities.as_ref().is_some_and(Vec::is_empty) {
            return bad("experiment.ablation_densities must not be empty when given");
        }
        for (i, m) in e.methods.iter().enumerate() {
            if e.methods[..i].contains(m) {
                return bad(&format!("experiment.methods lists {} twice", m.name()));
            }
        }
        for &m in &e.methods {
            for &d in self.densities_of(m) {
                m.configure(&self.base, d, e.seeds[0]).validate()?;
            }
        }
        Ok(())
    }

    /// The densities a method runs at.
    fn densities_of(&self, m: Method) -> &[f64] {
        let e = &self.experiment;
        match (&e.ablation_densities, m.is_ablation()) {
            (Some(d), true) => d,
            _ => &e.densities,
        }
    }

    /// The (method, density, seed) runs, dense FedAvg once per seed.
    pub fn runs(&self) -> Vec<(Method, f64, u64)> {
        let e = &self.experiment;
        let mut out = Vec::new();
        for &seed in &e.seeds {
            for &m in &e.methods {
                if m == Method::FedavgDense {
                    out.push((m, 1.0, seed));
                } else {
                    for &d in self.densities_of(m) {
                        out.push((m, d, seed));
                    }
                }
            }
        }
        out
    }
}

/// One finished run.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    /// Method.
    pub method: Method,
    /// Density asked for.
    pub density: f64,
    /// Seed.
    pub seed: u64,
    /// Final test accuracy.
    pub accuracy: f64,
    /// Accuracy after each evaluated round.
    pub curve: Vec<(u64, f64)>,
    /// Training FLOPs per sample at the final masks, averaged over the run's steps: `3·f_S`,
    /// and `2·f_S + f_D` for the steps that need a dense weight gradient (PruneFL's steps in
    /// adjustment rounds; one step per adjustment round for FedTiny and FedDST, counted as a
    /// whole-model dense gradient, an upper bound for FedTiny).
    pub train_flops: f64,
    /// Modelled client memory (model state + activations) at the final masks, in bytes.
    pub memory_bytes: u64,
    /// Modelled client model state (parameters + gradients + optimizer state) at the final masks,
    /// in bytes.
    #[serde(default)]
    pub model_state_bytes: u64,
    /// Largest peak RSS a client reported. In process that is the simulation process's peak
    /// (coordinator, the clients training at once, the shared data), reset at each run's start
    /// where the OS allows it.
    pub peak_rss_bytes: Option<u64>,
    /// Mean bytes per participating client per round without a mask change, down and up.
    pub bytes_per_round: (f64, f64),
    /// All bytes of the run (selection, mask changes and adjustment uploads included) per
    /// participation in a training round, down and up.
    #[serde(default)]
    pub bytes_all_rounds: (f64, f64),
    /// The run folder.
    pub run_dir: String,
    /// Wall-clock seconds of the run's rounds (evaluation included).
    #[serde(default)]
    pub seconds: f64,
}

/// Runs every configured run in process, one after another, writing each run's folder and then
/// the experiment's tables and plots. `progress` receives each record as it completes.
///
/// With `resume`, the experiment continues in that existing experiment folder: runs whose folder
/// holds a finished `summary.json` are read back instead of run again, the others run. The
/// folder's base config (everything but `[experiment]`) must equal `cfg`'s, so methods, densities
/// or seeds can be added to a finished sweep without mixing settings.
///
/// With `report_only` (and `resume`), nothing runs: the report covers the finished runs only.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: &ExperimentConfig,
    resume: Option<&std::path::Path>,
    report_only: bool,
    train: Arc<Dataset>,
    test: Arc<Dataset>,
    stop: watch::Receiver<bool>,
    progress: &mut (dyn FnMut(usize, usize, &RunRecord, bool) + Send),
) -> Result<(RunDir, Vec<RunRecord>)> {
    cfg.validate()?;
    let dir = match resume {
        None => RunDir::create(&cfg.base.federation.output.dir, &cfg.experiment.name)?,
        Some(path) => {
            let saved_path = path.join("experiment.toml");
            let text = std::fs::read_to_string(&saved_path)
                .map_err(|e| SimError::io(saved_path.clone(), e))?;
            let saved = ExperimentConfig::from_toml(&text, &saved_path.display().to_string())?;
            let mut a = saved.base.clone();
            let mut b = cfg.base.clone();
            // Where outputs go and where data comes from may differ between machines.
            a.federation.output = b.federation.output.clone();
            a.federation.eval.data_dir = b.federation.eval.data_dir.clone();
            a.clients.data_dir = b.clients.data_dir.clone();
            b.federation.output = a.federation.output.clone();
            if a != b {
                return Err(SimError::Config {
                    path: saved_path.display().to_string(),
                    message: "the experiment folder was made with a different base config \
                              (only [experiment] may change when resuming)"
                        .into(),
                });
            }
            RunDir::create_existing(path)
        }
    };
    dir.write("experiment.toml", cfg.to_toml()?.as_bytes())?;
    let runs = cfg.runs();
    let mut records = Vec::new();
    for (i, &(method, density, seed)) in runs.iter().enumerate() {
        if *stop.borrow() {
            break;
        }
        let mut sim = method.configure(&cfg.base, density, seed);
        sim.federation.output.dir = dir.path().join("runs");
        let name = sim.federation.output.name.clone().unwrap_or_default();
        let done = dir.path().join("runs").join(&name);
        if resume.is_some()
            && let Some(record) = finished_record(method, density, seed, &sim, &done)?
        {
            progress(i + 1, runs.len(), &record, true);
            records.push(record);
            continue;
        }
        if report_only {
            continue;
        }
        // Each run's reported peak covers that run only, not the runs before it.
        cost::reset_peak_rss();
        let (summary, run_dir) =
            run_in_process(&sim, train.clone(), test.clone(), stop.clone()).await?;
        if summary.interrupted {
            break;
        }
        let record = record_of(method, density, seed, &sim, run_dir.path(), &summary)?;
        progress(i + 1, runs.len(), &record, false);
        records.push(record);
    }
    write_report(&dir, cfg, &records)?;
    Ok((dir, records))
}

/// The record of a finished run folder, or `None` when the run did not finish there.
fn finished_record(
    method: Method,
    density: f64,
    seed: u64,
    sim: &SimConfig,
    run_dir: &std::path::Path,
) -> Result<Option<RunRecord>> {
    let path = run_dir.join("summary.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let summary: RunSummary = serde_json::from_str(&text).map_err(|e| SimError::Config {
        path: path.display().to_string(),
        message: format!("unreadable run summary: {e}"),
    })?;
    if summary.interrupted || summary.rounds < sim.federation.run.rounds {
        return Ok(None);
    }
    record_of(method, density, seed, sim, run_dir, &summary).map(Some)
}

/// The record of a finished run from its folder (metrics, final model) and summary.
fn record_of(
    method: Method,
    density: f64,
    seed: u64,
    sim: &SimConfig,
    run_dir: &std::path::Path,
    summary: &RunSummary,
) -> Result<RunRecord> {
    let metrics: Vec<RoundMetrics> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map_err(|e| SimError::io(run_dir.join("metrics.jsonl"), e))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let model = checkpoint::load_model(&run_dir.join(FINAL_MODEL_FILE))?.to_model()?;
    let flops = cost::flops(&model)?;
    let storage = if method == Method::FedavgDense {
        Storage::Dense
    } else {
        Storage::Sparse
    };
    let memory = cost::memory(
        &model,
        sim.federation.training.batch_size,
        sim.federation.training.optimizer.state_per_value(),
        storage,
    )?;
    Ok(RunRecord {
        method,
        density,
        seed,
        accuracy: summary.final_test_accuracy.unwrap_or(0.0),
        curve: metrics
            .iter()
            .filter_map(|m| m.test_accuracy.map(|a| (m.round, a)))
            .collect(),
        train_flops: {
            let f = dense_grad_step_fraction(method, sim);
            (1.0 - f) * flops.train_sparse() + f * flops.train_sparse_with_dense_grad()
        },
        memory_bytes: memory.total(),
        model_state_bytes: memory.model_state(),
        peak_rss_bytes: metrics.iter().filter_map(|m| m.client_peak_rss_bytes).max(),
        bytes_per_round: (
            summary.mean_bytes_down_per_client,
            summary.mean_bytes_up_per_client,
        ),
        bytes_all_rounds: {
            let n: usize = metrics
                .iter()
                .filter(|m| m.round > 0)
                .map(|m| m.participants)
                .sum();
            let n = n.max(1) as f64;
            (
                metrics.iter().map(|m| m.bytes_down as f64).sum::<f64>() / n,
                metrics.iter().map(|m| m.bytes_up as f64).sum::<f64>() / n,
            )
        },
        run_dir: run_dir.display().to_string(),
        seconds: metrics.iter().map(|m| m.seconds).sum(),
    })
}

/// The fraction of a run's local steps that also compute a dense weight gradient.
fn dense_grad_step_fraction(method: Method, sim: &SimConfig) -> f64 {
    let f = &sim.federation;
    let rounds = f.run.rounds.max(1);
    let t_end = f.fedtiny.t_end(rounds);
    let adjusting = (1..=rounds)
        .filter(|&t| {
            t.is_multiple_of(f.fedtiny.adjust_every.max(1))
                && t <= t_end
                && fedtiny_common::fedtiny::alpha_at(f.fedtiny.alpha, t, t_end) > 0.0
        })
        .count() as f64
        / rounds as f64;
    let steps = f.training.max_steps.unwrap_or(1).max(1) as f64;
    match method {
        Method::Prunefl => adjusting,
        Method::FedavgDense
        | Method::Random
        | Method::Magnitude
        | Method::Snip
        | Method::Synflow
        | Method::IterativeMagnitude => 0.0,
        _ => adjusting / steps,
    }
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// What the columns of `results.md` measure, printed under the table.
const TABLE_LEGEND: &str = "
Columns: final accuracy on the test split after the last round (mean ± sample sd over seeds);
training FLOPs per sample at the final masks (dense-gradient steps of adjustment rounds included);
model state = parameters + gradients + optimizer state a client holds, modelled (active values
and their indices for sparse methods); + activations = the modelled training peak at the batch
size; sim peak RSS = the simulation process's measured peak resident memory during the run
(coordinator, the clients training at once and the shared data, so it does not separate
methods); bytes per client and training round without a mask change, then over all rounds
(selection, mask changes and adjustment uploads included) per participation; wall-clock
seconds per run.
";

/// Writes `results.md`, `results.csv`, `records.json` and one accuracy plot per density.
pub fn write_report(
    dir: &RunDir,
    cfg: &ExperimentConfig,
    records: &[RunRecord],
) -> Result<Vec<PathBuf>> {
    let dense = records.iter().find(|r| r.method == Method::FedavgDense);
    let (dense_flops, dense_mem, dense_state) = dense.map_or((f64::NAN, f64::NAN, f64::NAN), |d| {
        (
            d.train_flops,
            d.memory_bytes as f64,
            d.model_state_bytes as f64,
        )
    });
    let mut md = String::from(
        "| method | density | seeds | final accuracy (mean ± sd) | train FLOPs/sample | × dense | model state | × dense | model state + activations | × dense | sim peak RSS | bytes/round/client down | up | all rounds down | up | s/run |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut csv = String::from(
        "method,density,seeds,accuracy_mean,accuracy_sd,train_flops_per_sample,flops_vs_dense,model_state_bytes,model_state_vs_dense,memory_bytes,memory_vs_dense,peak_rss_bytes,bytes_down_per_round,bytes_up_per_round,bytes_down_all_rounds,bytes_up_all_rounds,seconds_per_run\n",
    );
    let mut groups: Vec<(Method, f64)> = Vec::new();
    for r in records {
        if !groups.iter().any(|g| g.0 == r.method && g.1 == r.density) {
            groups.push((r.method, r.density));
        }
    }
    for (m, d) in &groups {
        let rs: Vec<&RunRecord> = records
            .iter()
            .filter(|r| r.method == *m && r.density == *d)
            .collect();
        let acc: Vec<f64> = rs.iter().map(|r| r.accuracy).collect();
        let (mean, sd) = mean_sd(&acc);
        let flops = rs[0].train_flops;
        let mem = rs[0].memory_bytes as f64;
        let state = rs[0].model_state_bytes as f64;
        let rss = rs.iter().filter_map(|r| r.peak_rss_bytes).max();
        let down = rs.iter().map(|r| r.bytes_per_round.0).sum::<f64>() / rs.len() as f64;
        let up = rs.iter().map(|r| r.bytes_per_round.1).sum::<f64>() / rs.len() as f64;
        let all_down = rs.iter().map(|r| r.bytes_all_rounds.0).sum::<f64>() / rs.len() as f64;
        let all_up = rs.iter().map(|r| r.bytes_all_rounds.1).sum::<f64>() / rs.len() as f64;
        let secs = rs.iter().map(|r| r.seconds).sum::<f64>() / rs.len() as f64;
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} ± {:.2} % | {:.2} M | {:.3} | {:.3} MiB | {:.3} | {:.2} MiB | {:.3} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            m.name(),
            d,
            rs.len(),
            100.0 * mean,
            100.0 * sd,
            flops / 1e6,
            flops / dense_flops,
            state / (1 << 20) as f64,
            state / dense_state,
            mem / (1 << 20) as f64,
            mem / dense_mem,
            rss.map_or("–".into(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64)),
            down,
            up,
            all_down,
            all_up,
            secs
        ));
        csv.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.0},{:.6},{:.0},{:.6},{:.0},{:.6},{},{:.0},{:.0},{:.0},{:.0},{:.1}\n",
            m.name(),
            d,
            rs.len(),
            mean,
            sd,
            flops,
            flops / dense_flops,
            state,
            state / dense_state,
            mem,
            mem / dense_mem,
            rss.map_or(String::new(), |b| b.to_string()),
            down,
            up,
            all_down,
            all_up,
            secs
        ));
    }
    md.push_str(TABLE_LEGEND);
    let mut written = vec![
        dir.write("results.md", md.as_bytes())?,
        dir.write("results.csv", csv.as_bytes())?,
        dir.write_json("records.json", &records)?,
    ];
    let mut densities = cfg.experiment.densities.clone();
    densities.sort_by(f64::total_cmp);
    for d in densities {
        let series: Vec<Series> = groups
            .iter()
            .filter(|(m, gd)| *gd == d || *m == Method::FedavgDense)
            .map(|(m, gd)| {
                let rs: Vec<&RunRecord> = records
                    .iter()
                    .filter(|r| r.method == *m && r.density == *gd)
                    .collect();
                let rounds: Vec<u64> = rs[0].curve.iter().map(|p| p.0).collect();
                let points = rounds
                    .iter()
                    .map(|&t| {
                        let v: Vec<f64> = rs
                            .iter()
                            .filter_map(|r| r.curve.iter().find(|p| p.0 == t).map(|p| p.1))
                            .collect();
                        (t as f64, v.iter().sum::<f64>() / v.len().max(1) as f64)
                    })
                    .collect();
                Series {
                    label: if *m == Method::FedavgDense {
                        "fedavg_dense (d=1)".into()
                    } else {
                        m.name().into()
                    },
                    points,
                }
            })
            .collect();
        let svg = line_chart(
            &format!("Test accuracy per round, density {d} (mean over seeds)"),
            "round",
            "test accuracy",
            &series,
        );
        written.push(dir.write(&format!("accuracy-d{d}.svg"), svg.as_bytes())?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ExperimentConfig {
        let text = include_str!("../configs/experiment-fmnist.toml");
        ExperimentConfig::from_toml(text, "experiment-fmnist.toml").unwrap()
    }

    #[test]
    fn the_sweep_runs_ablations_only_at_their_densities_and_dense_once_per_seed() {
        let c = config();
        let runs = c.runs();
        // 8 sparse methods × 2 densities + dense, and 4 ablations × 1 density, per seed.
        assert_eq!(runs.len(), 2 * (8 * 2 + 1 + 4));
        for (m, d, _) in &runs {
            if m.is_ablation() {
                assert_eq!(*d, 0.01);
            }
            if *m == Method::FedavgDense {
                assert_eq!(*d, 1.0);
            }
        }
        let mut dup = c.clone();
        dup.experiment.methods.push(Method::Fedtiny);
        assert!(dup.validate().is_err());
    }

    #[test]
    fn dense_gradient_steps_are_counted_per_method() {
        let c = config();
        // ΔT = 10, T_end = 60: rounds 10..=50 adjust (α_60 = 0), 5 of 100; 5 steps per task.
        let f = |m: Method| dense_grad_step_fraction(m, &m.configure(&c.base, 0.01, 1));
        assert_eq!(f(Method::Random), 0.0);
        assert!((f(Method::Prunefl) - 0.05).abs() < 1e-12);
        assert!((f(Method::Feddst) - 0.01).abs() < 1e-12);
        assert!((f(Method::Fedtiny) - 0.01).abs() < 1e-12);
    }
}
