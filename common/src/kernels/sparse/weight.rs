//! A masked `[K, N]` weight in compressed form, indexed both by column and by row.

use crate::mask::Mask;
use crate::{Error, Result};

/// The active entries of a masked `[K, N]` weight (row-major, `K = fan_in`, `N = fan_out`),
/// stored twice: by column `n` (CSC, for the forward product) and by row `k` (CSR, for the input
/// and weight gradients).
///
/// The sparsity pattern is built once per mask ([`SparseWeight::new`]); the values change every
/// optimizer step and are refreshed by a gather through stored indices
/// ([`SparseWeight::refresh`], `O(active)`). [`SparseWeight::sync`] does whichever is needed.
#[derive(Clone, Debug)]
pub struct SparseWeight {
    rows: usize,
    cols: usize,
    /// The mask the pattern was built from (for change detection).
    pattern: Mask,
    /// CSC: entries of column `n` are `col_ptr[n]..col_ptr[n + 1]`, ascending in `k`.
    pub(super) col_ptr: Vec<usize>,
    /// CSC: the row `k` of each entry.
    pub(super) col_row: Vec<u32>,
    /// CSC: the value of each entry.
    pub(super) col_val: Vec<f32>,
    /// CSC: the dense index `k·N + n` of each entry.
    col_src: Vec<u32>,
    /// CSR: entries of row `k` are `row_ptr[k]..row_ptr[k + 1]`, ascending in `n`.
    pub(super) row_ptr: Vec<usize>,
    /// CSR: the row `k` of each entry.
    pub(super) row_row: Vec<u32>,
    /// CSR: the column `n` of each entry.
    pub(super) row_col: Vec<u32>,
    /// CSR: the value of each entry.
    pub(super) row_val: Vec<f32>,
    /// CSR: the dense index `k·N + n` of each entry (ascending: CSR order is the mask's order).
    row_src: Vec<u32>,
}

impl SparseWeight {
    /// Compresses the active entries of `values` (a row-major `[rows, cols]` matrix) under `mask`.
    pub fn new(values: &[f32], mask: &Mask, rows: usize, cols: usize) -> Result<Self> {
        let len = rows
            .checked_mul(cols)
            .filter(|&l| u32::try_from(l).is_ok())
            .ok_or_else(|| Error::shape("sparse weight", "at most 2^32 elements", (rows, cols)))?;
        if values.len() != len || mask.len() != len {
            return Err(Error::shape(
                "sparse weight",
                format!("{len} values and mask bits for [{rows}, {cols}]"),
                (values.len(), mask.len()),
            ));
        }
        let nnz = mask.active();
        let mut row_ptr = vec![0usize; rows + 1];
        let mut col_count = vec![0usize; cols + 1];
        let mut row_row = Vec::with_capacity(nnz);
        let mut row_col = Vec::with_capacity(nnz);
        let mut row_src = Vec::with_capacity(nnz);
        for i in mask.iter_active() {
            let (k, n) = (i / cols, i % cols);
            row_ptr[k + 1] += 1;
            col_count[n + 1] += 1;
            // Both fit in u32: i < rows·cols ≤ u32::MAX, checked above.
            row_row.push(k as u32);
            row_col.push(n as u32);
            row_src.push(i as u32);
        }
        for k in 0..rows {
            row_ptr[k + 1] += row_ptr[k];
        }
        for n in 0..cols {
            col_count[n + 1] += col_count[n];
        }
        let col_ptr = col_count.clone();
        // Counting sort of the CSR entries (ascending k) into columns keeps k ascending in each.
        let mut next = col_count;
        let mut col_row = vec![0u32; nnz];
        let mut col_src = vec![0u32; nnz];
        for e in 0..nnz {
            let n = row_col[e] as usize;
            let slot = next[n];
            next[n] += 1;
            col_row[slot] = row_row[e];
            col_src[slot] = row_src[e];
        }
        let mut w = SparseWeight {
            rows,
            cols,
            pattern: mask.clone(),
            col_ptr,
            col_row,
            col_val: vec![0.0; nnz],
            col_src,
            row_ptr,
            row_row,
            row_col,
            row_val: vec![0.0; nnz],
            row_src,
        };
        w.refresh(values)?;
        Ok(w)
    }

    /// Re-reads the values of the active entries from `values` (same pattern): a gather of
    /// `2·active` elements.
    pub fn refresh(&mut self, values: &[f32]) -> Result<()> {
        if values.len() != self.rows * self.cols {
            return Err(Error::shape(
                "sparse weight refresh",
                self.rows * self.cols,
                values.len(),
            ));
        }
        for (v, &i) in self.col_val.iter_mut().zip(&self.col_src) {
            *v = values[i as usize];
        }
        for (v, &i) in self.row_val.iter_mut().zip(&self.row_src) {
            *v = values[i as usize];
        }
        Ok(())
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
            Some(w) if w.rows == rows && w.cols == cols && w.pattern == *mask => w.refresh(values),
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
        self.row_src.len()
    }

    /// The mask the pattern was built from.
    pub fn mask(&self) -> &Mask {
        &self.pattern
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
        for (&v, &i) in sparse.iter().zip(&self.row_src) {
            dense[i as usize] = v;
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
        for (e, &i) in self.row_src.iter().enumerate() {
            dense[i as usize] = (0..parts).fold(0.0, |acc, p| acc + sums[p * nnz + e]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_orders_hold_every_active_entry() {
        let (k, n) = (5, 7);
        let values: Vec<f32> = (0..k * n).map(|i| i as f32 + 0.5).collect();
        let mask = Mask::from_fn(k * n, |i| (i * 7) % 3 == 0);
        let w = SparseWeight::new(&values, &mask, k, n).unwrap();
        assert_eq!(w.nnz(), mask.active());
        for c in 0..n {
            let rows: Vec<u32> = w.col_row[w.col_ptr[c]..w.col_ptr[c + 1]].to_vec();
            let want: Vec<u32> = (0..k)
                .filter(|r| mask.get(r * n + c))
                .map(|r| r as u32)
                .collect();
            assert_eq!(rows, want);
            for e in w.col_ptr[c]..w.col_ptr[c + 1] {
                assert_eq!(w.col_val[e], values[w.col_row[e] as usize * n + c]);
            }
        }
        for r in 0..k {
            for e in w.row_ptr[r]..w.row_ptr[r + 1] {
                assert_eq!(w.row_row[e] as usize, r);
                assert_eq!(w.row_val[e], values[r * n + w.row_col[e] as usize]);
            }
        }
        let mut dense = vec![f32::NAN; k * n];
        w.scatter_csr(&w.row_val.clone(), &mut dense).unwrap();
        for i in 0..k * n {
            assert_eq!(dense[i], if mask.get(i) { values[i] } else { 0.0 });
        }
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
