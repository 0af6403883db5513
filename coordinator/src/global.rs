//! The global model the coordinator holds: architecture, state and masks.

use fedtiny_common::mask::MaskSet;
use fedtiny_common::models::{Model, ModelSpec};
use fedtiny_common::state::StateDict;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The coordinator's model. `masks.version` grows by one whenever the masks change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalModel {
    /// Architecture.
    pub spec: ModelSpec,
    /// Every tensor (pruned positions exactly zero).
    pub state: StateDict,
    /// The masks of the prunable tensors.
    pub masks: MaskSet,
}

impl GlobalModel {
    /// A freshly initialised model (seeded), unmasked, mask version 0.
    pub fn initial(spec: &ModelSpec, seed: u64) -> Result<Self> {
        let model = Model::new(spec, seed)?;
        Ok(GlobalModel {
            spec: spec.clone(),
            state: model.state_dict(),
            masks: MaskSet::default(),
        })
    }

    /// Builds a [`Model`] holding this state and masks.
    pub fn to_model(&self) -> Result<Model> {
        let mut m = Model::new(&self.spec, 0)?;
        m.set_masks(&self.masks)?;
        m.load_state_dict(&self.state)?;
        Ok(m)
    }

    /// Installs new masks (bumping the version) and zeroes the pruned weights of the state.
    pub fn set_masks(&mut self, mut masks: MaskSet) -> Result<()> {
        let mut m = Model::new(&self.spec, 0)?;
        masks.version = self.masks.version + 1;
        m.set_masks(&masks)?;
        m.load_state_dict(&self.state)?;
        self.state = m.state_dict();
        self.masks = masks;
        Ok(())
    }

    /// Density over prunable tensors.
    pub fn density(&self) -> f64 {
        let (mut a, mut n) = (0usize, 0usize);
        for (name, e) in &self.state.entries {
            if e.prunable {
                n += e.values.len();
                a += self
                    .masks
                    .get(name)
                    .map_or(e.values.len(), fedtiny_common::mask::Mask::active);
            }
        }
        if n == 0 { 1.0 } else { a as f64 / n as f64 }
    }

    /// Prunable weights (P) and dense elements (everything else) of the state.
    pub fn sizes(&self) -> (usize, usize) {
        let mut p = 0;
        let mut dense = 0;
        for e in self.state.entries.values() {
            if e.prunable {
                p += e.values.len();
            } else {
                dense += e.values.len();
            }
        }
        (p, dense)
    }
}

/// The BatchNorm running statistics of a state (the tensors ABNS re-estimates).
pub fn running_stats(state: &StateDict) -> StateDict {
    StateDict {
        entries: state
            .entries
            .iter()
            .filter(|(_, e)| {
                matches!(
                    e.role,
                    fedtiny_common::param::Role::RunningMean
                        | fedtiny_common::param::Role::RunningVar
                )
            })
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect(),
    }
}
