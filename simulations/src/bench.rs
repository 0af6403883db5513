//! Training-throughput benchmark: samples per second of full training steps (forward, loss,
//! backward, optimizer step) on synthetic batches, reported as the median over repeats.
//!
//! Synthetic data keep data loading out of the measurement (it is a separate, cheaper cost).
//! Every model is measured in the same process, one after another, so ratios between rows come
//! from the same machine state.

use std::time::Instant;

use fedtiny_common::loss::softmax_cross_entropy;
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::tensor::{Mode, from_vec};
use fedtiny_common::{cost, parallel, rng};
use rand::RngExt;
use serde::Serialize;

use crate::Result;
use crate::centralized::median;

/// What to measure.
#[derive(Clone, Debug, Serialize)]
pub struct BenchOptions {
    /// Models to measure, in order.
    pub archs: Vec<Arch>,
    /// Width multiplier.
    pub width: f64,
    /// Input shape `[h, w, c]`.
    pub input: [usize; 3],
    /// Classes.
    pub classes: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Kernel threads (0 = one per core).
    pub threads: usize,
    /// Untimed steps before measuring.
    pub warmup_steps: usize,
    /// Timed steps per repeat.
    pub steps: usize,
    /// Repeats (the median is reported).
    pub repeats: usize,
    /// Seed of the model and the synthetic data.
    pub seed: u64,
    /// Optimizer used in each step.
    pub optimizer: OptimizerConfig,
}

/// One model's measurement.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Model.
    pub arch: String,
    /// Width multiplier.
    pub width: f64,
    /// Trainable values.
    pub params: usize,
    /// Dense training FLOPs per sample.
    pub train_flops_per_sample: f64,
    /// Median throughput over repeats.
    pub samples_per_sec: f64,
    /// Slowest repeat.
    pub samples_per_sec_min: f64,
    /// Fastest repeat.
    pub samples_per_sec_max: f64,
    /// Achieved training GFLOP/s at the median.
    pub gflops: f64,
    /// Every repeat's throughput.
    pub repeats: Vec<f64>,
}

/// Measures every model in `opts.archs`, calling `on_row` after each.
pub fn run(opts: &BenchOptions, on_row: &mut dyn FnMut(&BenchRow)) -> Result<Vec<BenchRow>> {
    let pool = parallel::thread_pool(opts.threads)?;
    let mut rows = Vec::new();
    for &arch in &opts.archs {
        let spec = ModelSpec::new(arch, opts.input, opts.classes, opts.width)?;
        let row = pool.install(|| measure(&spec, opts))?;
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

fn measure(spec: &ModelSpec, opts: &BenchOptions) -> Result<BenchRow> {
    let mut model = Model::new(spec, opts.seed)?;
    let mut optimizer = opts.optimizer.build()?;
    let mut r = rng::derived(opts.seed, "bench-data", 0);
    let [h, w, c] = spec.input;
    let n = opts.batch_size;
    let images: Vec<f32> = (0..n * h * w * c)
        .map(|_| r.random_range(-1.0..1.0))
        .collect();
    let labels: Vec<usize> = (0..n).map(|_| r.random_range(0..spec.classes)).collect();
    let mut step = || -> Result<()> {
        let x = from_vec(&[n, h, w, c], images.clone())?;
        let logits = model.forward(x, Mode::Train)?;
        let out = softmax_cross_entropy(&logits, &labels)?;
        model.backward(out.grad)?;
        optimizer.step(&mut model)?;
        Ok(())
    };
    for _ in 0..opts.warmup_steps {
        step()?;
    }
    let mut speeds = Vec::with_capacity(opts.repeats);
    for _ in 0..opts.repeats.max(1) {
        let t0 = Instant::now();
        for _ in 0..opts.steps.max(1) {
            step()?;
        }
        let secs = t0.elapsed().as_secs_f64();
        speeds.push((opts.steps.max(1) * n) as f64 / secs.max(1e-9));
    }
    let mut sorted = speeds.clone();
    sorted.sort_by(f64::total_cmp);
    let flops = cost::flops(&model)?;
    let med = median(&sorted);
    Ok(BenchRow {
        arch: spec.arch.to_string(),
        width: spec.width,
        params: model.num_params(),
        train_flops_per_sample: flops.train_dense(),
        samples_per_sec: med,
        samples_per_sec_min: sorted.first().copied().unwrap_or(0.0),
        samples_per_sec_max: sorted.last().copied().unwrap_or(0.0),
        gflops: med * flops.train_dense() / 1e9,
        repeats: speeds,
    })
}

/// A Markdown table of the rows, with each row's ratio to an optional reference throughput.
pub fn markdown(rows: &[BenchRow], reference: &[(String, f64)]) -> String {
    let mut s = String::from(
        "| model | width | params | train MFLOP/sample | samples/s (median) | min | max | GFLOP/s | vs reference |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let refv = reference
            .iter()
            .find(|(a, _)| *a == r.arch)
            .map(|(_, v)| *v);
        let ratio = refv.map_or("–".to_string(), |v| {
            format!("{:.2}× ({v:.0}/s)", r.samples_per_sec / v)
        });
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {} |\n",
            r.arch,
            r.width,
            r.params,
            r.train_flops_per_sample / 1e6,
            r.samples_per_sec,
            r.samples_per_sec_min,
            r.samples_per_sec_max,
            r.gflops,
            ratio
        ));
    }
    s
}
