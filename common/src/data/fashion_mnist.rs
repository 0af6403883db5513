//! Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 28×28 grayscale images of clothing, 10 classes,
//! 60,000 training and 10,000 test images, in four IDX files.
//!
//! Decisions:
//! - [`load`] looks for each standard file name with `.gz` first and falls back to the unpacked
//!   name; either way the content decides whether it is decompressed (see [`idx`]).
//! - Every file is checked: magic, exact length, 28×28 images, labels below 10, and as many
//!   labels as images. The number of images is not fixed, so the committed sample (and any other
//!   subset written by [`save`]) loads the same way as the full set.
//! - Datasets are named `fashion-mnist/train` and `fashion-mnist/test`.

use std::path::{Path, PathBuf};

pub use super::Splits;
use super::{DataError, Dataset, idx};

/// Number of classes.
pub const CLASSES: usize = 10;
/// Image height and width.
pub const SIDE: usize = 28;
/// The class names, by label.
pub const CLASS_NAMES: [&str; CLASSES] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
/// Training images, without the `.gz` suffix.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// Training labels, without the `.gz` suffix.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// Test images, without the `.gz` suffix.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// Test labels, without the `.gz` suffix.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// What to tell a user whose data directory lacks a file.
const HINT: &str = "the four Fashion-MNIST IDX files (train-images-idx3-ubyte, \
                    train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each \
                    optionally .gz) are expected in that folder; pass --data-dir or use --download";

/// Loads both splits from `dir`.
pub fn load(dir: &Path) -> Result<Splits, DataError> {
    let train = load_split(dir, TRAIN_IMAGES, TRAIN_LABELS, "fashion-mnist/train")?;
    let test = load_split(dir, TEST_IMAGES, TEST_LABELS, "fashion-mnist/test")?;
    tracing::info!(
        dir = %dir.display(),
        train = train.len(),
        test = test.len(),
        "loaded Fashion-MNIST"
    );
    Ok(Splits { train, test })
}

/// The path of file `base` in `dir`: `base.gz` if it exists, else `base`, else
/// [`DataError::MissingFile`] naming `base.gz`.
pub fn locate(dir: &Path, base: &str) -> Result<PathBuf, DataError> {
    let gz = dir.join(format!("{base}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    let plain = dir.join(base);
    if plain.is_file() {
        return Ok(plain);
    }
    Err(DataError::MissingFile {
        path: gz,
        hint: HINT.into(),
    })
}

fn load_split(
    dir: &Path,
    images_base: &str,
    labels_base: &str,
    name: &str,
) -> Result<Dataset, DataError> {
    let images_path = locate(dir, images_base)?;
    let labels_path = locate(dir, labels_base)?;
    let images = idx::read_images(&images_path)?;
    if (images.height, images.width) != (SIDE, SIDE) {
        return Err(DataError::dimensions(
            &images_path,
            format!(
                "images are {}×{}, Fashion-MNIST images are {SIDE}×{SIDE}",
                images.height, images.width
            ),
        ));
    }
    let labels = idx::read_labels(&labels_path)?;
    if labels.len() != images.count {
        return Err(DataError::CountMismatch {
            images_path,
            images: images.count,
            labels_path,
            labels: labels.len(),
        });
    }
    super::dataset::check_labels(&labels_path, &labels, CLASSES)?;
    Dataset::new(name, images.pixels, labels, SIDE, SIDE, 1, CLASSES)
}

/// Writes both splits into `dir` (created if needed) as the four standard gzipped IDX files;
/// returns their paths. Both splits must be single-channel; any image size is written as is.
pub fn save(dir: &Path, splits: &Splits) -> Result<Vec<PathBuf>, DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut written = Vec::with_capacity(4);
    for (data, images_base, labels_base) in [
        (&splits.train, TRAIN_IMAGES, TRAIN_LABELS),
        (&splits.test, TEST_IMAGES, TEST_LABELS),
    ] {
        if data.channels() != 1 {
            return Err(DataError::InvalidArgument(format!(
                "IDX holds single-channel images; dataset `{}` has {} channels",
                data.name(),
                data.channels()
            )));
        }
        let images = dir.join(format!("{images_base}.gz"));
        idx::write_images_gz(
            &images,
            data.len(),
            data.height(),
            data.width(),
            data.images(),
        )?;
        let labels = dir.join(format!("{labels_base}.gz"));
        idx::write_labels_gz(&labels, data.labels())?;
        written.push(images);
        written.push(labels);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(n: usize, name: &str) -> Dataset {
        let images = (0..n * SIDE * SIDE).map(|i| (i % 253) as u8).collect();
        let labels = (0..n).map(|i| (i % CLASSES) as u8).collect();
        Dataset::new(name, images, labels, SIDE, SIDE, 1, CLASSES).unwrap()
    }

    fn write_all(dir: &Path, train: usize, test: usize) {
        save(
            dir,
            &Splits {
                train: synthetic(train, "fashion-mnist/train"),
                test: synthetic(test, "fashion-mnist/test"),
            },
        )
        .unwrap();
    }

    fn assert_names(err: &DataError, path: &Path) {
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "`{msg}` lacks {path:?}"
        );
    }

    #[test]
    fn save_load_round_trip_gz_and_plain() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), 30, 20);
        let s = load(dir.path()).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (30, 20));
        assert_eq!(s.train, synthetic(30, "fashion-mnist/train"));
        assert_eq!(s.test.class_counts(), vec![2; 10]);
        assert_eq!(s.train.sample_shape(), [28, 28, 1]);

        // Unpack the test labels: the plain file is found when the .gz is gone.
        let gz = dir.path().join(format!("{TEST_LABELS}.gz"));
        let labels = idx::read_labels(&gz).unwrap();
        std::fs::remove_file(&gz).unwrap();
        let plain = dir.path().join(TEST_LABELS);
        std::fs::write(&plain, idx::encode_labels(&labels).unwrap()).unwrap();
        assert_eq!(locate(dir.path(), TEST_LABELS).unwrap(), plain);
        assert_eq!(load(dir.path()).unwrap(), s);
    }

    #[test]
    fn missing_file_is_typed_with_hint() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), 10, 10);
        let path = dir.path().join(format!("{TEST_IMAGES}.gz"));
        std::fs::remove_file(&path).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::MissingFile { .. }), "{err:?}");
        assert_names(&err, &path);
        assert!(err.to_string().contains("--data-dir"));
    }

    #[test]
    fn count_mismatch_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), 10, 10);
        let labels = dir.path().join(format!("{TRAIN_LABELS}.gz"));
        idx::write_labels_gz(&labels, &[1; 9]).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::CountMismatch {
                    images: 10,
                    labels: 9,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_names(&err, &labels);
        assert_names(&err, &dir.path().join(format!("{TRAIN_IMAGES}.gz")));
    }

    #[test]
    fn label_out_of_range_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), 10, 10);
        let labels = dir.path().join(format!("{TEST_LABELS}.gz"));
        let mut l = vec![0u8; 10];
        l[6] = 10;
        idx::write_labels_gz(&labels, &l).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    index: 6,
                    label: 10,
                    classes: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_names(&err, &labels);
    }

    #[test]
    fn wrong_image_size_is_a_dimension_error() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), 10, 10);
        let images = dir.path().join(format!("{TRAIN_IMAGES}.gz"));
        idx::write_images_gz(&images, 10, 32, 32, &[0; 10 * 32 * 32]).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Dimensions { .. }), "{err:?}");
        assert_names(&err, &images);
    }

    #[test]
    fn committed_sample_loads() {
        // `data/fashion-mnist-sample` sits at the workspace root, above the crate's manifest.
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sample = manifest
            .ancestors()
            .chain(Path::new(file!()).ancestors())
            .map(|a| a.join("data/fashion-mnist-sample"))
            .find(|p| p.is_dir());
        let Some(sample) = sample else {
            panic!(
                "data/fashion-mnist-sample not found above {}",
                manifest.display()
            );
        };
        let s = load(&sample).unwrap();
        assert_eq!(s.train.len(), 4000);
        assert_eq!(s.test.len(), 1000);
        assert_eq!(s.train.class_counts(), vec![400; 10]);
        assert_eq!(s.test.class_counts(), vec![100; 10]);
    }
}
