//! A contact sheet: one grid image with a thumbnail of every image of a prompt set.

use image::{imageops, RgbImage};
use std::path::Path;

/// Builds a grid of thumbnails (each fitted into `cell`×`cell`, aspect kept, centred) with
/// `columns` columns (default: about square). Unreadable images leave a grey cell.
pub fn contact_sheet(images: &[&Path], cell: u32, columns: Option<u32>) -> RgbImage {
    let n = images.len().max(1) as u32;
    let cols = columns
        .unwrap_or_else(|| (n as f64).sqrt().ceil() as u32)
        .clamp(1, n);
    let rows = n.div_ceil(cols);
    let pad = 4;
    let mut sheet = RgbImage::from_pixel(
        cols * (cell + pad) + pad,
        rows * (cell + pad) + pad,
        image::Rgb([24, 24, 24]),
    );
    for (i, path) in images.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        let x0 = pad + c * (cell + pad);
        let y0 = pad + r * (cell + pad);
        let thumb = match image::open(path) {
            Ok(img) => img.thumbnail(cell, cell).to_rgb8(),
            Err(_) => RgbImage::from_pixel(cell, cell, image::Rgb([96, 96, 96])),
        };
        let dx = (cell - thumb.width()) / 2;
        let dy = (cell - thumb.height()) / 2;
        imageops::overlay(&mut sheet, &thumb, (x0 + dx) as i64, (y0 + dy) as i64);
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_size() {
        let d = std::env::temp_dir().join(format!("relayfarm-sheet-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("a.png");
        RgbImage::from_pixel(20, 10, image::Rgb([255, 0, 0]))
            .save(&p)
            .unwrap();
        let paths = [p.as_path(), p.as_path(), p.as_path()];
        let sheet = contact_sheet(&paths, 32, None);
        // 3 images → 2 columns × 2 rows of 32 px cells with 4 px gaps.
        assert_eq!((sheet.width(), sheet.height()), (2 * 36 + 4, 2 * 36 + 4));
        // The red thumbnail is centred in the first cell.
        assert_eq!(sheet.get_pixel(4 + 16, 4 + 16), &image::Rgb([255, 0, 0]));
        let _ = std::fs::remove_dir_all(d);
    }
}
