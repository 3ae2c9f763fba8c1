//! The packed formats on a CubeCL device (CUDA, or wgpu on Vulkan/Metal/DX12): the kernels
//! that read NF4 and every GGML block type graft loads, generic over the CubeCL runtime so the
//! same code runs on burn-cuda and burn-wgpu.
//!
//! A weight's storage is uploaded once per device, as it is (packed; NF4 with its absmaxes
//! expanded to f32, as on the CPU), and kept with the weight ([`PackedWeight::device_copies`]).
//! A product then either dequantizes the weight's rows on the device into an f32 `[rows, cols]`
//! tensor for the backend's GEMM (the buffer comes from CubeCL's memory pool, which reuses it
//! from product to product), or — for a few activation rows, a decode step — reads the blocks
//! directly in [`matmul_small`] without an f32 weight at all.
//!
//! The per-value decoding mirrors `ggml.rs` and `nf4.rs` (the CPU's reference): the same
//! formulas in the same order of f32 operations.

use std::cell::Cell;
use std::sync::Arc;

use burn_cubecl::cubecl;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, FloatElement};
use cubecl::prelude::*;
use cubecl::server::Handle;

use super::ggml::{IQ4_NL_VALUES, MXFP4_VALUES};
use super::nf4::{BLOCK as NF4_BLOCK, NF4_CODE};
use super::{GgmlType, PackedWeight, Storage};

// NF4's block is a literal in the kernel
const _: () = assert!(NF4_BLOCK == 64);

/// The comptime storage kind of a kernel: a GGML type's id, or [`NF4`] (no GGML type has it).
const NF4: u32 = 1000;
const F32: u32 = GgmlType::F32.id();
const F16: u32 = GgmlType::F16.id();
const BF16: u32 = GgmlType::BF16.id();
const Q4_0: u32 = GgmlType::Q4_0.id();
const Q4_1: u32 = GgmlType::Q4_1.id();
const Q5_0: u32 = GgmlType::Q5_0.id();
const Q5_1: u32 = GgmlType::Q5_1.id();
const Q8_0: u32 = GgmlType::Q8_0.id();
const Q2_K: u32 = GgmlType::Q2_K.id();
const Q3_K: u32 = GgmlType::Q3_K.id();
const Q4_K: u32 = GgmlType::Q4_K.id();
const Q5_K: u32 = GgmlType::Q5_K.id();
const Q6_K: u32 = GgmlType::Q6_K.id();
const IQ4_NL: u32 = GgmlType::IQ4_NL.id();
const IQ4_XS: u32 = GgmlType::IQ4_XS.id();
const MXFP4: u32 = GgmlType::MXFP4.id();

/// Rows of activations up to which a product reads the packed blocks directly
/// ([`matmul_small`]); more rows dequantize the weight and use the GEMM.
pub const SMALL_ROWS: usize = 4;

/// Little-endian byte `i` of a buffer of u32 words.
#[cube]
fn byte_at(words: &Array<u32>, i: usize) -> u32 {
    (words[i / 4] >> (((i % 4) * 8) as u32)) & 0xFFu32
}

/// The little-endian u16 at byte `i`.
#[cube]
fn u16_at(words: &Array<u32>, i: usize) -> u32 {
    byte_at(words, i) | (byte_at(words, i + 1) << 8u32)
}

/// IEEE half bits → f32 (normals, subnormals, infinities and NaNs).
#[cube]
fn half_to_f32(h: u32) -> f32 {
    let e = (h >> 10u32) & 0x1Fu32;
    let m = h & 0x3FFu32;
    let normal = f32::reinterpret(((e + 112u32) << 23u32) | (m << 13u32));
    let special = f32::reinterpret(0x7F80_0000u32 | (m << 13u32));
    let subnormal = f32::cast_from(m) * 5.960_464_5e-8f32; // m · 2^-24
    let mag = select(e == 0u32, subnormal, select(e == 31u32, special, normal));
    select((h >> 15u32) == 1u32, -mag, mag)
}

/// The half at byte `i`, as f32.
#[cube]
fn half_at(words: &Array<u32>, i: usize) -> f32 {
    half_to_f32(u16_at(words, i))
}

/// A byte read as a signed 8-bit value.
#[cube]
fn signed8(q: u32) -> f32 {
    f32::cast_from(q) - 256.0f32 * f32::cast_from(q >> 7u32)
}

/// Nibble `j % 16`'s low (`j < 16`) or high half of the 16 bytes at `at` (the Q4_0 order).
#[cube]
fn nibble(words: &Array<u32>, at: usize, j: usize) -> u32 {
    let q = byte_at(words, at + j % 16);
    select(j < 16, q & 0xFu32, q >> 4u32)
}

/// Six-bit scale or min `j` of a K-quant block's 12 scale bytes at `at`
/// (`get_scale_min_k4`): `which` 0 for the scale, 1 for the min.
#[cube]
fn scale_min_k4(words: &Array<u32>, at: usize, j: usize, which: usize) -> u32 {
    let first = byte_at(words, at + j + 4 * which) & 63u32;
    let hi = byte_at(words, at + j + 4);
    let lo = select(which == 0, hi & 0xFu32, hi >> 4u32);
    // (at ≥ 4: the scales follow d and dmin)
    let top = byte_at(words, at + j + 4 * which - 4) >> 6u32;
    select(j < 4, first, lo | (top << 4u32))
}

/// The two-bit code of value `l` of sub-block `i` (of 16) in a Q2_K/Q3_K `qs` at `at`.
#[cube]
fn two_bit_code(words: &Array<u32>, at: usize, i: usize, l: usize) -> u32 {
    let shift = (2 * (i / 2 % 4)) as u32;
    (byte_at(words, at + 32 * (i / 8) + 16 * (i % 2) + l) >> shift) & 3u32
}

/// The five-bit code `j` of a Q5_0/Q5_1 block whose u32 of fifth bits is at `at` (its
/// Q4_0-ordered nibbles follow it).
#[cube]
fn q5_code(words: &Array<u32>, at: usize, j: usize) -> u32 {
    let qh = u16_at(words, at) | (u16_at(words, at + 2) << 16u32);
    nibble(words, at + 4, j) | (((qh >> (j as u32)) & 1u32) << 4u32)
}

/// Value `j` of a Q4_K/Q5_K block at `b` whose nibbles are at `codes`: `d·sc·(n + high) −
/// dmin·m` with sub-block `j / 32`'s six-bit scale and min.
#[cube]
fn k_quant_value(words: &Array<u32>, b: usize, j: usize, high: u32, codes: usize) -> f32 {
    let c = j / 64;
    let within = j % 64;
    let sub = j / 32;
    let l = within % 32;
    let d = half_at(words, b) * f32::cast_from(scale_min_k4(words, b + 4, sub, 0));
    let dm = half_at(words, b + 2) * f32::cast_from(scale_min_k4(words, b + 4, sub, 1));
    let q = byte_at(words, codes + 32 * c + l);
    let n = select(within < 32, q & 0xFu32, q >> 4u32) + high;
    d * f32::cast_from(n) - dm
}

/// Value `j` (of its block's) of the block at byte `b`, for a GGML `kind`.
#[cube]
fn ggml_value(words: &Array<u32>, b: usize, j: usize, #[comptime] kind: u32) -> f32 {
    let mut v = 0.0f32;
    if comptime!(kind == F32) {
        v = f32::reinterpret(u16_at(words, b) | (u16_at(words, b + 2) << 16u32));
    } else if comptime!(kind == F16) {
        v = half_at(words, b);
    } else if comptime!(kind == BF16) {
        v = f32::reinterpret(u16_at(words, b) << 16u32);
    } else if comptime!(kind == Q4_0) {
        let d = half_at(words, b);
        v = (f32::cast_from(nibble(words, b + 2, j)) - 8.0f32) * d;
    } else if comptime!(kind == Q4_1) {
        let d = half_at(words, b);
        let m = half_at(words, b + 2);
        v = f32::cast_from(nibble(words, b + 4, j)) * d + m;
    } else if comptime!(kind == Q5_0) {
        v = (f32::cast_from(q5_code(words, b + 2, j)) - 16.0f32) * half_at(words, b);
    } else if comptime!(kind == Q5_1) {
        let q = f32::cast_from(q5_code(words, b + 4, j));
        v = q * half_at(words, b) + half_at(words, b + 2);
    } else if comptime!(kind == Q8_0) {
        v = signed8(byte_at(words, b + 2 + j)) * half_at(words, b);
    } else if comptime!(kind == Q2_K) {
        let i = j / 16;
        let l = j % 16;
        let sc = byte_at(words, b + i);
        let dl = half_at(words, b + 80) * f32::cast_from(sc & 0xFu32);
        let ml = half_at(words, b + 82) * f32::cast_from(sc >> 4u32);
        v = dl * f32::cast_from(two_bit_code(words, b + 16, i, l)) - ml;
    } else if comptime!(kind == Q3_K) {
        let i = j / 16;
        let l = j % 16;
        let low = (byte_at(words, b + 96 + i % 8) >> ((4 * (i / 8)) as u32)) & 0xFu32;
        let high = (byte_at(words, b + 104 + i % 4) >> ((2 * (i / 4)) as u32)) & 3u32;
        let scale = f32::cast_from(low | (high << 4u32)) - 32.0f32;
        let dl = half_at(words, b + 108) * scale;
        let h = byte_at(words, b + 16 * (i % 2) + l);
        let offset = select(((h >> ((i / 2) as u32)) & 1u32) == 0u32, 4.0f32, 0.0f32);
        v = dl * (f32::cast_from(two_bit_code(words, b + 32, i, l)) - offset);
    } else if comptime!(kind == Q4_K) {
        v = k_quant_value(words, b, j, 0u32, b + 16);
    } else if comptime!(kind == Q5_K) {
        // the fifth bit of value l of sub-block s is bit s of qh[l]
        let l = j % 32;
        let sub = j / 32;
        let hbit = (byte_at(words, b + 16 + l) >> (sub as u32)) & 1u32;
        v = k_quant_value(words, b, j, hbit * 16u32, b + 48);
    } else if comptime!(kind == Q6_K) {
        let half = j / 128;
        let jj = j % 128;
        let k = jj / 32;
        let l = jj % 32;
        let ql = byte_at(words, b + 64 * half + l + 32 * (k % 2));
        let low = select(k < 2, ql & 0xFu32, ql >> 4u32);
        let high = (byte_at(words, b + 128 + 32 * half + l) >> ((2 * k) as u32)) & 3u32;
        let q = f32::cast_from(low | (high << 4u32)) - 32.0f32;
        let sc = signed8(byte_at(words, b + 192 + 8 * half + l / 16 + 2 * k));
        v = half_at(words, b + 208) * sc * q;
    } else if comptime!(kind == IQ4_NL) {
        let table = comptime!(IQ4_NL_VALUES.map(f32::from));
        let lut = Array::<f32>::from_data(table);
        v = half_at(words, b) * lut[nibble(words, b + 2, j) as usize];
    } else if comptime!(kind == IQ4_XS) {
        let table = comptime!(IQ4_NL_VALUES.map(f32::from));
        let lut = Array::<f32>::from_data(table);
        let ib = j / 32;
        let jj = j % 32;
        let low = (byte_at(words, b + 4 + ib / 2) >> ((4 * (ib % 2)) as u32)) & 0xFu32;
        let high = (u16_at(words, b + 2) >> ((2 * ib) as u32)) & 3u32;
        let ls = f32::cast_from(low | (high << 4u32)) - 32.0f32;
        v = half_at(words, b) * ls * lut[nibble(words, b + 8 + 16 * ib, jj) as usize];
    } else if comptime!(kind == MXFP4) {
        let table = comptime!(MXFP4_VALUES.map(f32::from));
        let lut = Array::<f32>::from_data(table);
        let e = byte_at(words, b);
        let bits = select(e < 2u32, 0x0020_0000u32 << e, (e - 1u32) << 23u32);
        v = f32::reinterpret(bits) * lut[nibble(words, b + 1, j) as usize];
    }
    v
}

/// Value `(r, c)` of a weight whose row 0 is row `first_row` of its storage.
#[cube]
fn weight_value(
    words: &Array<u32>,
    absmax: &Array<f32>,
    r: usize,
    c: usize,
    layout: &Layout,
    #[comptime] kind: u32,
) -> f32 {
    if comptime!(kind == NF4) {
        let table = comptime!(NF4_CODE);
        let lut = Array::<f32>::from_data(table);
        let i = (layout.first_row + r) * layout.cols + c;
        let byte = byte_at(words, i / 2);
        let q = select(i % 2 == 0, byte >> 4u32, byte & 0xFu32);
        lut[q as usize] * absmax[i / 64]
    } else {
        let b = (layout.first_row + r) * layout.row_bytes + (c / layout.block) * layout.block_bytes;
        ggml_value(words, b, c % layout.block, kind)
    }
}

/// Where a weight's values are in its storage.
#[derive(CubeLaunch, CubeType, Clone, Copy)]
pub struct Layout {
    pub rows: usize,
    pub cols: usize,
    pub first_row: usize,
    /// GGML: bytes per row, values and bytes per block (unused for NF4).
    pub row_bytes: usize,
    pub block: usize,
    pub block_bytes: usize,
}

/// `out[r·cols + c]` = value `(r, c)`: one unit per value.
#[cube(launch, address_type = "dynamic")]
fn dequantize_kernel<F: Float>(
    words: &Array<u32>,
    absmax: &Array<f32>,
    out: &mut Array<F>,
    layout: Layout,
    #[comptime] kind: u32,
) {
    let e = ABSOLUTE_POS;
    if e >= layout.rows * layout.cols {
        terminate!();
    }
    out[e] = F::cast_from(weight_value(
        words,
        absmax,
        e / layout.cols,
        e % layout.cols,
        &layout,
        kind,
    ));
}

/// `out[i·rows + r]` = Σ_c `x[i·cols + c]` · value `(r, c)`: one unit per output, reading the
/// blocks of its weight row directly.
#[cube(launch, address_type = "dynamic")]
fn matmul_small_kernel<F: Float>(
    x: &Array<F>,
    words: &Array<u32>,
    absmax: &Array<f32>,
    out: &mut Array<F>,
    n: usize,
    layout: Layout,
    #[comptime] kind: u32,
) {
    let o = ABSOLUTE_POS;
    if o >= n * layout.rows {
        terminate!();
    }
    let (i, r) = (o / layout.rows, o % layout.rows);
    let mut acc = 0.0f32;
    for c in 0..layout.cols {
        let w = weight_value(words, absmax, r, c, &layout, kind);
        acc += f32::cast_from(x[i * layout.cols + c]) * w;
    }
    out[o] = F::cast_from(acc);
}

/// A weight's storage on one device.
struct Uploaded<R: CubeRuntime> {
    device: R::Device,
    words: Handle,
    n_words: usize,
    /// NF4's absmaxes (one zero for GGML blocks, which have none).
    absmax: Handle,
    n_absmax: usize,
    kind: u32,
    /// GGML: bytes per row, values and bytes per block.
    row_bytes: usize,
    block: usize,
    block_bytes: usize,
}

/// A launch of one unit per each of `units` values.
fn grid<R: CubeRuntime>(client: &ComputeClient<R>, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, units);
    (
        cubecl::calculate_cube_count_elemwise(client, units, dim),
        dim,
    )
}

impl<R: CubeRuntime> Uploaded<R> {
    /// The storage and absmax buffers as kernel arguments.
    fn args(&self) -> (ArrayArg<R>, ArrayArg<R>) {
        // SAFETY: the handles hold `n_words` u32 and `n_absmax` f32 values (made so in
        // `uploaded`)
        unsafe {
            (
                ArrayArg::from_raw_parts(self.words.clone(), self.n_words),
                ArrayArg::from_raw_parts(self.absmax.clone(), self.n_absmax),
            )
        }
    }

    /// 32-bit indices where every index of a launch over `units` values fits them (a stack
    /// of experts can pass 4 GiB), else 64-bit.
    fn address_type(&self, units: usize) -> cubecl::ir::AddressType {
        cubecl::ir::AddressType::from_len(units.max(4 * self.n_words).max(self.n_absmax))
    }
}

/// The storage of `w` on `device`, uploaded the first time (loading places every weight
/// through [`upload`], so a product meets it there; a weight made after loading — a merge —
/// is uploaded by the first product that meets it; two threads meeting it at once may both
/// upload, and one copy is kept).
fn uploaded<R: CubeRuntime>(w: &PackedWeight, device: &R::Device) -> Arc<Uploaded<R>> {
    on_device(w, device, &Cell::new(false))
}

/// Uploads `w`'s storage to `device` if it is not there yet; whether this call did.
pub fn upload<R: CubeRuntime>(w: &PackedWeight, device: &R::Device) -> bool {
    let made = Cell::new(false);
    on_device::<R>(w, device, &made);
    made.get()
}

/// [`uploaded`], setting `made` when this call uploads.
fn on_device<R: CubeRuntime>(
    w: &PackedWeight,
    device: &R::Device,
    made: &Cell<bool>,
) -> Arc<Uploaded<R>> {
    w.device_copies().get_or_make(
        |u: &Uploaded<R>| u.device == *device,
        || {
            made.set(true);
            upload_now(w, device)
        },
    )
}

/// `w`'s storage copied to `device`.
fn upload_now<R: CubeRuntime>(w: &PackedWeight, device: &R::Device) -> Uploaded<R> {
    let client = R::client(device);
    let (bytes, absmax, kind, row_bytes, block, block_bytes) = match w.storage() {
        Storage::Ggml {
            ty,
            bytes,
            row_bytes,
        } => (
            bytes,
            &[0.0f32][..],
            ty.id(),
            row_bytes,
            ty.block_size(),
            ty.type_size(),
        ),
        Storage::Nf4 { codes, absmax } => (codes, absmax, NF4, 0, 1, 1),
    };
    // whole u32 words (a copy only where the storage ends inside one)
    let words = if bytes.len() % 4 == 0 {
        client.create_from_slice(bytes)
    } else {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().div_ceil(4) * 4, 0);
        client.create_from_slice(&padded)
    };
    let absmax_bytes: Vec<u8> = absmax.iter().flat_map(|v| v.to_le_bytes()).collect();
    Uploaded {
        device: device.clone(),
        words,
        n_words: bytes.len().div_ceil(4),
        absmax: client.create_from_slice(&absmax_bytes),
        n_absmax: absmax.len(),
        kind,
        row_bytes,
        block,
        block_bytes,
    }
}

/// `$body` with `$kind` bound to the storage kind of `$u` as a constant, so that each kind
/// compiles its own kernel (the kinds listed once, here).
macro_rules! with_kind {
    ($u:expr, |$kind:ident| $body:expr) => {
        with_kind!(@each $u, $kind, $body, [
            NF4, F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
            IQ4_NL, IQ4_XS, MXFP4
        ])
    };
    (@each $u:expr, $kind:ident, $body:expr, [$($k:ident),*]) => {
        match $u.kind {
            $($k => {
                let $kind = $k;
                $body
            })*
            other => unreachable!("storage kind {other} has no kernel"),
        }
    };
}

fn layout_arg<R: CubeRuntime>(w: &PackedWeight, u: &Uploaded<R>) -> LayoutLaunch<R> {
    LayoutLaunch::new(
        w.rows,
        w.cols,
        w.first_row(),
        u.row_bytes,
        u.block,
        u.block_bytes,
    )
}

/// A contiguous `[rows, cols]` output (not the backend's `empty`, which may pad rows on CUDA).
pub(crate) fn output<R: CubeRuntime, F: FloatElement>(
    device: &R::Device,
    rows: usize,
    cols: usize,
) -> CubeTensor<R> {
    let client = R::client(device);
    let handle = client.empty(rows * cols * size_of::<F>());
    CubeTensor::new_contiguous(
        client,
        device.clone(),
        [rows, cols].into(),
        handle,
        F::dtype(),
    )
}

/// The f32 (or `F`) weight `[rows, cols]` of `w`, dequantized on `device`.
pub fn dequantize<R: CubeRuntime, F: FloatElement>(
    w: &PackedWeight,
    device: &R::Device,
) -> CubeTensor<R> {
    let u = uploaded::<R>(w, device);
    let out = output::<R, F>(device, w.rows, w.cols);
    let client = &out.client;
    let units = w.rows * w.cols;
    let (count, dim) = grid(client, units);
    let (words, absmax) = u.args();
    with_kind!(u, |kind| dequantize_kernel::launch::<F, R>(
        client,
        count,
        dim,
        u.address_type(units),
        words,
        absmax,
        unsafe { ArrayArg::from_raw_parts(out.handle.clone(), units) },
        layout_arg(w, &u),
        kind,
    ));
    out
}

/// `x·Wᵀ` for a few rows of `x` (`[n, cols]`) → `[n, rows]`, reading the packed blocks
/// directly (no f32 weight).
pub fn matmul_small<R: CubeRuntime, F: FloatElement>(
    x: CubeTensor<R>,
    w: &PackedWeight,
) -> CubeTensor<R> {
    let x = burn_cubecl::kernel::into_contiguous(x);
    let n = x.meta.shape()[0];
    let device = x.device.clone();
    let u = uploaded::<R>(w, &device);
    let out = output::<R, F>(&device, n, w.rows);
    let client = &out.client;
    let units = n * w.rows;
    let (count, dim) = grid(client, units);
    let (words, absmax) = u.args();
    with_kind!(u, |kind| matmul_small_kernel::launch::<F, R>(
        client,
        count,
        dim,
        u.address_type(units.max(n * w.cols)),
        unsafe { ArrayArg::from_raw_parts(x.handle.clone(), n * w.cols) },
        words,
        absmax,
        unsafe { ArrayArg::from_raw_parts(out.handle.clone(), units) },
        n,
        layout_arg(w, &u),
        kind,
    ));
    out
}

/// [`dequantize`] into `dtype`'s element type: f32, or f16/bf16 for a half-precision
/// compute dtype (another type: the backend's `F`).
pub fn dequantize_to<R: CubeRuntime, F: FloatElement>(
    w: &PackedWeight,
    device: &R::Device,
    dtype: burn::tensor::DType,
) -> CubeTensor<R> {
    use burn::tensor::DType;
    match dtype {
        DType::F32 => dequantize::<R, f32>(w, device),
        DType::F16 => dequantize::<R, half::f16>(w, device),
        DType::BF16 => dequantize::<R, half::bf16>(w, device),
        _ => dequantize::<R, F>(w, device),
    }
}

/// [`matmul_small`] in `x`'s element type (the sums are f32 whatever it is).
pub fn matmul_small_in<R: CubeRuntime, F: FloatElement>(
    x: CubeTensor<R>,
    w: &PackedWeight,
) -> CubeTensor<R> {
    use burn::tensor::DType;
    match x.dtype {
        DType::F32 => matmul_small::<R, f32>(x, w),
        DType::F16 => matmul_small::<R, half::f16>(x, w),
        DType::BF16 => matmul_small::<R, half::bf16>(x, w),
        _ => matmul_small::<R, F>(x, w),
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn_cubecl::cubecl::wgpu::WgpuRuntime;

    use super::super::kernels::tests::{activations, ggml_weight};
    use super::*;

    fn host(t: CubeTensor<WgpuRuntime>) -> Vec<f32> {
        use burn::prelude::*;
        use burn::tensor::TensorPrimitive;
        Tensor::<crate::device::Wgpu, 2>::from_primitive(TensorPrimitive::Float(t))
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    }

    /// `want` and `got` agree to `tol` relative to `want`'s largest value (NaN where NaN).
    fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-30);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let same = g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol * scale;
            assert!(same, "{what}: value {i}: device {g} vs host {w}");
        }
    }

    /// A weight of every GGML type graft loads (each must have a kernel), and NF4 — also with
    /// rows that end inside a block and a byte.
    fn weights() -> Vec<PackedWeight> {
        let mut all: Vec<PackedWeight> = (0..64)
            .filter_map(GgmlType::from_id)
            .map(|t| ggml_weight(t, 6, 512))
            .collect();
        assert_eq!(all.len(), 16);
        let dense =
            |rows, cols| -> Vec<f32> { activations(rows, cols).iter().map(|v| v * 0.05).collect() };
        all.push(PackedWeight::nf4(6, 512, &dense(6, 512)));
        all.push(PackedWeight::nf4(6, 65, &dense(6, 65)));
        all
    }

    #[test]
    fn every_storage_dequantizes_on_the_device_as_on_the_host() {
        let device = crate::device::wgpu_device(None);
        for w in weights() {
            let name = w.kind_name();
            // plain floats bit for bit; blocks to rounding (a device may fuse a multiply-add)
            let tol = if matches!(name.as_str(), "F32" | "F16" | "BF16") {
                0.0
            } else {
                1e-6
            };
            let got = host(dequantize::<WgpuRuntime, f32>(&w, &device));
            assert_close(&name, &got, &w.dequantize(), tol);
            // a view of rows 1..4 reads its own rows of the shared upload
            let view = w.rows_view(1, 3);
            let got = host(dequantize::<WgpuRuntime, f32>(&view, &device));
            assert_close(&format!("{name} rows 1..4"), &got, &view.dequantize(), tol);
            assert_eq!(w.device_copies().len(), 1, "{name}: one upload for both");
        }
    }

    #[test]
    fn a_weight_uploads_once_per_device_and_its_views_share_it() {
        let device = crate::device::wgpu_device(None);
        let w = PackedWeight::nf4(6, 512, &activations(6, 512));
        assert!(upload::<WgpuRuntime>(&w, &device));
        assert!(!upload::<WgpuRuntime>(&w, &device));
        assert!(!upload::<WgpuRuntime>(&w.rows_view(1, 3), &device));
        assert!(!upload::<WgpuRuntime>(&w.clone(), &device));
        assert_eq!(w.device_copies().len(), 1);
    }

    #[test]
    fn small_products_read_the_blocks_as_the_cpu_does() {
        use burn::prelude::*;
        let device = crate::device::wgpu_device(None);
        // (random f32 and bf16 bits reach 1e38, whose sums overflow in either order)
        let finite = |w: &PackedWeight| !matches!(w.kind_name().as_str(), "F32" | "BF16");
        for w in weights().into_iter().filter(finite) {
            for n in [1, 3] {
                let x = activations(n, w.cols);
                let xt = Tensor::<crate::device::Wgpu, 2>::from_data(
                    burn::tensor::TensorData::new(x.clone(), [n, w.cols]),
                    &device,
                );
                let got = host(matmul_small::<WgpuRuntime, f32>(
                    xt.into_primitive().tensor(),
                    &w,
                ));
                let want = w.matmul_t_portable(&x, n);
                assert_close(&format!("{} n={n}", w.kind_name()), &got, &want, 1e-5);
            }
        }
    }
}
