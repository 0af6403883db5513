//! Stage 0 on the coordinator: the small labelled server set `D_s` and dense pre-training on it.
//!
//! Decisions: `D_s` holds `n_shots` images per class drawn (seeded) from the *training* split,
//! never from the test split, and those images are removed from the data the clients are given
//! (see [`server_split`]), so no client holds them. Pre-training uses the run's local-training
//! optimizer settings on `D_s` for `pre_train_epochs` epochs.

use std::sync::Arc;

use fedtiny_common::data::{Dataset, Normalization};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::rng;
use fedtiny_common::train::{self, BatchOptions, NoHooks};

use crate::error::Result;
use crate::global::GlobalModel;

/// The server's labelled set.
#[derive(Clone)]
pub struct ServerSet {
    /// The dataset the indices point into (the training split).
    pub data: Arc<Dataset>,
    /// The server's samples.
    pub indices: Vec<usize>,
    /// Normalisation of the dataset.
    pub normalization: Normalization,
}

pub use fedtiny_common::data::split::server_split;

/// Trains the global model densely on the server set.
pub fn pre_train(
    global: &mut GlobalModel,
    set: &ServerSet,
    epochs: usize,
    optimizer: &OptimizerConfig,
    seed: u64,
) -> Result<()> {
    if epochs == 0 || set.indices.len() < 2 {
        return Ok(());
    }
    let mut model = global.to_model()?;
    let mut opt = optimizer.build()?;
    let opts = BatchOptions {
        batch_size: 32.min(set.indices.len()),
        normalization: set.normalization.clone(),
        augment: None,
    };
    let mut r = rng::derived(seed, "pre-train", 0);
    for _ in 0..epochs {
        train::train_epoch(
            &mut model,
            opt.as_mut(),
            &set.data,
            &set.indices,
            &opts,
            &mut r,
            &mut NoHooks,
        )?;
    }
    global.state = model.state_dict();
    Ok(())
}

/// SNIP masks: scores `|w ⊙ ∂L/∂w|` over the server set, pruned layer-wise from dense to
/// `density` in `iterations` steps (density `d^(i/iterations)` after step i), each step scoring
/// the model masked by the previous one.
pub fn snip_masks(
    global: &GlobalModel,
    set: &ServerSet,
    density: f64,
    iterations: u32,
) -> Result<fedtiny_common::mask::MaskSet> {
    use fedtiny_common::layers::Slot;
    use fedtiny_common::loss::softmax_cross_entropy;
    use fedtiny_common::mask::MaskSet;
    use fedtiny_common::pruning::masks_from_scores;
    use fedtiny_common::tensor::{Mode, from_vec};

    fedtiny_common::pruning::check_density(density)?;
    let mut masks = MaskSet::default();
    let [h, w, c] = global.spec.input;
    for i in 1..=iterations.max(1) {
        let d_i = density.powf(f64::from(i) / f64::from(iterations.max(1)));
        let mut model = global.to_model()?;
        model.set_masks(&masks)?;
        let mut grad_sum: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for chunk in set.indices.chunks(32) {
            if chunk.len() < 2 {
                continue;
            }
            let mut images = vec![0.0f32; chunk.len() * h * w * c];
            let mut labels = Vec::new();
            set.data
                .fill_batch(chunk, &set.normalization, None, &mut images, &mut labels)
                .map_err(fedtiny_common::Error::from)?;
            let x = from_vec(&[chunk.len(), h, w, c], images)?;
            let logits = model.forward(x, Mode::Train)?;
            let out = softmax_cross_entropy(&logits, &labels)?;
            model.backward(out.grad)?;
            model.visit(&mut |name, slot| {
                if let Slot::Param(p) = slot
                    && p.prunable
                {
                    let acc = grad_sum
                        .entry(name.to_string())
                        .or_insert_with(|| vec![0.0; p.len()]);
                    for (a, g) in acc.iter_mut().zip(p.grad_dense().iter()) {
                        *a += f64::from(*g);
                    }
                }
            });
        }
        let next = masks_from_scores(&model, d_i, &mut |name, p| {
            Ok(grad_sum.get(name).map(|g| {
                p.value_dense()
                    .iter()
                    .zip(g)
                    .map(|(w, g)| (f64::from(*w) * g).abs() as f32)
                    .collect()
            }))
        })?;
        masks = next;
    }
    Ok(masks)
}
