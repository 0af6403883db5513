//! A masked `[K, N]` weight in compressed form, indexed both by column and by row.

use std::ops::Range;
use std::sync::Arc;

use crate::mask::Mask;
use crate::{Error, Result};

/// The active entries of a masked `[K, N]` weight (row-major, `K = fan_in`, `N = fan_out`),
/// indexed by row `k` (CSR, for the input and weight gradients) and by column `n` (CSC, for the
/// forward product).
///
/// The CSR values ([`SparseWeight::values`]) are in the mask's order (ascending dense index
/// `k·N + n`), which makes them usable as the parameter's own storage: a lean parameter
/// ([`crate::param::Param`]) keeps its values here and nowhere else. The CSC values are a copy
/// in column order that [`SparseWeight::sync_columns`] rebuilds after the values change (an
/// `O(active)` scatter); the forward product refuses to run on stale column values.
///
/// Memory per active entry: two values (CSR and CSC) and two `u32` indices (the column of each
/// CSR entry, the row of each CSC entry); plus `K + N + 2` `u32` offsets and the mask (shared
/// through an [`Arc`], not copied). The row of a CSR entry is found from the row offsets.
#[derive(Clone, Debug)]
pub struct SparseWeight {
    rows: usize,
    cols: usize,
    /// The mask the pattern was built from (shared with the parameter that owns it).
    pattern: Arc<Mask>,
    /// CSC: entries of column `n` are `col_ptr[n]..col_ptr[n + 1]`, ascending in `k`.
    pub(super) col_ptr: Vec<u32>,
    /// CSC: the row `k` of each entry.
    pub(super) col_row: Vec<u32>,
    /// CSC: the value of each entry (a copy of the CSR values, see `stale`).
    pub(super) col_val: Vec<f32>,
    /// CSR: entries of row `k` are `row_ptr[k]..row_ptr[k + 1]`, ascending in `n`.
    pub(super) row_ptr: Vec<u32>,
    /// CSR: the column `n` of each entry.
    pub(super) row_col: Vec<u32>,
    /// CSR: the value of each entry, in mask order (the canonical values).
    pub(super) row_val: Vec<f32>,
    /// True when `row_val` may have changed since `col_val` was last rebuilt.
    stale: bool,
}

impl SparseWeight {
    /// The pattern of `mask` over a row-major `[rows, cols]` matrix, with every value zero.
    pub fn pattern(mask: Arc<Mask>, rows: usize, cols: usize) -> Result<Self> {
        let len = rows
            .checked_mul(cols)
            .filter(|&l| u32::try_from(l).is_ok())
            .ok_or_else(|| Error::shape("sparse weight", "at most 2^32 elements", (rows, cols)))?;
        if mask.len() != len {
            return Err(Error::shape(
                "sparse weight",
                format!("{len} mask bits for [{rows}, {cols}]"),
                mask.len(),
            ));
        }
        let nnz = mask.active();
        let mut row_ptr = vec![0u32; rows + 1];
        let mut col_ptr = vec![0u32; cols + 1];
        let mut row_col = Vec::with_capacity(nnz);
        for i in mask.iter_active() {
            let (k, n) = (i / cols, i % cols);
            // All counts and indices fit in u32: i < rows·cols ≤ u32::MAX, checked above.
            row_ptr[k + 1] += 1;
            col_ptr[n + 1] += 1;
            row_col.push(n as u32);
        }
        for k in 0..rows {
            row_ptr[k + 1] += row_ptr[k];
        }
        for n in 0..cols {
            col_ptr[n + 1] += col_ptr[n];
        }
        // Counting sort of the CSR entries (ascending k) into columns keeps k ascending in each.
        let mut next = col_ptr.clone();
        let mut col_row = vec![0u32; nnz];
        for k in 0..rows {
            let (lo, hi) = (row_ptr[k] as usize, row_ptr[k + 1] as usize);
            for &n in &row_col[lo..hi] {
                let slot = &mut next[n as usize];
                col_row[*slot as usize] = k as u32;
                *slot += 1;
            }
        }
        Ok(SparseWeight {
            rows,
            cols,
            pattern: mask,
            col_ptr,
            col_row,
            col_val: vec![0.0; nnz],
            row_ptr,
            row_col,
            row_val: vec![0.0; nnz],
            stale: false,
        })
    }

    /// Compresses the active entries of `values` (a row-major `[rows, cols]` matrix) under `mask`.
    pub fn new(values: &[f32], mask: &Mask, rows: usize, cols: usize) -> Result<Self> {
        Self::from_dense(values, Arc::new(mask.clone()), rows, cols)
    }

    /// [`SparseWeight::new`] with a shared mask.
    pub fn from_dense(values: &[f32], mask: Arc<Mask>, rows: usize, cols: usize) -> Result<Self> {
        let mut w = Self::pattern(mask, rows, cols)?;
        w.refresh(values)?;
        Ok(w)
    }

    /// The pattern of `mask` with the given active values (in mask order).
    pub fn from_active(
        values: Vec<f32>,
        mask: Arc<Mask>,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let mut w = Self::pattern(mask, rows, cols)?;
        if values.len() != w.nnz() {
            return Err(Error::shape("sparse weight values", w.nnz(), values.len()));
        }
        w.row_val = values;
        w.stale = true;
        w.sync_columns();
        Ok(w)
    }

    /// Re-reads the values of the active entries from the dense `values` (same pattern): a
    /// gather of `active` elements, then [`SparseWeight::sync_columns`].
    pub fn refresh(&mut self, values: &[f32]) -> Result<()> {
        if values.len() != self.rows * self.cols {
            return Err(Error::shape(
                "sparse weight refresh",
                self.rows * self.cols,
                values.len(),
            ));
        }
        let cols = self.cols;
        for k in 0..self.rows {
            let (lo, hi) = (self.row_ptr[k] as usize, self.row_ptr[k + 1] as usize);
            let row = &values[k * cols..(k + 1) * cols];
            for (v, &n) in self.row_val[lo..hi].iter_mut().zip(&self.row_col[lo..hi]) {
                *v = row[n as usize];
            }
        }
        self.stale = true;
        self.sync_columns();
        Ok(())
    }

    /// Rebuilds the column-ordered copy of the values (needed by the forward product) after
    /// [`SparseWeight::values_mut`]; does nothing when it is up to date.
    pub fn sync_columns(&mut self) {
        if !self.stale {
            return;
        }
        let mut next: Vec<u32> = self.col_ptr[..self.cols].to_vec();
        for k in 0..self.rows {
            let (lo, hi) = (self.row_ptr[k] as usize, self.row_ptr[k + 1] as usize);
            for (&v, &n) in self.row_val[lo..hi].iter().zip(&self.row_col[lo..hi]) {
                let slot = &mut next[n as usize];
                self.col_val[*slot as usize] = v;
                *slot += 1;
            }
        }
        self.stale = false;
    }

    /// Brings the compressed weight up to date with `values` under `mask`: rebuilds the pattern
    /// if the mask (or the shape) differs from the one it was built from, else refreshes the
    /// values only.
    pub fn sync(
        this: &mut Option<SparseWeight>,
        values: &[f32],
        mask: &Mask,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        match this {
            Some(w) if w.rows == rows && w.cols == cols && *w.pattern == *mask => w.refresh(values),
            _ => {
                *this = Some(SparseWeight::new(values, mask, rows, cols)?);
                Ok(())
            }
        }
    }

    /// Rows `K` (fan-in).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns `N` (fan-out).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Active entries.
    pub fn nnz(&self) -> usize {
        self.row_col.len()
    }

    /// The mask the pattern was built from.
    pub fn mask(&self) -> &Mask {
        &self.pattern
    }

    /// The mask the pattern was built from, shared.
    pub fn shared_mask(&self) -> &Arc<Mask> {
        &self.pattern
    }

    /// The values of the active entries, in mask order (ascending dense index).
    pub fn values(&self) -> &[f32] {
        &self.row_val
    }

    /// The values of the active entries, mutably, in mask order. Marks the column copy stale:
    /// call [`SparseWeight::sync_columns`] before the next forward product.
    pub fn values_mut(&mut self) -> &mut [f32] {
        self.stale = true;
        &mut self.row_val
    }

    /// Takes the values out (mask order), leaving the weight without values.
    pub fn into_values(self) -> Vec<f32> {
        self.row_val
    }

    /// Whether the column copy of the values is out of date.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Bytes held by the index arrays (row and column offsets, one index per entry per order).
    pub fn index_bytes(&self) -> usize {
        4 * (self.col_ptr.len() + self.col_row.len() + self.row_ptr.len() + self.row_col.len())
    }

    /// Bytes held by the values (the mask-ordered values and their column-ordered copy).
    pub fn value_bytes(&self) -> usize {
        4 * (self.row_val.len() + self.col_val.len())
    }

    /// Calls `f(e, i)` for every entry `e` (CSR order) with its dense index `i = k·N + n`.
    fn for_each_entry(&self, mut f: impl FnMut(usize, usize)) {
        for k in 0..self.rows {
            for e in self.row_ptr[k] as usize..self.row_ptr[k + 1] as usize {
                f(e, k * self.cols + self.row_col[e] as usize);
            }
        }
    }

    /// The CSR entries (positions in mask order) of the rows `rows`.
    pub fn row_entries(&self, rows: Range<usize>) -> Result<Range<usize>> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(Error::shape("sparse weight rows", self.rows, rows.end));
        }
        Ok(self.row_ptr[rows.start] as usize..self.row_ptr[rows.end] as usize)
    }

    /// The rows `rows` as a weight of their own (pattern and values copied; its columns are
    /// up to date if this weight's are).
    pub fn row_block(&self, rows: Range<usize>) -> Result<SparseWeight> {
        let entries = self.row_entries(rows.clone())?;
        let first = rows.start * self.cols;
        let mask = Mask::from_fn(rows.len() * self.cols, |i| self.pattern.get(first + i));
        let values = self.row_val[entries].to_vec();
        Self::from_active(values, Arc::new(mask), rows.len(), self.cols)
    }

    /// Re-reads the values of a [`SparseWeight::row_block`] of `parent` (the same rows of a
    /// weight with the same pattern).
    pub fn refresh_rows(&mut self, parent: &SparseWeight, rows: Range<usize>) -> Result<()> {
        let entries = parent.row_entries(rows.clone())?;
        if rows.len() != self.rows || parent.cols != self.cols || entries.len() != self.nnz() {
            return Err(Error::shape(
                "sparse weight row block",
                (self.rows, self.cols, self.nnz()),
                (rows.len(), parent.cols, entries.len()),
            ));
        }
        self.values_mut().copy_from_slice(&parent.row_val[entries]);
        self.sync_columns();
        Ok(())
    }

    /// Writes the rows `k` of the CSR entries `e0..e0 + out.len()` into `out`.
    pub(super) fn entry_rows(&self, e0: usize, out: &mut [u32]) {
        if out.is_empty() {
            return;
        }
        // The last row whose entries start at or before e0 (row_ptr[0] = 0 ≤ e0).
        let mut k = self.row_ptr.partition_point(|&p| p as usize <= e0) - 1;
        for (j, o) in out.iter_mut().enumerate() {
            while self.row_ptr[k + 1] as usize <= e0 + j {
                k += 1;
            }
            *o = k as u32;
        }
    }

    /// Writes per-entry values given in CSR order (as the weight-gradient kernels produce them) into a dense row-major `[K, N]` matrix, with zeros at inactive positions.
    pub fn scatter_csr(&self, sparse: &[f32], dense: &mut [f32]) -> Result<()> {
        if sparse.len() != self.nnz() || dense.len() != self.rows * self.cols {
            return Err(Error::shape(
                "sparse scatter",
                (self.nnz(), self.rows * self.cols),
                (sparse.len(), dense.len()),
            ));
        }
        dense.fill(0.0);
        self.for_each_entry(|e, i| dense[i] = sparse[e]);
        Ok(())
    }

    /// Sums `parts` consecutive per-entry vectors (added in order, each entry from 0) into
    /// `out`, one value per entry in CSR order.
    pub fn sum_parts(&self, sums: &[f32], parts: usize, out: &mut [f32]) -> Result<()> {
        let nnz = self.nnz();
        if sums.len() != parts * nnz || out.len() != nnz {
            return Err(Error::shape(
                "sparse sum",
                (parts * nnz, nnz),
                (sums.len(), out.len()),
            ));
        }
        for (e, o) in out.iter_mut().enumerate() {
            *o = (0..parts).fold(0.0, |acc, p| acc + sums[p * nnz + e]);
        }
        Ok(())
    }

    /// [`SparseWeight::scatter_csr`] of the sum of `parts` consecutive per-entry vectors (added
    /// in order).
    pub fn scatter_csr_sum(&self, sums: &[f32], parts: usize, dense: &mut [f32]) -> Result<()> {
        let nnz = self.nnz();
        if sums.len() != parts * nnz || dense.len() != self.rows * self.cols {
            return Err(Error::shape(
                "sparse scatter",
                (parts * nnz, self.rows * self.cols),
                (sums.len(), dense.len()),
            ));
        }
        dense.fill(0.0);
        self.for_each_entry(|e, i| {
            dense[i] = (0..parts).fold(0.0, |acc, p| acc + sums[p * nnz + e]);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(w: &SparseWeight) -> Vec<u32> {
        let mut ks = vec![0u32; w.nnz()];
        w.entry_rows(0, &mut ks);
        ks
    }

    #[test]
    fn both_orders_hold_every_active_entry() {
        let (k, n) = (5, 7);
        let values: Vec<f32> = (0..k * n).map(|i| i as f32 + 0.5).collect();
        let mask = Mask::from_fn(k * n, |i| (i * 7) % 3 == 0);
        let w = SparseWeight::new(&values, &mask, k, n).unwrap();
        assert_eq!(w.nnz(), mask.active());
        for c in 0..n {
            let (lo, hi) = (w.col_ptr[c] as usize, w.col_ptr[c + 1] as usize);
            let rows: Vec<u32> = w.col_row[lo..hi].to_vec();
            let want: Vec<u32> = (0..k)
                .filter(|r| mask.get(r * n + c))
                .map(|r| r as u32)
                .collect();
            assert_eq!(rows, want);
            for e in lo..hi {
                assert_eq!(w.col_val[e], values[w.col_row[e] as usize * n + c]);
            }
        }
        let ks = rows_of(&w);
        for r in 0..k {
            for e in w.row_ptr[r] as usize..w.row_ptr[r + 1] as usize {
                assert_eq!(ks[e] as usize, r);
                assert_eq!(w.row_val[e], values[r * n + w.row_col[e] as usize]);
            }
        }
        // Entry rows from any starting entry.
        for e0 in 0..w.nnz() {
            let mut part = vec![0u32; w.nnz() - e0];
            w.entry_rows(e0, &mut part);
            assert_eq!(part, ks[e0..]);
        }
        // CSR order is mask order.
        let active: Vec<f32> = mask.iter_active().map(|i| values[i]).collect();
        assert_eq!(w.values(), active.as_slice());
        let mut dense = vec![f32::NAN; k * n];
        w.scatter_csr(w.values(), &mut dense).unwrap();
        for i in 0..k * n {
            assert_eq!(dense[i], if mask.get(i) { values[i] } else { 0.0 });
        }
    }

    #[test]
    fn row_blocks_hold_their_rows_entries_and_follow_new_values() {
        let (k, n) = (9, 5);
        let values: Vec<f32> = (0..k * n).map(|i| i as f32 - 7.25).collect();
        let mask = Mask::from_fn(k * n, |i| (i * 11) % 4 != 0);
        let w = SparseWeight::new(&values, &mask, k, n).unwrap();
        for rows in [0..0, 0..9, 3..6, 8..9] {
            let block = w.row_block(rows.clone()).unwrap();
            let sub: Vec<f32> = (rows.start * n..rows.end * n).map(|i| values[i]).collect();
            let sub_mask = Mask::from_fn(sub.len(), |i| mask.get(rows.start * n + i));
            let want = SparseWeight::new(&sub, &sub_mask, rows.len(), n).unwrap();
            assert_eq!((block.rows(), block.cols()), (rows.len(), n));
            assert_eq!(block.values(), want.values());
            assert_eq!(block.row_col, want.row_col);
            assert_eq!(
                (&block.col_row, &block.col_val),
                (&want.col_row, &want.col_val)
            );
            assert!(!block.is_stale());
            let entries = w.row_entries(rows.clone()).unwrap();
            assert_eq!(&w.values()[entries], block.values());
        }
        // New values of the parent reach the block's columns.
        let shifted: Vec<f32> = values.iter().map(|v| v * 2.0 + 1.0).collect();
        let w2 = SparseWeight::new(&shifted, &mask, k, n).unwrap();
        let mut block = w.row_block(3..6).unwrap();
        block.refresh_rows(&w2, 3..6).unwrap();
        assert_eq!(block.values(), w2.row_block(3..6).unwrap().values());
        assert_eq!(block.col_val, w2.row_block(3..6).unwrap().col_val);
        assert!(block.refresh_rows(&w2, 3..7).is_err());
        assert!(w.row_entries(5..10).is_err());
        assert!(w.row_block(2..10).is_err());
    }

    #[test]
    fn values_set_in_mask_order_reach_the_columns() {
        let (k, n) = (6, 4);
        let mask = Arc::new(Mask::from_fn(k * n, |i| i % 5 != 1));
        let vals: Vec<f32> = (0..mask.active()).map(|e| e as f32 * 0.25 - 2.0).collect();
        let mut w = SparseWeight::from_active(vals.clone(), mask.clone(), k, n).unwrap();
        let mut dense = vec![0.0; k * n];
        w.scatter_csr(&vals, &mut dense).unwrap();
        let reference = SparseWeight::new(&dense, &mask, k, n).unwrap();
        assert_eq!(w.col_val, reference.col_val);
        w.values_mut()[3] = 100.0;
        assert!(w.is_stale());
        w.sync_columns();
        assert!(!w.is_stale());
        dense[mask.iter_active().nth(3).unwrap()] = 100.0;
        let reference = SparseWeight::new(&dense, &mask, k, n).unwrap();
        assert_eq!(w.col_val, reference.col_val);
        assert!(Arc::ptr_eq(w.shared_mask(), &mask));
        assert!(SparseWeight::from_active(vec![0.0; 2], mask, k, n).is_err());
        let parts: Vec<f32> = (0..2 * w.nnz()).map(|i| i as f32).collect();
        let mut summed = vec![0.0; w.nnz()];
        w.sum_parts(&parts, 2, &mut summed).unwrap();
        w.scatter_csr_sum(&parts, 2, &mut dense).unwrap();
        let mut scattered = vec![0.0; k * n];
        w.scatter_csr(&summed, &mut scattered).unwrap();
        assert_eq!(dense, scattered);
    }

    #[test]
    fn sync_refreshes_values_and_rebuilds_on_a_new_mask() {
        let (k, n) = (4, 3);
        let mut values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let m1 = Mask::from_fn(12, |i| i % 2 == 0);
        let mut w = None;
        SparseWeight::sync(&mut w, &values, &m1, k, n).unwrap();
        values[4] = 40.0;
        SparseWeight::sync(&mut w, &values, &m1, k, n).unwrap();
        let sw = w.as_ref().unwrap();
        assert!(sw.row_val.contains(&40.0) && sw.col_val.contains(&40.0));
        let m2 = Mask::from_fn(12, |i| i == 5);
        SparseWeight::sync(&mut w, &values, &m2, k, n).unwrap();
        let sw = w.as_ref().unwrap();
        assert_eq!((sw.nnz(), sw.row_val[0], sw.mask()), (1, 5.0, &m2));
        assert!(SparseWeight::new(&values, &m2, 3, 3).is_err());
    }
}
