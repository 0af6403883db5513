//! Reading and writing IDX files of unsigned bytes (the MNIST / Fashion-MNIST format).
//!
//! An IDX file is a big-endian header — the magic number `0x0000_08NN` (`08` = unsigned byte,
//! `NN` = number of dimensions), then one `u32` per dimension — followed by the values in row-major
//! order. Only the two kinds that image classification uses are supported: images
//! ([`IMAGES_MAGIC`], dims `count × height × width`) and labels ([`LABELS_MAGIC`], dim `count`).
//!
//! Decisions:
//! - Compression is detected from the content (gzip magic bytes `1f 8b`), never from the file name,
//!   so a `.gz` that was unpacked in place, or a plain file named `.gz`, still reads.
//! - The whole file is read into memory (the largest standard file is 26 MB compressed); the
//!   payload buffer grows only as bytes actually arrive, so a lying header cannot make us allocate
//!   gigabytes up front, and payloads above [`MAX_PAYLOAD_BYTES`] are refused outright.
//! - The length must match the header exactly: fewer bytes is [`DataError::Truncated`], any
//!   trailing byte is [`DataError::Dimensions`]. A corrupt or cut-short gzip stream is
//!   [`DataError::Gzip`].
//! - Writers produce gzip with a zero timestamp and the best compression level, so writing the
//!   same data twice gives the same bytes (useful for committed samples and fixtures).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use flate2::Compression;
use flate2::read::MultiGzDecoder;

use super::DataError;

/// Magic number of an IDX file of unsigned-byte images with three dimensions.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte labels with one dimension.
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// The first two bytes of every gzip stream.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// The largest payload (decompressed, without header) accepted: 4 GiB.
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 32;

/// Images read from an IDX file: `count` images of `height × width` bytes, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows per image.
    pub height: usize,
    /// Columns per image.
    pub width: usize,
    /// `count · height · width` bytes.
    pub pixels: Vec<u8>,
}

/// Reads an IDX image file (gzipped or plain). `path` is read and named in any error.
pub fn read_images(path: &Path) -> Result<IdxImages, DataError> {
    let bytes = read_file(path)?;
    decode_images(path, &bytes)
}

/// Reads an IDX label file (gzipped or plain).
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read_file(path)?;
    decode_labels(path, &bytes)
}

/// Decodes the bytes of an IDX image file (gzipped or plain); `path` is only used in errors.
pub fn decode_images(path: &Path, bytes: &[u8]) -> Result<IdxImages, DataError> {
    let (dims, pixels) = decode(path, bytes, IMAGES_MAGIC, 3)?;
    let [count, height, width] = [dims[0], dims[1], dims[2]];
    if (height == 0 || width == 0) && count > 0 {
        return Err(DataError::dimensions(
            path,
            format!("images of {height}×{width} pixels are empty"),
        ));
    }
    Ok(IdxImages {
        count,
        height,
        width,
        pixels,
    })
}

/// Decodes the bytes of an IDX label file (gzipped or plain); `path` is only used in errors.
pub fn decode_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    decode(path, bytes, LABELS_MAGIC, 1).map(|(_, labels)| labels)
}

/// Encodes images as plain (uncompressed) IDX bytes.
pub fn encode_images(
    count: usize,
    height: usize,
    width: usize,
    pixels: &[u8],
) -> Result<Vec<u8>, DataError> {
    let expected = count.checked_mul(height).and_then(|n| n.checked_mul(width));
    if expected != Some(pixels.len()) {
        return Err(DataError::InvalidArgument(format!(
            "{count} images of {height}×{width} need {count}·{height}·{width} bytes, got {}",
            pixels.len()
        )));
    }
    encode(IMAGES_MAGIC, &[count, height, width], pixels)
}

/// Encodes labels as plain (uncompressed) IDX bytes.
pub fn encode_labels(labels: &[u8]) -> Result<Vec<u8>, DataError> {
    encode(LABELS_MAGIC, &[labels.len()], labels)
}

/// Writes images as a gzipped IDX file.
pub fn write_images_gz(
    path: &Path,
    count: usize,
    height: usize,
    width: usize,
    pixels: &[u8],
) -> Result<(), DataError> {
    write_gz(path, &encode_images(count, height, width, pixels)?)
}

/// Writes labels as a gzipped IDX file.
pub fn write_labels_gz(path: &Path, labels: &[u8]) -> Result<(), DataError> {
    write_gz(path, &encode_labels(labels)?)
}

/// Writes `bytes` gzipped (best compression, zero timestamp, no file name) to `path`.
pub fn write_gz(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let io = |e| DataError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(BufWriter::new(file), Compression::best());
    encoder.write_all(bytes).map_err(io)?;
    let mut inner = encoder.finish().map_err(io)?;
    inner.flush().map_err(io)?;
    Ok(())
}

/// Whether `bytes` start with the gzip magic bytes.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&GZIP_MAGIC)
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::MissingFile {
                path: path.to_path_buf(),
                hint: "no such file".into(),
            }
        } else {
            DataError::io(path, e)
        }
    })
}

fn encode(magic: u32, dims: &[usize], payload: &[u8]) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + payload.len());
    out.extend_from_slice(&magic.to_be_bytes());
    for &d in dims {
        let d = u32::try_from(d).map_err(|_| {
            DataError::InvalidArgument(format!("IDX dimension {d} does not fit in 32 bits"))
        })?;
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes an IDX file of `rank` dimensions; returns the dims and the payload.
fn decode(
    path: &Path,
    bytes: &[u8],
    magic: u32,
    rank: usize,
) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    if is_gzip(bytes) {
        decode_reader(path, MultiGzDecoder::new(bytes), magic, rank)
    } else {
        decode_reader(path, bytes, magic, rank)
    }
}

fn decode_reader(
    path: &Path,
    mut reader: impl Read,
    magic: u32,
    rank: usize,
) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    // Only a gzip decoder can fail while reading from memory.
    let gzip = |e: std::io::Error| DataError::Gzip {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let header_len = 4 + 4 * rank;
    let mut header = [0u8; 16];
    let got = read_up_to(&mut reader, &mut header[..header_len]).map_err(gzip)?;
    if got < 4 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: 4,
            actual: got as u64,
        });
    }
    let found = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if found != magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            expected: magic,
            found,
        });
    }
    if got < header_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header_len as u64,
            actual: got as u64,
        });
    }
    let dims: Vec<u64> = header[4..header_len]
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let dims_text = dims
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join("×");
    let size = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&s| s <= MAX_PAYLOAD_BYTES)
        .ok_or_else(|| {
            DataError::dimensions(
                path,
                format!("header dims {dims_text} exceed the {MAX_PAYLOAD_BYTES}-byte limit"),
            )
        })?;
    let mut payload = Vec::with_capacity(usize::try_from(size.min(1 << 26)).unwrap_or(0));
    (&mut reader)
        .take(size + 1)
        .read_to_end(&mut payload)
        .map_err(gzip)?;
    let actual = payload.len() as u64;
    if actual < size {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header_len as u64 + size,
            actual: header_len as u64 + actual,
        });
    }
    if actual > size {
        return Err(DataError::dimensions(
            path,
            format!(
                "header dims {dims_text} account for {size} bytes of data, but the file has \
                 trailing bytes after them"
            ),
        ));
    }
    let dims = dims
        .into_iter()
        .map(usize::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| DataError::dimensions(path, "dimension does not fit in usize"))?;
    Ok((dims, payload))
}

/// Reads until `buf` is full or the reader is exhausted; returns the number of bytes read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_images() -> (usize, usize, usize, Vec<u8>) {
        let (n, h, w) = (5, 4, 3);
        (
            n,
            h,
            w,
            (0..n * h * w).map(|i| (i * 7 % 256) as u8).collect(),
        )
    }

    fn assert_names(err: &DataError, path: &Path) {
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "message `{msg}` does not name {}",
            path.display()
        );
    }

    #[test]
    fn round_trip_gzipped_and_plain() {
        let dir = tempfile::tempdir().unwrap();
        let (n, h, w, pixels) = sample_images();
        let labels = vec![0u8, 3, 9, 1, 1];

        let gz_images = dir.path().join("img.gz");
        let gz_labels = dir.path().join("lab.gz");
        write_images_gz(&gz_images, n, h, w, &pixels).unwrap();
        write_labels_gz(&gz_labels, &labels).unwrap();
        assert!(is_gzip(&std::fs::read(&gz_images).unwrap()));

        // Plain files whose names end in .gz: detection is by content, not by name.
        let plain_images = dir.path().join("img-plain.gz");
        let plain_labels = dir.path().join("lab-plain");
        std::fs::write(&plain_images, encode_images(n, h, w, &pixels).unwrap()).unwrap();
        std::fs::write(&plain_labels, encode_labels(&labels).unwrap()).unwrap();

        for (ip, lp) in [(&gz_images, &gz_labels), (&plain_images, &plain_labels)] {
            let images = read_images(ip).unwrap();
            assert_eq!(
                images,
                IdxImages {
                    count: n,
                    height: h,
                    width: w,
                    pixels: pixels.clone()
                }
            );
            assert_eq!(read_labels(lp).unwrap(), labels);
        }
    }

    #[test]
    fn gzip_output_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_labels_gz(&a, &[1, 2, 3]).unwrap();
        write_labels_gz(&b, &[1, 2, 3]).unwrap();
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }

    #[test]
    fn truncated_file_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        let (n, h, w, pixels) = sample_images();
        let mut bytes = encode_images(n, h, w, &pixels).unwrap();
        bytes.truncate(bytes.len() - 7);
        for (name, gz) in [("t-plain", false), ("t.gz", true)] {
            let path = dir.path().join(name);
            if gz {
                write_gz(&path, &bytes).unwrap();
            } else {
                std::fs::write(&path, &bytes).unwrap();
            }
            let err = read_images(&path).unwrap_err();
            assert!(
                matches!(
                    err,
                    DataError::Truncated {
                        expected: 76,
                        actual: 69,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_names(&err, &path);
        }
        // Cut inside the header.
        let path = dir.path().join("short-header");
        std::fs::write(&path, &bytes[..9]).unwrap();
        let err = read_images(&path).unwrap_err();
        assert!(matches!(
            err,
            DataError::Truncated {
                expected: 16,
                actual: 9,
                ..
            }
        ));
        assert_names(&err, &path);
        let path = dir.path().join("tiny");
        std::fs::write(&path, [0u8, 0]).unwrap();
        let err = read_labels(&path).unwrap_err();
        assert!(matches!(
            err,
            DataError::Truncated {
                expected: 4,
                actual: 2,
                ..
            }
        ));
        assert_names(&err, &path);
    }

    #[test]
    fn wrong_magic_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels-given-as-images.gz");
        write_labels_gz(&path, &[1, 2, 3]).unwrap();
        let err = read_images(&path).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::BadMagic {
                    expected: IMAGES_MAGIC,
                    found: LABELS_MAGIC,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_names(&err, &path);
        assert!(err.to_string().contains("0x00000801"));
    }

    #[test]
    fn trailing_bytes_are_a_dimension_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trailing");
        let mut bytes = encode_labels(&[1, 2, 3]).unwrap();
        bytes.push(0);
        std::fs::write(&path, &bytes).unwrap();
        let err = read_labels(&path).unwrap_err();
        assert!(matches!(err, DataError::Dimensions { .. }), "{err:?}");
        assert_names(&err, &path);
    }

    #[test]
    fn absurd_header_is_refused_without_allocating() {
        let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
        for _ in 0..3 {
            bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        let path = Path::new("huge-header");
        let err = decode_images(path, &bytes).unwrap_err();
        assert!(matches!(err, DataError::Dimensions { .. }), "{err:?}");
        // Large but under the limit: truncated, not an allocation failure.
        let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
        for d in [60_000u32, 100, 100] {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        let err = decode_images(path, &bytes).unwrap_err();
        assert!(matches!(err, DataError::Truncated { .. }), "{err:?}");
    }

    #[test]
    fn corrupt_gzip_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.gz");
        let (n, h, w, pixels) = sample_images();
        write_images_gz(&good, n, h, w, &pixels).unwrap();
        let bytes = std::fs::read(&good).unwrap();

        // Garbage after the gzip magic.
        let garbage = dir.path().join("garbage.gz");
        let mut g = GZIP_MAGIC.to_vec();
        g.extend_from_slice(b"this is not deflate data at all");
        std::fs::write(&garbage, &g).unwrap();
        // A stream cut in half.
        let cut = dir.path().join("cut.gz");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        // A flipped byte in the compressed body (caught by deflate or the CRC).
        let flipped = dir.path().join("flipped.gz");
        let mut f = bytes.clone();
        let mid = f.len() / 2;
        f[mid] ^= 0xff;
        std::fs::write(&flipped, &f).unwrap();

        for path in [garbage, cut, flipped] {
            let err = read_images(&path).unwrap_err();
            assert!(matches!(err, DataError::Gzip { .. }), "{path:?}: {err:?}");
            assert_names(&err, &path);
        }
    }

    #[test]
    fn missing_file_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.gz");
        let err = read_labels(&path).unwrap_err();
        assert!(matches!(err, DataError::MissingFile { .. }), "{err:?}");
        assert_names(&err, &path);
    }

    #[test]
    fn encode_checks_lengths() {
        assert!(matches!(
            encode_images(2, 2, 2, &[0; 7]),
            Err(DataError::InvalidArgument(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let p = Path::new("arbitrary");
            let _ = decode_images(p, &bytes);
            let _ = decode_labels(p, &bytes);
            let mut gz = GZIP_MAGIC.to_vec();
            gz.extend_from_slice(&bytes);
            let _ = decode_images(p, &gz);
            let _ = decode_labels(p, &gz);
        }

        #[test]
        fn arbitrary_payload_after_valid_header_never_panics(
            dims in proptest::collection::vec(0u32..6, 3),
            tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
            for d in &dims {
                bytes.extend_from_slice(&d.to_be_bytes());
            }
            bytes.extend_from_slice(&tail);
            let p = Path::new("arbitrary");
            match decode_images(p, &bytes) {
                Ok(img) => prop_assert_eq!(img.pixels.len(), img.count * img.height * img.width),
                Err(e) => prop_assert!(e.to_string().contains("arbitrary")),
            }
        }
    }
}
