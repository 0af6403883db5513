//! Finding, downloading and loading the data a config names.

use fedtiny_common::data::{Normalization, Splits};

use crate::Result;
use crate::config::{DataConfig, DatasetKind, resolve_data_dir};

/// Loads the train and test splits a config names, downloading them first when asked to and
/// missing, then applies the configured limits.
pub fn load(cfg: &DataConfig, progress: &mut dyn FnMut(&str, u64, Option<u64>)) -> Result<Splits> {
    let dir = resolve_data_dir(&cfg.dir);
    if cfg.download && cfg.dataset == DatasetKind::FashionMnist {
        fedtiny_common::data::download::download_fashion_mnist(&dir, progress)?;
    }
    let splits = cfg.dataset.load(&dir)?;
    let limit = |d: fedtiny_common::data::Dataset, n: Option<usize>| -> Result<_> {
        match n {
            Some(n) if n < d.len() => Ok(d.subset(&(0..n).collect::<Vec<_>>())?),
            _ => Ok(d),
        }
    };
    Ok(Splits {
        train: limit(splits.train, cfg.train_limit)?,
        test: limit(splits.test, cfg.test_limit)?,
    })
}

/// The standard normalisation of a dataset.
pub fn normalization(kind: DatasetKind) -> Normalization {
    kind.normalization()
}
