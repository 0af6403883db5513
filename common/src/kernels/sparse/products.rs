//! The three sparse products over a packed [`Layout`], split across the rayon pool.
//!
//! With `S` the packed operand and `T` the packed result (`[blocks][N][out_len]`):
//! - [`forward`]: `T[b][n][j] = Σ_{k active in column n} W[k,n] · S[b][row_off[k] + j]`, one task
//!   item per `(b, n)` row of `T`, entries in CSC order.
//! - [`input_grad`]: `dS[b][region g] = Σ_{k in g} Σ_{n active in row k} W[k,n] · dT[b][n]`
//!   shifted by row `k`'s offset, one task item per `(b, g)` region, rows in the group's order
//!   and entries in CSR order.
//! - [`weight_grad`]: `dW[k,n] = Σ_b ⟨S[b][row_off[k]..], dT[b][n]⟩` at active `(k, n)` only, in
//!   CSR order; blocks are visited in cache-sized tiles, entries are cut into fixed chunks, and
//!   each entry sums over blocks in order.
//!
//! Each output element is computed by one task, in an order that does not depend on how rayon
//! splits the items: results are bit-identical whatever the thread count. The `*_block` kernels
//! do the same for one block, sequentially, for callers that fuse packing and products per
//! block (see [`super::conv`]).

use rayon::prelude::*;

use super::layout::Layout;
use super::simd::{self, Isa, LANES};
use super::weight::SparseWeight;
use crate::{Error, Result};

/// Weight-gradient entries per task item.
const DW_CHUNK: usize = 32;

/// Longest stretch of a block's runs that the weight gradient reads per pass (a multiple of
/// the lane count).
const DW_RUN: usize = 128;

/// Bytes of packed source and output gradient per tile of blocks in the weight gradient.
const DW_TILE_BYTES: usize = 512 << 10;

fn check(what: &str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::shape(format!("sparse {what}"), expected, actual))
    }
}

fn check_weight(l: &Layout, w: &SparseWeight) -> Result<()> {
    check("weight rows", l.rows(), w.rows())
}

/// Fails when the column copy of the weight's values is out of date (the forward product reads
/// it; see [`SparseWeight::sync_columns`]).
pub(super) fn check_columns(w: &SparseWeight) -> Result<()> {
    if w.is_stale() {
        return Err(Error::StateMismatch(
            "sparse weight: column values are out of date (sync_columns not called)".into(),
        ));
    }
    Ok(())
}

/// Entries per call of the weight-gradient dot products whose rows are looked up together.
const ROWS_CHUNK: usize = 64;

/// Items per rayon task so that a task holds at least ~`target` multiply-adds.
fn min_items(per_item: usize, target: usize) -> usize {
    (target / per_item.max(1)).max(1)
}

/// One block of the forward product: `t` is `[N][out_len]` (overwritten), `s` one block of the
/// packed source. Sequential; callers check the lengths.
pub(super) fn forward_block(isa: Isa, l: &Layout, w: &SparseWeight, s: &[f32], t: &mut [f32]) {
    for (n, row) in t.chunks_mut(l.out_len.max(1)).enumerate() {
        column(isa, l, w, s, n, row);
    }
}

/// Row `n` of one block of the forward product.
#[inline]
fn column(isa: Isa, l: &Layout, w: &SparseWeight, s: &[f32], n: usize, row: &mut [f32]) {
    let (lo, hi) = (w.col_ptr[n] as usize, w.col_ptr[n + 1] as usize);
    simd::gather_rows(
        isa,
        row,
        s,
        &w.col_row[lo..hi],
        &w.col_val[lo..hi],
        &l.row_off,
    );
}

/// One block of the input gradient: `ds` is one block of the packed source (overwritten), `dt`
/// `[N][out_len]`. Sequential; callers check the lengths.
pub(super) fn input_grad_block(isa: Isa, l: &Layout, w: &SparseWeight, dt: &[f32], ds: &mut [f32]) {
    for (g, region) in ds.chunks_mut(l.group_len.max(1)).enumerate() {
        region_grad(isa, l, w, dt, g, region);
    }
}

/// Region `g` of one block of the input gradient (overwritten).
#[inline]
fn region_grad(isa: Isa, l: &Layout, w: &SparseWeight, dt: &[f32], g: usize, region: &mut [f32]) {
    let len = l.out_len;
    region.fill(0.0);
    for &k in l.group(g) {
        let k = k as usize;
        let (lo, hi) = (w.row_ptr[k] as usize, w.row_ptr[k + 1] as usize);
        if lo < hi {
            simd::gather_cols(
                isa,
                &mut region[l.shift[k]..][..len],
                dt,
                &w.row_col[lo..hi],
                &w.row_val[lo..hi],
                len,
            );
        }
    }
}

/// One block of the weight gradient, added into per-entry lanes (CSR order, finished by
/// [`simd::reduce`]). Sequential; callers check the lengths.
pub(super) fn weight_grad_block(
    isa: Isa,
    l: &Layout,
    w: &SparseWeight,
    s: &[f32],
    dt: &[f32],
    lanes: &mut [simd::Lanes],
) {
    let mut ks = [0u32; ROWS_CHUNK];
    for (c, lanes) in lanes.chunks_mut(ROWS_CHUNK).enumerate() {
        let e0 = c * ROWS_CHUNK;
        let ks = &mut ks[..lanes.len()];
        w.entry_rows(e0, ks);
        let ns = &w.row_col[e0..][..lanes.len()];
        simd::dots(
            isa,
            lanes,
            ks,
            ns,
            s,
            dt,
            &l.row_off,
            l.out_len,
            0..l.out_len,
        );
    }
}

/// The forward product into `out` (`[blocks][N][out_len]`, overwritten).
pub(super) fn forward(
    isa: Isa,
    l: &Layout,
    w: &SparseWeight,
    src: &[f32],
    out: &mut [f32],
) -> Result<()> {
    check_weight(l, w)?;
    check_columns(w)?;
    check("source", l.src_len(), src.len())?;
    check("result", l.out_size(w.cols()), out.len())?;
    let (len, cols, block) = (l.out_len, w.cols(), l.block_len());
    if len == 0 || cols == 0 {
        return Ok(());
    }
    let per_item = len * (w.nnz() / cols + 1);
    out.par_chunks_mut(len)
        .enumerate()
        .with_min_len(min_items(per_item, 1 << 14))
        .for_each(|(i, row)| {
            let (b, n) = (i / cols, i % cols);
            column(isa, l, w, &src[b * block..][..block], n, row);
        });
    Ok(())
}

/// The input gradient into `ds` (the packed source's shape, overwritten), from the packed
/// output gradient `dt` (`[blocks][N][out_len]`).
pub(super) fn input_grad(
    isa: Isa,
    l: &Layout,
    w: &SparseWeight,
    dt: &[f32],
    ds: &mut [f32],
) -> Result<()> {
    check_weight(l, w)?;
    check("output gradient", l.out_size(w.cols()), dt.len())?;
    check("input gradient", l.src_len(), ds.len())?;
    let (len, groups, tblock) = (l.out_len, l.groups, w.cols() * l.out_len);
    if l.group_len == 0 || groups == 0 {
        return Ok(());
    }
    let per_item = len * (w.nnz() / groups + 1);
    ds.par_chunks_mut(l.group_len)
        .enumerate()
        .with_min_len(min_items(per_item, 1 << 14))
        .for_each(|(i, region)| {
            let (b, g) = (i / groups, i % groups);
            region_grad(isa, l, w, &dt[b * tblock..][..tblock], g, region);
        });
    Ok(())
}

/// The weight gradient at active entries, in CSR order, into `out` (`nnz` values, overwritten).
pub(super) fn weight_grad(
    isa: Isa,
    l: &Layout,
    w: &SparseWeight,
    src: &[f32],
    dt: &[f32],
    out: &mut [f32],
) -> Result<()> {
    check_weight(l, w)?;
    check("source", l.src_len(), src.len())?;
    check("output gradient", l.out_size(w.cols()), dt.len())?;
    check("weight gradient", w.nnz(), out.len())?;
    let (len, block, tblock) = (l.out_len, l.block_len(), w.cols() * l.out_len);
    out.fill(0.0);
    // Blocks are visited in tiles that fit in L2 (every task reads most of a tile), each tile
    // once; inside a tile, tasks own chunks of entries and add the blocks in order, each block
    // in runs of at most `DW_RUN` positions (whose operands stay in L1 across the chunk).
    let tile = (DW_TILE_BYTES / ((block + tblock) * 4).max(1)).clamp(1, l.blocks.max(1));
    let runs = len.div_ceil(DW_RUN).max(1);
    for b0 in (0..l.blocks).step_by(tile) {
        let b1 = (b0 + tile).min(l.blocks);
        out.par_chunks_mut(DW_CHUNK)
            .enumerate()
            .for_each(|(c, acc)| {
                let e0 = c * DW_CHUNK;
                let mut ks = [0u32; DW_CHUNK];
                let ks = &mut ks[..acc.len()];
                w.entry_rows(e0, ks);
                let ns = &w.row_col[e0..][..acc.len()];
                let mut lanes = [[0.0f32; LANES]; DW_CHUNK];
                let lanes = &mut lanes[..acc.len()];
                for b in b0..b1 {
                    let (s, t) = (&src[b * block..][..block], &dt[b * tblock..][..tblock]);
                    for r in 0..runs {
                        let part = (r * DW_RUN).min(len)..((r + 1) * DW_RUN).min(len);
                        simd::dots(isa, lanes, ks, ns, s, t, &l.row_off, len, part);
                    }
                }
                for (a, l) in acc.iter_mut().zip(lanes.iter()) {
                    *a += simd::reduce(l);
                }
            });
    }
    Ok(())
}
