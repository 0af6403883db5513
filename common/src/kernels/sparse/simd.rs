//! The inner loops of the sparse kernels, compiled twice: once for the baseline target (SSE2 on
//! x86-64, separate multiply and add) and once with AVX2 + FMA enabled, chosen at run time.
//!
//! # Why this module allows `unsafe`
//!
//! The workspace builds for the baseline x86-64 target, so safe code auto-vectorises to 4-lane
//! SSE2 without fused multiply-add; `f32::mul_add` there is a library call. The loops below are
//! plain safe Rust (slices, zips, fixed-size lane arrays), and the same source compiled inside a
//! `#[target_feature(enable = "avx2,fma")]` function vectorises to 8-lane FMA. Calling such a
//! function is `unsafe` (the CPU must have the features), so each call sits in one `unsafe`
//! block behind a check: an [`Isa`] that says AVX2 + FMA can only be made by [`Isa::detect`],
//! after `is_x86_feature_detected!` confirmed both. There is no unchecked indexing here, and
//! intrinsics in one place only: the compiler does not turn a transpose into shuffles, so
//! [`transpose8`] spells out the 8×8 AVX transpose (eight loads, three rounds of shuffles,
//! eight stores). Measured: `fedtiny-sim bench` of `resnet18` width ¼ at d = 0.01, alternated
//! with the binary before it, 1,618 / 1,522 / 2,017 → 1,980 / 1,870 / 2,185 samples/s (commit
//! d9ff04f). Its loads and stores take pointers from bounds-checked slices of exactly eight
//! values. `benches/kernels.rs` measures both variants; the portable one is the
//! fallback on other CPUs and is tested on every machine.
//!
//! Every loop computes each output with the same operations in the same order whatever the
//! grouping (a run of 4 or 8 entries computes each entry exactly as single entries would), so
//! results do not depend on how callers split the work.
#![allow(unsafe_code)]

/// The instruction set the sparse kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Isa(Level);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Isa {
    /// The best variant this CPU supports (AVX2 + FMA when available).
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa(Level::Avx2Fma);
        }
        Isa(Level::Portable)
    }

    /// The portable variant (baseline target features only).
    pub fn portable() -> Isa {
        Isa(Level::Portable)
    }

    /// A short name: `avx2+fma` or `portable`.
    pub fn name(self) -> &'static str {
        match self.0 {
            Level::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma => "avx2+fma",
        }
    }
}

/// Multiply-add `a·b + c`: fused where the target has FMA, else a multiply and an add.
trait Arith {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

struct Plain;
impl Arith for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
struct Fused;
#[cfg(target_arch = "x86_64")]
impl Arith for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Lanes of the dot-product accumulators (two AVX2 vectors: enough independent chains to hide
/// the FMA latency).
pub(super) const LANES: usize = 16;

/// `dst[j] (+)= Σ_e vals[e] · src[off(e) + j]` for `j < dst.len()`, entries in order, four at
/// a time; with `init`, `dst` is overwritten (as if it were zero, without reading it). Panics if
/// a run leaves `src` (callers guarantee runs fit, see `Layout`).
#[inline(always)]
fn axpy_runs<A: Arith>(
    dst: &mut [f32],
    src: &[f32],
    vals: &[f32],
    off: impl Fn(usize) -> usize,
    init: bool,
) {
    let len = dst.len();
    let run = |e: usize| &src[off(e)..][..len];
    let mut e = 0;
    let mut fresh = init;
    // Eight entries per pass while they last: one load and store of `dst` per eight
    // multiply-adds instead of per four.
    let (octets, rest) = vals.as_chunks::<8>();
    for v in octets {
        let s: [&[f32]; 8] = std::array::from_fn(|i| run(e + i));
        let lanes = dst
            .iter_mut()
            .zip(s[0])
            .zip(s[1])
            .zip(s[2])
            .zip(s[3])
            .zip(s[4])
            .zip(s[5])
            .zip(s[6])
            .zip(s[7]);
        // The first multiply-add of a fresh `dst` adds to zero (same bits as a zeroed `dst`).
        let octet = |d: f32, x: [f32; 8]| {
            let mut acc = A::madd(v[0], x[0], d);
            for i in 1..8 {
                acc = A::madd(v[i], x[i], acc);
            }
            acc
        };
        if fresh {
            for ((((((((d, x0), x1), x2), x3), x4), x5), x6), x7) in lanes {
                *d = octet(0.0, [*x0, *x1, *x2, *x3, *x4, *x5, *x6, *x7]);
            }
        } else {
            for ((((((((d, x0), x1), x2), x3), x4), x5), x6), x7) in lanes {
                *d = octet(*d, [*x0, *x1, *x2, *x3, *x4, *x5, *x6, *x7]);
            }
        }
        fresh = false;
        e += 8;
    }
    let mut quads = rest.chunks_exact(4);
    for v in quads.by_ref() {
        let (s0, s1, s2, s3) = (run(e), run(e + 1), run(e + 2), run(e + 3));
        let lanes = dst.iter_mut().zip(s0).zip(s1).zip(s2).zip(s3);
        if fresh {
            for ((((d, a), b), c), f) in lanes {
                let acc = A::madd(v[1], *b, A::madd(v[0], *a, 0.0));
                *d = A::madd(v[3], *f, A::madd(v[2], *c, acc));
            }
            fresh = false;
        } else {
            for ((((d, a), b), c), f) in lanes {
                let acc = A::madd(v[1], *b, A::madd(v[0], *a, *d));
                *d = A::madd(v[3], *f, A::madd(v[2], *c, acc));
            }
        }
        e += 4;
    }
    for &v in quads.remainder() {
        if fresh {
            for (d, a) in dst.iter_mut().zip(run(e)) {
                *d = A::madd(v, *a, 0.0);
            }
            fresh = false;
        } else {
            for (d, a) in dst.iter_mut().zip(run(e)) {
                *d = A::madd(v, *a, *d);
            }
        }
        e += 1;
    }
    if fresh {
        dst.fill(0.0);
    }
}

/// Partial sums of one dot product, lane `i` holding positions `i mod LANES`.
pub(super) type Lanes = [f32; LANES];

/// Sums the lanes in a fixed tree.
pub(super) fn reduce(acc: &Lanes) -> f32 {
    let mut h = [0.0f32; LANES / 2];
    for (i, x) in h.iter_mut().enumerate() {
        *x = acc[i] + acc[i + LANES / 2];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// The lane-wise multiply-add of one chunk into one accumulator.
#[inline(always)]
fn madd_lanes<A: Arith>(acc: &mut Lanes, s: &[f32; LANES], t: &[f32; LANES]) {
    for i in 0..LANES {
        acc[i] = A::madd(s[i], t[i], acc[i]);
    }
}

/// The positions past the last whole chunk. Kept out of line: a tail loop next to the main
/// loop stops it from vectorising at full width. Every layout makes runs whole chunks, so this
/// only runs on odd lengths (tests); out of line it lacks the target features, and `mul_add` is
/// then a library call: as exact, only slower.
#[cold]
#[inline(never)]
fn madd_tail<A: Arith>(acc: &mut Lanes, s: &[f32], t: &[f32]) {
    for ((a, x), y) in acc.iter_mut().zip(s).zip(t) {
        *a = A::madd(*x, *y, *a);
    }
}

/// Adds `s ⊙ t` (same lengths) into the lanes of one dot product.
#[inline(always)]
fn dot1<A: Arith>(l: &mut Lanes, s: &[f32], t: &[f32]) {
    let t = &t[..s.len()];
    let (sc, sr) = s.as_chunks::<LANES>();
    let (tc, tr) = t.as_chunks::<LANES>();
    let mut a = *l;
    for (sv, tv) in sc.iter().zip(tc) {
        madd_lanes::<A>(&mut a, sv, tv);
    }
    *l = a;
    if !sr.is_empty() {
        madd_tail::<A>(l, sr, tr);
    }
}

/// [`dot1`] for four `t_i` sharing `s` (one load of `s` per four multiply-adds); each entry's
/// lanes evolve exactly as [`dot1`]'s would.
#[inline(always)]
fn dot4<A: Arith>(l: &mut [Lanes], s: &[f32], t: [&[f32]; 4]) {
    let len = s.len();
    let (sc, sr) = s.as_chunks::<LANES>();
    let (c0, r0) = t[0][..len].as_chunks::<LANES>();
    let (c1, r1) = t[1][..len].as_chunks::<LANES>();
    let (c2, r2) = t[2][..len].as_chunks::<LANES>();
    let (c3, r3) = t[3][..len].as_chunks::<LANES>();
    let (mut a0, mut a1, mut a2, mut a3) = (l[0], l[1], l[2], l[3]);
    for ((((sv, x0), x1), x2), x3) in sc.iter().zip(c0).zip(c1).zip(c2).zip(c3) {
        madd_lanes::<A>(&mut a0, sv, x0);
        madd_lanes::<A>(&mut a1, sv, x1);
        madd_lanes::<A>(&mut a2, sv, x2);
        madd_lanes::<A>(&mut a3, sv, x3);
    }
    (l[0], l[1], l[2], l[3]) = (a0, a1, a2, a3);
    if !sr.is_empty() {
        for (li, ri) in l.iter_mut().zip([r0, r1, r2, r3]) {
            madd_tail::<A>(li, sr, ri);
        }
    }
}

/// `lanes[e] += s[row_off[ks[e]] + j] · t[ns[e]·len + j]` (lane `j mod LANES`, counted from the
/// start of `part`) over `j` in `part`, a sub-range of `0..len`; four consecutive entries of the
/// same row share their loads of `s`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dots_body<A: Arith>(
    lanes: &mut [Lanes],
    ks: &[u32],
    ns: &[u32],
    s: &[f32],
    t: &[f32],
    row_off: &[usize],
    len: usize,
    part: std::ops::Range<usize>,
) {
    let trow = |n: u32| &t[n as usize * len..][part.clone()];
    let mut e = 0;
    while e < lanes.len() {
        let k = ks[e];
        let srow = &s[row_off[k as usize]..][part.clone()];
        if e + 4 <= lanes.len() && ks[e + 3] == k {
            dot4::<A>(
                &mut lanes[e..e + 4],
                srow,
                [
                    trow(ns[e]),
                    trow(ns[e + 1]),
                    trow(ns[e + 2]),
                    trow(ns[e + 3]),
                ],
            );
            e += 4;
        } else {
            dot1::<A>(&mut lanes[e], srow, trow(ns[e]));
            e += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::{
        __m256, _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_shuffle_ps, _mm256_storeu_ps,
        _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn transpose8(src: &[f32], ss: usize, dst: &mut [f32], ds: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| {
            let row = &src[i * ss..][..8];
            // SAFETY: `row` holds the eight values the unaligned load reads.
            unsafe { _mm256_loadu_ps(row.as_ptr()) }
        });
        // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves swapped.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (j, v) in out.into_iter().enumerate() {
            let row = &mut dst[j * ds..][..8];
            // SAFETY: `row` holds the eight values the unaligned store writes.
            unsafe { _mm256_storeu_ps(row.as_mut_ptr(), v) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gather_rows(
        dst: &mut [f32],
        src: &[f32],
        rows: &[u32],
        vals: &[f32],
        row_off: &[usize],
    ) {
        axpy_runs::<Fused>(dst, src, vals, |e| row_off[rows[e] as usize], true);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gather_cols(
        dst: &mut [f32],
        src: &[f32],
        cols: &[u32],
        vals: &[f32],
        stride: usize,
    ) {
        axpy_runs::<Fused>(dst, src, vals, |e| cols[e] as usize * stride, false);
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dots(
        lanes: &mut [Lanes],
        ks: &[u32],
        ns: &[u32],
        s: &[f32],
        t: &[f32],
        row_off: &[usize],
        len: usize,
        part: std::ops::Range<usize>,
    ) {
        dots_body::<Fused>(lanes, ks, ns, s, t, row_off, len, part);
    }
}

/// Transposes one 8×8 tile, `dst[j·ds + i] = src[i·ss + j]` for `i, j < 8` (a plain copy of
/// each value, so every variant gives the same bits). Panics if a slice is too short for the
/// tile.
pub(super) fn transpose8(isa: Isa, src: &[f32], ss: usize, dst: &mut [f32], ds: usize) {
    match isa.0 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `gather_rows`: AVX2 and FMA were detected when this `Isa` was made.
        Level::Avx2Fma => unsafe { x86::transpose8(src, ss, dst, ds) },
        Level::Portable => {
            for i in 0..8 {
                for (j, v) in src[i * ss..][..8].iter().enumerate() {
                    dst[j * ds + i] = *v;
                }
            }
        }
    }
}

/// `dst[j] = Σ_e vals[e] · src[row_off[rows[e]] + j]` (overwriting): one column of the forward
/// product.
pub(super) fn gather_rows(
    isa: Isa,
    dst: &mut [f32],
    src: &[f32],
    rows: &[u32],
    vals: &[f32],
    row_off: &[usize],
) {
    match isa.0 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::Avx2Fma` is only made by `Isa::detect` after confirming AVX2 and FMA
        // on this CPU; the callee is safe code compiled with those features.
        Level::Avx2Fma => unsafe { x86::gather_rows(dst, src, rows, vals, row_off) },
        Level::Portable => axpy_runs::<Plain>(dst, src, vals, |e| row_off[rows[e] as usize], true),
    }
}

/// `dst[j] += Σ_e vals[e] · src[cols[e]·stride + j]`: one row of the input gradient.
pub(super) fn gather_cols(
    isa: Isa,
    dst: &mut [f32],
    src: &[f32],
    cols: &[u32],
    vals: &[f32],
    stride: usize,
) {
    match isa.0 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `gather_rows`: AVX2 and FMA were detected when this `Isa` was made.
        Level::Avx2Fma => unsafe { x86::gather_cols(dst, src, cols, vals, stride) },
        Level::Portable => axpy_runs::<Plain>(dst, src, vals, |e| cols[e] as usize * stride, false),
    }
}

/// `lanes[e] += s[row_off[ks[e]] + j] · t[ns[e]·len + j]` for `j` in `part` (lane `j mod 16`
/// from the start of `part`): weight-gradient entries; [`reduce`] finishes them.
#[allow(clippy::too_many_arguments)]
pub(super) fn dots(
    isa: Isa,
    lanes: &mut [Lanes],
    ks: &[u32],
    ns: &[u32],
    s: &[f32],
    t: &[f32],
    row_off: &[usize],
    len: usize,
    part: std::ops::Range<usize>,
) {
    match isa.0 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `gather_rows`: AVX2 and FMA were detected when this `Isa` was made.
        Level::Avx2Fma => unsafe { x86::dots(lanes, ks, ns, s, t, row_off, len, part) },
        Level::Portable => dots_body::<Plain>(lanes, ks, ns, s, t, row_off, len, part),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_transposes_agree_with_the_definition() {
        let (ss, ds) = (11, 9);
        let src: Vec<f32> = (0..7 * ss + 8).map(|i| i as f32 * 0.5 - 3.0).collect();
        for isa in [Isa::portable(), Isa::detect()] {
            let mut dst = vec![f32::NAN; 7 * ds + 8];
            transpose8(isa, &src, ss, &mut dst, ds);
            for i in 0..8 {
                for j in 0..8 {
                    assert_eq!(dst[j * ds + i].to_bits(), src[i * ss + j].to_bits());
                }
                if i < 7 {
                    assert!(
                        dst[i * ds + 8].is_nan(),
                        "{}: stride gap untouched",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    fn variants_agree_with_a_reference_and_groupings_agree_bitwise() {
        let len = 37;
        let src: Vec<f32> = (0..400)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let row_off = [0usize, 5, 90, 200, 300, 7, 11, 42, 150, 3, 250, 61, 120];
        let rows: Vec<u32> = (0..row_off.len() as u32).collect();
        let vals = [
            0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75, 3.0, -0.5, 1.25, 0.125, -2.0, 0.75, 1.0,
        ];
        for isa in [Isa::portable(), Isa::detect()] {
            // gather_rows overwrites (0 to 13 entries: empty, octets, quads, singles, mixes).
            for n in 0..=rows.len() {
                let mut dst = vec![f32::NAN; len];
                gather_rows(isa, &mut dst, &src, &rows[..n], &vals[..n], &row_off);
                for (j, d) in dst.iter().enumerate() {
                    let r: f64 = rows[..n]
                        .iter()
                        .zip(&vals)
                        .map(|(&k, &v)| f64::from(v) * f64::from(src[row_off[k as usize] + j]))
                        .sum();
                    assert!((f64::from(*d) - r).abs() < 1e-5, "{}", isa.name());
                }
                // Entry by entry (one, then accumulating one at a time): the same bits.
                if n > 0 {
                    let mut one = vec![f32::NAN; len];
                    gather_rows(isa, &mut one, &src, &rows[..1], &vals[..1], &row_off);
                    for e in 1..n {
                        let off = [row_off[e] as u32];
                        gather_cols(isa, &mut one, &src, &off, &vals[e..=e], 1);
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&one), bits(&dst), "{} entries, {}", n, isa.name());
                }
            }
            // gather_cols accumulates (ten entries: an octet and two singles).
            let mut dst = vec![1.0f32; len];
            let cols = [3u32, 0, 7, 1, 2, 8, 4, 6, 5, 9];
            gather_cols(isa, &mut dst, &src, &cols, &vals[..10], 40);
            let mut one = vec![1.0f32; len];
            for (c, v) in cols.iter().zip(&vals) {
                gather_cols(isa, &mut one, &src, &[*c], &[*v], 40);
            }
            for (j, d) in dst.iter().enumerate() {
                assert_eq!(d.to_bits(), one[j].to_bits(), "{}", isa.name());
                let r: f64 = 1.0
                    + cols
                        .iter()
                        .zip(&vals)
                        .map(|(&n, &v)| f64::from(v) * f64::from(src[n as usize * 40 + j]))
                        .sum::<f64>();
                assert!((f64::from(*d) - r).abs() < 1e-5, "{}", isa.name());
            }
            let ks = [0u32, 0, 0, 0, 0, 1, 2, 2];
            let ns = [0u32, 1, 2, 3, 4, 0, 5, 6];
            let mut all = vec![[0.0f32; LANES]; ks.len()];
            dots(isa, &mut all, &ks, &ns, &src, &src, &row_off, len, 0..len);
            for e in 0..ks.len() {
                let mut one = [[0.0f32; LANES]];
                dots(
                    isa,
                    &mut one,
                    &ks[e..=e],
                    &ns[e..=e],
                    &src,
                    &src,
                    &row_off,
                    len,
                    0..len,
                );
                assert_eq!(reduce(&one[0]).to_bits(), reduce(&all[e]).to_bits());
                let s = &src[row_off[ks[e] as usize]..][..len];
                let t = &src[ns[e] as usize * len..][..len];
                let r: f64 = s
                    .iter()
                    .zip(t)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                assert!((f64::from(reduce(&all[e])) - r).abs() < 1e-4);
            }
        }
    }
}
