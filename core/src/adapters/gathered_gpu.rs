//! The gathered LoRA term of a mixed batch on a CubeCL device (CUDA, or wgpu on Vulkan), the
//! counterpart of [`super::gathered`] on the CPU and of punica's BGMV: one kernel per
//! projection adds every row's own adapter term `scale·(x·Aᵀ)·Bᵀ`, whatever mix of adapters
//! the batch's rows carry.
//!
//! The batch's runs of rows (a run: consecutive rows with one adapter) reach the kernel as
//! sequences — each run's `A`, `B`, first and end row, rank and scale — read where the
//! adapter keeps them (no copy, no per-call upload: the scalars travel with the launch). The
//! kernel is compiled once per number of runs. One cube works on one row: its units first
//! shrink the row through its run's `A` (each of the `r` dot products split over
//! `units / r` units, then summed in shared memory), then expand through `B`, each unit
//! writing every `units`-th output.

use std::ops::Range;

use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, FloatElement};
use cubecl::prelude::*;

use crate::quant::gpu::output;

/// Units per cube (one cube per batch row); also the largest rank the kernel takes.
pub const UNITS: usize = 256;

/// Rows one launch takes (the cube count's first dimension).
const MAX_ROWS: usize = 65_535;

/// `out = y + scale·(x·Aᵀ)·Bᵀ` for each row, with its run's `A`, `B` and scale; rows in no
/// run are copied.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn lora_rows_kernel<F: Float>(
    x: &Array<F>,
    y: &Array<F>,
    out: &mut Array<F>,
    a: &Sequence<Array<F>>,
    b: &Sequence<Array<F>>,
    starts: &Sequence<usize>,
    ends: &Sequence<usize>,
    ranks: &Sequence<usize>,
    scales: &Sequence<f32>,
    d_in: usize,
    d_out: usize,
) {
    let row = CUBE_POS;
    let unit = usize::cast_from(UNIT_POS);
    let mut partial = SharedMemory::<f32>::new(UNITS);
    let mut shrunk = SharedMemory::<f32>::new(UNITS);
    let mut covered = false;
    #[unroll]
    for s in 0..a.len() {
        // Every unit of the cube takes the same branch (one row per cube): the barriers
        // inside are uniform.
        if row >= *starts.index(s) && row < *ends.index(s) {
            covered = true;
            let (a_s, b_s) = (a.index(s), b.index(s));
            let rank = *ranks.index(s);
            let split = UNITS / rank;
            let (k, part) = (unit / split, unit % split);
            let mut acc = 0.0f32;
            if k < rank {
                let mut c = part;
                loop {
                    if c >= d_in {
                        break;
                    }
                    acc += f32::cast_from(x[row * d_in + c]) * f32::cast_from(a_s[k * d_in + c]);
                    c += split;
                }
            }
            partial[unit] = acc;
            sync_cube();
            if unit < rank {
                let mut sum = 0.0f32;
                for p in 0..split {
                    sum += partial[unit * split + p];
                }
                shrunk[unit] = sum * *scales.index(s);
            }
            sync_cube();
            let mut o = unit;
            loop {
                if o >= d_out {
                    break;
                }
                let mut d = 0.0f32;
                for j in 0..rank {
                    d += shrunk[j] * f32::cast_from(b_s[o * rank + j]);
                }
                out[row * d_out + o] = F::cast_from(f32::cast_from(y[row * d_out + o]) + d);
                o += UNITS;
            }
        }
    }
    if !covered {
        let mut o = unit;
        loop {
            if o >= d_out {
                break;
            }
            out[row * d_out + o] = y[row * d_out + o];
            o += UNITS;
        }
    }
}

/// One run of rows and its adapter: `a: [r, in]`, `b: [out, r]` in the backend's float type.
pub struct Run<R: CubeRuntime> {
    pub rows: Range<usize>,
    pub a: CubeTensor<R>,
    pub b: CubeTensor<R>,
    pub scale: f32,
}

/// Whether [`lora_rows`] takes a batch of `n` rows whose adapters have ranks `ranks`.
pub fn fits(n: usize, ranks: impl IntoIterator<Item = usize>) -> bool {
    (1..=MAX_ROWS).contains(&n) && ranks.into_iter().all(|r| (1..=UNITS).contains(&r))
}

/// Runs one launch takes: each binds two buffers, and devices bind few per kernel (Metal: 31
/// storage buffers); a batch with more chains launches of this many, each adding to the
/// last one's output (which also bounds the kernel variants compiled to this many).
pub const MAX_RUNS: usize = 8;

/// `y` plus each run's adapter term, in one launch per [`MAX_RUNS`] runs.
///
/// # Shapes
/// `y: [n, out]`, `x: [n, in]` → `[n, out]`
pub fn lora_rows<R: CubeRuntime, F: FloatElement>(
    y: CubeTensor<R>,
    x: CubeTensor<R>,
    mut runs: Vec<Run<R>>,
) -> CubeTensor<R> {
    if runs.len() > MAX_RUNS {
        let rest = runs.split_off(MAX_RUNS);
        let y = lora_rows::<R, F>(y, x.clone(), runs);
        return lora_rows::<R, F>(y, x, rest);
    }
    let (x, y) = (into_contiguous(x), into_contiguous(y));
    let (n, d_in, d_out) = (x.meta.shape()[0], x.meta.shape()[1], y.meta.shape()[1]);
    let device = y.device.clone();
    let out = output::<R, F>(&device, n, d_out);
    let client = &out.client;
    let (mut a, mut b) = (SequenceArg::new(), SequenceArg::new());
    let (mut starts, mut ends, mut ranks, mut scales) = (
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
    );
    let mut longest = n * d_in.max(d_out);
    // The adapters' tensors stay alive (in `held`) until the launch is queued.
    let mut held = Vec::with_capacity(runs.len());
    for run in runs {
        let rank = run.a.meta.shape()[0];
        let (ta, tb) = (into_contiguous(run.a), into_contiguous(run.b));
        longest = longest.max(rank * d_in.max(d_out));
        // SAFETY: contiguous `[r, in]` and `[out, r]` tensors of `F`.
        unsafe {
            a.push(ArrayArg::from_raw_parts(ta.handle.clone(), rank * d_in));
            b.push(ArrayArg::from_raw_parts(tb.handle.clone(), d_out * rank));
        }
        starts.push(run.rows.start);
        ends.push(run.rows.end);
        ranks.push(rank);
        scales.push(run.scale);
        held.push((ta, tb));
    }
    // SAFETY: contiguous `[n, in]`, `[n, out]` and `[n, out]` tensors of `F`.
    unsafe {
        lora_rows_kernel::launch::<F, R>(
            client,
            CubeCount::Static(n as u32, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            cubecl::ir::AddressType::from_len(longest),
            ArrayArg::from_raw_parts(x.handle.clone(), n * d_in),
            ArrayArg::from_raw_parts(y.handle.clone(), n * d_out),
            ArrayArg::from_raw_parts(out.handle.clone(), n * d_out),
            a,
            b,
            starts,
            ends,
            ranks,
            scales,
            d_in,
            d_out,
        );
    }
    drop(held);
    out
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::prelude::*;
    use burn::tensor::TensorData;

    use super::UNITS;
    use crate::adapters::lora::LoraWeights;
    use crate::backend::{lora_rows_by_run, GraftBackend};

    type W = crate::device::Wgpu;
    type F = burn::backend::Flex;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 1000.0)
            .collect()
    }

    fn matrix<B: Backend>(rows: usize, cols: usize, seed: usize, d: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(values(rows * cols, seed), [rows, cols]), d)
    }

    fn lora<B: Backend>(
        r: usize,
        d_in: usize,
        d_out: usize,
        seed: usize,
        d: &B::Device,
    ) -> LoraWeights<B> {
        LoraWeights {
            a: matrix(r, d_in, seed, d),
            b: matrix(d_out, r, seed + 1, d),
            scale: 0.5 + seed as f32,
            dropout: 0.0,
            experts: 1,
        }
    }

    /// Runs of a mixed batch: adapter 0 (rank 4), no adapter, adapter 1 (rank 24: the units
    /// split unevenly), adapter 0 again, adapter 2 (the largest rank the kernel takes), then
    /// eight one-row runs of the three in turn (13 runs: two chained launches).
    fn term<B: GraftBackend>(device: &B::Device, gathered: bool) -> Vec<f32> {
        let (d_in, d_out) = (300, 270);
        let adapters = [
            lora::<B>(4, d_in, d_out, 1, device),
            lora::<B>(24, d_in, d_out, 2, device),
            lora::<B>(UNITS, d_in, d_out, 3, device),
        ];
        let mut runs = vec![
            (0..2, Some(&adapters[0])),
            (2..3, None),
            (3..7, Some(&adapters[1])),
            (7..9, Some(&adapters[0])),
            (9..11, Some(&adapters[2])),
        ];
        runs.extend((11..ROWS).map(|i| (i..i + 1, Some(&adapters[i % 3]))));
        assert!(runs.len() > super::MAX_RUNS);
        let (x, y) = (
            matrix::<B>(ROWS, d_in, 7, device),
            matrix::<B>(ROWS, d_out, 8, device),
        );
        let out = if gathered {
            B::lora_rows(y, x, &runs)
        } else {
            lora_rows_by_run(y, x, &runs)
        };
        out.into_data().to_vec::<f32>().expect("f32")
    }

    const ROWS: usize = 19;

    #[test]
    fn one_launch_adds_each_rows_own_adapter_as_the_cpu_does() {
        // The batch below takes the kernel (not the runs' products): ranks up to UNITS.
        assert!(super::fits(11, [4, 24, UNITS]));
        assert!(!super::fits(11, [4, UNITS + 1]));
        let got = term::<W>(&crate::device::wgpu_device(None), true);
        let want = term::<F>(&Default::default(), false);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * scale,
                "value {i}: device {g} vs CPU {w}"
            );
        }
        // The row with no adapter is `y` as it was.
        let y = values(ROWS * 270, 8);
        assert_eq!(&got[2 * 270..3 * 270], &y[2 * 270..3 * 270]);
        assert_ne!(&got[..270], &y[..270]);
    }
}
