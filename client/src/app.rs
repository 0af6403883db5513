//! The client's compute, free of any transport.
//!
//! A [`ClientApp`] owns only its data and the masks it last received: it builds the model for
//! each task and drops it afterwards, so an idle client holds no model and a simulation's memory
//! grows with the clients running at once, not with the clients in the federation. It runs on
//! the caller's rayon pool.

use std::sync::Arc;
use std::time::Instant;

use fedtiny_common::data::{Dataset, Normalization};
use fedtiny_common::fedtiny::model_candidate;
use fedtiny_common::mask::MaskSet;
use fedtiny_common::models::Model;
use fedtiny_common::param::Role;
use fedtiny_common::state::StateDict;
use fedtiny_common::task::{
    AdjustKind, CalibrateResult, CalibrateTask, CandidateEvalResult, CandidateEvalTask,
    CandidateSet, EvaluateResult, EvaluateTask, ModelPayload, Task, TaskResult, TrainResult,
    TrainTask, validation_indices,
};
use fedtiny_common::train::{self, BatchOptions, NoHooks, PassStats, StepHooks};
use fedtiny_common::{cost, rng};

use crate::ClientError;
use crate::adjust::{self, AdjustHook};

/// A client's own data: indices into shared datasets (a simulation shares one copy among all
/// clients; an edge device loads just its own).
#[derive(Clone, Debug)]
pub struct LocalData {
    /// The training set.
    pub train: Arc<Dataset>,
    /// This client's training samples.
    pub train_indices: Vec<usize>,
    /// The test set and this client's test samples, if it evaluates.
    pub test: Option<(Arc<Dataset>, Vec<usize>)>,
    /// Normalisation of the dataset.
    pub normalization: Normalization,
}

/// The client's compute.
pub struct ClientApp {
    data: LocalData,
    masks: Option<MaskSet>,
    /// `w0` of the last stage-1a task, kept for stage 1c (which then does not carry it).
    w0: Option<Arc<ModelPayload>>,
    memory_budget_bytes: u64,
}

impl ClientApp {
    /// A client over its local data.
    pub fn new(data: LocalData) -> Self {
        ClientApp {
            data,
            masks: None,
            w0: None,
            memory_budget_bytes: 0,
        }
    }

    /// The same client with a memory budget in bytes (0 = none): a training task whose
    /// predicted peak exceeds it is refused with [`ClientError::OverBudget`] before training.
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget_bytes = bytes;
        self
    }

    /// Sets the memory budget in bytes (0 = none); see [`ClientApp::with_memory_budget`].
    pub fn set_memory_budget(&mut self, bytes: u64) {
        self.memory_budget_bytes = bytes;
    }

    /// The memory budget in bytes (0 = none).
    pub fn memory_budget_bytes(&self) -> u64 {
        self.memory_budget_bytes
    }

    /// The same client holding `masks` already, as if an earlier task had brought them (a
    /// simulation that builds its clients per task hands each the masks it held).
    pub fn with_masks(mut self, masks: MaskSet) -> Self {
        self.masks = Some(masks);
        self
    }

    /// The same client keeping `w0` from a stage-1a task, as if it had run that task here (a
    /// simulation that builds its clients per task hands each the `w0` it kept).
    pub fn with_w0(mut self, w0: Arc<ModelPayload>) -> Self {
        self.w0 = Some(w0);
        self
    }

    /// The `w0` this client keeps between adaptive BatchNorm selection's two round trips.
    pub fn w0(&self) -> Option<&Arc<ModelPayload>> {
        self.w0.as_ref()
    }

    /// Number of local training samples.
    pub fn num_train_samples(&self) -> usize {
        self.data.train_indices.len()
    }

    /// The version of the masks this client holds.
    pub fn mask_version(&self) -> Option<u64> {
        self.masks.as_ref().map(|m| m.version)
    }

    /// The masks this client holds.
    pub fn masks(&self) -> Option<&MaskSet> {
        self.masks.as_ref()
    }

    /// Runs one task to completion.
    pub fn handle(&mut self, task: &Task) -> Result<TaskResult, ClientError> {
        match task {
            Task::Train(t) => self.train(t).map(TaskResult::Train),
            Task::Evaluate(t) => self.evaluate(t).map(TaskResult::Evaluate),
            Task::Calibrate(t) => self.calibrate(t).map(TaskResult::Calibrate),
            Task::EvaluateCandidates(t) => self
                .evaluate_candidates(t)
                .map(TaskResult::EvaluateCandidates),
        }
    }

    /// Builds the global model of a payload, adopting its masks when it carries them.
    fn load(&mut self, payload: &ModelPayload) -> Result<Model, ClientError> {
        if let Some(m) = &payload.masks {
            if m.version != payload.mask_version {
                return Err(ClientError::Wire(format!(
                    "payload masks have version {} but the payload says {}",
                    m.version, payload.mask_version
                )));
            }
            self.masks = Some(m.clone());
        }
        let masks = match &self.masks {
            Some(m) if m.version == payload.mask_version => m,
            _ => {
                return Err(ClientError::MissingMasks {
                    wanted: payload.mask_version,
                    held: self.mask_version(),
                });
            }
        };
        let mut model = Model::new(&payload.spec, 0)?;
        // Masked weights hold only their active values, gradients and moments.
        model.set_lean_storage(true)?;
        model.set_masks(masks)?;
        model.load_state_dict(&payload.state)?;
        Ok(model)
    }

    fn train(&mut self, t: &TrainTask) -> Result<TrainResult, ClientError> {
        let started = Instant::now();
        let mut model = self.load(&t.model)?;
        self.check_budget(&model, t)?;
        let mut optimizer = t.training.optimizer.build()?;
        let opts = BatchOptions {
            batch_size: t.training.batch_size,
            normalization: self.data.normalization.clone(),
            augment: t.training.augment.clone(),
        };
        let mut r = rng::seeded(t.seed);
        let mut stats = PassStats::default();
        let mut hook = AdjustHook::new(&t.adjust, t.adjust_kind);
        let per_epoch =
            train::steps_per_epoch(self.data.train_indices.len(), t.training.batch_size);
        let segments = adjust::plan(
            per_epoch,
            t.training.epochs,
            t.training.max_steps,
            t.adjust_kind,
            !t.adjust.is_empty(),
        );
        let mut own_masks = Vec::new();
        for segment in segments {
            hook.capture = segment.capture;
            let hooks: &mut dyn StepHooks = if segment.capture {
                &mut hook
            } else {
                &mut NoHooks
            };
            let s = train::train_steps(
                &mut model,
                optimizer.as_mut(),
                &self.data.train,
                &self.data.train_indices,
                &opts,
                segment.steps,
                &mut r,
                hooks,
            )?;
            stats.merge(&s);
            if segment.readjust_after {
                own_masks = hook.readjust(&mut model)?;
                // The moments belong to the old masks: start the optimizer afresh.
                optimizer = t.training.optimizer.build()?;
            }
        }
        let topk = match t.adjust_kind {
            AdjustKind::PrunedTopK => std::mem::take(&mut hook.topk),
            AdjustKind::SquaredGradientSum => hook.squared_sums(&model),
            AdjustKind::ClientPruneGrow => Vec::new(),
        };
        let answered = if t.adjust_kind == AdjustKind::ClientPruneGrow {
            own_masks.len()
        } else {
            topk.len()
        };
        if answered != t.adjust.len() {
            return Err(ClientError::Core(fedtiny_common::Error::InvalidConfig(
                format!(
                    "adjustment asked for {} tensors, {} answered (unknown or unmasked names?)",
                    t.adjust.len(),
                    answered
                ),
            )));
        }
        Ok(TrainResult {
            round: t.round,
            mask_version: t.model.mask_version,
            num_samples: self.data.train_indices.len(),
            state: model.state_dict(),
            train_loss: stats.loss(),
            train_accuracy: stats.accuracy(),
            seconds: started.elapsed().as_secs_f64(),
            peak_rss_bytes: cost::peak_rss_bytes(),
            topk,
            masks: own_masks,
        })
    }

    /// Refuses a training task whose predicted peak (the same prediction the coordinator makes,
    /// under [`cost::CLIENT_STORAGE`]) exceeds the memory budget.
    fn check_budget(&self, model: &Model, t: &TrainTask) -> Result<(), ClientError> {
        let budget = self.memory_budget_bytes;
        if budget == 0 {
            return Ok(());
        }
        let footprint = cost::TrainFootprint::of_model(
            model,
            t.training.optimizer.state_per_value(),
            cost::CLIENT_STORAGE,
        )?;
        let predicted = footprint.peak_bytes(t.training.batch_size);
        if predicted > budget {
            return Err(ClientError::OverBudget {
                predicted,
                budget,
                batch_size: t.training.batch_size,
            });
        }
        Ok(())
    }

    /// Builds `w0` (dense) and the candidates' masks.
    fn candidates(
        &mut self,
        payload: &ModelPayload,
        set: &CandidateSet,
    ) -> Result<(Model, Vec<fedtiny_common::mask::MaskSet>), ClientError> {
        let w0 = self.load(payload)?;
        let masks = set
            .seeds
            .iter()
            .map(|&seed| model_candidate(&w0, set.density, set.allocation, seed))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((w0, masks))
    }

    fn calibrate(&mut self, t: &CalibrateTask) -> Result<CalibrateResult, ClientError> {
        let (w0, masks) = self.candidates(&t.model, &t.candidates)?;
        // Kept for stage 1c, so that the coordinator sends `w0` once.
        let kept = Arc::new(ModelPayload {
            spec: t.model.spec.clone(),
            mask_version: t.model.mask_version,
            masks: t.model.masks.clone(),
            state: w0.state_dict(),
        });
        drop(w0);
        self.w0 = Some(kept.clone());
        let state = &kept.state;
        let val = validation_indices(&self.data.train_indices, &t.validation);
        let opts = BatchOptions {
            batch_size: t.batch_size,
            normalization: self.data.normalization.clone(),
            augment: None,
        };
        let mut bn = Vec::with_capacity(masks.len());
        // One candidate at a time: peak memory is one model plus one batch of activations.
        for m in &masks {
            let mut model = Model::new(&t.model.spec, 0)?;
            model.set_lean_storage(true)?;
            model.set_masks(m)?;
            model.load_state_dict(state)?;
            train::calibrate_batchnorm(&mut model, &self.data.train, &val, &opts, t.passes)?;
            bn.push(running_stats(&model.state_dict()));
        }
        Ok(CalibrateResult {
            round: t.round,
            val_count: val.len(),
            bn,
        })
    }

    fn evaluate_candidates(
        &mut self,
        t: &CandidateEvalTask,
    ) -> Result<CandidateEvalResult, ClientError> {
        if t.bn.len() != t.candidates.seeds.len() {
            return Err(ClientError::Wire(format!(
                "{} BatchNorm sets for {} candidates",
                t.bn.len(),
                t.candidates.seeds.len()
            )));
        }
        // Stage 1c ends the selection: the kept `w0` is released either way.
        let kept = self.w0.take();
        let payload = match (&t.model, &kept) {
            (Some(p), _) => p,
            (None, Some(p)) => p.as_ref(),
            (None, None) => return Err(ClientError::MissingW0),
        };
        fedtiny_proto::convert::check_candidate_statistics(&payload.state, &t.bn)
            .map_err(|e| ClientError::Wire(e.to_string()))?;
        let (w0, masks) = self.candidates(payload, &t.candidates)?;
        let base = w0.state_dict();
        drop(w0);
        let val = validation_indices(&self.data.train_indices, &t.validation);
        let opts = BatchOptions {
            batch_size: t.batch_size,
            normalization: self.data.normalization.clone(),
            augment: None,
        };
        let mut stats = Vec::with_capacity(masks.len());
        for (m, bn) in masks.iter().zip(&t.bn) {
            let mut state = base.clone();
            for (name, e) in &bn.entries {
                match state.entries.get_mut(name) {
                    Some(dst)
                        if dst.shape == e.shape
                            && matches!(dst.role, Role::RunningMean | Role::RunningVar) =>
                    {
                        dst.values.clone_from(&e.values);
                    }
                    _ => {
                        return Err(ClientError::Wire(format!(
                            "BatchNorm statistics name an unknown or mismatched tensor `{name}`"
                        )));
                    }
                }
            }
            let mut model = Model::new(&payload.spec, 0)?;
            model.set_lean_storage(true)?;
            model.set_masks(m)?;
            model.load_state_dict(&state)?;
            let s = train::evaluate(&mut model, &self.data.train, &val, &opts)?;
            stats.push(EvaluateResult {
                round: t.round,
                loss_sum: s.loss_sum,
                correct: s.correct,
                count: s.count,
            });
        }
        Ok(CandidateEvalResult {
            round: t.round,
            stats,
        })
    }

    fn evaluate(&mut self, t: &EvaluateTask) -> Result<EvaluateResult, ClientError> {
        let mut model = self.load(&t.model)?;
        let (test, idx) = self.data.test.as_ref().ok_or(ClientError::NoTestData)?;
        let opts = BatchOptions {
            batch_size: t.batch_size,
            normalization: self.data.normalization.clone(),
            augment: None,
        };
        let s = train::evaluate(&mut model, test, idx, &opts)?;
        Ok(EvaluateResult {
            round: t.round,
            loss_sum: s.loss_sum,
            correct: s.correct,
            count: s.count,
        })
    }
}

/// The BatchNorm running statistics of a state.
pub fn running_stats(state: &StateDict) -> StateDict {
    StateDict {
        entries: state
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.role, Role::RunningMean | Role::RunningVar))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect(),
    }
}
