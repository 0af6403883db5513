//! The local training and evaluation loops that every component shares: the edge client, the
//! coordinator's server-side pre-training and evaluation, and the simulations.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::data::{Augment, Dataset, Normalization};
use crate::loss::softmax_cross_entropy;
use crate::models::Model;
use crate::optim::Optimizer;
use crate::rng::Rng;
use crate::tensor::{Mode, from_vec};
use crate::{Error, Result};

/// How to cut data into batches and prepare them.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Samples per batch.
    pub batch_size: usize,
    /// Per-channel normalisation.
    pub normalization: Normalization,
    /// Training-time augmentation (none for evaluation).
    pub augment: Option<Augment>,
}

/// Loss and accuracy over a pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PassStats {
    /// Sum of per-sample losses.
    pub loss_sum: f64,
    /// Correctly classified samples.
    pub correct: usize,
    /// Samples seen.
    pub count: usize,
}

impl PassStats {
    /// Mean loss (0 when empty).
    pub fn loss(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.loss_sum / self.count as f64
        }
    }

    /// Accuracy in [0, 1] (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.correct as f64 / self.count as f64
        }
    }

    /// Adds another pass's counts.
    pub fn merge(&mut self, other: &PassStats) {
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.count += other.count;
    }
}

/// Callbacks around every training step.
pub trait StepHooks {
    /// Before step `step` (counted from 0 within the epoch; `last` for the epoch's last step):
    /// may change the learning rate or flag tensors for dense gradients.
    fn before_step(
        &mut self,
        _step: usize,
        _last: bool,
        _model: &mut Model,
        _optimizer: &mut dyn Optimizer,
    ) {
    }
    /// After backward and before the optimizer step: the gradients of this step are in the
    /// model's parameters. Errors abort the epoch.
    fn before_optimizer_step(&mut self, _last: bool, _model: &mut Model) -> Result<()> {
        Ok(())
    }
    /// After a step, with the number of samples processed so far in the epoch.
    fn after_step(&mut self, _samples_done: usize) {}
}

/// Hooks that do nothing.
pub struct NoHooks;

impl StepHooks for NoHooks {}

/// Reusable batch buffers, so a pass allocates once.
struct BatchBuffers {
    images: Vec<f32>,
    labels: Vec<usize>,
}

impl BatchBuffers {
    fn new() -> Self {
        BatchBuffers {
            images: Vec::new(),
            labels: Vec::new(),
        }
    }

    fn fill(
        &mut self,
        data: &Dataset,
        idx: &[usize],
        opts: &BatchOptions,
        rng: Option<&mut Rng>,
    ) -> Result<crate::Tensor> {
        let [h, w, c] = data.sample_shape();
        self.images.resize(idx.len() * h * w * c, 0.0);
        let aug = match (&opts.augment, rng) {
            (Some(a), Some(r)) => Some((a, r)),
            _ => None,
        };
        data.fill_batch(
            idx,
            &opts.normalization,
            aug,
            &mut self.images,
            &mut self.labels,
        )?;
        from_vec(&[idx.len(), h, w, c], std::mem::take(&mut self.images))
    }
}

/// One epoch of training over `indices` of `data`, shuffled by `rng`. A trailing batch of a
/// single sample is skipped (BatchNorm cannot train on it). `hooks` may set the learning rate and
/// receives the number of
/// samples processed after each step (see [`StepHooks`]). Returns the training loss and accuracy of the epoch.
pub fn train_epoch(
    model: &mut Model,
    optimizer: &mut dyn Optimizer,
    data: &Dataset,
    indices: &[usize],
    opts: &BatchOptions,
    rng: &mut Rng,
    hooks: &mut dyn StepHooks,
) -> Result<PassStats> {
    train_steps(model, optimizer, data, indices, opts, None, rng, hooks)
}

/// Steps of one epoch over `indices` (see [`train_epoch`]): a batch of fewer than 2 samples is
/// skipped, so this is `⌊n / b⌋` or `⌈n / b⌉`.
pub fn steps_per_epoch(samples: usize, batch_size: usize) -> usize {
    if batch_size == 0 {
        return 0;
    }
    let full = samples / batch_size;
    full + usize::from(samples % batch_size >= 2)
}

/// [`train_epoch`] stopped after at most `max_steps` steps (`None`: the whole epoch). The hooks'
/// `last` flag marks the last step actually taken.
#[allow(clippy::too_many_arguments)]
pub fn train_steps(
    model: &mut Model,
    optimizer: &mut dyn Optimizer,
    data: &Dataset,
    indices: &[usize],
    opts: &BatchOptions,
    max_steps: Option<usize>,
    rng: &mut Rng,
    hooks: &mut dyn StepHooks,
) -> Result<PassStats> {
    if opts.batch_size == 0 {
        return Err(Error::InvalidConfig("batch size must be positive".into()));
    }
    let mut order = indices.to_vec();
    order.shuffle(rng);
    let mut bufs = BatchBuffers::new();
    let mut stats = PassStats::default();
    let mut steps = steps_per_epoch(order.len(), opts.batch_size);
    if let Some(m) = max_steps {
        steps = steps.min(m);
    }
    for (step, chunk) in order.chunks(opts.batch_size).enumerate() {
        if step >= steps {
            break;
        }
        if chunk.len() < 2 {
            continue;
        }
        let last = step + 1 == steps;
        hooks.before_step(step, last, model, optimizer);
        let x = bufs.fill(data, chunk, opts, Some(rng))?;
        let logits = model.forward(x, Mode::Train)?;
        let out = softmax_cross_entropy(&logits, &bufs.labels)?;
        if !out.loss_sum.is_finite() {
            return Err(Error::NonFinite("training loss (diverged)".into()));
        }
        model.backward(out.grad)?;
        hooks.before_optimizer_step(last, model)?;
        optimizer.step(model)?;
        stats.loss_sum += out.loss_sum;
        stats.correct += out.correct;
        stats.count += chunk.len();
        // Recover the image buffer the tensor took.
        bufs.images = Vec::new();
        hooks.after_step(stats.count);
    }
    model.clear_cache();
    Ok(stats)
}

/// Evaluates the model (eval mode, no augmentation) on `indices` of `data`.
pub fn evaluate(
    model: &mut Model,
    data: &Dataset,
    indices: &[usize],
    opts: &BatchOptions,
) -> Result<PassStats> {
    let opts = BatchOptions {
        augment: None,
        ..opts.clone()
    };
    let mut bufs = BatchBuffers::new();
    let mut stats = PassStats::default();
    for chunk in indices.chunks(opts.batch_size.max(1)) {
        let x = bufs.fill(data, chunk, &opts, None)?;
        let logits = model.forward(x, Mode::Eval)?;
        let out = softmax_cross_entropy(&logits, &bufs.labels)?;
        stats.loss_sum += out.loss_sum;
        stats.correct += out.correct;
        stats.count += chunk.len();
        bufs.images = Vec::new();
    }
    model.clear_cache();
    Ok(stats)
}

/// Runs forward passes in [`Mode::Calibrate`] over `indices` for `passes` passes: BatchNorm
/// running statistics are re-estimated, nothing else changes (FedTiny's BN re-estimation).
pub fn calibrate_batchnorm(
    model: &mut Model,
    data: &Dataset,
    indices: &[usize],
    opts: &BatchOptions,
    passes: usize,
) -> Result<()> {
    let opts = BatchOptions {
        augment: None,
        ..opts.clone()
    };
    let mut bufs = BatchBuffers::new();
    for _ in 0..passes {
        for chunk in indices.chunks(opts.batch_size.max(1)) {
            if chunk.len() < 2 {
                continue;
            }
            let x = bufs.fill(data, chunk, &opts, None)?;
            model.forward(x, Mode::Calibrate)?;
            bufs.images = Vec::new();
        }
    }
    model.clear_cache();
    Ok(())
}
