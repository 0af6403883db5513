//! Where the rows of the implicit dense operand live in a packed buffer.
//!
//! The sparse kernels never see an `[M, K]` matrix. They see a packed source buffer `S` made of
//! `blocks` self-contained blocks; inside a block, row `k` of the operand is the `out_len`
//! contiguous values starting at `row_off[k]`, and the kernels vectorise along that run. Rows
//! may overlap: for a convolution, row `(ky, kx, c)` is channel `c`'s plane shifted by the tap
//! (see [`super::conv`]); for a matrix, rows are the columns of `X` one after another (see
//! [`super::matrix`]). A block is divided into `groups` regions of `group_len` values; the rows
//! of one group read (and their gradients write) only their group's region, so regions can be
//! written in parallel.
//!
//! Results `T` are `[blocks][N][out_len]`: output `j` of block `b` and column `n`.

use crate::{Error, Result};

/// A packed layout of the dense operand of a sparse product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Number of self-contained blocks (images for a convolution, row panels for a matrix).
    pub(super) blocks: usize,
    /// Regions per block.
    pub(super) groups: usize,
    /// Values per region.
    pub(super) group_len: usize,
    /// Outputs per block and weight column (the length of every row run).
    pub(super) out_len: usize,
    /// Per weight row `k`: the start of its run inside a block.
    pub(super) row_off: Vec<usize>,
    /// Per weight row `k`: the start of its run inside its group's region.
    pub(super) shift: Vec<usize>,
    /// Rows of group `g` are `group_rows[group_ptr[g]..group_ptr[g + 1]]`, in fixed order.
    pub(super) group_ptr: Vec<usize>,
    /// See `group_ptr`.
    pub(super) group_rows: Vec<u32>,
}

impl Layout {
    /// Builds a layout from each row's group and shift, checking that every run fits its region.
    pub(super) fn new(
        blocks: usize,
        groups: usize,
        group_len: usize,
        out_len: usize,
        row_group: &[usize],
        shift: Vec<usize>,
    ) -> Result<Self> {
        if row_group.len() != shift.len() {
            return Err(Error::shape("sparse layout", row_group.len(), shift.len()));
        }
        if u32::try_from(row_group.len()).is_err() {
            return Err(Error::shape(
                "sparse layout",
                "at most 2^32 rows",
                row_group.len(),
            ));
        }
        let mut group_ptr = vec![0usize; groups + 1];
        for (&g, &s) in row_group.iter().zip(&shift) {
            if g >= groups || s + out_len > group_len {
                return Err(Error::shape(
                    "sparse layout",
                    format!("group < {groups}, shift + {out_len} <= {group_len}"),
                    (g, s),
                ));
            }
            group_ptr[g + 1] += 1;
        }
        for g in 0..groups {
            group_ptr[g + 1] += group_ptr[g];
        }
        let mut next = group_ptr.clone();
        let mut group_rows = vec![0u32; row_group.len()];
        for (k, &g) in row_group.iter().enumerate() {
            group_rows[next[g]] = k as u32; // fits: checked above
            next[g] += 1;
        }
        let row_off = row_group
            .iter()
            .zip(&shift)
            .map(|(&g, &s)| g * group_len + s)
            .collect();
        Ok(Layout {
            blocks,
            groups,
            group_len,
            out_len,
            row_off,
            shift,
            group_ptr,
            group_rows,
        })
    }

    /// Rows `K` of the operand (the weight's fan-in).
    pub fn rows(&self) -> usize {
        self.row_off.len()
    }

    /// Values per block of the packed source.
    pub fn block_len(&self) -> usize {
        self.groups * self.group_len
    }

    /// Values of the packed source (and of its gradient).
    pub fn src_len(&self) -> usize {
        self.blocks * self.block_len()
    }

    /// Values of a packed result with `cols` weight columns: `[blocks][cols][out_len]`.
    pub fn out_size(&self, cols: usize) -> usize {
        self.blocks * cols * self.out_len
    }

    /// Outputs per block and column.
    pub fn out_len(&self) -> usize {
        self.out_len
    }

    /// Blocks.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub(super) fn group(&self, g: usize) -> &[u32] {
        &self.group_rows[self.group_ptr[g]..self.group_ptr[g + 1]]
    }
}

/// Rounds `n` up to a multiple of `to` (`to > 0`).
pub(super) fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_list_their_rows_and_runs_must_fit() {
        let l = Layout::new(2, 2, 10, 4, &[1, 0, 1], vec![0, 2, 6]).unwrap();
        assert_eq!(l.group(0), &[1]);
        assert_eq!(l.group(1), &[0, 2]);
        assert_eq!(l.row_off, vec![10, 2, 16]);
        assert_eq!((l.block_len(), l.src_len(), l.out_size(3)), (20, 40, 24));
        assert!(Layout::new(1, 1, 10, 4, &[0], vec![7]).is_err());
        assert!(Layout::new(1, 1, 10, 4, &[1], vec![0]).is_err());
    }
}
