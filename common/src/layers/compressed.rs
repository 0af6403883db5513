//! The compressed copy of a masked weight that the sparse kernels read, shared by the conv and
//! linear layers.

use super::conv::weight_slice;
use crate::Result;
use crate::kernels::sparse::SparseWeight;
use crate::mask::Mask;
use crate::param::Param;

/// Brings `compressed` up to date with `weight`'s values and mask as a `rows × cols` matrix
/// (all entries if the mask was removed since the forward pass).
pub(super) fn sync(
    weight: &Param,
    compressed: &mut Option<SparseWeight>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let values = weight_slice(weight)?;
    let all;
    let mask = match weight.mask() {
        Some(m) => m,
        None => {
            all = Mask::ones(values.len());
            &all
        }
    };
    SparseWeight::sync(compressed, values, mask, rows, cols)
}

/// Puts `weight` where the sparse kernels want it: lean storage when allowed (then no
/// compressed copy is kept), else `compressed` synced with the dense values. Returns whether
/// the weight is lean.
pub(super) fn prepare(
    weight: &mut Param,
    compressed: &mut Option<SparseWeight>,
    rows: usize,
    cols: usize,
) -> Result<bool> {
    weight.follow_kernels(true)?;
    let lean = weight.is_lean();
    if lean {
        *compressed = None;
    } else {
        sync(weight, compressed, rows, cols)?;
    }
    Ok(lean)
}
