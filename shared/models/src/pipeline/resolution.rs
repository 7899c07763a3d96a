//! Resolution binning (diffusers' `PixArtImageProcessor`): generate at the aspect-ratio bin
//! closest to the requested size, then resize and centre-crop back to the request.

use super::aspect_ratio_bins::{BIN_1024, BIN_2048, BIN_256, BIN_512};
use crate::{ModelError, Result};
use candle_core::{Device, Tensor};

/// The bin table diffusers' PixArt-Σ pipeline uses for a transformer `sample_size`.
pub fn bin_table_for_sample_size(
    sample_size: usize,
) -> Result<&'static [(&'static str, u32, u32)]> {
    match sample_size {
        256 => Ok(BIN_2048),
        128 => Ok(BIN_1024),
        64 => Ok(BIN_512),
        32 => Ok(BIN_256),
        other => Err(ModelError::UnsupportedConfig {
            component: "transformer".into(),
            field: "sample_size".into(),
            value: other.to_string(),
            hint: "resolution binning has tables for sample_size 32, 64, 128 and 256 only; render with --no-resolution-binning".into(),
        }),
    }
}

/// `classify_height_width_bin`: the (height, width) of the bin whose ratio key is closest to
/// `height / width` (first one on ties, as Python's `min` over the dict).
pub fn classify_height_width_bin(
    height: u32,
    width: u32,
    table: &[(&str, u32, u32)],
) -> (u32, u32) {
    let ar = height as f64 / width as f64;
    let mut best = (f64::INFINITY, table[0].1, table[0].2);
    for &(key, h, w) in table {
        let k: f64 = key.parse().unwrap_or(f64::NAN);
        let d = (k - ar).abs();
        if d < best.0 {
            best = (d, h, w);
        }
    }
    (best.1, best.2)
}

/// `resize_and_crop_tensor`: bilinear resize (align_corners = false, source scale in/out per
/// axis, as `F.interpolate(size=...)`) to cover the requested size, then centre crop.
/// `samples` is `[B, C, H, W]`; works on any dtype (computed in f32 on the host).
pub fn resize_and_crop(samples: &Tensor, new_height: usize, new_width: usize) -> Result<Tensor> {
    let (b, c, h, w) = samples.dims4()?;
    if h == new_height && w == new_width {
        return Ok(samples.clone());
    }
    let ratio = f64::max(new_height as f64 / h as f64, new_width as f64 / w as f64);
    let rw = (w as f64 * ratio) as usize;
    let rh = (h as f64 * ratio) as usize;
    let device = samples.device().clone();
    let dtype = samples.dtype();
    let src: Vec<f32> = samples
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let resized = bilinear(&src, b * c, h, w, rh, rw);
    let y0 = (rh - new_height) / 2;
    let x0 = (rw - new_width) / 2;
    let mut out = Vec::with_capacity(b * c * new_height * new_width);
    for plane in 0..b * c {
        for y in 0..new_height {
            let row = plane * rh * rw + (y0 + y) * rw + x0;
            out.extend_from_slice(&resized[row..row + new_width]);
        }
    }
    Ok(
        Tensor::from_vec(out, (b, c, new_height, new_width), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&device)?,
    )
}

/// Source index and weight for one output coordinate (PyTorch's `area_pixel_compute_source_index`).
fn source_index(dst: usize, in_size: usize, out_size: usize) -> (usize, usize, f32) {
    let scale = in_size as f32 / out_size as f32;
    let src = ((dst as f32 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src as usize).min(in_size - 1);
    let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
    (i0, i1, src - i0 as f32)
}

fn bilinear(src: &[f32], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let ys: Vec<_> = (0..oh).map(|y| source_index(y, h, oh)).collect();
    let xs: Vec<_> = (0..ow).map(|x| source_index(x, w, ow)).collect();
    let mut out = vec![0f32; planes * oh * ow];
    for p in 0..planes {
        let s = &src[p * h * w..(p + 1) * h * w];
        let o = &mut out[p * oh * ow..(p + 1) * oh * ow];
        for (y, &(y0, y1, ly)) in ys.iter().enumerate() {
            for (x, &(x0, x1, lx)) in xs.iter().enumerate() {
                let top = (1.0 - lx) * s[y0 * w + x0] + lx * s[y0 * w + x1];
                let bot = (1.0 - lx) * s[y1 * w + x0] + lx * s[y1 * w + x1];
                o[y * ow + x] = (1.0 - ly) * top + ly * bot;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_match_diffusers_examples() {
        // 200×300 with the 256 table → 208×304 (diffusers, checked in the fixture generator).
        assert_eq!(classify_height_width_bin(200, 300, BIN_256), (208, 304));
        assert_eq!(
            classify_height_width_bin(1024, 1024, BIN_1024),
            (1024, 1024)
        );
        assert_eq!(BIN_2048.len(), 40);
        assert_eq!(BIN_1024.len(), 33);
    }

    #[test]
    fn resize_crop_shape_and_offsets() {
        // Spec example: 208×304 → requested 180×263 resizes to 180×263 (ratio from height).
        let t = Tensor::arange(0f32, (208 * 304) as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 208, 304))
            .unwrap();
        let r = resize_and_crop(&t, 180, 263).unwrap();
        assert_eq!(r.dims4().unwrap(), (1, 1, 180, 263));
    }

    #[test]
    fn bilinear_matches_torch_small() {
        // torch: F.interpolate(arange(4.).view(1,1,2,2), size=(3,3), mode="bilinear", align_corners=False)
        let out = bilinear(&[0., 1., 2., 3.], 1, 2, 2, 3, 3);
        let expect = [0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0];
        for (a, b) in out.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }
}
