//! Embeddings shared by the diffusion transformers.
//!
//! - [`Timesteps`]: the sinusoidal timestep code of diffusers' `get_timestep_embedding`
//!   (models-spec §0.1).
//! - [`TimestepEmbedding`]: the `linear_1 → SiLU → linear_2` MLP applied to that code.
//! - [`get_2d_sincos_pos_embed`]: the 2-D sin-cos position table of diffusers'
//!   `get_2d_sincos_pos_embed` (models-spec §0.2), computed on the host the way diffusers does
//!   (positions in f32, frequencies and sin/cos in f64, result rounded to f32).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::Result;

/// Sinusoidal timestep code, diffusers `Timesteps(num_channels, flip_sin_to_cos,
/// downscale_freq_shift)` with `scale = 1` and `max_period = 10000`.
///
/// For `half = dim / 2`, the frequencies are `f_i = exp(-ln(10000)·i / (half - shift))`
/// (computed in f32 like PyTorch), `a = t·f`, and the output is `[sin(a), cos(a)]`, or
/// `[cos(a), sin(a)]` with `flip_sin_to_cos`; an odd `dim` gets one zero column at the end.
/// The frequency row is built once, on the device, at construction.
#[derive(Debug, Clone)]
pub struct Timesteps {
    freqs: Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
}

impl Timesteps {
    /// Builds the frequency row for a `dim`-wide code on `device`.
    pub fn new(
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f64,
        device: &Device,
    ) -> Result<Self> {
        let freqs = timestep_frequencies(dim / 2, downscale_freq_shift, 10000.0);
        let n = freqs.len();
        let freqs = Tensor::from_vec(freqs, (1, n), device)?;
        Ok(Self {
            freqs,
            dim,
            flip_sin_to_cos,
        })
    }

    /// The width of the code.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `t` `[B]` (any float dtype; computed in f32) → code `[B, dim]` in f32.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?.flatten_all()?.unsqueeze(1)?;
        let args = t.broadcast_mul(&self.freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let mut parts = if self.flip_sin_to_cos {
            vec![cos, sin]
        } else {
            vec![sin, cos]
        };
        if self.dim % 2 == 1 {
            let b = t.dim(0)?;
            parts.push(Tensor::zeros((b, 1), DType::F32, t.device())?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// The `half` frequencies `exp(-ln(max_period)·i / (half - shift))`, in f32 arithmetic as
/// diffusers' `get_timestep_embedding` computes them.
pub fn timestep_frequencies(half: usize, downscale_freq_shift: f64, max_period: f64) -> Vec<f32> {
    let log_period = -(max_period.ln() as f32);
    let denom = (half as f64 - downscale_freq_shift) as f32;
    (0..half)
        .map(|i| (log_period * i as f32 / denom).exp())
        .collect()
}

/// diffusers `TimestepEmbedding` (default settings): `linear_1 → SiLU → linear_2`, both
/// linears with bias. Keys: `linear_1.{weight,bias}`, `linear_2.{weight,bias}`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads the MLP `in_channels → time_embed_dim → time_embed_dim`.
    pub fn new(in_channels: usize, time_embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let linear_1 = candle_nn::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?;
        let linear_2 = candle_nn::linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?;
        Ok(Self { linear_1, linear_2 })
    }

    /// `x` `[B, in_channels]` in the weights' dtype → `[B, time_embed_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(x)?.silu()?;
        Ok(self.linear_2.forward(&h)?)
    }
}

/// One 1-D sin-cos code of width `dim` for `pos`, appended to `out` as
/// `[sin(pos·ω), cos(pos·ω)]` with `ω_k = 10000^(-k/(dim/2))` (f64, like diffusers).
fn push_sincos_1d(out: &mut Vec<f32>, omega: &[f64], pos: f64) {
    out.extend(omega.iter().map(|&w| (pos * w).sin() as f32));
    out.extend(omega.iter().map(|&w| (pos * w).cos() as f32));
}

/// diffusers `get_2d_sincos_pos_embed(embed_dim, (grid_h, grid_w), base_size,
/// interpolation_scale)`: a row-major `[grid_h·grid_w, embed_dim]` table (as a flat `Vec`).
///
/// Token `(i, j)` (row `i`, column `j`) holds the 1-D code of the column position
/// `j / (grid_w / base_size) / interpolation_scale` in its first `embed_dim/2` channels and that
/// of the row position `i / (grid_h / base_size) / interpolation_scale` in the last
/// `embed_dim/2` (diffusers' `meshgrid(w, h)` puts the column coordinate first). Positions are
/// rounded to f32 as in PyTorch; the sines and cosines are taken in f64 and rounded to f32.
///
/// `embed_dim` must be a multiple of 4 (diffusers requires even halves).
pub fn get_2d_sincos_pos_embed(
    embed_dim: usize,
    grid_h: usize,
    grid_w: usize,
    base_size: usize,
    interpolation_scale: f64,
) -> Result<Vec<f32>> {
    if !embed_dim.is_multiple_of(4) {
        return Err(crate::ModelError::invalid(
            "embed_dim",
            format!("2-D sin-cos positions need a multiple of 4, got {embed_dim}"),
        ));
    }
    if grid_h == 0 || grid_w == 0 || base_size == 0 {
        return Err(crate::ModelError::invalid(
            "grid",
            format!("empty position grid {grid_h}x{grid_w} (base size {base_size})"),
        ));
    }
    let half = embed_dim / 2;
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let axis = |n: usize| -> Vec<f64> {
        let div = (n as f64 / base_size as f64) as f32;
        let interp = interpolation_scale as f32;
        (0..n).map(|i| (i as f32 / div / interp) as f64).collect()
    };
    let pos_h = axis(grid_h);
    let pos_w = axis(grid_w);
    // Each distinct column / row code is computed once, then copied per token.
    let mut col_codes = Vec::with_capacity(grid_w * half);
    for &p in &pos_w {
        push_sincos_1d(&mut col_codes, &omega, p);
    }
    let mut row_codes = Vec::with_capacity(grid_h * half);
    for &p in &pos_h {
        push_sincos_1d(&mut row_codes, &omega, p);
    }
    let mut table = Vec::with_capacity(grid_h * grid_w * embed_dim);
    for i in 0..grid_h {
        let row = &row_codes[i * half..(i + 1) * half];
        for j in 0..grid_w {
            table.extend_from_slice(&col_codes[j * half..(j + 1) * half]);
            table.extend_from_slice(row);
        }
    }
    Ok(table)
}

/// [`get_2d_sincos_pos_embed`] as a `[1, grid_h·grid_w, embed_dim]` tensor of `dtype` on
/// `device`, ready to be added to `[B, N, embed_dim]` tokens.
pub fn sincos_pos_embed_2d_tensor(
    embed_dim: usize,
    grid_h: usize,
    grid_w: usize,
    base_size: usize,
    interpolation_scale: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let table = get_2d_sincos_pos_embed(embed_dim, grid_h, grid_w, base_size, interpolation_scale)?;
    let t = Tensor::from_vec(table, (1, grid_h * grid_w, embed_dim), device)?;
    Ok(t.to_dtype(dtype)?)
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // reference values printed by Python
mod tests {
    use super::*;

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "index {k}: got {g}, want {w}");
        }
    }

    /// Values from diffusers 0.42.1:
    /// `get_2d_sincos_pos_embed(8, (2, 3), base_size=4, interpolation_scale=1.5).float()`.
    #[test]
    fn sincos_2d_small_non_square_grid_matches_diffusers() {
        #[rustfmt::skip]
        let want: [f32; 48] = [
            0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0,
            7.763718963e-01, 8.888771757e-03, 6.302750707e-01, 9.999604821e-01, 0.0, 0.0, 1.0, 1.0,
            9.786556959e-01, 1.777684130e-02, -2.055067271e-01, 9.998419881e-01, 0.0, 0.0, 1.0, 1.0,
            0.0, 0.0, 1.0, 1.0, 9.719378948e-01, 1.333293878e-02, 2.352375388e-01, 9.999111295e-01,
            7.763718963e-01, 8.888771757e-03, 6.302750707e-01, 9.999604821e-01,
            9.719378948e-01, 1.333293878e-02, 2.352375388e-01, 9.999111295e-01,
            9.786556959e-01, 1.777684130e-02, -2.055067271e-01, 9.998419881e-01,
            9.719378948e-01, 1.333293878e-02, 2.352375388e-01, 9.999111295e-01,
        ];
        let got = get_2d_sincos_pos_embed(8, 2, 3, 4, 1.5).unwrap();
        assert_close(&got, &want, 1e-7);
    }

    /// Spot rows from diffusers 0.42.1:
    /// `get_2d_sincos_pos_embed(16, (48, 80), base_size=64, interpolation_scale=2).float()`,
    /// rows 1000 and 3839 (large positions, where f32 rounding of the positions matters).
    #[test]
    fn sincos_2d_large_grid_spot_rows_match_diffusers() {
        #[rustfmt::skip]
        let row_1000: [f32; 16] = [
            -2.879033089e-01, 9.995735884e-01, 1.593182087e-01, 1.599931717e-02,
            -9.576594830e-01, -2.919952199e-02, 9.872272611e-01, 9.998720288e-01,
            9.893582463e-01, 7.173560858e-01, 7.991469651e-02, 7.999914698e-03,
            -1.455000341e-01, 6.967067122e-01, 9.968017340e-01, 9.999679923e-01,
        ];
        #[rustfmt::skip]
        let row_3839: [f32; 16] = [
            1.830361038e-01, -1.840634458e-02, 3.107671142e-01, 3.159474209e-02,
            9.831061959e-01, -9.998306036e-01, 9.504860640e-01, 9.995007515e-01,
            -8.249869943e-02, 8.259163238e-03, 3.082313836e-01, 3.132820874e-02,
            9.965911508e-01, -9.999659061e-01, 9.513114095e-01, 9.995091558e-01,
        ];
        let got = get_2d_sincos_pos_embed(16, 48, 80, 64, 2.0).unwrap();
        assert_eq!(got.len(), 48 * 80 * 16);
        assert_close(&got[1000 * 16..1001 * 16], &row_1000, 1e-7);
        assert_close(&got[3839 * 16..3840 * 16], &row_3839, 1e-7);
    }

    #[test]
    fn sincos_2d_rejects_bad_dims() {
        assert!(get_2d_sincos_pos_embed(6, 2, 2, 2, 1.0).is_err());
        assert!(get_2d_sincos_pos_embed(8, 0, 2, 2, 1.0).is_err());
    }

    /// Values from diffusers 0.42.1: `get_timestep_embedding(torch.tensor([0., 1., 999., 500.5]),
    /// 8, flip_sin_to_cos=True, downscale_freq_shift=0)`.
    #[test]
    fn timestep_code_matches_diffusers() {
        #[rustfmt::skip]
        let want: [f32; 32] = [
            1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
            5.403023362e-01, 9.950041771e-01, 9.999499917e-01, 9.999995232e-01,
            8.414709568e-01, 9.983341396e-02, 9.999833070e-03, 9.999998147e-04,
            9.996498227e-01, 8.074550629e-01, -8.444697857e-01, 5.411435366e-01,
            -2.646075189e-02, -5.899291039e-01, -5.356031656e-01, 8.409302235e-01,
            -5.513889790e-01, 9.768723845e-01, 2.884533405e-01, 8.773427606e-01,
            -8.342483044e-01, -2.138232291e-01, -9.574939609e-01, 4.798642397e-01,
        ];
        let dev = Device::Cpu;
        let ts = Timesteps::new(8, true, 0.0, &dev).unwrap();
        let t = Tensor::new(&[0f32, 1.0, 999.0, 500.5], &dev).unwrap();
        let got = ts.forward(&t).unwrap();
        assert_eq!(got.dims(), &[4, 8]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        // sin/cos of arguments up to ~1000 in f32: allow a few ulps of the argument.
        assert_close(&got, &want, 2e-6);
    }

    #[test]
    fn timestep_code_unflipped_and_odd_width() {
        let dev = Device::Cpu;
        let ts = Timesteps::new(5, false, 1.0, &dev).unwrap();
        let t = Tensor::new(&[2f32], &dev).unwrap();
        let got: Vec<f32> = ts
            .forward(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // half = 2, shift 1: f = [1, exp(-ln 1e4)] = [1, 1e-4]
        let want = [
            2f32.sin(),
            (2e-4f32).sin(),
            2f32.cos(),
            (2e-4f32).cos(),
            0.0,
        ];
        assert_close(&got, &want, 1e-6);
    }
}
