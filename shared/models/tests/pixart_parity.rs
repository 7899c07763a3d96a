//! Parity of the PixArt denoiser with diffusers 0.42.1 `PixArtTransformer2DModel` on the tiny
//! random-weight fixture (`scripts/make_fixtures.py`): a non-square 6×10 latent with a padding
//! mask, and the default 32×32 grid.

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::{ComponentFolder, PipelineFolder};
use relayfarm_models::denoiser::pixart::ACCEPTED_CLASSES;
use relayfarm_models::denoiser::{KvCompressConfig, KvSampling, PixArtOptions, PixArtTransformer};
use relayfarm_models::{ModelError, RunDtype};

const PIPE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/pixart-sigma-tiny"
);
const EXPECTED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/expected/transformer.safetensors"
);

fn load_model(opts: &PixArtOptions) -> anyhow::Result<PixArtTransformer> {
    let pipe = PipelineFolder::open(PIPE)?;
    let comp = pipe.component("transformer", ACCEPTED_CLASSES)?;
    Ok(PixArtTransformer::load(
        &comp,
        RunDtype::F32,
        &Device::Cpu,
        opts,
    )?)
}

struct Case {
    latents: Tensor,
    timestep: Tensor,
    ehs: Tensor,
    mask: Tensor,
    expected: Tensor,
}

fn case(prefix: &str) -> anyhow::Result<Case> {
    let t = candle_core::safetensors::load(EXPECTED, &Device::Cpu)?;
    let get = |name: &str| -> anyhow::Result<Tensor> {
        t.get(&format!("{prefix}{name}"))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("fixture lacks {prefix}{name}"))
    };
    Ok(Case {
        latents: get("hidden_states")?,
        timestep: get("timestep")?,
        ehs: get("encoder_hidden_states")?,
        mask: get("encoder_attention_mask")?,
        expected: get("output")?,
    })
}

/// (max |got − want|, std(want)).
fn error_figures(got: &Tensor, want: &Tensor) -> anyhow::Result<(f32, f32)> {
    let got = got.to_dtype(DType::F32)?;
    let max_abs = (&got - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let w = want.flatten_all()?;
    let mean = w.mean_all()?.to_scalar::<f32>()?;
    let var = w
        .affine(1.0, -(mean as f64))?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok((max_abs, var.sqrt()))
}

fn check(prefix: &str, label: &str) -> anyhow::Result<()> {
    let model = load_model(&PixArtOptions::default())?;
    let c = case(prefix)?;
    let out = model.forward(&c.latents, &c.timestep, &c.ehs, Some(&c.mask))?;
    assert_eq!(out.dims(), c.expected.dims(), "{label}: output shape");
    let (max_abs, std) = error_figures(&out, &c.expected)?;
    let rel = max_abs / std;
    println!("pixart {label}: max_abs {max_abs:.3e}, std {std:.3e}, max_abs/std {rel:.3e}");
    assert!(rel <= 1e-4, "{label}: max_abs/std {rel:.3e} > 1e-4");
    // The fixture's padding mask must matter (otherwise the test would not cover it).
    let unmasked = model.forward(&c.latents, &c.timestep, &c.ehs, None)?;
    let (diff, _) = error_figures(&unmasked, &c.expected)?;
    assert!(
        diff > 1e3 * max_abs.max(1e-7),
        "{label}: mask has no effect ({diff:.3e})"
    );
    Ok(())
}

#[test]
fn non_square_grid_with_padding_mask_matches_diffusers() -> anyhow::Result<()> {
    check("", "6x10 latent, padded caption")
}

#[test]
fn default_grid_matches_diffusers() -> anyhow::Result<()> {
    check("default_", "32x32 latent (default grid)")
}

/// The cached position table must not leak between grid sizes, and a second call must give
/// the same result.
#[test]
fn alternating_grids_reuse_cached_positions() -> anyhow::Result<()> {
    let model = load_model(&PixArtOptions::default())?;
    let a = case("")?;
    let b = case("default_")?;
    let a1 = model.forward(&a.latents, &a.timestep, &a.ehs, Some(&a.mask))?;
    let b1 = model.forward(&b.latents, &b.timestep, &b.ehs, Some(&b.mask))?;
    let a2 = model.forward(&a.latents, &a.timestep, &a.ehs, Some(&a.mask))?;
    assert_eq!(error_figures(&a1, &a2)?.0, 0.0);
    assert!(error_figures(&b1, &b.expected)?.0 / error_figures(&b1, &b.expected)?.1 <= 1e-4);
    Ok(())
}

/// Prepared caption conditioning (the denoising-loop path) gives the same output.
#[test]
fn prepared_text_conditioning_matches_forward() -> anyhow::Result<()> {
    let model = load_model(&PixArtOptions::default())?;
    for prefix in ["", "default_"] {
        let c = case(prefix)?;
        let text = model.encode_text(&c.ehs, Some(&c.mask))?;
        assert_eq!(text.batch_size(), 2);
        let out = model.forward_with_text(&c.latents, &c.timestep, &text)?;
        let direct = model.forward(&c.latents, &c.timestep, &c.ehs, Some(&c.mask))?;
        assert_eq!(error_figures(&out, &direct)?.0, 0.0, "{prefix}");
        // A batch mismatch is an error, not a broadcast.
        let one = c.latents.narrow(0, 0, 1)?;
        let t1 = c.timestep.narrow(0, 0, 1)?;
        assert!(model.forward_with_text(&one, &t1, &text).is_err());
    }
    Ok(())
}

/// Batched output equals one-at-a-time output.
#[test]
fn batch_equals_single() -> anyhow::Result<()> {
    let model = load_model(&PixArtOptions::default())?;
    let c = case("")?;
    let full = model.forward(&c.latents, &c.timestep, &c.ehs, Some(&c.mask))?;
    for i in 0..2 {
        let one = model.forward(
            &c.latents.narrow(0, i, 1)?,
            &c.timestep.narrow(0, i, 1)?,
            &c.ehs.narrow(0, i, 1)?,
            Some(&c.mask.narrow(0, i, 1)?),
        )?;
        let (max_abs, std) = error_figures(&one, &full.narrow(0, i, 1)?)?;
        assert!(max_abs / std <= 1e-5, "sample {i}: {max_abs:.3e}");
    }
    Ok(())
}

/// The original 1024-MS upload declares the generic `Transformer2DModel` class; other classes
/// are refused with the supported list.
#[test]
fn accepts_legacy_class_and_refuses_others() -> anyhow::Result<()> {
    let dir = format!("{PIPE}/transformer");
    let legacy = ComponentFolder::open(&dir, "transformer", "Transformer2DModel".into())?;
    PixArtTransformer::load(
        &legacy,
        RunDtype::F32,
        &Device::Cpu,
        &PixArtOptions::default(),
    )?;
    let other = ComponentFolder::open(&dir, "transformer", "UNet2DConditionModel".into())?;
    let err = PixArtTransformer::load(
        &other,
        RunDtype::F32,
        &Device::Cpu,
        &PixArtOptions::default(),
    )
    .expect_err("a UNet class must be refused");
    assert!(matches!(err, ModelError::UnknownClass { .. }), "{err}");
    Ok(())
}

#[test]
fn bad_inputs_are_rejected() -> anyhow::Result<()> {
    let model = load_model(&PixArtOptions::default())?;
    let c = case("")?;
    // 7 is not a multiple of the patch size 2.
    let odd = Tensor::zeros((2, 4, 7, 10), DType::F32, &Device::Cpu)?;
    assert!(model
        .forward(&odd, &c.timestep, &c.ehs, Some(&c.mask))
        .is_err());
    let wrong_c = Tensor::zeros((2, 3, 6, 10), DType::F32, &Device::Cpu)?;
    assert!(model
        .forward(&wrong_c, &c.timestep, &c.ehs, Some(&c.mask))
        .is_err());
    let short_mask = c.mask.narrow(1, 0, 3)?;
    assert!(model
        .forward(&c.latents, &c.timestep, &c.ehs, Some(&short_mask))
        .is_err());
    assert_eq!(model.out_channels(), 8);
    assert_eq!(model.in_channels(), 4);
    assert_eq!(model.patch_size(), 2);
    assert_eq!(model.sample_size(), 32);
    Ok(())
}

/// KV compression runs on the fixture (no trained `sr` weights → averaging init) in every
/// sampling mode and keeps the output shape; with a 2×2 grid compressed by 2 the model still
/// runs (1 key token).
#[test]
fn kv_compression_runs_in_every_mode() -> anyhow::Result<()> {
    let c = case("")?;
    let plain = load_model(&PixArtOptions::default())?.forward(
        &c.latents,
        &c.timestep,
        &c.ehs,
        Some(&c.mask),
    )?;
    for sampling in [KvSampling::Conv, KvSampling::Uniform, KvSampling::Ave] {
        let opts = PixArtOptions {
            kv_compress: Some(KvCompressConfig {
                layers: vec![1],
                scale_factor: 2,
                sampling,
            }),
        };
        let model = load_model(&opts)?;
        let out = model.forward(&c.latents, &c.timestep, &c.ehs, Some(&c.mask))?;
        assert_eq!(out.dims(), plain.dims());
        let (diff, std) = error_figures(&out, &plain)?;
        // Compression changes the result, but not wildly.
        assert!(
            diff > 0.0 && diff < 10.0 * std,
            "{sampling:?}: {diff} vs std {std}"
        );
        let small = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu)?;
        let t = Tensor::new(&[10f32], &Device::Cpu)?;
        let e = c.ehs.narrow(0, 0, 1)?;
        assert_eq!(model.forward(&small, &t, &e, None)?.dims(), &[1, 8, 4, 4]);
    }
    let bad = PixArtOptions {
        kv_compress: Some(KvCompressConfig {
            layers: vec![2],
            scale_factor: 2,
            sampling: KvSampling::Conv,
        }),
    };
    assert!(load_model(&bad).is_err());
    Ok(())
}
