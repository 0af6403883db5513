//! Centralized training: one model, the whole training set, per-epoch test evaluation. It is the
//! accuracy reference that federated runs are compared with, and the quickest check that the
//! engine learns.

use std::time::Instant;

use fedtiny_common::data::Splits;
use fedtiny_common::models::Model;
use fedtiny_common::optim::Optimizer;
use fedtiny_common::train::{self, BatchOptions, StepHooks};
use fedtiny_common::{cost, parallel, rng};
use serde::Serialize;

use crate::config::{CentralizedConfig, Schedule};
use crate::run_dir::RunDir;
use crate::{Result, datasets};

/// Metrics of one epoch (one line of `metrics.jsonl`).
#[derive(Clone, Debug, Serialize)]
pub struct EpochMetrics {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Mean training loss over the epoch (with the weights as they were at each step).
    pub train_loss: f64,
    /// Training accuracy over the epoch.
    pub train_accuracy: f64,
    /// Test loss after the epoch.
    pub test_loss: f64,
    /// Test accuracy after the epoch.
    pub test_accuracy: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f32,
    /// Wall-clock seconds of the training part of the epoch.
    pub train_seconds: f64,
    /// Training throughput of the epoch.
    pub samples_per_sec: f64,
}

/// The outcome of a run (`summary.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The run folder.
    pub run_dir: String,
    /// Seed of the run.
    pub seed: u64,
    /// Model name.
    pub arch: String,
    /// Width multiplier.
    pub width: f64,
    /// Trainable values.
    pub params: usize,
    /// Kernel threads used.
    pub threads: usize,
    /// Training samples.
    pub train_samples: usize,
    /// Test samples.
    pub test_samples: usize,
    /// Epochs run.
    pub epochs: usize,
    /// Test accuracy after the last epoch.
    pub final_test_accuracy: f64,
    /// Test loss after the last epoch.
    pub final_test_loss: f64,
    /// Best test accuracy over epochs.
    pub best_test_accuracy: f64,
    /// Total training seconds (without evaluation).
    pub train_seconds: f64,
    /// Median per-epoch training throughput.
    pub median_samples_per_sec: f64,
    /// Dense training FLOPs per sample (3 × forward).
    pub train_flops_per_sample: f64,
    /// Peak resident memory of the process, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// What a caller sees while a run goes on.
pub trait Observer: Send {
    /// An epoch starts; `samples` will be processed.
    fn epoch_start(&mut self, _epoch: usize, _samples: usize) {}
    /// Samples processed so far in the epoch.
    fn progress(&mut self, _samples_done: usize) {}
    /// An epoch ended.
    fn epoch_end(&mut self, _metrics: &EpochMetrics) {}
}

/// An observer that ignores everything.
pub struct Quiet;

impl Observer for Quiet {}

struct Hooks<'a> {
    base_lr: f32,
    schedule: Schedule,
    step0: usize,
    total_steps: usize,
    observer: &'a mut dyn Observer,
}

impl StepHooks for Hooks<'_> {
    fn before_step(
        &mut self,
        step: usize,
        _last: bool,
        _model: &mut fedtiny_common::models::Model,
        optimizer: &mut dyn Optimizer,
    ) {
        if self.schedule == Schedule::Cosine {
            let t = (self.step0 + step) as f64 / self.total_steps.max(1) as f64;
            let lr = 0.5 * f64::from(self.base_lr) * (1.0 + (std::f64::consts::PI * t).cos());
            optimizer.set_lr(lr as f32);
        }
    }

    fn after_step(&mut self, samples_done: usize) {
        self.observer.progress(samples_done);
    }
}

/// The default run-folder name of a config.
pub fn default_run_name(cfg: &CentralizedConfig) -> String {
    format!(
        "train-{}-w{}-s{}",
        cfg.model.arch, cfg.model.width, cfg.seed
    )
}

/// Trains and evaluates as `cfg` says, writing the run folder as it goes.
pub fn run(
    cfg: &CentralizedConfig,
    splits: &Splits,
    observer: &mut dyn Observer,
) -> Result<(RunDir, Summary)> {
    cfg.validate()?;
    let spec = cfg.model_spec()?;
    if splits.train.sample_shape() != spec.input || splits.test.sample_shape() != spec.input {
        return Err(fedtiny_common::Error::shape(
            "dataset",
            spec.input,
            splits.train.sample_shape(),
        )
        .into());
    }
    let name = cfg
        .output
        .name
        .clone()
        .unwrap_or_else(|| default_run_name(cfg));
    let dir = RunDir::create(&cfg.output.dir, &name)?;
    dir.write("config.toml", cfg.to_toml()?.as_bytes())?;

    let pool = parallel::thread_pool(cfg.threads)?;
    let threads = pool.current_num_threads();
    let mut model = Model::new(&spec, rng::derive(cfg.seed, "model", 0))?;
    let mut optimizer = cfg.train.optimizer.build()?;
    let mut data_rng = rng::derived(cfg.seed, "centralized-data", 0);
    let opts = BatchOptions {
        batch_size: cfg.train.batch_size,
        normalization: datasets::normalization(cfg.data.dataset),
        augment: cfg.data.augment.clone(),
    };
    let eval_opts = BatchOptions {
        batch_size: cfg.train.eval_batch_size,
        ..opts.clone()
    };
    let train_idx: Vec<usize> = (0..splits.train.len()).collect();
    let test_idx: Vec<usize> = (0..splits.test.len()).collect();
    let steps_per_epoch = train_idx.len().div_ceil(cfg.train.batch_size);

    let mut history: Vec<EpochMetrics> = Vec::new();
    for epoch in 1..=cfg.train.epochs {
        observer.epoch_start(epoch, train_idx.len());
        let mut hooks = Hooks {
            base_lr: cfg.train.optimizer.lr(),
            schedule: cfg.train.schedule,
            step0: (epoch - 1) * steps_per_epoch,
            total_steps: cfg.train.epochs * steps_per_epoch,
            observer,
        };
        let t0 = Instant::now();
        let tr = pool.install(|| {
            train::train_epoch(
                &mut model,
                optimizer.as_mut(),
                &splits.train,
                &train_idx,
                &opts,
                &mut data_rng,
                &mut hooks,
            )
        })?;
        let secs = t0.elapsed().as_secs_f64();
        let te =
            pool.install(|| train::evaluate(&mut model, &splits.test, &test_idx, &eval_opts))?;
        let m = EpochMetrics {
            epoch,
            train_loss: tr.loss(),
            train_accuracy: tr.accuracy(),
            test_loss: te.loss(),
            test_accuracy: te.accuracy(),
            lr: optimizer.lr(),
            train_seconds: secs,
            samples_per_sec: tr.count as f64 / secs.max(1e-9),
        };
        dir.append_metric(&m)?;
        observer.epoch_end(&m);
        history.push(m);
    }
    let mut speeds: Vec<f64> = history.iter().map(|m| m.samples_per_sec).collect();
    speeds.sort_by(f64::total_cmp);
    let last = history.last();
    let flops = cost::flops(&model)?;
    let summary = Summary {
        run_dir: dir.path().display().to_string(),
        seed: cfg.seed,
        arch: cfg.model.arch.to_string(),
        width: cfg.model.width,
        params: model.num_params(),
        threads,
        train_samples: splits.train.len(),
        test_samples: splits.test.len(),
        epochs: cfg.train.epochs,
        final_test_accuracy: last.map_or(0.0, |m| m.test_accuracy),
        final_test_loss: last.map_or(0.0, |m| m.test_loss),
        best_test_accuracy: history.iter().map(|m| m.test_accuracy).fold(0.0, f64::max),
        train_seconds: history.iter().map(|m| m.train_seconds).sum(),
        median_samples_per_sec: median(&speeds),
        train_flops_per_sample: flops.train_dense(),
        peak_rss_bytes: cost::peak_rss_bytes(),
    };
    dir.write_json("summary.json", &summary)?;
    Ok((dir, summary))
}

/// Median of sorted values (0 for none).
pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
    }
}
