//! Per-rank weight memory of the tensor-parallel PixArt-Σ denoiser (work in progress).

fn main() {}
