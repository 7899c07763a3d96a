//! PNG files with generation metadata (prompt, seed, steps, ... ) in text chunks.

use relayfarm_core::GenerationMetadata;

/// Errors while turning a tensor into a PNG.
#[derive(Debug, thiserror::Error)]
pub enum PngError {
    /// The image tensor is not `[1, 3, H, W]` / `[3, H, W]` f32.
    #[error("image tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The PNG encoder failed.
    #[error("PNG encoding failed: {0}")]
    Encode(#[from] png::EncodingError),
}

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major RGB bytes.
    pub pixels: Vec<u8>,
}

/// Converts an f32 image in [0, 1] (`[1, 3, H, W]` or `[3, H, W]`) to 8-bit RGB, rounding as
/// diffusers' `numpy_to_pil` does (`(x * 255).round()`).
pub fn tensor_to_rgb8(image: &candle_core::Tensor) -> Result<Rgb8, PngError> {
    let image = if image.rank() == 4 {
        image.squeeze(0)?
    } else {
        image.clone()
    };
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        return Err(PngError::Tensor(candle_core::Error::Msg(format!(
            "expected 3 channels, got {c}"
        ))));
    }
    let hwc = image
        .to_dtype(candle_core::DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let pixels = hwc
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok(Rgb8 {
        width: w as u32,
        height: h as u32,
        pixels,
    })
}

/// Encodes an RGB image as PNG with the metadata as `tEXt` chunks (Latin-1 values) or
/// `iTXt` chunks (UTF-8 values: prompts in any language).
pub fn encode_png(image: &Rgb8, metadata: &GenerationMetadata) -> Result<Vec<u8>, PngError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, image.width, image.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in metadata.text_chunks() {
            if value.chars().all(|c| (c as u32) < 0x80 && c != '\0') {
                enc.add_text_chunk(key, value)?;
            } else {
                enc.add_itxt_chunk(key, value)?;
            }
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&image.pixels)?;
        writer.finish()?;
    }
    Ok(out)
}

/// Reads the text chunks of a PNG (for tests and `relayfarm` tools).
pub fn read_png_text(bytes: &[u8]) -> Result<Vec<(String, String)>, png::DecodingError> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info()?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trip() {
        let meta = GenerationMetadata {
            prompt: "一只猫 in the snow".into(),
            negative_prompt: "".into(),
            seed: 42,
            steps: 20,
            guidance: 4.5,
            width: 2,
            height: 1,
            model: "tiny".into(),
            scheduler: "DPMSolverMultistepScheduler".into(),
            dtype: "f32".into(),
            version: "0.1.0".into(),
        };
        let img = Rgb8 {
            width: 2,
            height: 1,
            pixels: vec![0, 0, 0, 255, 255, 255],
        };
        let bytes = encode_png(&img, &meta).unwrap();
        let text = read_png_text(&bytes).unwrap();
        let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
        assert_eq!(get("prompt").as_deref(), Some("一只猫 in the snow"));
        assert_eq!(get("seed").as_deref(), Some("42"));
        assert_eq!(
            get("scheduler").as_deref(),
            Some("DPMSolverMultistepScheduler")
        );
        assert_eq!(get("size").as_deref(), Some("2x1"));
    }
}
