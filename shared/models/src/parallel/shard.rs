//! Loading one rank's slice of each weight straight from the memory-mapped safetensors.
//!
//! A split weight is read slice by slice from the mapped file: only the bytes of this rank's
//! rows (column-parallel) or of its column range in each row (row-parallel) are touched and
//! copied; the whole tensor is never materialised. Replicated weights are read whole.
//!
//! candle's own `ShardedSafeTensors` also reads only the slice, but it copies byte by byte,
//! does not check the checkpoint's shape when sharding, and its builder type cannot feed the
//! layers that take a plain [`VarBuilder`] (timestep embedding, KV compression); this module
//! serves both from one mapping.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::checkpoint::ComponentFolder;
use crate::{ModelError, Result, RunDtype};

/// Which part of the weights a rank holds: rank `rank` of `world`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardSpec {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Ranks sharing the weights.
    pub world: usize,
}

impl ShardSpec {
    /// Rank `rank` of `world` (checked).
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(ModelError::invalid(
                "tensor parallel",
                format!("rank {rank} of {world} ranks is not a valid shard"),
            ));
        }
        Ok(ShardSpec { rank, world })
    }

    /// The whole model on one rank.
    pub fn single() -> Self {
        ShardSpec { rank: 0, world: 1 }
    }

    /// This rank's part of `len` items (`len / world` of them); an error naming `what` when
    /// `len` does not divide evenly.
    pub fn range(&self, len: usize, what: &str) -> Result<Range<usize>> {
        if !len.is_multiple_of(self.world) {
            return Err(ModelError::invalid(
                "tensor parallel",
                format!(
                    "{what}: {len} does not split evenly over {} ranks",
                    self.world
                ),
            ));
        }
        let part = len / self.world;
        Ok(self.rank * part..(self.rank + 1) * part)
    }
}

/// The memory-mapped files, shared by every view and by the [`VarBuilder`]s made from them.
struct Mapped {
    st: MmapedSafetensors,
    files: Vec<PathBuf>,
}

/// [`SimpleBackend`] over [`Mapped`], so that replicated layers can use a plain [`VarBuilder`].
struct WholeTensors(Arc<Mapped>);

impl SimpleBackend for WholeTensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        SimpleBackend::get(&self.0.st, s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        SimpleBackend::get_unchecked(&self.0.st, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.st.get(name).is_ok()
    }
}

/// One rank's view of a checkpoint's weights: splits weights along a dimension for tensor
/// parallelism and reads replicated ones whole. Cheap to clone; `pp` descends into a prefix as
/// a [`VarBuilder`] does.
#[derive(Clone)]
pub struct ShardedWeights {
    mapped: Arc<Mapped>,
    prefix: Vec<String>,
    shard: ShardSpec,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for ShardedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedWeights")
            .field("files", &self.mapped.files)
            .field("prefix", &self.prefix.join("."))
            .field("shard", &self.shard)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl ShardedWeights {
    /// Memory-maps safetensors files (one checkpoint, possibly in several shards); tensors are
    /// converted to `dtype` on `device` as they are taken.
    pub fn from_files(
        files: &[PathBuf],
        dtype: RunDtype,
        device: &Device,
        shard: ShardSpec,
    ) -> Result<Self> {
        let first = files.first().ok_or_else(|| {
            ModelError::invalid("weights", "no safetensors files to load".to_string())
        })?;
        // SAFETY: the files are memory-mapped read-only; relayfarm never writes checkpoint
        // files, and users are told not to modify a checkpoint while it is being served.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            // Name the file that fails on its own (the header check of each file is cheap).
            // SAFETY: as above.
            let bad = files
                .iter()
                .find(|f| unsafe { MmapedSafetensors::new(f) }.is_err())
                .unwrap_or(first);
            ModelError::corrupt(
                bad,
                format!("not a valid safetensors file ({e}); the download is probably truncated or corrupt: download it again"),
            )
        })?;
        Ok(ShardedWeights {
            mapped: Arc::new(Mapped {
                st,
                files: files.to_vec(),
            }),
            prefix: Vec::new(),
            shard,
            dtype: dtype.dtype(),
            device: device.clone(),
        })
    }

    /// The weights of a component folder (its single or sharded safetensors; `variant` as in
    /// [`ComponentFolder::var_builder`]).
    pub fn from_component(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
        shard: ShardSpec,
    ) -> Result<Self> {
        let files = component.weight_files(variant)?.files;
        Self::from_files(&files, dtype, device, shard)
    }

    /// The rank this view loads for.
    pub fn shard(&self) -> ShardSpec {
        self.shard
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The view under `name` (`pp("transformer_blocks").pp(0)` → `transformer_blocks.0.`).
    pub fn pp(&self, name: impl ToString) -> Self {
        let mut prefix = self.prefix.clone();
        prefix.push(name.to_string());
        ShardedWeights {
            prefix,
            ..self.clone()
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix.join("."))
        }
    }

    /// Whether the checkpoint holds `name` under this prefix.
    pub fn contains_tensor(&self, name: &str) -> bool {
        self.mapped.st.get(&self.path(name)).is_ok()
    }

    /// A [`VarBuilder`] over the same mapping and prefix that reads whole tensors, for layers
    /// that are replicated on every rank.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let vb = VarBuilder::from_backend(
            Box::new(WholeTensors(self.mapped.clone())),
            self.dtype,
            self.device.clone(),
        );
        if self.prefix.is_empty() {
            vb
        } else {
            vb.pp(self.prefix.join("."))
        }
    }

    /// A whole (replicated) tensor of shape `shape`.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.get_split(shape, name, None)
    }

    /// This rank's slice along `dim` of the tensor `name` whose full shape is `shape`.
    ///
    /// Only the slice is read from the mapped file: one contiguous range when every dimension
    /// before `dim` is 1, otherwise one range per leading index.
    pub fn get_split(
        &self,
        shape: impl Into<Shape>,
        name: &str,
        dim: Option<usize>,
    ) -> Result<Tensor> {
        self.get_split_chunks(shape, name, dim, 1)
    }

    /// Like [`ShardedWeights::get_split`] for a tensor whose dimension `dim` holds `chunks`
    /// equal blocks that are split alike (e.g. GEGLU's `[hidden; gate]` projection): this
    /// rank's slice of each block, concatenated in block order. Only those slices are read.
    pub fn get_split_chunks(
        &self,
        shape: impl Into<Shape>,
        name: &str,
        dim: Option<usize>,
        chunks: usize,
    ) -> Result<Tensor> {
        let chunks = chunks.max(1);
        let full_name = self.path(name);
        let want: Shape = shape.into();
        let view = self.mapped.st.get(&full_name)?;
        if view.shape() != want.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {full_name}"),
                expected: want,
                got: view.shape().into(),
            }
            .into());
        }
        let file_dtype: DType = view.dtype().try_into()?;
        let dims = view.shape().to_vec();
        let data = view.data();
        let Some(dim) = dim.filter(|_| self.shard.world > 1) else {
            let whole = 0..data.len();
            let t = from_byte_ranges(
                data,
                std::slice::from_ref(&whole),
                file_dtype,
                &dims,
                &self.device,
            )?;
            return Ok(t.to_dtype(self.dtype)?);
        };
        if dim >= dims.len() {
            return Err(ModelError::invalid(
                "tensor parallel",
                format!("{full_name}: cannot split dimension {dim} of {dims:?}"),
            ));
        }
        if dims[dim] % chunks != 0 {
            return Err(ModelError::invalid(
                "tensor parallel",
                format!("{full_name}: dimension {dim} of {dims:?} is not {chunks} equal blocks"),
            ));
        }
        let block = dims[dim] / chunks;
        let range = self.shard.range(block, &full_name)?;
        let outer: usize = dims[..dim].iter().product();
        let inner_bytes: usize =
            dims[dim + 1..].iter().product::<usize>() * file_dtype.size_in_bytes();
        let row_bytes = dims[dim] * inner_bytes;
        let block_bytes = block * inner_bytes;
        let (lo, hi) = (range.start * inner_bytes, range.end * inner_bytes);
        let mut out_dims = dims.clone();
        out_dims[dim] = range.len() * chunks;
        let ranges: Vec<Range<usize>> = (0..outer)
            .flat_map(|o| {
                (0..chunks).map(move |c| {
                    let base = o * row_bytes + c * block_bytes;
                    base + lo..base + hi
                })
            })
            .collect();
        let t = from_byte_ranges(data, &ranges, file_dtype, &out_dims, &self.device)?;
        Ok(t.to_dtype(self.dtype)?)
    }

    /// Column-parallel weight `name` of full shape `[out, in]`: this rank's `out / world`
    /// output rows.
    pub fn column_weight(&self, out_dim: usize, in_dim: usize, name: &str) -> Result<Tensor> {
        self.get_split((out_dim, in_dim), name, Some(0))
    }

    /// Column-parallel bias `name` of full shape `[out]`: this rank's `out / world` entries.
    pub fn column_bias(&self, out_dim: usize, name: &str) -> Result<Tensor> {
        self.get_split(out_dim, name, Some(0))
    }

    /// Row-parallel weight `name` of full shape `[out, in]`: this rank's `in / world` input
    /// columns of every row.
    pub fn row_weight(&self, out_dim: usize, in_dim: usize, name: &str) -> Result<Tensor> {
        self.get_split((out_dim, in_dim), name, Some(1))
    }

    /// Row-parallel bias `name` `[out]`: the partial outputs of the ranks are summed, so the
    /// bias is added once — whole on rank 0, `None` (not read) on the others.
    pub fn row_bias(&self, out_dim: usize, name: &str) -> Result<Option<Tensor>> {
        if self.shard.rank == 0 {
            Ok(Some(self.get(out_dim, name)?))
        } else {
            Ok(None)
        }
    }
}

/// A tensor of `dtype` and `dims` from the concatenated byte `ranges` of `data` (little-endian
/// elements, as safetensors stores them), copied once into the tensor's own buffer.
fn from_byte_ranges(
    data: &[u8],
    ranges: &[Range<usize>],
    dtype: DType,
    dims: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let total: usize = ranges.iter().map(|r| r.len()).sum();
    let n: usize = dims.iter().product();
    if total != n * dtype.size_in_bytes() || ranges.iter().any(|r| r.end > data.len()) {
        return Err(candle_core::Error::Msg(format!(
            "slice of {total} bytes does not hold {dims:?} {dtype:?}"
        ))
        .into());
    }
    match dtype {
        DType::F32 => typed_from_ranges::<f32>(data, ranges, dims, device),
        DType::F16 => typed_from_ranges::<half::f16>(data, ranges, dims, device),
        DType::BF16 => typed_from_ranges::<half::bf16>(data, ranges, dims, device),
        DType::F64 => typed_from_ranges::<f64>(data, ranges, dims, device),
        _ => {
            let mut buf = Vec::with_capacity(total);
            for r in ranges {
                buf.extend_from_slice(&data[r.clone()]);
            }
            Ok(Tensor::from_raw_buffer(&buf, dtype, dims, device)?)
        }
    }
}

/// [`from_byte_ranges`] for a float element type: the bytes go straight into a `Vec<T>`.
#[cfg(target_endian = "little")]
fn typed_from_ranges<T: candle_core::WithDType>(
    data: &[u8],
    ranges: &[Range<usize>],
    dims: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let size = std::mem::size_of::<T>();
    let mut v: Vec<T> = Vec::with_capacity(n);
    let dst = v.as_mut_ptr().cast::<u8>();
    let mut off = 0usize;
    for r in ranges {
        let src = &data[r.clone()];
        // SAFETY: `from_byte_ranges` checked that the ranges hold exactly `n · size` bytes in
        // all, so every copy stays inside the `n`-element allocation; the source is a plain
        // byte slice (any alignment) that does not overlap the new vector.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(off), src.len()) };
        off += src.len();
    }
    if off != n * size {
        return Err(candle_core::Error::Msg(format!("copied {off} bytes for {n} elements")).into());
    }
    // SAFETY: all `n` elements were initialised above, and every bit pattern is a valid
    // f32/f16/bf16/f64 (the element types this is called with); safetensors stores
    // little-endian values, matching this target.
    unsafe { v.set_len(n) };
    Ok(Tensor::from_vec(v, dims, device)?)
}

#[cfg(not(target_endian = "little"))]
fn typed_from_ranges<T: candle_core::WithDType>(
    data: &[u8],
    ranges: &[Range<usize>],
    dims: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let mut buf = Vec::new();
    for r in ranges {
        buf.extend_from_slice(&data[r.clone()]);
    }
    Ok(Tensor::from_raw_buffer(&buf, T::DTYPE, dims, device)?)
}

/// Bytes of weights a rank holds, split into what tensor parallelism divides across ranks and
/// what every rank keeps whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightFootprint {
    /// Bytes of this rank's slices of split weights.
    pub sharded: usize,
    /// Bytes of replicated weights (and of row-parallel biases, held by rank 0 only).
    pub replicated: usize,
}

impl WeightFootprint {
    /// All bytes.
    pub fn total(&self) -> usize {
        self.sharded + self.replicated
    }

    /// Bytes of a tensor's elements.
    pub fn bytes_of(t: &Tensor) -> usize {
        t.elem_count() * t.dtype().size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tmp(name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relayfarm-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &p).unwrap();
        p
    }

    #[test]
    fn slices_match_narrow_of_the_whole_tensor() {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 48.0, &dev)
            .unwrap()
            .reshape((6, 8))
            .unwrap();
        let w16 = w.to_dtype(DType::F16).unwrap();
        let b = Tensor::arange(0f32, 6.0, &dev).unwrap();
        let p = write_tmp(
            "slices.safetensors",
            &[
                ("l.weight", w.clone()),
                ("l.bias", b.clone()),
                ("h.weight", w16),
            ],
        );
        for world in [1usize, 2] {
            for rank in 0..world {
                let sw = ShardedWeights::from_files(
                    std::slice::from_ref(&p),
                    RunDtype::F32,
                    &dev,
                    ShardSpec::new(rank, world).unwrap(),
                )
                .unwrap();
                let l = sw.pp("l");
                let col = l.column_weight(6, 8, "weight").unwrap();
                let want = w.narrow(0, rank * 6 / world, 6 / world).unwrap();
                assert_eq!(
                    col.to_vec2::<f32>().unwrap(),
                    want.to_vec2::<f32>().unwrap()
                );
                let row = l.row_weight(6, 8, "weight").unwrap();
                let want = w.narrow(1, rank * 8 / world, 8 / world).unwrap();
                assert_eq!(
                    row.to_vec2::<f32>().unwrap(),
                    want.to_vec2::<f32>().unwrap()
                );
                // f16 in the file, f32 out.
                let h = sw.pp("h").row_weight(6, 8, "weight").unwrap();
                assert_eq!(h.dtype(), DType::F32);
                assert_eq!(h.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
                let cb = l.column_bias(6, "bias").unwrap();
                assert_eq!(cb.dims(), [6 / world]);
                assert_eq!(l.row_bias(6, "bias").unwrap().is_some(), rank == 0);
                // Replicated, and the VarBuilder over the same mapping.
                assert_eq!(l.get((6, 8), "weight").unwrap().dims(), [6, 8]);
                assert_eq!(l.var_builder().get(6, "bias").unwrap().dims(), [6]);
                assert!(l.contains_tensor("bias") && !l.contains_tensor("nope"));
            }
        }
        let sw = ShardedWeights::from_files(
            std::slice::from_ref(&p),
            RunDtype::F32,
            &dev,
            ShardSpec::new(1, 4).unwrap(),
        )
        .unwrap();
        let e = sw.pp("l").column_weight(6, 8, "weight").unwrap_err();
        assert!(e.to_string().contains("does not split evenly"), "{e}");
        let e = sw.pp("l").column_weight(8, 6, "weight").unwrap_err();
        assert!(e.to_string().contains("shape mismatch"), "{e}");
        assert!(ShardSpec::new(2, 2).is_err());
    }
}
