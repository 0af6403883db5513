//! Builders shared by the integration tests: models, random masks, tasks and results.

#![allow(dead_code)]

use fedtiny_common::data::Augment;
use fedtiny_common::fedtiny::Allocation;
use fedtiny_common::mask::{Mask, MaskSet};
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::param::Role;
use fedtiny_common::state::StateDict;
use fedtiny_common::task::{
    CalibrateResult, CalibrateTask, CandidateEvalResult, CandidateEvalTask, CandidateSet,
    EvaluateResult, EvaluateTask, LocalTraining, ModelPayload, Task, TaskResult, TrainResult,
    TrainTask, Validation,
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
        max_steps: None,
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
        adjust: Vec::new(),
        adjust_kind: Default::default(),
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
        topk: Vec::new(),
        masks: Vec::new(),
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

/// Top-K requests over every prunable tensor of a masked model: K = a third of its pruned
/// positions (at least 1).
pub fn adjust(model: &Model, masks: &MaskSet) -> Vec<(String, usize)> {
    model
        .prunable_names()
        .into_iter()
        .map(|name| {
            let m = masks.get(&name).expect("a mask per prunable tensor");
            let k = ((m.len() - m.active()) / 3).max(1);
            (name, k)
        })
        .collect()
}

/// A train task of an adjustment round (see [`adjust`]).
pub fn adjust_task(model: &Model, masks: &MaskSet, send_masks: bool) -> Task {
    let Task::Train(mut t) = train_task(model, masks, send_masks) else {
        unreachable!()
    };
    t.adjust = adjust(model, masks);
    Task::Train(t)
}

/// A train result answering [`adjust_task`]: for each requested tensor, K pseudo-random
/// gradients at pruned positions, ascending by index.
pub fn adjust_result(model: &Model, masks: &MaskSet) -> TaskResult {
    let TaskResult::Train(mut r) = train_result(model, masks) else {
        unreachable!()
    };
    let mut rng = SplitMix(17);
    r.topk = adjust(model, masks)
        .into_iter()
        .map(|(name, k)| {
            let m = masks.get(&name).expect("mask");
            let pruned: Vec<usize> = (0..m.len()).filter(|&i| !m.get(i)).collect();
            let step = (pruned.len() / k).max(1);
            let pairs = pruned
                .iter()
                .step_by(step)
                .take(k)
                .map(|&i| (i as u32, rng.unit() - 0.5))
                .collect();
            (name, pairs)
        })
        .collect();
    TaskResult::Train(r)
}

pub fn candidates(n: usize, allocation: Allocation) -> CandidateSet {
    CandidateSet {
        density: 0.1,
        allocation,
        seeds: (0..n as u64).map(|i| 1000 + 7 * i).collect(),
    }
}

pub fn validation() -> Validation {
    Validation {
        fraction: 0.1,
        seed: 42,
    }
}

/// `n` sets of BatchNorm running statistics for a model: its running means and variances,
/// perturbed per candidate (variances kept positive).
pub fn bn_stats(model: &Model, n: usize, seed: u64) -> Vec<StateDict> {
    let mut rng = SplitMix(seed);
    let state = model.state_dict();
    (0..n)
        .map(|_| {
            let mut s = StateDict::default();
            for (name, e) in &state.entries {
                if !matches!(e.role, Role::RunningMean | Role::RunningVar) {
                    continue;
                }
                let mut e = e.clone();
                for v in &mut e.values {
                    *v = match e.role {
                        Role::RunningVar => 0.1 + rng.unit(),
                        _ => rng.unit() - 0.5,
                    };
                }
                s.entries.insert(name.clone(), e);
            }
            s
        })
        .collect()
}

/// The dense pre-trained model, with the empty mask set sent along (or held, version 0).
pub fn dense_payload(model: &Model, send_masks: bool) -> ModelPayload {
    payload(model, &MaskSet::default(), send_masks)
}

pub fn calibrate_task(model: &Model, n: usize, allocation: Allocation, send_masks: bool) -> Task {
    Task::Calibrate(CalibrateTask {
        round: 0,
        model: dense_payload(model, send_masks),
        candidates: candidates(n, allocation),
        passes: 2,
        batch_size: 32,
        validation: validation(),
    })
}

pub fn eval_candidates_task(
    model: &Model,
    n: usize,
    allocation: Allocation,
    send_masks: bool,
) -> Task {
    Task::EvaluateCandidates(CandidateEvalTask {
        round: 0,
        model: Some(dense_payload(model, send_masks)),
        candidates: candidates(n, allocation),
        bn: bn_stats(model, n, 5),
        batch_size: 128,
        validation: validation(),
    })
}

pub fn calibrate_result(model: &Model, n: usize) -> TaskResult {
    TaskResult::Calibrate(CalibrateResult {
        round: 0,
        val_count: 60,
        bn: bn_stats(model, n, 11),
    })
}

pub fn eval_candidates_result(n: usize) -> TaskResult {
    TaskResult::EvaluateCandidates(CandidateEvalResult {
        round: 0,
        stats: (0..n)
            .map(|i| EvaluateResult {
                round: 0,
                loss_sum: 10.0 + i as f64,
                correct: 30 + i % 30,
                count: 60,
            })
            .collect(),
    })
}
