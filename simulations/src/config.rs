//! Run configuration: TOML with unknown fields refused, validated into checked values.
//!
//! Every run writes its *resolved* config (after defaults and command-line overrides) next to its
//! results, so `fedtiny-sim train <run>/config.toml` replays it.

use std::path::{Path, PathBuf};

use fedtiny_common::data::Augment;
pub use fedtiny_common::data::DatasetKind;
use fedtiny_common::models::{Arch, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use serde::{Deserialize, Serialize};

use crate::{Result, SimError};

/// The built-in centralized-training config (the `cnn` on the committed Fashion-MNIST sample).
pub const DEFAULT_CENTRALIZED: &str = include_str!("../configs/centralized-cnn.toml");

/// Which model to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Width multiplier.
    #[serde(default = "one")]
    pub width: f64,
}

fn one() -> f64 {
    1.0
}

/// Where the data are and how to use them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Which dataset.
    pub dataset: DatasetKind,
    /// The directory holding its files. A relative path that does not exist from the working
    /// directory is also tried from the workspace root.
    pub dir: PathBuf,
    /// Download the dataset into `dir` (checksums verified) when its files are missing.
    #[serde(default)]
    pub download: bool,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: Option<Augment>,
    /// Use only the first N training samples (all when absent).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Use only the first N test samples (all when absent).
    #[serde(default)]
    pub test_limit: Option<usize>,
}

/// Learning-rate schedule over the whole run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The optimizer's learning rate throughout.
    Constant,
    /// Cosine decay to zero over all steps.
    Cosine,
}

/// Training hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Passes over the training data.
    pub epochs: usize,
    /// Samples per training step.
    pub batch_size: usize,
    /// Samples per evaluation batch.
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    /// Learning-rate schedule.
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
}

fn default_eval_batch() -> usize {
    500
}

fn default_schedule() -> Schedule {
    Schedule::Constant
}

/// Where results go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Parent directory of run folders.
    #[serde(default = "default_runs")]
    pub dir: PathBuf,
    /// Run folder name (default: derived from the model and seed).
    #[serde(default)]
    pub name: Option<String>,
}

fn default_runs() -> PathBuf {
    PathBuf::from("runs")
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: default_runs(),
            name: None,
        }
    }
}

/// A centralized training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralizedConfig {
    /// Seed of every random choice in the run.
    pub seed: u64,
    /// Kernel threads (0 = one per core).
    #[serde(default)]
    pub threads: usize,
    /// The model.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// Training.
    pub train: TrainSection,
    /// Output.
    #[serde(default)]
    pub output: OutputConfig,
}

impl CentralizedConfig {
    /// Parses and validates a TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let c: CentralizedConfig = toml::from_str(text).map_err(|e| SimError::Config {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        c.validate().map_err(|e| SimError::Config {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        Ok(c)
    }

    /// Reads, parses and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The built-in default.
    pub fn embedded_default() -> Result<Self> {
        Self::from_toml(DEFAULT_CENTRALIZED, "<embedded centralized-cnn.toml>")
    }

    /// The model spec for this config's dataset.
    pub fn model_spec(&self) -> Result<ModelSpec> {
        let (input, classes) = self.data.dataset.shape();
        Ok(ModelSpec::new(
            self.model.arch,
            input,
            classes,
            self.model.width,
        )?)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SimError::Core(fedtiny_common::Error::InvalidConfig(m)));
        self.model_spec()?;
        self.train.optimizer.validate()?;
        if self.train.epochs == 0 {
            return bad("train.epochs must be at least 1".into());
        }
        if self.train.batch_size < 2 {
            return bad("train.batch_size must be at least 2 (BatchNorm)".into());
        }
        if self.train.eval_batch_size == 0 {
            return bad("train.eval_batch_size must be positive".into());
        }
        if self.threads > 1024 {
            return bad(format!("threads = {} is not plausible", self.threads));
        }
        if let Some(a) = &self.data.augment {
            let h = self.data.dataset.shape().0[0];
            if a.crop_padding > h {
                return bad(format!(
                    "data.augment.crop_padding {} exceeds the image size {h}",
                    a.crop_padding
                ));
            }
        }
        if self.data.train_limit == Some(0) || self.data.test_limit == Some(0) {
            return bad("data.train_limit and data.test_limit must be positive".into());
        }
        Ok(())
    }

    /// The resolved config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| SimError::Serialize {
            what: "config".into(),
            message: e.to_string(),
        })
    }
}

/// Resolves a data directory: as given when it exists (or is absolute), else relative to the
/// workspace root this binary was built from, so the embedded defaults work from any folder of
/// the checkout.
pub fn resolve_data_dir(dir: &Path) -> PathBuf {
    if dir.is_absolute() || dir.exists() {
        return dir.to_path_buf();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidate = root.join(dir);
    if candidate.exists() {
        candidate
    } else {
        dir.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_round_trips() {
        let c = CentralizedConfig::embedded_default().unwrap();
        let text = c.to_toml().unwrap();
        assert_eq!(CentralizedConfig::from_toml(&text, "t").unwrap(), c);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_with_the_origin() {
        let bad_key = DEFAULT_CENTRALIZED.replace("epochs =", "epoch_count =");
        let e = CentralizedConfig::from_toml(&bad_key, "my.toml").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("my.toml") && msg.contains("epoch_count"),
            "{msg}"
        );

        let zero = DEFAULT_CENTRALIZED.replace("batch_size = 64", "batch_size = 1");
        let msg = CentralizedConfig::from_toml(&zero, "z.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("batch_size"), "{msg}");

        let arch = DEFAULT_CENTRALIZED.replace("arch = \"cnn\"", "arch = \"lenet\"");
        assert!(CentralizedConfig::from_toml(&arch, "a.toml").is_err());
        assert!(CentralizedConfig::from_toml("seed = [", "broken.toml").is_err());
    }
}
