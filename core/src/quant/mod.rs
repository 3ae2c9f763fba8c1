//! Frozen base-weight storage: GGML blocks kept as shipped in a GGUF file, or NF4 (+double
//! quantization) made on load. Only this module knows codebooks and block layouts; the rest of
//! graft sees a [`PackedWeight`] that can dequantize itself, whole or by rows.

mod device_copies;
mod encode;
mod ggml;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) mod gpu;
mod kernels;
mod kernels_q8;
pub mod mix;
pub mod nf4;

use std::sync::Arc;

pub use encode::EncodeError;
pub use ggml::GgmlType;
pub(crate) use kernels::avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use kernels::avx2::hsum;
pub use nf4::Nf4Tensor;

/// How a base weight is stored, as named on the command line and in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// Keep what the checkpoint ships (GGUF blocks stay packed; safetensors load dense).
    Keep,
    /// Quantize dense weights to NF4 with double quantization on load.
    Nf4,
    /// Expand every weight to dense f32 (plain LoRA on a full-precision base).
    None,
}

impl std::str::FromStr for QuantKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keep" => Ok(QuantKind::Keep),
            "none" => Ok(QuantKind::None),
            "nf4" => Ok(QuantKind::Nf4),
            other => Err(format!(
                "unknown quantization '{other}' (expected 'keep', 'none' or 'nf4')"
            )),
        }
    }
}

impl std::fmt::Display for QuantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuantKind::Keep => "keep",
            QuantKind::Nf4 => "nf4",
            QuantKind::None => "none",
        })
    }
}

crate::serde_as_str!(QuantKind);

/// What the activations are rounded to before they meet a packed weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activations {
    /// Kept in f32: the reference numerics the parity tests hold graft to.
    #[default]
    F32,
    /// Rounded to 8 bits per block of 32 (one f32 scale each) and multiplied with integer dot
    /// products, as llama.cpp does, for decode and prefill alike. Block types without such a
    /// kernel (NF4, Q5_1, Q2_K, Q3_K, the IQ types, MXFP4) keep f32 activations.
    Q8,
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Activations::F32),
            "q8" => Ok(Activations::Q8),
            other => Err(format!(
                "unknown activation precision '{other}' (expected 'q8' or 'f32')"
            )),
        }
    }
}

impl std::fmt::Display for Activations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Activations::F32 => "f32",
            Activations::Q8 => "q8",
        })
    }
}

crate::serde_as_str!(Activations);

/// Packed bytes that do not fit the shape they are said to have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{cols} columns is not a whole number of {ty:?} blocks of {block}")]
    PartialBlock {
        ty: GgmlType,
        cols: usize,
        block: usize,
    },
    #[error("{bytes} bytes of {ty:?} do not hold a [{rows}, {cols}] weight ({expected} expected)")]
    Size {
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: usize,
        expected: usize,
    },
}

/// Packed bytes, shared by every weight that views them: owned, or a range of a memory-mapped
/// file (a GGUF's tensor data, paged in by the kernel when first read and dropped under memory
/// pressure like any file cache, so a 30B-A3B model's experts that no token chooses never
/// occupy memory). As with llama.cpp's mmap, the file must not change while it is mapped.
#[derive(Clone)]
pub enum SharedBytes {
    Owned(Arc<[u8]>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        range: std::ops::Range<usize>,
    },
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            SharedBytes::Owned(b) => b,
            SharedBytes::Mapped { map, range } => &map[range.clone()],
        }
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharedBytes::Owned(b) => write!(f, "Owned({} bytes)", b.len()),
            SharedBytes::Mapped { range, .. } => write!(f, "Mapped({range:?})"),
        }
    }
}

impl From<Arc<[u8]>> for SharedBytes {
    fn from(b: Arc<[u8]>) -> Self {
        SharedBytes::Owned(b)
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(b: Vec<u8>) -> Self {
        SharedBytes::Owned(b.into())
    }
}

impl SharedBytes {
    /// Whether the bytes are a mapped file's, not a copy.
    pub fn is_mapped(&self) -> bool {
        matches!(self, SharedBytes::Mapped { .. })
    }
}

/// A frozen 2-D weight `[rows, cols]` kept packed in memory: the whole of its storage, or a
/// run of rows of a larger weight sharing that storage (one expert of a GGUF 3-D expert
/// tensor, see [`PackedWeight::rows_view`]).
#[derive(Debug, Clone)]
pub struct PackedWeight {
    pub rows: usize,
    pub cols: usize,
    /// The first row of `data` this weight is (0 unless it is a view).
    first_row: usize,
    data: PackedData,
    /// How [`Self::matmul_t`] treats its activations.
    activations: Activations,
    /// The storage on GPU devices (shared with the clones and views that share `data`).
    copies: Arc<device_copies::DeviceCopies>,
}

/// A packed weight's storage as a GPU kernel reads it (see [`PackedWeight::storage`]).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) enum Storage<'a> {
    /// Every row's GGML blocks, `row_bytes` per row.
    Ggml {
        ty: GgmlType,
        bytes: &'a [u8],
        row_bytes: usize,
    },
    /// NF4 codes (two per byte, the first in the high nibble) over the row-major flattening,
    /// and one absmax per [`nf4::BLOCK`] values.
    Nf4 { codes: &'a [u8], absmax: &'a [f32] },
}

#[derive(Debug, Clone)]
enum PackedData {
    /// GGML blocks along each row (`cols` is a multiple of the block size).
    Ggml { ty: GgmlType, bytes: SharedBytes },
    /// NF4 over the row-major flattening, with the absmaxes already expanded to f32 once
    /// (one f32 per 64 values: 1/16 of a byte per weight).
    Nf4 {
        q: Arc<Nf4Tensor>,
        absmax: Arc<[f32]>,
    },
}

impl PackedWeight {
    /// Wraps GGML bytes of a `[rows, cols]` weight.
    ///
    /// # Errors
    /// When `cols` is not a whole number of blocks or the byte count is not the one implied.
    pub fn ggml(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: SharedBytes,
    ) -> Result<Self, LayoutError> {
        let row_bytes = ty.bytes_for(cols as u64).ok_or(LayoutError::PartialBlock {
            ty,
            cols,
            block: ty.block_size(),
        })?;
        if row_bytes as usize * rows != bytes.len() {
            return Err(LayoutError::Size {
                ty,
                rows,
                cols,
                bytes: bytes.len(),
                expected: row_bytes as usize * rows,
            });
        }
        Ok(PackedWeight {
            rows,
            cols,
            first_row: 0,
            data: PackedData::Ggml { ty, bytes },
            activations: Activations::F32,
            copies: Arc::default(),
        })
    }

    /// Quantizes a dense row-major `[rows, cols]` weight to NF4 with double quantization.
    pub fn nf4(rows: usize, cols: usize, w: &[f32]) -> Self {
        let q = Nf4Tensor::quantize(w, true);
        let absmax = q.absmax().into();
        PackedWeight {
            rows,
            cols,
            first_row: 0,
            data: PackedData::Nf4 {
                q: Arc::new(q),
                absmax,
            },
            activations: Activations::F32,
            copies: Arc::default(),
        }
    }

    /// Whether the packed bytes are a memory-mapped file's (a GGUF's), not a copy.
    pub fn is_mapped(&self) -> bool {
        matches!(&self.data, PackedData::Ggml { bytes, .. } if bytes.is_mapped())
    }

    /// A short description of the storage, e.g. `Q4_1` or `NF4`.
    pub fn kind_name(&self) -> String {
        match &self.data {
            PackedData::Ggml { ty, .. } => format!("{ty:?}"),
            PackedData::Nf4 { .. } => "NF4".into(),
        }
    }

    /// Rows `start..start + n` as a weight of their own that shares this one's storage (no
    /// copy): e.g. expert `e` of a `[experts · rows, cols]` stack is `rows_view(e · rows, rows)`.
    ///
    /// # Panics
    /// When the rows are not all inside this weight.
    pub fn rows_view(&self, start: usize, n: usize) -> PackedWeight {
        assert!(
            start + n <= self.rows,
            "rows {start}..{} of a weight with {} rows",
            start + n,
            self.rows
        );
        PackedWeight {
            rows: n,
            cols: self.cols,
            first_row: self.first_row + start,
            data: self.data.clone(),
            activations: self.activations,
            copies: self.copies.clone(),
        }
    }

    /// The whole storage this weight is (some rows of), for a GPU kernel to upload once.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    pub(crate) fn storage(&self) -> Storage<'_> {
        match &self.data {
            PackedData::Ggml { ty, bytes } => Storage::Ggml {
                ty: *ty,
                bytes,
                row_bytes: ty
                    .bytes_for(self.cols as u64)
                    .expect("whole blocks per row: checked by PackedWeight::ggml")
                    as usize,
            },
            PackedData::Nf4 { q, absmax } => Storage::Nf4 {
                codes: &q.packed,
                absmax,
            },
        }
    }

    /// The row of [`Self::storage`] this weight's row 0 is.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    pub(crate) fn first_row(&self) -> usize {
        self.first_row
    }

    /// The storage's copies on GPU devices.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    pub(crate) fn device_copies(&self) -> &device_copies::DeviceCopies {
        &self.copies
    }

    /// This weight with its products taking `activations` (see [`Activations`]).
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }

    /// How this weight's products treat their activations.
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Whether [`Self::matmul_t`] rounds the activations to 8 bits: asked for, and an integer
    /// kernel exists for this block type and CPU. Such a weight takes that path at every batch
    /// size (prefill too), so a row's result never depends on how many rows came with it.
    pub fn integer_path(&self) -> bool {
        self.activations == Activations::Q8 && kernels_q8::available(self)
    }

    /// Bytes of memory the packed weight's rows hold (a view's share of its storage).
    pub fn n_bytes(&self) -> usize {
        match &self.data {
            PackedData::Ggml { ty, .. } => {
                ty.bytes_for(self.cols as u64).unwrap_or(0) as usize * self.rows
            }
            PackedData::Nf4 { q, absmax } => {
                let all = q.n_bytes() + absmax.len() * 4;
                let total_rows = (q.len / self.cols.max(1)).max(1);
                all * self.rows / total_rows
            }
        }
    }

    /// Dequantizes rows `start..start + n` into a row-major buffer of `n * cols` values.
    pub fn dequantize_rows(&self, start: usize, n: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), n * self.cols);
        let start = self.first_row + start;
        match &self.data {
            PackedData::Ggml { ty, bytes } => {
                let rb = ty.bytes_for(self.cols as u64).unwrap_or(0) as usize;
                ty.dequantize(&bytes[start * rb..(start + n) * rb], out);
            }
            PackedData::Nf4 { q, absmax } => q.dequantize_range(absmax, start * self.cols, out),
        }
    }

    /// `x·Wᵀ` for `n` rows of `x` (`[n, cols]`, row-major) → `[n, rows]`, without ever
    /// holding the f32 weight. Uses the SIMD kernels of `kernels.rs` where the CPU and block
    /// type have one; otherwise each task dequantizes a few weight rows at a time into a small
    /// buffer and takes their dot products with every row of `x`. Either way each output is one
    /// dot product in a fixed order, so a row's result does not depend on `n` (batch-invariant).
    /// With [`Activations::Q8`] the rows of `x` are first rounded to 8 bits per block where
    /// the block type has an integer kernel (`kernels_q8.rs`).
    pub fn matmul_t(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_t_then(x, n, None)
    }

    /// [`Self::matmul_t`], running `then(o, ys)` on the outputs of consecutive weight rows from
    /// `o` as soon as a task has computed them (`ys[j·n + i]`: weight row `o + j`, activation
    /// row `i`).
    pub fn matmul_t_then(
        &self,
        x: &[f32],
        n: usize,
        then: Option<&(dyn Fn(usize, &mut [f32]) + Sync)>,
    ) -> Vec<f32> {
        debug_assert_eq!(x.len(), n * self.cols);
        if n == 0 {
            return Vec::new();
        }
        if self.activations == Activations::Q8 {
            if let Some(y) = kernels_q8::matmul_t(self, x, n, then) {
                return y;
            }
        }
        kernels::matmul_t(self, x, n, then)
            .unwrap_or_else(|| self.matmul_t_portable_then(x, n, then))
    }

    /// The portable path of [`Self::matmul_t`] (also the reference its SIMD kernels are
    /// tested against).
    pub fn matmul_t_portable(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_t_portable_then(x, n, None)
    }

    fn matmul_t_portable_then(
        &self,
        x: &[f32],
        n: usize,
        then: Option<&(dyn Fn(usize, &mut [f32]) + Sync)>,
    ) -> Vec<f32> {
        use rayon::prelude::*;
        const TILE: usize = 16;
        let (rows, cols) = (self.rows, self.cols);
        // Outputs by weight row (`[rows, n]`) so each task owns a contiguous slice.
        let mut by_row = vec![0f32; rows * n];
        by_row
            .par_chunks_mut(TILE * n.max(1))
            .enumerate()
            .for_each(|(c, part)| {
                let (o, t) = (c * TILE, part.len() / n.max(1));
                let mut buf = vec![0f32; t * cols];
                self.dequantize_rows(o, t, &mut buf);
                for (j, w) in buf.chunks_exact(cols).enumerate() {
                    for r in 0..n {
                        part[j * n + r] = dot(&x[r * cols..(r + 1) * cols], w);
                    }
                }
                if let Some(then) = then {
                    then(o, part);
                }
            });
        outputs_by_x_row(by_row, rows, n)
    }

    /// Dequantizes the whole weight, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }
}

/// Products computed by weight row (`[rows, n]`, so that each task owns a contiguous slice)
/// rearranged as `[n, rows]`.
fn outputs_by_x_row(by_row: Vec<f32>, rows: usize, n: usize) -> Vec<f32> {
    if n == 1 {
        return by_row;
    }
    // In tiles, so that neither side is walked with a stride of a whole row (a prefill's
    // outputs are megabytes).
    const TILE: usize = 32;
    let mut out = vec![0f32; n * rows];
    for o0 in (0..rows).step_by(TILE) {
        for r0 in (0..n).step_by(TILE) {
            for o in o0..(o0 + TILE).min(rows) {
                let ys = &by_row[o * n..(o + 1) * n];
                for r in r0..(r0 + TILE).min(n) {
                    out[r * rows + o] = ys[r];
                }
            }
        }
    }
    out
}

/// Dot product with 8 independent accumulators (vectorizes; a fixed summation order).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for k in 0..8 {
            acc[k] += a[i * 8 + k] * b[i * 8 + k];
        }
    }
    let mut sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block type refuses a row that ends inside a block, and a byte count that is not
    /// the one the shape implies.
    #[test]
    fn ggml_refuses_partial_blocks() {
        for id in 0..64 {
            let Some(ty) = GgmlType::from_id(id) else {
                continue;
            };
            let bs = ty.block_size();
            if bs == 1 {
                continue;
            }
            let cols = bs + bs / 2;
            let err = PackedWeight::ggml(ty, 2, cols, vec![0; 4 * ty.type_size()].into())
                .expect_err("a partial block");
            assert_eq!(
                err.to_string(),
                format!("{cols} columns is not a whole number of {ty:?} blocks of {bs}")
            );
            let two = vec![0; 2 * ty.type_size()].into();
            assert!(PackedWeight::ggml(ty, 1, 2 * bs, two).is_ok(), "{ty:?}");
            let err = PackedWeight::ggml(ty, 2, 2 * bs, vec![0; 3].into()).expect_err("3 bytes");
            assert!(
                err.to_string().contains("do not hold a [2, "),
                "{ty:?}: {err}"
            );
        }
    }
}
