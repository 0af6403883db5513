//! Tensor and mask encodings for the wire.
//!
//! The wire cost rules:
//! - Masks are shared state with a version ([`MaskSet`]); they travel only when they change, each
//!   as the smaller of a bitmap (`⌈n/8⌉` bytes) and a list of active indices (`4a` bytes).
//! - A masked tensor travels as its active values in mask order, with no indices
//!   ([`Encoding::MaskOrder`], `4a` bytes): the receiver already holds the mask.
//! - Any other tensor travels as the smallest of dense (`4n` bytes), bitmap + values
//!   (`⌈n/8⌉ + 4a` bytes) and indices + values (`8a` bytes), where `a` counts its non-zero values.
//!   Ties go to dense, then to bitmap + values.
//! - Sparse lists (top-K gradients, PruneFL's importance of all pruned positions) travel as
//!   (index, value) pairs, or as a bitmap of the listed positions + values when that is smaller
//!   ([`encode_sparse`], [`decode_sparse`]).
//!
//! Byte layouts: values are little-endian `f32`; bitmaps are packed LSB-first (bit `k` of byte `j`
//! is element `8j + k`) and have no bits set past the element count; indices are little-endian
//! `u32`, strictly ascending.
//!
//! Decisions:
//! - "Non-zero" means "not bit-for-bit `+0.0`", so `-0.0` survives a round trip exactly.
//! - Encoders refuse non-finite values and shapes that disagree with the value count.
//! - A masked tensor sends only its active positions; whatever it holds elsewhere is dropped and
//!   decodes as `0.0` (a masked tensor holds zeros there by invariant, see
//!   [`Param`](crate::param::Param)).
//! - Decoders trust nothing: every length, count, index, bit and value is checked against the
//!   encoding and the [`Limits`], and every problem is a [`CodecError`] naming the tensor. A
//!   decoded sparse tensor is allocated densely, so the limits also bound the memory a small
//!   message can make the receiver allocate.
//! - [`decode_state`] is strict about masks: a tensor named in the mask set must come in mask
//!   order, a mask-order tensor needs a mask, and every mask must name a tensor of the state.

use std::collections::BTreeMap;

use crate::mask::{Mask, MaskSet};
use crate::param::Role;
use crate::state::{StateDict, StateEntry};

/// How a tensor's values travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Every value, in row-major order (`4n` bytes).
    Dense,
    /// A bitmap of the non-zero positions, then their values (`⌈n/8⌉ + 4a` bytes).
    BitmapValues,
    /// The non-zero positions as ascending `u32` indices, then their values (`8a` bytes).
    IndexValues,
    /// The values at the active positions of a mask both sides hold, ascending (`4a` bytes).
    MaskOrder,
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encoding::Dense => "dense",
            Encoding::BitmapValues => "bitmap+values",
            Encoding::IndexValues => "index+values",
            Encoding::MaskOrder => "mask-order",
        })
    }
}

/// One tensor as it travels. Which byte fields are used depends on the [`Encoding`]; the others
/// are empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedTensor {
    /// The tensor's dotted name.
    pub name: String,
    /// What the tensor is.
    pub role: Role,
    /// Whether pruning may mask it.
    pub prunable: bool,
    /// Its shape.
    pub shape: Vec<usize>,
    /// How the values travel.
    pub encoding: Encoding,
    /// The transmitted values, little-endian `f32`.
    pub values: Vec<u8>,
    /// For [`Encoding::BitmapValues`]: the non-zero positions, packed LSB-first.
    pub bitmap: Vec<u8>,
    /// For [`Encoding::IndexValues`]: the non-zero positions, little-endian `u32`, ascending.
    pub indices: Vec<u8>,
}

/// How a mask travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MaskEncoding {
    /// Packed bits, LSB-first (`⌈n/8⌉` bytes).
    Bitmap,
    /// The active positions, little-endian `u32`, ascending (`4a` bytes).
    Indices,
}

impl std::fmt::Display for MaskEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaskEncoding::Bitmap => "bitmap",
            MaskEncoding::Indices => "indices",
        })
    }
}

/// One mask as it travels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedMask {
    /// The dotted name of the masked tensor.
    pub name: String,
    /// Number of elements the mask covers.
    pub len: usize,
    /// How `bytes` encode the active positions.
    pub encoding: MaskEncoding,
    /// The encoded mask.
    pub bytes: Vec<u8>,
}

/// A mask set as it travels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedMaskSet {
    /// The set's version.
    pub version: u64,
    /// The masks, ordered by name.
    pub masks: Vec<EncodedMask>,
}

/// Upper bounds a decoder enforces before allocating anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest element count of one tensor or mask.
    pub max_elements_per_tensor: usize,
    /// Most tensors in one state, or masks in one set.
    pub max_tensors: usize,
    /// Most elements across all tensors of one state, or all masks of one set.
    pub max_total_elements: usize,
}

impl Default for Limits {
    /// 64 Mi elements per tensor, 4096 tensors, 256 Mi elements (1 GiB of `f32`) in total.
    fn default() -> Self {
        Limits {
            max_elements_per_tensor: 64 << 20,
            max_tensors: 4096,
            max_total_elements: 256 << 20,
        }
    }
}

/// Why a tensor or mask could not be encoded or decoded. Every variant but
/// [`CodecError::TooManyTensors`] names the tensor (or the masked tensor) concerned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The shape's element count overflows or exceeds [`Limits::max_elements_per_tensor`].
    #[error("tensor `{tensor}`: shape {shape:?} exceeds the limit of {limit} elements")]
    TooLarge {
        /// The tensor.
        tensor: String,
        /// Its claimed shape (for a mask, its length).
        shape: Vec<usize>,
        /// The limit.
        limit: usize,
    },
    /// The elements of a state or mask set exceed [`Limits::max_total_elements`].
    #[error("tensor `{tensor}` brings the total to more than {limit} elements")]
    TotalTooLarge {
        /// The tensor that crossed the limit.
        tensor: String,
        /// The limit.
        limit: usize,
    },
    /// A state or mask set has more entries than [`Limits::max_tensors`].
    #[error("{count} tensors exceed the limit of {limit}")]
    TooManyTensors {
        /// Entries received.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// An entry to encode has a value count that disagrees with its shape.
    #[error("tensor `{tensor}`: shape {shape:?} needs {expected} values, the entry has {actual}")]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The element count of the shape.
        expected: usize,
        /// The values present.
        actual: usize,
    },
    /// A byte field of 4-byte items has a length that is not a multiple of 4.
    #[error("tensor `{tensor}`: {field} has {len} bytes, not a multiple of 4")]
    Misaligned {
        /// The tensor.
        tensor: String,
        /// `"values"` or `"indices"`.
        field: &'static str,
        /// The byte length found.
        len: usize,
    },
    /// The number of values disagrees with what the encoding implies.
    #[error("tensor `{tensor}`: the {encoding} encoding implies {expected} values, got {actual}")]
    ValueCount {
        /// The tensor.
        tensor: String,
        /// Its encoding.
        encoding: Encoding,
        /// Values implied by the shape, bitmap popcount, index count or mask.
        expected: usize,
        /// Values present.
        actual: usize,
    },
    /// A bitmap does not have `⌈n/8⌉` bytes.
    #[error(
        "tensor `{tensor}`: a bitmap of {elements} elements has {expected} bytes, got {actual}"
    )]
    BitmapLength {
        /// The tensor.
        tensor: String,
        /// Elements covered.
        elements: usize,
        /// `⌈elements/8⌉`.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// A bitmap has bits set past its element count.
    #[error("tensor `{tensor}`: bitmap has bits set past its {elements} elements")]
    StrayBits {
        /// The tensor.
        tensor: String,
        /// Elements covered.
        elements: usize,
    },
    /// A byte field the encoding does not use is not empty.
    #[error("tensor `{tensor}`: the {encoding} encoding does not use {field}, got {len} bytes")]
    UnexpectedField {
        /// The tensor.
        tensor: String,
        /// Its encoding.
        encoding: Encoding,
        /// `"bitmap"` or `"indices"`.
        field: &'static str,
        /// Bytes present.
        len: usize,
    },
    /// An index is not below the element count.
    #[error("tensor `{tensor}`: index {index} out of range for {elements} elements")]
    IndexOutOfRange {
        /// The tensor.
        tensor: String,
        /// The offending index.
        index: u64,
        /// Elements covered.
        elements: usize,
    },
    /// Indices are not strictly ascending.
    #[error("tensor `{tensor}`: index {index} at position {position} follows {previous}")]
    IndicesNotAscending {
        /// The tensor.
        tensor: String,
        /// Position of the offending index in the list.
        position: usize,
        /// The index before it.
        previous: u32,
        /// The offending index.
        index: u32,
    },
    /// A top-K list names an index twice.
    #[error("tensor `{tensor}`: index {index} appears twice")]
    DuplicateIndex {
        /// The tensor.
        tensor: String,
        /// The repeated index.
        index: u32,
    },
    /// A value is NaN or infinite.
    #[error("tensor `{tensor}`: non-finite value at element {position}")]
    NonFinite {
        /// The tensor.
        tensor: String,
        /// Element index (in the tensor) of the first non-finite value.
        position: usize,
    },
    /// A mask-order tensor arrived without a mask.
    #[error("tensor `{tensor}` is in mask order but no mask is held for it")]
    MissingMask {
        /// The tensor.
        tensor: String,
    },
    /// A mask's length differs from the tensor's element count.
    #[error("tensor `{tensor}` has {elements} elements, its mask {mask_len}")]
    MaskLength {
        /// The tensor.
        tensor: String,
        /// Elements of the tensor.
        elements: usize,
        /// Elements of the mask.
        mask_len: usize,
    },
    /// A tensor came in an encoding other than the one required.
    #[error("tensor `{tensor}` must be {expected}, got {actual}")]
    WrongEncoding {
        /// The tensor.
        tensor: String,
        /// The encoding required (mask order for a masked tensor, index+values for a top-K list).
        expected: Encoding,
        /// The encoding received.
        actual: Encoding,
    },
    /// A mask set names a tensor that the state does not have.
    #[error("a mask names tensor `{tensor}`, which the state does not have")]
    MaskWithoutTensor {
        /// The masked tensor's name.
        tensor: String,
    },
    /// Two tensors of a state have the same name.
    #[error("tensor `{tensor}` appears twice")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
    },
    /// Two masks of a set have the same name.
    #[error("the mask of `{tensor}` appears twice")]
    DuplicateMask {
        /// The masked tensor.
        tensor: String,
    },
}

/// Shorthand for results of this module.
pub type Result<T, E = CodecError> = std::result::Result<T, E>;

/// Payload bytes of an encoded tensor (values, bitmap and indices; names and shapes excluded).
pub fn wire_bytes(t: &EncodedTensor) -> usize {
    t.values.len() + t.bitmap.len() + t.indices.len()
}

/// Payload bytes of an encoded mask (its bitmap or indices; the name excluded).
pub fn mask_wire_bytes(m: &EncodedMask) -> usize {
    m.bytes.len()
}

/// Encodes one tensor. With `shared_mask`, as [`Encoding::MaskOrder`] (the mask must have the
/// tensor's element count); otherwise as the smallest of dense, bitmap + values and
/// index + values for its non-zero values (ties to dense).
pub fn encode_tensor(
    name: &str,
    entry: &StateEntry,
    shared_mask: Option<&Mask>,
) -> Result<EncodedTensor> {
    let n = checked_count(&entry.shape).ok_or_else(|| CodecError::TooLarge {
        tensor: name.to_string(),
        shape: entry.shape.clone(),
        limit: usize::MAX,
    })?;
    if n != entry.values.len() {
        return Err(CodecError::ShapeMismatch {
            tensor: name.to_string(),
            shape: entry.shape.clone(),
            expected: n,
            actual: entry.values.len(),
        });
    }
    if let Some(position) = entry.values.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::NonFinite {
            tensor: name.to_string(),
            position,
        });
    }
    let mut out = EncodedTensor {
        name: name.to_string(),
        role: entry.role,
        prunable: entry.prunable,
        shape: entry.shape.clone(),
        encoding: Encoding::Dense,
        values: Vec::new(),
        bitmap: Vec::new(),
        indices: Vec::new(),
    };
    if let Some(mask) = shared_mask {
        if mask.len() != n {
            return Err(CodecError::MaskLength {
                tensor: name.to_string(),
                elements: n,
                mask_len: mask.len(),
            });
        }
        out.encoding = Encoding::MaskOrder;
        out.values = Vec::with_capacity(4 * mask.active());
        for i in mask.iter_active() {
            out.values
                .extend_from_slice(&entry.values.get(i).copied().unwrap_or(0.0).to_le_bytes());
        }
        return Ok(out);
    }
    let active = entry.values.iter().filter(|v| is_nonzero(**v)).count();
    out.encoding = smallest_encoding(n, active);
    match out.encoding {
        Encoding::Dense => out.values = f32_bytes(entry.values.iter().copied()),
        Encoding::BitmapValues => {
            out.bitmap = vec![0u8; n.div_ceil(8)];
            for (i, v) in entry.values.iter().enumerate() {
                if is_nonzero(*v)
                    && let Some(b) = out.bitmap.get_mut(i / 8)
                {
                    *b |= 1 << (i % 8);
                }
            }
            out.values = f32_bytes(entry.values.iter().copied().filter(|v| is_nonzero(*v)));
        }
        Encoding::IndexValues | Encoding::MaskOrder => {
            // `smallest_encoding` picks IndexValues only when every index fits in a u32.
            out.encoding = Encoding::IndexValues;
            out.indices = Vec::with_capacity(4 * active);
            out.values = Vec::with_capacity(4 * active);
            for (i, v) in entry.values.iter().enumerate() {
                if is_nonzero(*v) {
                    out.indices.extend_from_slice(&(i as u32).to_le_bytes());
                    out.values.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    Ok(out)
}

/// The encoding [`encode_tensor`] picks without a mask for `n` elements of which `active` are
/// non-zero: the smallest on the wire, ties to dense, then bitmap + values.
pub fn smallest_encoding(n: usize, active: usize) -> Encoding {
    let dense = n.saturating_mul(4);
    let bitmap = n.div_ceil(8).saturating_add(active.saturating_mul(4));
    let index = active.saturating_mul(8);
    let indices_fit = n <= u32::MAX as usize + 1;
    if dense <= bitmap && (dense <= index || !indices_fit) {
        Encoding::Dense
    } else if bitmap <= index || !indices_fit {
        Encoding::BitmapValues
    } else {
        Encoding::IndexValues
    }
}

/// Decodes one tensor, validating it completely (see the module docs). `shared_mask` is the mask
/// a [`Encoding::MaskOrder`] tensor was encoded against; other encodings ignore it. Positions that
/// were not sent decode to `0.0`.
pub fn decode_tensor(
    t: &EncodedTensor,
    shared_mask: Option<&Mask>,
    limits: &Limits,
) -> Result<(String, StateEntry)> {
    let n = element_count(&t.name, &t.shape, limits)?;
    let values = match t.encoding {
        Encoding::Dense => {
            expect_empty(t, "bitmap", &t.bitmap)?;
            expect_empty(t, "indices", &t.indices)?;
            expect_values(t, n)?;
            let mut out = Vec::with_capacity(n);
            for (position, v) in f32s(&t.values).enumerate() {
                check_finite(&t.name, position, v)?;
                out.push(v);
            }
            out
        }
        Encoding::BitmapValues => {
            expect_empty(t, "indices", &t.indices)?;
            let words = words_from_bitmap(&t.name, &t.bitmap, n)?;
            let active = words.iter().map(|w| w.count_ones() as usize).sum();
            expect_values(t, active)?;
            scatter(&t.name, n, bit_positions(&words), &t.values)?
        }
        Encoding::IndexValues => {
            expect_empty(t, "bitmap", &t.bitmap)?;
            let indices = read_indices(&t.name, &t.indices, n)?;
            expect_values(t, indices.len())?;
            scatter(&t.name, n, indices.into_iter(), &t.values)?
        }
        Encoding::MaskOrder => {
            expect_empty(t, "bitmap", &t.bitmap)?;
            expect_empty(t, "indices", &t.indices)?;
            let mask = shared_mask.ok_or_else(|| CodecError::MissingMask {
                tensor: t.name.clone(),
            })?;
            if mask.len() != n {
                return Err(CodecError::MaskLength {
                    tensor: t.name.clone(),
                    elements: n,
                    mask_len: mask.len(),
                });
            }
            expect_values(t, mask.active())?;
            scatter(&t.name, n, mask.iter_active(), &t.values)?
        }
    };
    Ok((
        t.name.clone(),
        StateEntry {
            role: t.role,
            prunable: t.prunable,
            shape: t.shape.clone(),
            values,
        },
    ))
}

/// Encodes a whole state: tensors with a mask in `masks` in mask order, the others as the
/// smallest encoding. Fails if a mask names a tensor the state does not have.
pub fn encode_state(state: &StateDict, masks: Option<&MaskSet>) -> Result<Vec<EncodedTensor>> {
    if let Some(set) = masks
        && let Some(name) = set.masks.keys().find(|k| !state.entries.contains_key(*k))
    {
        return Err(CodecError::MaskWithoutTensor {
            tensor: name.clone(),
        });
    }
    state
        .entries
        .iter()
        .map(|(name, entry)| encode_tensor(name, entry, masks.and_then(|m| m.get(name))))
        .collect()
}

/// Decodes a whole state. Tensors named in `masks` must be in mask order against their mask;
/// every mask must name a tensor of the state; names must be unique; the counts must be within
/// `limits`.
pub fn decode_state(
    tensors: &[EncodedTensor],
    masks: Option<&MaskSet>,
    limits: &Limits,
) -> Result<StateDict> {
    if tensors.len() > limits.max_tensors {
        return Err(CodecError::TooManyTensors {
            count: tensors.len(),
            limit: limits.max_tensors,
        });
    }
    let mut state = StateDict::default();
    let mut total = 0usize;
    for t in tensors {
        let n = element_count(&t.name, &t.shape, limits)?;
        total = add_total(&t.name, total, n, limits)?;
        if state.entries.contains_key(&t.name) {
            return Err(CodecError::DuplicateTensor {
                tensor: t.name.clone(),
            });
        }
        let mask = masks.and_then(|m| m.get(&t.name));
        if mask.is_some() && t.encoding != Encoding::MaskOrder {
            return Err(CodecError::WrongEncoding {
                tensor: t.name.clone(),
                expected: Encoding::MaskOrder,
                actual: t.encoding,
            });
        }
        let (name, entry) = decode_tensor(t, mask, limits)?;
        state.entries.insert(name, entry);
    }
    if let Some(set) = masks
        && let Some(name) = set.masks.keys().find(|k| !state.entries.contains_key(*k))
    {
        return Err(CodecError::MaskWithoutTensor {
            tensor: name.clone(),
        });
    }
    Ok(state)
}

/// Encodes a mask set, each mask as the smaller of a bitmap and an index list (ties to the
/// bitmap).
pub fn encode_masks(masks: &MaskSet) -> EncodedMaskSet {
    EncodedMaskSet {
        version: masks.version,
        masks: masks
            .masks
            .iter()
            .map(|(name, m)| encode_mask(name, m))
            .collect(),
    }
}

/// Encodes one mask as the smaller of a bitmap and an index list (ties to the bitmap).
pub fn encode_mask(name: &str, mask: &Mask) -> EncodedMask {
    let n = mask.len();
    let indices_fit = n <= u32::MAX as usize + 1;
    let bitmap_bytes = n.div_ceil(8);
    if indices_fit && mask.active().saturating_mul(4) < bitmap_bytes {
        let mut bytes = Vec::with_capacity(4 * mask.active());
        for i in mask.iter_active() {
            bytes.extend_from_slice(&(i as u32).to_le_bytes());
        }
        EncodedMask {
            name: name.to_string(),
            len: n,
            encoding: MaskEncoding::Indices,
            bytes,
        }
    } else {
        let mut bytes: Vec<u8> = mask.words().iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes.truncate(bitmap_bytes);
        EncodedMask {
            name: name.to_string(),
            len: n,
            encoding: MaskEncoding::Bitmap,
            bytes,
        }
    }
}

/// Decodes a mask set, validating every mask (see the module docs) and the counts against
/// `limits`. Names must be unique.
pub fn decode_masks(m: &EncodedMaskSet, limits: &Limits) -> Result<MaskSet> {
    if m.masks.len() > limits.max_tensors {
        return Err(CodecError::TooManyTensors {
            count: m.masks.len(),
            limit: limits.max_tensors,
        });
    }
    let mut masks = BTreeMap::new();
    let mut total = 0usize;
    for em in &m.masks {
        total = add_total(&em.name, total, em.len, limits)?;
        if masks.contains_key(&em.name) {
            return Err(CodecError::DuplicateMask {
                tensor: em.name.clone(),
            });
        }
        let mask = decode_mask(em, limits)?;
        masks.insert(em.name.clone(), mask);
    }
    Ok(MaskSet {
        masks,
        version: m.version,
    })
}

/// Decodes one mask, validating its length, bytes and indices.
pub fn decode_mask(em: &EncodedMask, limits: &Limits) -> Result<Mask> {
    let n = element_count(&em.name, &[em.len], limits)?;
    let words = match em.encoding {
        MaskEncoding::Bitmap => words_from_bitmap(&em.name, &em.bytes, n)?,
        MaskEncoding::Indices => {
            let mut words = vec![0u64; n.div_ceil(64)];
            for i in read_indices(&em.name, &em.bytes, n)? {
                if let Some(w) = words.get_mut(i / 64) {
                    *w |= 1 << (i % 64);
                }
            }
            words
        }
    };
    // The words are validated above; `from_words` re-checks them cheaply.
    Mask::from_words(n, words).map_err(|_| CodecError::StrayBits {
        tensor: em.name.clone(),
        elements: n,
    })
}

/// Encodes a sparse list of (index, value) pairs (a top-K list, or a whole tensor's pruned part)
/// for a tensor of shape `shape`, as [`Encoding::IndexValues`] (`8a` bytes) or, when smaller,
/// [`Encoding::BitmapValues`] (`n/8 + 4a` bytes; the bitmap marks the listed positions, zero
/// values included). The pairs may come in any order; indices must be unique and in range,
/// values finite.
pub fn encode_sparse(
    name: &str,
    role: Role,
    prunable: bool,
    shape: &[usize],
    pairs: &[(u32, f32)],
) -> Result<EncodedTensor> {
    let n = checked_count(shape).ok_or_else(|| CodecError::TooLarge {
        tensor: name.to_string(),
        shape: shape.to_vec(),
        limit: usize::MAX,
    })?;
    let mut sorted = pairs.to_vec();
    sorted.sort_by_key(|&(i, _)| i);
    let bitmap = n.div_ceil(8) < 4 * sorted.len();
    let mut out = EncodedTensor {
        name: name.to_string(),
        role,
        prunable,
        shape: shape.to_vec(),
        encoding: if bitmap {
            Encoding::BitmapValues
        } else {
            Encoding::IndexValues
        },
        values: Vec::with_capacity(4 * sorted.len()),
        bitmap: if bitmap {
            vec![0u8; n.div_ceil(8)]
        } else {
            Vec::new()
        },
        indices: Vec::with_capacity(if bitmap { 0 } else { 4 * sorted.len() }),
    };
    let mut previous = None;
    for &(i, v) in &sorted {
        if i as usize >= n {
            return Err(CodecError::IndexOutOfRange {
                tensor: name.to_string(),
                index: u64::from(i),
                elements: n,
            });
        }
        if previous == Some(i) {
            return Err(CodecError::DuplicateIndex {
                tensor: name.to_string(),
                index: i,
            });
        }
        check_finite(name, i as usize, v)?;
        previous = Some(i);
        if bitmap {
            if let Some(b) = out.bitmap.get_mut(i as usize / 8) {
                *b |= 1 << (i % 8);
            }
        } else {
            out.indices.extend_from_slice(&i.to_le_bytes());
        }
        out.values.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Decodes a list encoded by [`encode_sparse`] into ascending (index, value) pairs, validating it
/// like [`decode_tensor`] (which would instead densify it).
pub fn decode_sparse(t: &EncodedTensor, limits: &Limits) -> Result<Vec<(u32, f32)>> {
    let n = element_count(&t.name, &t.shape, limits)?;
    let indices: Vec<usize> = match t.encoding {
        Encoding::IndexValues => {
            expect_empty(t, "bitmap", &t.bitmap)?;
            read_indices(&t.name, &t.indices, n)?
        }
        Encoding::BitmapValues => {
            expect_empty(t, "indices", &t.indices)?;
            bit_positions(&words_from_bitmap(&t.name, &t.bitmap, n)?).collect()
        }
        other => {
            return Err(CodecError::WrongEncoding {
                tensor: t.name.clone(),
                expected: Encoding::IndexValues,
                actual: other,
            });
        }
    };
    expect_values(t, indices.len())?;
    let mut out = Vec::with_capacity(indices.len());
    for (i, v) in indices.into_iter().zip(f32s(&t.values)) {
        check_finite(&t.name, i, v)?;
        // Both readers checked i < n, and n ≤ 2^32 whenever the indices are u32.
        out.push((i as u32, v));
    }
    Ok(out)
}

/// Whether a value has to travel: anything but `+0.0` (so `-0.0` round-trips exactly).
fn is_nonzero(v: f32) -> bool {
    v.to_bits() != 0
}

fn checked_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The element count of a shape, overflow-checked and within the per-tensor limit.
fn element_count(name: &str, shape: &[usize], limits: &Limits) -> Result<usize> {
    match checked_count(shape) {
        Some(n) if n <= limits.max_elements_per_tensor => Ok(n),
        _ => Err(CodecError::TooLarge {
            tensor: name.to_string(),
            shape: shape.to_vec(),
            limit: limits.max_elements_per_tensor,
        }),
    }
}

fn add_total(name: &str, total: usize, n: usize, limits: &Limits) -> Result<usize> {
    match total.checked_add(n) {
        Some(t) if t <= limits.max_total_elements => Ok(t),
        _ => Err(CodecError::TotalTooLarge {
            tensor: name.to_string(),
            limit: limits.max_total_elements,
        }),
    }
}

fn expect_empty(t: &EncodedTensor, field: &'static str, bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(CodecError::UnexpectedField {
            tensor: t.name.clone(),
            encoding: t.encoding,
            field,
            len: bytes.len(),
        })
    }
}

/// Checks that `t.values` holds exactly `expected` little-endian `f32`s.
fn expect_values(t: &EncodedTensor, expected: usize) -> Result<()> {
    if !t.values.len().is_multiple_of(4) {
        return Err(CodecError::Misaligned {
            tensor: t.name.clone(),
            field: "values",
            len: t.values.len(),
        });
    }
    let actual = t.values.len() / 4;
    if actual != expected {
        return Err(CodecError::ValueCount {
            tensor: t.name.clone(),
            encoding: t.encoding,
            expected,
            actual,
        });
    }
    Ok(())
}

fn check_finite(name: &str, position: usize, v: f32) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(CodecError::NonFinite {
            tensor: name.to_string(),
            position,
        })
    }
}

fn f32_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// A zero tensor of `n` elements with `values` written at `positions` (all `< n`, as many as
/// values), every value checked to be finite.
fn scatter(
    name: &str,
    n: usize,
    positions: impl Iterator<Item = usize>,
    values: &[u8],
) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; n];
    for (i, v) in positions.zip(f32s(values)) {
        check_finite(name, i, v)?;
        if let Some(slot) = out.get_mut(i) {
            *slot = v;
        }
    }
    Ok(out)
}

/// Packed words from an LSB-first bitmap of exactly `⌈n/8⌉` bytes with no bits past `n`.
fn words_from_bitmap(name: &str, bytes: &[u8], n: usize) -> Result<Vec<u64>> {
    let expected = n.div_ceil(8);
    if bytes.len() != expected {
        return Err(CodecError::BitmapLength {
            tensor: name.to_string(),
            elements: n,
            expected,
            actual: bytes.len(),
        });
    }
    if !n.is_multiple_of(8)
        && let Some(&last) = bytes.last()
        && last >> (n % 8) != 0
    {
        return Err(CodecError::StrayBits {
            tensor: name.to_string(),
            elements: n,
        });
    }
    Ok(bytes
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect())
}

fn bit_positions(words: &[u64]) -> impl Iterator<Item = usize> + '_ {
    words.iter().enumerate().flat_map(|(wi, &w)| {
        let mut bits = w;
        std::iter::from_fn(move || {
            if bits == 0 {
                None
            } else {
                let t = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(wi * 64 + t)
            }
        })
    })
}

/// Little-endian `u32` indices, strictly ascending and below `n`.
fn read_indices(name: &str, bytes: &[u8], n: usize) -> Result<Vec<usize>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CodecError::Misaligned {
            tensor: name.to_string(),
            field: "indices",
            len: bytes.len(),
        });
    }
    let mut out = Vec::with_capacity(bytes.len() / 4);
    let mut previous: Option<u32> = None;
    for (position, c) in bytes.chunks_exact(4).enumerate() {
        let index = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if let Some(previous) = previous
            && index <= previous
        {
            return Err(CodecError::IndicesNotAscending {
                tensor: name.to_string(),
                position,
                previous,
                index,
            });
        }
        if index as usize >= n {
            return Err(CodecError::IndexOutOfRange {
                tensor: name.to_string(),
                index: u64::from(index),
                elements: n,
            });
        }
        previous = Some(index);
        out.push(index as usize);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(shape: Vec<usize>, values: Vec<f32>) -> StateEntry {
        StateEntry {
            role: Role::Weight,
            prunable: true,
            shape,
            values,
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Finite values, including `-0.0` and subnormals.
    fn finite() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(-0.0f32),
            prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO,
        ]
    }

    /// A shape (0 to 3 dims, possibly with zero dims) and values at a random density.
    fn sparse_entry() -> impl Strategy<Value = StateEntry> {
        (prop::collection::vec(0usize..12, 0..4), 0.0f64..=1.0).prop_flat_map(|(shape, p)| {
            let n: usize = shape.iter().product();
            prop::collection::vec((0.0f64..1.0, finite()), n).prop_map(move |v| {
                let values = v
                    .into_iter()
                    .map(|(u, x)| if u < p { x } else { 0.0 })
                    .collect();
                entry(shape.clone(), values)
            })
        })
    }

    fn mask_for(n: usize) -> impl Strategy<Value = Mask> {
        prop::collection::vec(any::<bool>(), n).prop_map(move |b| Mask::from_fn(n, |i| b[i]))
    }

    /// An entry and a mask of its length, the entry's inactive values zeroed.
    fn masked_entry() -> impl Strategy<Value = (StateEntry, Mask)> {
        sparse_entry().prop_flat_map(|e| {
            let n = e.values.len();
            mask_for(n).prop_map(move |m| {
                let mut e = e.clone();
                m.apply(&mut e.values);
                (e, m)
            })
        })
    }

    fn any_encoding() -> impl Strategy<Value = Encoding> {
        prop_oneof![
            Just(Encoding::Dense),
            Just(Encoding::BitmapValues),
            Just(Encoding::IndexValues),
            Just(Encoding::MaskOrder),
        ]
    }

    fn small_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..80)
    }

    fn arbitrary_tensor() -> impl Strategy<Value = EncodedTensor> {
        (
            prop::collection::vec(0usize..20, 0..3),
            any_encoding(),
            small_bytes(),
            small_bytes(),
            small_bytes(),
        )
            .prop_map(|(shape, encoding, values, bitmap, indices)| EncodedTensor {
                name: "t".into(),
                role: Role::Bias,
                prunable: false,
                shape,
                encoding,
                values,
                bitmap,
                indices,
            })
    }

    proptest! {
        #[test]
        fn unmasked_round_trip_is_identity(e in sparse_entry()) {
            let t = encode_tensor("w", &e, None).unwrap();
            let (name, back) = decode_tensor(&t, None, &Limits::default()).unwrap();
            prop_assert_eq!(name, "w");
            prop_assert_eq!(&back.shape, &e.shape);
            prop_assert_eq!(back.role, e.role);
            prop_assert_eq!(back.prunable, e.prunable);
            prop_assert_eq!(bits(&back.values), bits(&e.values));
        }

        #[test]
        fn chosen_encoding_is_the_smallest(e in sparse_entry()) {
            let n = e.values.len();
            let a = e.values.iter().filter(|v| v.to_bits() != 0).count();
            let t = encode_tensor("w", &e, None).unwrap();
            let (dense, bitmap, index) = (4 * n, n.div_ceil(8) + 4 * a, 8 * a);
            let best = dense.min(bitmap).min(index);
            prop_assert_eq!(wire_bytes(&t), best);
            let expected = if dense == best {
                Encoding::Dense
            } else if bitmap == best {
                Encoding::BitmapValues
            } else {
                Encoding::IndexValues
            };
            prop_assert_eq!(t.encoding, expected);
        }

        #[test]
        fn mask_order_round_trips_given_the_mask((e, m) in masked_entry()) {
            let t = encode_tensor("w", &e, Some(&m)).unwrap();
            prop_assert_eq!(t.encoding, Encoding::MaskOrder);
            prop_assert_eq!(t.values.len(), 4 * m.active());
            prop_assert_eq!(wire_bytes(&t), 4 * m.active());
            let (_, back) = decode_tensor(&t, Some(&m), &Limits::default()).unwrap();
            prop_assert_eq!(bits(&back.values), bits(&e.values));
            // Without the mask, the same bytes are refused.
            prop_assert!(
                matches!(decode_tensor(&t, None, &Limits::default()),
                Err(CodecError::MissingMask { .. })),
                "decoding without the mask must fail"
            );
        }

        #[test]
        fn mask_order_drops_inactive_values(e in sparse_entry()) {
            let n = e.values.len();
            let m = Mask::from_fn(n, |i| i % 3 == 0);
            let t = encode_tensor("w", &e, Some(&m)).unwrap();
            let (_, back) = decode_tensor(&t, Some(&m), &Limits::default()).unwrap();
            let mut expect = e.values.clone();
            m.apply(&mut expect);
            prop_assert_eq!(bits(&back.values), bits(&expect));
        }

        #[test]
        fn masks_round_trip_in_the_smaller_encoding(
            masks in prop::collection::vec(
                (0usize..300, 0.0f64..=1.0).prop_flat_map(|(n, p)| {
                    prop::collection::vec(0.0f64..1.0, n)
                        .prop_map(move |u| Mask::from_fn(n, |i| u[i] < p))
                }),
                0..5,
            ),
            version in any::<u64>(),
        ) {
            let set = MaskSet {
                masks: masks.into_iter().enumerate().map(|(i, m)| (format!("m{i}"), m)).collect(),
                version,
            };
            let enc = encode_masks(&set);
            for (em, m) in enc.masks.iter().zip(set.masks.values()) {
                prop_assert_eq!(mask_wire_bytes(em), (m.len().div_ceil(8)).min(4 * m.active()));
            }
            prop_assert_eq!(decode_masks(&enc, &Limits::default()).unwrap(), set);
        }

        #[test]
        fn state_round_trips_with_masks(
            entries in prop::collection::vec(masked_entry(), 0..6),
            version in any::<u64>(),
        ) {
            let mut state = StateDict::default();
            let mut set = MaskSet { version, ..MaskSet::default() };
            for (i, (e, m)) in entries.into_iter().enumerate() {
                let name = format!("layer{i}.weight");
                if i % 2 == 0 {
                    set.masks.insert(name.clone(), m);
                }
                state.entries.insert(name, e);
            }
            let enc = encode_state(&state, Some(&set)).unwrap();
            let back = decode_state(&enc, Some(&set), &Limits::default()).unwrap();
            prop_assert_eq!(back, state);
        }

        #[test]
        fn decoding_arbitrary_tensors_never_panics(
            t in arbitrary_tensor(),
            mask_bits in prop::collection::vec(any::<bool>(), 0..40),
        ) {
            let m = Mask::from_fn(mask_bits.len(), |i| mask_bits[i]);
            let limits = Limits::default();
            for mask in [None, Some(&m)] {
                if let Ok((_, e)) = decode_tensor(&t, mask, &limits) {
                    prop_assert_eq!(e.values.len(), e.shape.iter().product::<usize>());
                    prop_assert!(e.values.iter().all(|v| v.is_finite()));
                }
            }
            let _ = decode_sparse(&t, &limits);
            let _ = decode_state(std::slice::from_ref(&t), None, &limits);
        }

        #[test]
        fn decoding_arbitrary_masks_never_panics(
            len in 0usize..200,
            indices in any::<bool>(),
            bytes in small_bytes(),
        ) {
            let em = EncodedMask {
                name: "m".into(),
                len,
                encoding: if indices { MaskEncoding::Indices } else { MaskEncoding::Bitmap },
                bytes,
            };
            if let Ok(m) = decode_mask(&em, &Limits::default()) {
                prop_assert_eq!(m.len(), len);
            }
        }

        #[test]
        fn decoding_mutated_tensors_never_panics(
            e in sparse_entry(),
            field in 0usize..3,
            position in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            truncate in any::<bool>(),
        ) {
            let mut t = encode_tensor("w", &e, None).unwrap();
            let bytes = match field {
                0 => &mut t.values,
                1 => &mut t.bitmap,
                _ => &mut t.indices,
            };
            if !bytes.is_empty() {
                let i = position.index(bytes.len());
                if truncate {
                    bytes.truncate(i);
                } else {
                    bytes[i] ^= xor;
                }
            }
            if let Ok((_, back)) = decode_tensor(&t, None, &Limits::default()) {
                prop_assert_eq!(back.values.len(), e.values.len());
                prop_assert!(back.values.iter().all(|v| v.is_finite()));
            }
        }

        #[test]
        fn sparse_lists_round_trip(
            pairs in prop::collection::btree_map(0u32..500, finite(), 0..500),
        ) {
            let mut shuffled: Vec<(u32, f32)> = pairs.iter().map(|(&i, &v)| (i, v)).collect();
            shuffled.reverse();
            let t = encode_sparse("g", Role::Weight, true, &[20, 25], &shuffled).unwrap();
            // The smaller of 8 bytes per pair and a 63-byte bitmap + 4 bytes per pair.
            prop_assert_eq!(wire_bytes(&t), (8 * pairs.len()).min(63 + 4 * pairs.len()));
            let back = decode_sparse(&t, &Limits::default()).unwrap();
            let expect: Vec<(u32, u32)> = pairs.iter().map(|(&i, v)| (i, v.to_bits())).collect();
            let got: Vec<(u32, u32)> = back.iter().map(|&(i, v)| (i, v.to_bits())).collect();
            prop_assert_eq!(got, expect);
        }
    }

    fn dense(name: &str, shape: Vec<usize>, values: Vec<f32>) -> EncodedTensor {
        EncodedTensor {
            name: name.into(),
            role: Role::Weight,
            prunable: true,
            shape,
            encoding: Encoding::Dense,
            values: f32_bytes(values.into_iter()),
            bitmap: Vec::new(),
            indices: Vec::new(),
        }
    }

    fn idx_bytes(i: &[u32]) -> Vec<u8> {
        i.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn decode(t: &EncodedTensor) -> Result<(String, StateEntry)> {
        decode_tensor(t, None, &Limits::default())
    }

    #[test]
    fn shared_mask_sends_exactly_the_active_values() {
        let n = 10_000;
        for d in [0.1, 0.01] {
            let step = (1.0 / d) as usize;
            let m = Mask::from_fn(n, |i| i % step == 3);
            let a = m.active();
            assert_eq!(a, (n as f64 * d) as usize);
            let mut values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 + 1.0).collect();
            m.apply(&mut values);
            let t = encode_tensor("fc.weight", &entry(vec![100, 100], values), Some(&m)).unwrap();
            assert_eq!(t.values.len(), 4 * a);
            assert_eq!(wire_bytes(&t), 4 * a);
            // Without the mask: bitmap+values at d = 0.1, index+values (twice as large) at 0.01.
            let e = decode_tensor(&t, Some(&m), &Limits::default()).unwrap().1;
            let u = encode_tensor("fc.weight", &e, None).unwrap();
            if d > 0.05 {
                assert_eq!(u.encoding, Encoding::BitmapValues);
                assert_eq!(wire_bytes(&u), n / 8 + 4 * a);
            } else {
                assert_eq!(u.encoding, Encoding::IndexValues);
                assert_eq!(wire_bytes(&u), 8 * a);
            }
        }
    }

    #[test]
    fn encoder_refuses_bad_entries() {
        let e = entry(vec![2, 2], vec![1.0, f32::NAN, 0.0, 0.0]);
        assert!(matches!(
            encode_tensor("w", &e, None),
            Err(CodecError::NonFinite { position: 1, .. })
        ));
        let e = entry(vec![2, 3], vec![1.0; 5]);
        assert!(matches!(
            encode_tensor("w", &e, None),
            Err(CodecError::ShapeMismatch {
                expected: 6,
                actual: 5,
                ..
            })
        ));
        let e = entry(vec![4], vec![1.0; 4]);
        assert!(matches!(
            encode_tensor("w", &e, Some(&Mask::ones(5))),
            Err(CodecError::MaskLength {
                elements: 4,
                mask_len: 5,
                ..
            })
        ));
        let mut state = StateDict::default();
        state.entries.insert("a".into(), e);
        let mut set = MaskSet::default();
        set.masks.insert("b".into(), Mask::ones(4));
        assert!(matches!(
            encode_state(&state, Some(&set)),
            Err(CodecError::MaskWithoutTensor { tensor }) if tensor == "b"
        ));
        assert!(matches!(
            encode_sparse("g", Role::Weight, true, &[4], &[(1, 1.0), (1, 2.0)]),
            Err(CodecError::DuplicateIndex { index: 1, .. })
        ));
        assert!(matches!(
            encode_sparse("g", Role::Weight, true, &[4], &[(4, 1.0)]),
            Err(CodecError::IndexOutOfRange { index: 4, .. })
        ));
    }

    #[test]
    fn wrong_lengths_are_typed_errors() {
        let mut t = dense("w", vec![3], vec![1.0, 2.0, 3.0]);
        t.values.pop();
        assert!(matches!(
            decode(&t),
            Err(CodecError::Misaligned {
                field: "values",
                len: 11,
                ..
            })
        ));
        let t = dense("w", vec![3], vec![1.0, 2.0]);
        assert!(matches!(
            decode(&t),
            Err(CodecError::ValueCount {
                expected: 3,
                actual: 2,
                ..
            })
        ));
        let mut t = dense("w", vec![1], vec![1.0]);
        t.bitmap = vec![1];
        assert!(matches!(
            decode(&t),
            Err(CodecError::UnexpectedField {
                field: "bitmap",
                ..
            })
        ));
        let mut t = dense("w", vec![], vec![]);
        t.shape = vec![usize::MAX, 2];
        assert!(matches!(decode(&t), Err(CodecError::TooLarge { .. })));
        let t = dense("w", vec![10, 10], vec![0.0; 100]);
        let small = Limits {
            max_elements_per_tensor: 99,
            ..Limits::default()
        };
        assert!(matches!(
            decode_tensor(&t, None, &small),
            Err(CodecError::TooLarge { limit: 99, .. })
        ));
    }

    #[test]
    fn bitmap_errors_are_typed() {
        let base = EncodedTensor {
            encoding: Encoding::BitmapValues,
            bitmap: vec![0b0000_0101, 0b0000_0000],
            ..dense("w", vec![10], vec![1.0, 2.0])
        };
        assert_eq!(decode(&base).unwrap().1.values[..3], [1.0, 0.0, 2.0]);
        let t = EncodedTensor {
            bitmap: vec![0b101],
            ..base.clone()
        };
        assert!(matches!(
            decode(&t),
            Err(CodecError::BitmapLength {
                expected: 2,
                actual: 1,
                ..
            })
        ));
        let t = EncodedTensor {
            bitmap: vec![0b101, 0b100],
            ..base.clone()
        };
        assert!(matches!(
            decode(&t),
            Err(CodecError::StrayBits { elements: 10, .. })
        ));
        let t = EncodedTensor {
            bitmap: vec![0b111, 0],
            ..base.clone()
        };
        assert!(matches!(
            decode(&t),
            Err(CodecError::ValueCount {
                encoding: Encoding::BitmapValues,
                expected: 3,
                actual: 2,
                ..
            })
        ));
    }

    #[test]
    fn index_errors_are_typed() {
        let base = EncodedTensor {
            encoding: Encoding::IndexValues,
            indices: idx_bytes(&[1, 4]),
            ..dense("w", vec![5], vec![1.0, 2.0])
        };
        assert_eq!(decode(&base).unwrap().1.values, [0.0, 1.0, 0.0, 0.0, 2.0]);
        let t = EncodedTensor {
            indices: idx_bytes(&[1, 5]),
            ..base.clone()
        };
        assert!(matches!(
            decode(&t),
            Err(CodecError::IndexOutOfRange {
                index: 5,
                elements: 5,
                ..
            })
        ));
        let t = EncodedTensor {
            indices: idx_bytes(&[4, 1]),
            ..base.clone()
        };
        assert!(matches!(
            decode(&t),
            Err(CodecError::IndicesNotAscending {
                position: 1,
                previous: 4,
                index: 1,
                ..
            })
        ));
        let t = EncodedTensor {
            indices: idx_bytes(&[1, 1]),
            ..base.clone()
        };
        assert!(matches!(
            decode(&t),
            Err(CodecError::IndicesNotAscending { .. })
        ));
        let mut t = base.clone();
        t.indices.push(0);
        assert!(matches!(
            decode(&t),
            Err(CodecError::Misaligned {
                field: "indices",
                ..
            })
        ));
        let t = EncodedTensor {
            indices: idx_bytes(&[1]),
            ..base.clone()
        };
        assert!(matches!(decode(&t), Err(CodecError::ValueCount { .. })));
    }

    #[test]
    fn non_finite_values_are_refused() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = dense("w", vec![3], vec![1.0, 2.0, bad]);
            assert!(matches!(
                decode(&t),
                Err(CodecError::NonFinite { position: 2, .. })
            ));
            let t = EncodedTensor {
                encoding: Encoding::IndexValues,
                indices: idx_bytes(&[7]),
                ..dense("w", vec![9], vec![bad])
            };
            assert!(matches!(
                decode(&t),
                Err(CodecError::NonFinite { position: 7, .. })
            ));
            let m = Mask::from_fn(4, |i| i == 2);
            let t = EncodedTensor {
                encoding: Encoding::MaskOrder,
                ..dense("w", vec![4], vec![bad])
            };
            assert!(matches!(
                decode_tensor(&t, Some(&m), &Limits::default()),
                Err(CodecError::NonFinite { position: 2, .. })
            ));
        }
    }

    #[test]
    fn mask_order_errors_are_typed() {
        let t = EncodedTensor {
            encoding: Encoding::MaskOrder,
            ..dense("w", vec![4], vec![1.0, 2.0])
        };
        let limits = Limits::default();
        assert!(matches!(
            decode_tensor(&t, None, &limits),
            Err(CodecError::MissingMask { tensor }) if tensor == "w"
        ));
        assert!(matches!(
            decode_tensor(&t, Some(&Mask::ones(5)), &limits),
            Err(CodecError::MaskLength {
                elements: 4,
                mask_len: 5,
                ..
            })
        ));
        assert!(matches!(
            decode_tensor(&t, Some(&Mask::ones(4)), &limits),
            Err(CodecError::ValueCount {
                encoding: Encoding::MaskOrder,
                expected: 4,
                actual: 2,
                ..
            })
        ));
        let m = Mask::from_fn(4, |i| i % 2 == 1);
        assert_eq!(
            decode_tensor(&t, Some(&m), &limits).unwrap().1.values,
            [0.0, 1.0, 0.0, 2.0]
        );
    }

    #[test]
    fn state_errors_are_typed() {
        let limits = Limits::default();
        let a = dense("a", vec![2], vec![1.0, 2.0]);
        assert!(matches!(
            decode_state(&[a.clone(), a.clone()], None, &limits),
            Err(CodecError::DuplicateTensor { tensor }) if tensor == "a"
        ));
        let mut set = MaskSet::default();
        set.masks.insert("a".into(), Mask::ones(2));
        assert!(matches!(
            decode_state(std::slice::from_ref(&a), Some(&set), &limits),
            Err(CodecError::WrongEncoding {
                expected: Encoding::MaskOrder,
                actual: Encoding::Dense,
                ..
            })
        ));
        set.masks.insert("b".into(), Mask::ones(2));
        let a_masked = EncodedTensor {
            encoding: Encoding::MaskOrder,
            ..a.clone()
        };
        assert!(matches!(
            decode_state(&[a_masked], Some(&set), &limits),
            Err(CodecError::MaskWithoutTensor { tensor }) if tensor == "b"
        ));
        let few = Limits {
            max_tensors: 1,
            ..limits
        };
        let b = dense("b", vec![2], vec![1.0, 2.0]);
        assert!(matches!(
            decode_state(&[a.clone(), b.clone()], None, &few),
            Err(CodecError::TooManyTensors { count: 2, limit: 1 })
        ));
        let small_total = Limits {
            max_total_elements: 3,
            ..limits
        };
        assert!(matches!(
            decode_state(&[a, b], None, &small_total),
            Err(CodecError::TotalTooLarge { tensor, .. }) if tensor == "b"
        ));
    }

    #[test]
    fn mask_set_errors_are_typed() {
        let limits = Limits::default();
        let bitmap = |bytes: Vec<u8>, len| EncodedMask {
            name: "m".into(),
            len,
            encoding: MaskEncoding::Bitmap,
            bytes,
        };
        let indices = |i: &[u32], len| EncodedMask {
            name: "m".into(),
            len,
            encoding: MaskEncoding::Indices,
            bytes: idx_bytes(i),
        };
        assert!(matches!(
            decode_mask(&bitmap(vec![0b1000], 3), &limits),
            Err(CodecError::StrayBits { .. })
        ));
        assert!(matches!(
            decode_mask(&bitmap(vec![0, 0], 3), &limits),
            Err(CodecError::BitmapLength { .. })
        ));
        assert!(matches!(
            decode_mask(&indices(&[0, 3], 3), &limits),
            Err(CodecError::IndexOutOfRange { index: 3, .. })
        ));
        assert!(matches!(
            decode_mask(&indices(&[2, 1], 3), &limits),
            Err(CodecError::IndicesNotAscending { .. })
        ));
        assert_eq!(
            decode_mask(&indices(&[0, 2], 3), &limits).unwrap(),
            Mask::from_fn(3, |i| i != 1)
        );
        let set = EncodedMaskSet {
            version: 3,
            masks: vec![indices(&[0], 3), indices(&[1], 3)],
        };
        assert!(matches!(
            decode_masks(&set, &limits),
            Err(CodecError::DuplicateMask { tensor }) if tensor == "m"
        ));
        let huge = EncodedMaskSet {
            version: 0,
            masks: vec![indices(&[], usize::MAX)],
        };
        assert!(matches!(
            decode_masks(&huge, &limits),
            Err(CodecError::TotalTooLarge { .. })
        ));
        assert!(matches!(
            decode_mask(&indices(&[], usize::MAX), &limits),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn smallest_encoding_breaks_ties_towards_dense() {
        // n = 16, a = 8: dense 64, bitmap 2 + 32, index 64.
        assert_eq!(smallest_encoding(16, 8), Encoding::BitmapValues);
        // n = 32, a = 31: dense 128, bitmap 4 + 124, index 248 -> dense.
        assert_eq!(smallest_encoding(32, 31), Encoding::Dense);
        // n = 8, a = 8: dense 32, bitmap 33, index 64.
        assert_eq!(smallest_encoding(8, 8), Encoding::Dense);
        // n = 0: everything is 0 bytes.
        assert_eq!(smallest_encoding(0, 0), Encoding::Dense);
        // n = 64, a = 1: dense 256, bitmap 12, index 8.
        assert_eq!(smallest_encoding(64, 1), Encoding::IndexValues);
        // n = 32, a = 1: bitmap 8, index 8 -> bitmap.
        assert_eq!(smallest_encoding(32, 1), Encoding::BitmapValues);
    }
}
