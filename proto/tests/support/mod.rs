//! Builders shared by the integration tests: models, random masks, tasks and results.

#![allow(dead_code)]

use fedtiny_common::data::Augment;
use fedtiny_common::mask::{Mask, MaskSet};
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::state::StateDict;
use fedtiny_common::task::{
    EvaluateResult, EvaluateTask, LocalTraining, ModelPayload, Task, TaskResult, TrainResult,
    TrainTask,
};

/// SplitMix64: a tiny deterministic generator for tests.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The `cnn` for Fashion-MNIST shapes.
pub fn cnn(seed: u64) -> Model {
    let spec = ModelSpec::new(Arch::Cnn, [28, 28, 1], 10, 1.0).expect("spec");
    Model::new(&spec, seed).expect("model")
}

/// A very small `cnn` (8×8×1 input, width 1/8) for property tests.
pub fn tiny_cnn(seed: u64) -> Model {
    let spec = ModelSpec::new(Arch::Cnn, [8, 8, 1], 2, 0.125).expect("spec");
    Model::new(&spec, seed).expect("model")
}

/// A mask set over the model's prunable tensors keeping `round(d·n)` (at least 1) random
/// elements of each, installed on the model (so its state is masked).
pub fn random_masks(model: &mut Model, d: f64, version: u64, seed: u64) -> MaskSet {
    let mut rng = SplitMix(seed);
    let state = model.state_dict();
    let mut set = MaskSet {
        version,
        ..MaskSet::default()
    };
    for name in model.prunable_names() {
        let n = state.get(&name).expect("prunable tensor").values.len();
        let keep = ((d * n as f64).round() as usize).clamp(1, n);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..keep {
            let j = i + rng.below(n - i);
            idx.swap(i, j);
        }
        set.masks
            .insert(name, Mask::from_indices(n, &idx[..keep]).expect("mask"));
    }
    model.set_masks(&set).expect("set masks");
    set
}

/// Perturbs every value of a state a little (as training would), keeping masked zeros zero.
pub fn perturb(state: &mut StateDict, masks: &MaskSet, seed: u64) {
    let mut rng = SplitMix(seed);
    for (name, e) in &mut state.entries {
        for v in &mut e.values {
            *v += rng.unit() - 0.5;
        }
        if let Some(m) = masks.get(name) {
            m.apply(&mut e.values);
        }
    }
}

pub fn training() -> LocalTraining {
    LocalTraining {
        epochs: 1,
        batch_size: 64,
        optimizer: OptimizerConfig::default(),
        augment: Some(Augment {
            crop_padding: 2,
            horizontal_flip: false,
        }),
    }
}

pub fn payload(model: &Model, masks: &MaskSet, send_masks: bool) -> ModelPayload {
    ModelPayload {
        spec: model.spec().clone(),
        mask_version: masks.version,
        masks: send_masks.then(|| masks.clone()),
        state: model.state_dict(),
    }
}

pub fn train_task(model: &Model, masks: &MaskSet, send_masks: bool) -> Task {
    Task::Train(TrainTask {
        round: 7,
        model: payload(model, masks, send_masks),
        training: training(),
        seed: 0xDEAD_BEEF,
    })
}

pub fn evaluate_task(model: &Model, masks: &MaskSet, send_masks: bool) -> Task {
    Task::Evaluate(EvaluateTask {
        round: 7,
        model: payload(model, masks, send_masks),
        batch_size: 256,
    })
}

pub fn train_result(model: &Model, masks: &MaskSet) -> TaskResult {
    let mut state = model.state_dict();
    perturb(&mut state, masks, 99);
    TaskResult::Train(TrainResult {
        round: 7,
        mask_version: masks.version,
        num_samples: 600,
        state,
        train_loss: 0.73,
        train_accuracy: 0.81,
        seconds: 12.5,
        peak_rss_bytes: Some(123 << 20),
    })
}

pub fn evaluate_result() -> TaskResult {
    TaskResult::Evaluate(EvaluateResult {
        round: 7,
        loss_sum: 512.25,
        correct: 800,
        count: 1000,
    })
}
