//! CIFAR-10 (Krizhevsky, 2009), binary version: 32×32 RGB images, 10 classes, five training
//! batches and one test batch of 10,000 records each.
//!
//! Each record is one label byte followed by 3,072 pixel bytes stored channel-planar: the 1,024
//! red values (row-major), then green, then blue.
//!
//! Decisions:
//! - The files are looked for in `dir` itself, then in `dir/cifar-10-batches-bin/` (the folder the
//!   official archive unpacks to); all six must be in the same place. The archive itself is not
//!   unpacked here.
//! - Records are converted to channels-last (H×W×C) on load, once.
//! - A file whose length is not a positive multiple of 3,073 bytes is [`DataError::Dimensions`];
//!   a label ≥ 10 is [`DataError::LabelOutOfRange`] with its record index. The number of records
//!   per file is not fixed, so small test fixtures load the same way.
//! - Datasets are named `cifar10/train` and `cifar10/test`.

use std::path::{Path, PathBuf};

pub use super::Splits;
use super::{DataError, Dataset};

/// Number of classes.
pub const CLASSES: usize = 10;
/// Image height and width.
pub const SIDE: usize = 32;
/// Channels (R, G, B).
pub const CHANNELS: usize = 3;
/// Bytes per record: one label byte and 32·32·3 pixel bytes.
pub const RECORD_BYTES: usize = 1 + SIDE * SIDE * CHANNELS;
/// The folder the official binary archive unpacks to.
pub const SUBDIR: &str = "cifar-10-batches-bin";
/// The training batch files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_FILE: &str = "test_batch.bin";
/// The class names, by label.
pub const CLASS_NAMES: [&str; CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const HINT: &str = "the CIFAR-10 binary version (data_batch_1.bin … data_batch_5.bin and \
                    test_batch.bin) is expected in that folder or in its cifar-10-batches-bin \
                    subfolder; pass --data-dir";

/// Loads both splits from `dir` or `dir/cifar-10-batches-bin/`.
pub fn load(dir: &Path) -> Result<Splits, DataError> {
    let base = locate(dir)?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for name in TRAIN_FILES {
        read_batch(&base.join(name), &mut images, &mut labels)?;
    }
    let train = Dataset::new(
        "cifar10/train",
        images,
        labels,
        SIDE,
        SIDE,
        CHANNELS,
        CLASSES,
    )?;
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    read_batch(&base.join(TEST_FILE), &mut images, &mut labels)?;
    let test = Dataset::new(
        "cifar10/test",
        images,
        labels,
        SIDE,
        SIDE,
        CHANNELS,
        CLASSES,
    )?;
    tracing::info!(
        dir = %base.display(),
        train = train.len(),
        test = test.len(),
        "loaded CIFAR-10"
    );
    Ok(Splits { train, test })
}

/// The folder holding the batch files: `dir` if it has `data_batch_1.bin`, else
/// `dir/cifar-10-batches-bin` if that has it; then every file must exist there.
pub fn locate(dir: &Path) -> Result<PathBuf, DataError> {
    let sub = dir.join(SUBDIR);
    let base = if !dir.join(TRAIN_FILES[0]).is_file() && sub.join(TRAIN_FILES[0]).is_file() {
        sub
    } else {
        dir.to_path_buf()
    };
    for name in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        let path = base.join(name);
        if !path.is_file() {
            return Err(DataError::MissingFile {
                path,
                hint: HINT.into(),
            });
        }
    }
    Ok(base)
}

/// Appends the records of one batch file: pixels channels-last to `images`, labels to `labels`.
pub fn read_batch(
    path: &Path,
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_batch(path, &bytes, images, labels)
}

/// Decodes the bytes of one batch file (`path` is only used in errors) and appends its records.
/// Nothing is appended on error.
pub fn decode_batch(
    path: &Path,
    bytes: &[u8],
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(DataError::dimensions(
            path,
            format!(
                "length {} is not a positive multiple of the {RECORD_BYTES}-byte CIFAR-10 record",
                bytes.len()
            ),
        ));
    }
    let records = bytes.len() / RECORD_BYTES;
    if let Some((index, rec)) = bytes
        .chunks_exact(RECORD_BYTES)
        .enumerate()
        .find(|(_, r)| usize::from(r[0]) >= CLASSES)
    {
        return Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label: rec[0],
            classes: CLASSES,
        });
    }
    let plane = SIDE * SIDE;
    images.reserve(records * plane * CHANNELS);
    labels.reserve(records);
    for rec in bytes.chunks_exact(RECORD_BYTES) {
        labels.push(rec[0]);
        let (r, gb) = rec[1..].split_at(plane);
        let (g, b) = gb.split_at(plane);
        for ((&r, &g), &b) in r.iter().zip(g).zip(b) {
            images.extend_from_slice(&[r, g, b]);
        }
    }
    Ok(())
}

/// Encodes channels-last samples as CIFAR-10 binary records (the inverse of [`decode_batch`]);
/// used to write fixtures. `images` must hold `labels.len()` samples of 32×32×3.
pub fn encode_batch(images: &[u8], labels: &[u8]) -> Result<Vec<u8>, DataError> {
    let n = SIDE * SIDE * CHANNELS;
    if images.len() != labels.len() * n {
        return Err(DataError::InvalidArgument(format!(
            "{} labels need {} pixel bytes of 32×32×3, got {}",
            labels.len(),
            labels.len() * n,
            images.len()
        )));
    }
    let mut out = Vec::with_capacity(labels.len() * RECORD_BYTES);
    for (img, &label) in images.chunks_exact(n).zip(labels) {
        out.push(label);
        for c in 0..CHANNELS {
            out.extend(img.iter().skip(c).step_by(CHANNELS));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(n: usize, salt: usize) -> Vec<u8> {
        (0..n * SIDE * SIDE * CHANNELS)
            .map(|i| ((i * 31 + salt) % 256) as u8)
            .collect()
    }

    fn write_set(dir: &Path, per_file: usize) -> (Vec<u8>, Vec<u8>) {
        std::fs::create_dir_all(dir).unwrap();
        let (mut all_images, mut all_labels) = (Vec::new(), Vec::new());
        for (k, name) in TRAIN_FILES.iter().chain([&TEST_FILE]).enumerate() {
            let images = pixels(per_file, k);
            let labels: Vec<u8> = (0..per_file).map(|i| ((i + k) % 10) as u8).collect();
            std::fs::write(dir.join(name), encode_batch(&images, &labels).unwrap()).unwrap();
            if k < 5 {
                all_images.extend(images);
                all_labels.extend(labels);
            }
        }
        (all_images, all_labels)
    }

    fn assert_names(err: &DataError, path: &Path) {
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "`{msg}` lacks {path:?}"
        );
    }

    #[test]
    fn planar_records_become_channels_last() {
        let mut rec = vec![7u8];
        rec.extend((0..3 * 1024).map(|i| (i / 1024 * 100 + i % 1024 % 7) as u8));
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        decode_batch(Path::new("x"), &rec, &mut images, &mut labels).unwrap();
        assert_eq!(labels, vec![7]);
        // Pixel (0, 1): R = plane 0 index 1, G = plane 1 index 1, B = plane 2 index 1.
        assert_eq!(&images[3..6], &[1, 101, 201]);
        assert_eq!(encode_batch(&images, &labels).unwrap(), rec);
    }

    #[test]
    fn loads_from_dir_or_subdir() {
        for sub in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let target = if sub {
                tmp.path().join(SUBDIR)
            } else {
                tmp.path().to_path_buf()
            };
            let (images, labels) = write_set(&target, 3);
            let s = load(tmp.path()).unwrap();
            assert_eq!((s.train.len(), s.test.len()), (15, 3));
            assert_eq!(s.train.images(), images.as_slice());
            assert_eq!(s.train.labels(), labels.as_slice());
            assert_eq!(s.test.sample_shape(), [32, 32, 3]);
        }
    }

    #[test]
    fn typed_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        write_set(tmp.path(), 2);

        let bad_len = tmp.path().join(TRAIN_FILES[2]);
        let mut bytes = std::fs::read(&bad_len).unwrap();
        bytes.pop();
        std::fs::write(&bad_len, &bytes).unwrap();
        let err = load(tmp.path()).unwrap_err();
        assert!(matches!(err, DataError::Dimensions { .. }), "{err:?}");
        assert_names(&err, &bad_len);
        std::fs::write(&bad_len, []).unwrap();
        assert!(matches!(
            load(tmp.path()),
            Err(DataError::Dimensions { .. })
        ));

        write_set(tmp.path(), 2);
        let bad_label = tmp.path().join(TEST_FILE);
        let mut bytes = std::fs::read(&bad_label).unwrap();
        bytes[RECORD_BYTES] = 10;
        std::fs::write(&bad_label, &bytes).unwrap();
        let err = load(tmp.path()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    index: 1,
                    label: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_names(&err, &bad_label);

        write_set(tmp.path(), 2);
        let missing = tmp.path().join(TRAIN_FILES[4]);
        std::fs::remove_file(&missing).unwrap();
        let err = load(tmp.path()).unwrap_err();
        assert!(matches!(err, DataError::MissingFile { .. }), "{err:?}");
        assert_names(&err, &missing);
    }
}
