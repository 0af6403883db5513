//! The client's compute, free of any transport.
//!
//! A [`ClientApp`] owns only its data and the masks it last received: it builds the model for
//! each task and drops it afterwards, so an idle client holds no model and a simulation's memory
//! grows with the clients running at once, not with the clients in the federation. It runs on
//! the caller's rayon pool.

use std::sync::Arc;
use std::time::Instant;

use fedtiny_common::data::{Dataset, Normalization};
use fedtiny_common::mask::MaskSet;
use fedtiny_common::models::Model;
use fedtiny_common::task::{
    EvaluateResult, EvaluateTask, ModelPayload, Task, TaskResult, TrainResult, TrainTask,
};
use fedtiny_common::train::{self, BatchOptions, NoHooks, PassStats};
use fedtiny_common::{cost, rng};

use crate::ClientError;

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
}

impl ClientApp {
    /// A client over its local data.
    pub fn new(data: LocalData) -> Self {
        ClientApp { data, masks: None }
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
        model.set_masks(masks)?;
        model.load_state_dict(&payload.state)?;
        Ok(model)
    }

    fn train(&mut self, t: &TrainTask) -> Result<TrainResult, ClientError> {
        let started = Instant::now();
        let mut model = self.load(&t.model)?;
        let mut optimizer = t.training.optimizer.build()?;
        let opts = BatchOptions {
            batch_size: t.training.batch_size,
            normalization: self.data.normalization.clone(),
            augment: t.training.augment.clone(),
        };
        let mut r = rng::seeded(t.seed);
        let mut stats = PassStats::default();
        for _ in 0..t.training.epochs {
            let s = train::train_epoch(
                &mut model,
                optimizer.as_mut(),
                &self.data.train,
                &self.data.train_indices,
                &opts,
                &mut r,
                &mut NoHooks,
            )?;
            stats.merge(&s);
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
