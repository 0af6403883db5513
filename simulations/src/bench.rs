//! Training-throughput benchmark: samples per second of full training steps (forward, loss,
//! backward, optimizer step) on synthetic batches, reported as the median over repeats, for each
//! model and each density of a sweep.
//!
//! Synthetic data keep data loading out of the measurement (it is a separate, cheaper cost).
//! At density `d` every prunable tensor gets a random layer-wise mask keeping `d` of its entries
//! ([`fedtiny_common::pruning::random_masks`]); the layers then pick sparse or dense kernels by
//! their own policy. All densities of a model are built first and measured round-robin (repeat
//! 1 of every density, then repeat 2, ...), so that drifts in machine load spread over all of
//! them; each row's speed-up is over the same model's density-1 row from the same run.

use std::time::Instant;

use fedtiny_common::loss::softmax_cross_entropy;
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::optim::{Optimizer, OptimizerConfig};
use fedtiny_common::pruning::{check_density, random_masks};
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
    /// Seed of the model, its masks and the synthetic data.
    pub seed: u64,
    /// Optimizer used in each step.
    pub optimizer: OptimizerConfig,
    /// Densities of the prunable tensors to measure, each in (0, 1]; 1 (the dense reference)
    /// is added if missing, unless `only_listed`.
    pub densities: Vec<f64>,
    /// Measure only the listed densities (speed-ups are then relative to the densest one), so
    /// that a process's peak memory reflects just those, e.g. one sparse case.
    pub only_listed: bool,
}

/// One model's measurement at one density.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Model.
    pub arch: String,
    /// Width multiplier.
    pub width: f64,
    /// Density of the prunable tensors (random layer-wise masks; 1 = dense).
    pub density: f64,
    /// Trainable values.
    pub params: usize,
    /// Dense training FLOPs per sample.
    pub train_flops_per_sample: f64,
    /// Training FLOPs per sample at the masks' density (RigL convention: `3·f_S`).
    pub sparse_train_flops_per_sample: f64,
    /// Median throughput over repeats.
    pub samples_per_sec: f64,
    /// Median throughput over that of the same model at density 1, from the same run.
    pub speedup: f64,
    /// Slowest repeat.
    pub samples_per_sec_min: f64,
    /// Fastest repeat.
    pub samples_per_sec_max: f64,
    /// Achieved training GFLOP/s at the median, counting dense FLOPs.
    pub gflops: f64,
    /// Every repeat's throughput.
    pub repeats: Vec<f64>,
}

/// Measures every model in `opts.archs` at every density, calling `on_row` after each row.
pub fn run(opts: &BenchOptions, on_row: &mut dyn FnMut(&BenchRow)) -> Result<Vec<BenchRow>> {
    let pool = parallel::thread_pool(opts.threads)?;
    let densities = sweep(&opts.densities, !opts.only_listed)?;
    let mut rows = Vec::new();
    for &arch in &opts.archs {
        let spec = ModelSpec::new(arch, opts.input, opts.classes, opts.width)?;
        let measured = pool.install(|| measure(&spec, &densities, opts))?;
        for row in measured {
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The densities to measure: validated, deduplicated, descending, with 1 first when
/// `with_dense`.
fn sweep(densities: &[f64], with_dense: bool) -> Result<Vec<f64>> {
    let mut out = if with_dense { vec![1.0] } else { Vec::new() };
    if densities.is_empty() && out.is_empty() {
        return Err(fedtiny_common::Error::InvalidConfig("no density to measure".into()).into());
    }
    for &d in densities {
        check_density(d)?;
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out.sort_by(|a, b| b.total_cmp(a));
    Ok(out)
}

/// One model at one density, ready to step.
struct Case {
    model: Model,
    optimizer: Box<dyn Optimizer>,
    speeds: Vec<f64>,
}

fn measure(spec: &ModelSpec, densities: &[f64], opts: &BenchOptions) -> Result<Vec<BenchRow>> {
    let mut r = rng::derived(opts.seed, "bench-data", 0);
    let [h, w, c] = spec.input;
    let n = opts.batch_size;
    let images: Vec<f32> = (0..n * h * w * c)
        .map(|_| r.random_range(-1.0..1.0))
        .collect();
    let labels: Vec<usize> = (0..n).map(|_| r.random_range(0..spec.classes)).collect();
    let step = |case: &mut Case| -> Result<()> {
        let x = from_vec(&[n, h, w, c], images.clone())?;
        let logits = case.model.forward(x, Mode::Train)?;
        let out = softmax_cross_entropy(&logits, &labels)?;
        case.model.backward(out.grad)?;
        case.optimizer.step(&mut case.model)?;
        Ok(())
    };
    let mut cases = Vec::with_capacity(densities.len());
    for (i, &density) in densities.iter().enumerate() {
        let mut model = Model::new(spec, opts.seed)?;
        // As the edge client trains: masked weights held lean (active values only).
        model.set_lean_storage(true)?;
        let masks = random_masks(
            &model,
            density,
            &mut rng::derived(opts.seed, "bench-masks", i as u64),
        )?;
        model.set_masks(&masks)?;
        let mut case = Case {
            model,
            optimizer: opts.optimizer.build()?,
            speeds: Vec::with_capacity(opts.repeats),
        };
        for _ in 0..opts.warmup_steps {
            step(&mut case)?;
        }
        cases.push(case);
    }
    for _ in 0..opts.repeats.max(1) {
        for case in &mut cases {
            let t0 = Instant::now();
            for _ in 0..opts.steps.max(1) {
                step(case)?;
            }
            let secs = t0.elapsed().as_secs_f64();
            case.speeds
                .push((opts.steps.max(1) * n) as f64 / secs.max(1e-9));
        }
    }
    let mut rows = Vec::with_capacity(cases.len());
    let mut dense_speed = None;
    for (case, &density) in cases.iter().zip(densities) {
        let mut sorted = case.speeds.clone();
        sorted.sort_by(f64::total_cmp);
        let flops = cost::flops(&case.model)?;
        let med = median(&sorted);
        let dense = *dense_speed.get_or_insert(med);
        rows.push(BenchRow {
            arch: spec.arch.to_string(),
            width: spec.width,
            density,
            params: case.model.num_params(),
            train_flops_per_sample: flops.train_dense(),
            sparse_train_flops_per_sample: flops.train_sparse(),
            samples_per_sec: med,
            speedup: med / dense.max(1e-9),
            samples_per_sec_min: sorted.first().copied().unwrap_or(0.0),
            samples_per_sec_max: sorted.last().copied().unwrap_or(0.0),
            gflops: med * flops.train_dense() / 1e9,
            repeats: case.speeds.clone(),
        });
    }
    Ok(rows)
}

/// A Markdown table of the rows: throughput per model and density, the speed-up over the same
/// model's dense row, the FLOP ratio that would be the ideal speed-up, and each row's ratio to an
/// optional reference throughput (matched by model, compared at density 1 only).
pub fn markdown(rows: &[BenchRow], reference: &[(String, f64)]) -> String {
    let mut s = String::from(
        "| model | width | density | params | train MFLOP/sample (at density) | samples/s (median) | min | max | speed-up vs dense | FLOP ratio | vs reference |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let refv = reference
            .iter()
            .find(|(a, _)| *a == r.arch)
            .map(|(_, v)| *v)
            .filter(|_| r.density == 1.0);
        let ratio = refv.map_or("–".to_string(), |v| {
            format!("{:.2}× ({v:.0}/s)", r.samples_per_sec / v)
        });
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.1}× | {} |\n",
            r.arch,
            r.width,
            r.density,
            r.params,
            r.sparse_train_flops_per_sample / 1e6,
            r.samples_per_sec,
            r.samples_per_sec_min,
            r.samples_per_sec_max,
            r.speedup,
            r.train_flops_per_sample / r.sparse_train_flops_per_sample.max(1e-9),
            ratio
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_adds_the_dense_reference_and_orders_densities() {
        assert_eq!(sweep(&[0.1, 0.5, 0.1], true).unwrap(), vec![1.0, 0.5, 0.1]);
        assert_eq!(sweep(&[], true).unwrap(), vec![1.0]);
        assert!(sweep(&[0.0], true).is_err());
        assert!(sweep(&[1.5], true).is_err());
        assert_eq!(sweep(&[0.1, 0.01], false).unwrap(), vec![0.1, 0.01]);
        assert!(sweep(&[], false).is_err());
    }

    #[test]
    fn a_tiny_sweep_measures_every_density_against_dense() {
        let opts = BenchOptions {
            archs: vec![Arch::Cnn],
            width: 0.25,
            input: [8, 8, 1],
            classes: 3,
            batch_size: 4,
            threads: 1,
            warmup_steps: 1,
            steps: 1,
            repeats: 2,
            seed: 1,
            optimizer: OptimizerConfig::default(),
            densities: vec![0.1],
            only_listed: false,
        };
        let mut seen = 0;
        let rows = run(&opts, &mut |_| seen += 1).unwrap();
        assert_eq!((rows.len(), seen), (2, 2));
        assert_eq!((rows[0].density, rows[0].speedup), (1.0, 1.0));
        assert_eq!(rows[1].density, 0.1);
        assert!(rows[1].sparse_train_flops_per_sample < rows[0].sparse_train_flops_per_sample);
        assert!(
            rows.iter()
                .all(|r| r.repeats.len() == 2 && r.samples_per_sec > 0.0)
        );
        let md = markdown(&rows, &[("cnn".into(), 100.0)]);
        assert_eq!(md.lines().count(), 4);
        assert!(md.contains("(100/s)"));
    }
}
