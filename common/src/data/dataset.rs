//! An in-memory labelled image dataset of bytes.
//!
//! Decisions:
//! - Images are kept as raw `u8` pixels, channels-last (N×H×W×C), exactly as the files hold them
//!   (after CIFAR's planar layout is converted); conversion to normalised `f32` happens per batch
//!   in [`Dataset::fill_batch`](super::batch), so a 60,000-image set costs 47 MB, not 188 MB.
//! - Labels are `u8` (every supported dataset has at most 256 classes) and are checked against
//!   `classes` once, at construction; after that every accessor is infallible.
//! - Invalid indices are the caller's bug in [`Dataset::image`]/[`Dataset::label`] (they panic like
//!   slice indexing, and are documented to), but are typed errors in [`Dataset::subset`] and
//!   [`Dataset::fill_batch`](super::batch), whose indices come from partitions and configs.
//! - `Debug` prints the shape, not the pixels.

use std::path::PathBuf;

use super::DataError;

/// A labelled image dataset held in memory, channels-last.
#[derive(Clone, PartialEq, Eq)]
pub struct Dataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    height: usize,
    width: usize,
    channels: usize,
    classes: usize,
    name: String,
}

/// The training and test splits of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splits {
    /// The training split.
    pub train: Dataset,
    /// The test split.
    pub test: Dataset,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("name", &self.name)
            .field("len", &self.len())
            .field("shape", &self.sample_shape())
            .field("classes", &self.classes)
            .finish_non_exhaustive()
    }
}

impl Dataset {
    /// Builds a dataset from channels-last pixels (`labels.len() · height · width · channels`
    /// bytes) and labels, each below `classes`.
    ///
    /// Errors: [`DataError::InvalidArgument`] for a zero dimension, `classes` outside `1..=256`
    /// or a pixel count that does not match; [`DataError::LabelOutOfRange`] (whose `path` is the
    /// dataset's name) for a label `≥ classes`.
    pub fn new(
        name: impl Into<String>,
        images: Vec<u8>,
        labels: Vec<u8>,
        height: usize,
        width: usize,
        channels: usize,
        classes: usize,
    ) -> Result<Self, DataError> {
        let name = name.into();
        if height == 0 || width == 0 || channels == 0 {
            return Err(DataError::InvalidArgument(format!(
                "dataset `{name}`: sample shape {height}×{width}×{channels} has a zero dimension"
            )));
        }
        if classes == 0 || classes > 256 {
            return Err(DataError::InvalidArgument(format!(
                "dataset `{name}`: {classes} classes, expected 1 to 256"
            )));
        }
        let expected = labels
            .len()
            .checked_mul(height * width)
            .and_then(|n| n.checked_mul(channels));
        if expected != Some(images.len()) {
            return Err(DataError::InvalidArgument(format!(
                "dataset `{name}`: {} labels need {} pixel bytes of {height}×{width}×{channels} \
                 samples, got {}",
                labels.len(),
                expected.map_or_else(|| "too many".to_string(), |e| e.to_string()),
                images.len()
            )));
        }
        check_labels(&PathBuf::from(&name), &labels, classes)?;
        Ok(Dataset {
            images,
            labels,
            height,
            width,
            channels,
            classes,
            name,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset holds no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of sample `i` (`H·W·C` bytes, channels-last).
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.sample_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The label of sample `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// All labels, in sample order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// All pixels, N×H×W×C.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// Rows per image.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Columns per image.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Channels per pixel.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Number of classes (labels are `0..classes`).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The dataset's name (for logs and errors).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shape of one sample, `[H, W, C]`.
    pub fn sample_shape(&self) -> [usize; 3] {
        [self.height, self.width, self.channels]
    }

    /// Bytes (and, after conversion, `f32` values) per sample: `H·W·C`.
    pub fn sample_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// A new dataset of the samples at `indices`, in that order (repeats allowed). It keeps the
    /// name, shape and number of classes.
    ///
    /// Errors: [`DataError::InvalidArgument`] if an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        self.check_indices(indices)?;
        let n = self.sample_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(&self.images[i * n..(i + 1) * n]);
            labels.push(self.labels[i]);
        }
        Ok(Dataset {
            images,
            labels,
            height: self.height,
            width: self.width,
            channels: self.channels,
            classes: self.classes,
            name: self.name.clone(),
        })
    }

    /// How many samples each class has (length `classes`).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts
    }

    /// The sample indices of each class, ascending (length `classes`).
    pub fn class_indices(&self) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = self
            .class_counts()
            .into_iter()
            .map(Vec::with_capacity)
            .collect();
        for (i, &l) in self.labels.iter().enumerate() {
            out[usize::from(l)].push(i);
        }
        out
    }

    /// Checks that every index is below `len()`.
    pub(crate) fn check_indices(&self, indices: &[usize]) -> Result<(), DataError> {
        match indices.iter().find(|&&i| i >= self.len()) {
            Some(&i) => Err(DataError::InvalidArgument(format!(
                "index {i} is out of range for dataset `{}` of {} samples",
                self.name,
                self.len()
            ))),
            None => Ok(()),
        }
    }
}

/// Checks that every label is below `classes`; `path` names the source in the error.
pub(crate) fn check_labels(
    path: &std::path::Path,
    labels: &[u8],
    classes: usize,
) -> Result<(), DataError> {
    match labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= classes)
    {
        Some((index, &label)) => Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label,
            classes,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        // 4 samples of 2×1×2: sample i has pixels [i, 10+i, 20+i, 30+i].
        let images = (0..4u8).flat_map(|i| [i, 10 + i, 20 + i, 30 + i]).collect();
        Dataset::new("tiny", images, vec![2, 0, 2, 1], 2, 1, 2, 3).unwrap()
    }

    #[test]
    fn accessors() {
        let d = tiny();
        assert_eq!(d.len(), 4);
        assert!(!d.is_empty());
        assert_eq!(d.image(2), &[2, 12, 22, 32]);
        assert_eq!(d.label(3), 1);
        assert_eq!(d.labels(), &[2, 0, 2, 1]);
        assert_eq!(d.sample_shape(), [2, 1, 2]);
        assert_eq!(d.sample_len(), 4);
        assert_eq!(
            (d.height(), d.width(), d.channels(), d.classes()),
            (2, 1, 2, 3)
        );
        assert_eq!(d.name(), "tiny");
        assert_eq!(d.class_counts(), vec![1, 1, 2]);
        assert_eq!(d.class_indices(), vec![vec![1], vec![3], vec![0, 2]]);
        assert!(format!("{d:?}").contains("tiny"));
    }

    #[test]
    fn subset_keeps_order_and_checks_indices() {
        let d = tiny();
        let s = d.subset(&[3, 0, 3]).unwrap();
        assert_eq!(s.labels(), &[1, 2, 1]);
        assert_eq!(s.image(0), d.image(3));
        assert_eq!(s.image(1), d.image(0));
        assert!(d.subset(&[]).unwrap().is_empty());
        let err = d.subset(&[0, 4]).unwrap_err();
        assert!(matches!(err, DataError::InvalidArgument(_)));
        assert!(err.to_string().contains("tiny"));
    }

    #[test]
    fn new_validates() {
        let err = Dataset::new("bad", vec![0; 8], vec![0, 3], 2, 2, 1, 3).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    index: 1,
                    label: 3,
                    classes: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("bad"));
        assert!(matches!(
            Dataset::new("bad", vec![0; 7], vec![0, 0], 2, 2, 1, 3),
            Err(DataError::InvalidArgument(_))
        ));
        assert!(matches!(
            Dataset::new("bad", vec![], vec![], 0, 2, 1, 3),
            Err(DataError::InvalidArgument(_))
        ));
        assert!(matches!(
            Dataset::new("bad", vec![], vec![], 1, 1, 1, 0),
            Err(DataError::InvalidArgument(_))
        ));
        assert!(
            Dataset::new("empty", vec![], vec![], 1, 1, 1, 1)
                .unwrap()
                .is_empty()
        );
    }
}
