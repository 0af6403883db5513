//! im2col and col2im for channels-last (NHWC) batches.
//!
//! Row `r = (n·oh + oy)·ow + ox` of the column matrix holds the receptive field of output pixel
//! `(n, oy, ox)`, ordered `(ky, kx, c)`; out-of-image positions are zero. In NHWC a window row
//! `x[n, iy, ix..ix+kw, :]` is contiguous, so interior windows copy `kw·c` values at once.

use rayon::prelude::*;

use super::ConvGeometry;

/// Fills `cols` (`rows × patch`) from the batch `x` (`n × h × w × c`).
pub fn im2col(x: &[f32], g: &ConvGeometry, cols: &mut [f32]) {
    debug_assert_eq!(x.len(), g.n * g.image_len());
    debug_assert_eq!(cols.len(), g.rows() * g.patch());
    let per_image = g.oh * g.ow * g.patch();
    if per_image == 0 {
        return;
    }
    cols.par_chunks_mut(per_image)
        .zip(x.par_chunks(g.image_len().max(1)))
        .for_each(|(out, img)| image_to_cols(img, g, out));
}

fn image_to_cols(img: &[f32], g: &ConvGeometry, out: &mut [f32]) {
    let (c, kw) = (g.c, g.kw);
    let row_len = g.patch();
    let span = kw * c;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let row = &mut out[(oy * g.ow + ox) * row_len..][..row_len];
            let ix0 = (ox * g.stride) as isize - g.pad as isize;
            for ky in 0..g.kh {
                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                let dst = &mut row[ky * span..][..span];
                if iy < 0 || iy >= g.h as isize {
                    dst.fill(0.0);
                    continue;
                }
                let line = &img[iy as usize * g.w * c..][..g.w * c];
                if ix0 >= 0 && ix0 as usize + kw <= g.w {
                    dst.copy_from_slice(&line[ix0 as usize * c..][..span]);
                } else {
                    for kx in 0..kw {
                        let ix = ix0 + kx as isize;
                        let d = &mut dst[kx * c..][..c];
                        if ix < 0 || ix >= g.w as isize {
                            d.fill(0.0);
                        } else {
                            d.copy_from_slice(&line[ix as usize * c..][..c]);
                        }
                    }
                }
            }
        }
    }
}

/// Scatters `cols` back onto `dx` (`n × h × w × c`), overwriting `dx` with the sum of every
/// window's contribution: the adjoint of [`im2col`].
pub fn col2im(cols: &[f32], g: &ConvGeometry, dx: &mut [f32]) {
    debug_assert_eq!(dx.len(), g.n * g.image_len());
    debug_assert_eq!(cols.len(), g.rows() * g.patch());
    let per_image = g.oh * g.ow * g.patch();
    if per_image == 0 || g.image_len() == 0 {
        dx.fill(0.0);
        return;
    }
    dx.par_chunks_mut(g.image_len())
        .zip(cols.par_chunks(per_image))
        .for_each(|(img, cols)| cols_to_image(cols, g, img));
}

fn cols_to_image(cols: &[f32], g: &ConvGeometry, img: &mut [f32]) {
    img.fill(0.0);
    let (c, kw) = (g.c, g.kw);
    let row_len = g.patch();
    let span = kw * c;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let row = &cols[(oy * g.ow + ox) * row_len..][..row_len];
            let ix0 = (ox * g.stride) as isize - g.pad as isize;
            for ky in 0..g.kh {
                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let src = &row[ky * span..][..span];
                let line = &mut img[iy as usize * g.w * c..][..g.w * c];
                if ix0 >= 0 && ix0 as usize + kw <= g.w {
                    let dst = &mut line[ix0 as usize * c..][..span];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                } else {
                    for kx in 0..kw {
                        let ix = ix0 + kx as isize;
                        if ix < 0 || ix >= g.w as isize {
                            continue;
                        }
                        let dst = &mut line[ix as usize * c..][..c];
                        for (d, s) in dst.iter_mut().zip(&src[kx * c..][..c]) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;
    use rand::RngExt;

    /// Reference: the definition, one element at a time.
    fn naive_im2col(x: &[f32], g: &ConvGeometry) -> Vec<f32> {
        let mut out = vec![0.0; g.rows() * g.patch()];
        for n in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let r = (n * g.oh + oy) * g.ow + ox;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            for ch in 0..g.c {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                let v =
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        0.0
                                    } else {
                                        x[((n * g.h + iy as usize) * g.w + ix as usize) * g.c + ch]
                                    };
                                out[r * g.patch() + (ky * g.kw + kx) * g.c + ch] = v;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn geometries() -> Vec<ConvGeometry> {
        vec![
            ConvGeometry::new(2, 5, 6, 3, 3, 3, 1, 1).unwrap(),
            ConvGeometry::new(3, 7, 7, 2, 3, 3, 2, 1).unwrap(),
            ConvGeometry::new(1, 4, 4, 5, 1, 1, 2, 0).unwrap(),
            ConvGeometry::new(2, 8, 8, 1, 5, 5, 1, 2).unwrap(),
            ConvGeometry::new(2, 3, 3, 2, 3, 3, 1, 0).unwrap(),
        ]
    }

    #[test]
    fn im2col_matches_reference() {
        let mut r = rng::seeded(1);
        for g in geometries() {
            let x: Vec<f32> = (0..g.n * g.image_len())
                .map(|_| r.random_range(-1.0..1.0))
                .collect();
            let mut cols = vec![f32::NAN; g.rows() * g.patch()];
            im2col(&x, &g, &mut cols);
            assert_eq!(cols, naive_im2col(&x, &g), "{g:?}");
        }
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // <im2col(x), y> == <x, col2im(y)> for all x, y.
        let mut r = rng::seeded(2);
        for g in geometries() {
            let x: Vec<f64> = (0..g.n * g.image_len())
                .map(|_| r.random_range(-1.0..1.0))
                .collect();
            let y: Vec<f64> = (0..g.rows() * g.patch())
                .map(|_| r.random_range(-1.0..1.0))
                .collect();
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let y32: Vec<f32> = y.iter().map(|&v| v as f32).collect();
            let mut cols = vec![0.0; y.len()];
            im2col(&x32, &g, &mut cols);
            let mut dx = vec![f32::NAN; x.len()];
            col2im(&y32, &g, &mut dx);
            let lhs: f64 = cols
                .iter()
                .zip(&y32)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let rhs: f64 = x32
                .iter()
                .zip(&dx)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            assert!(
                (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
                "{g:?}: {lhs} vs {rhs}"
            );
        }
    }
}
