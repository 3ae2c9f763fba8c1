//! graft's extension of burn's `Backend`: the product of activations with a packed (quantized,
//! frozen) base weight.
//!
//! The default dequantizes the weight on the tensor's device and multiplies; backends can
//! override it with fused kernels that never materialize the f32 weight. Under autodiff the
//! product gets its own backward, `∂L/∂x = ∂L/∂y · W`, which dequantizes `W` again instead of
//! keeping the forward's f32 copy alive until the backward pass: QLoRA memory stays near the
//! packed size of the base, as in bitsandbytes' `MatMul4Bit`. No gradient flows to `W` (frozen).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, TensorData, TensorPrimitive};

use crate::adapters::gathered::{GatheredLora, RowLora, Values};
use crate::adapters::lora::RowAdapters;
use crate::model::proj::Proj;
use crate::model::Causal;
use crate::model::{attention_blocked, token_logps};
use crate::quant::PackedWeight;
use burn::backend::flex::FlexTensor;

/// A burn backend graft's model runs on.
pub trait GraftBackend: Backend {
    /// `x·Wᵀ` for a packed `W: [out, in]`, in `x`'s float type (f32, or a half type for
    /// [`crate::model::Model::set_compute_dtype`]).
    ///
    /// # Shapes
    /// `x: [n, in]` → `[n, out]`
    fn packed_matmul(x: Tensor<Self, 2>, w: &PackedWeight) -> Tensor<Self, 2> {
        let wd = dequantized(w, &x.device()).cast(x.dtype());
        x.matmul(wd.transpose())
    }

    /// `g·W` for a packed `W: [out, in]` (the input gradient of [`Self::packed_matmul`]).
    ///
    /// # Shapes
    /// `g: [n, out]` → `[n, in]`
    fn packed_matmul_transposed(g: Tensor<Self, 2>, w: &PackedWeight) -> Tensor<Self, 2> {
        let wd = dequantized(w, &g.device()).cast(g.dtype());
        g.matmul(wd)
    }

    /// A packed `W: [out, in]` as an f32 tensor on `device` (what the products without a
    /// fused kernel multiply with).
    fn unpacked(w: &PackedWeight, device: &Self::Device) -> Tensor<Self, 2> {
        dequantized(w, device)
    }

    /// `y` plus each row run's adapter term `scale·(x·Aᵀ)·Bᵀ` (rows of a serving batch may
    /// each have their own adapter; PEFT groups rows by adapter the same way). The default
    /// runs one pair of matrix products per run of rows; the CPU and CubeCL backends override
    /// it with one gathered pass over the rows (one kernel launch on a GPU).
    ///
    /// # Shapes
    /// `y: [n, out]`, `x: [n, in]` → `[n, out]`
    fn lora_rows(
        y: Tensor<Self, 2>,
        x: Tensor<Self, 2>,
        runs: &RowAdapters<'_, Self>,
    ) -> Tensor<Self, 2> {
        lora_rows_by_run(y, x, runs)
    }

    /// `softmax(q·Kᵀ·scale)·V` for query rows that see every key (no mask: a decode step),
    /// keys and values given as consecutive pieces read in place (the cache's parts), with an
    /// optional soft-cap `cap·tanh(s/cap)` of the scores and one sink logit per row that joins
    /// the softmax. `None` where the backend has no kernel for it: the model then runs the
    /// same attention as tensor ops (which also record gradients).
    ///
    /// # Shapes
    /// `q: [kv_heads, rows, hd]`, each piece's keys and values `[kv_heads, len, hd]`,
    /// `sinks: [kv_heads·rows]` → `[kv_heads, rows, hd]`
    fn attention_unmasked(
        q: &Tensor<Self, 3>,
        pieces: &[(Tensor<Self, 3>, Tensor<Self, 3>)],
        scale: f32,
        softcap: Option<f32>,
        sinks: Option<&Tensor<Self, 1>>,
    ) -> Option<Tensor<Self, 3>> {
        let _ = (q, pieces, scale, softcap, sinks);
        None
    }

    /// Causal attention of one sequence's query rows against its keys and values, in blocks
    /// of query positions that never hold the whole `[heads, n, keys]` scores
    /// ([`crate::model::Causal`] says what each row sees). Under autodiff it is one op whose
    /// backward recomputes each block's probabilities instead of keeping them.
    ///
    /// # Shapes
    /// `q: [kv_heads, groups·n, dk]`, `k: [kv_heads, keys, dk]`, `v: [kv_heads, keys, dv]`,
    /// `sinks: [kv_heads·groups]` → `[kv_heads, groups·n, dv]`
    fn attention_causal(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        sinks: Option<&Tensor<Self, 1>>,
        spec: &Causal,
    ) -> Tensor<Self, 3> {
        attention_blocked::forward(q, &k, &v, sinks, spec)
    }

    /// Puts `w`'s storage where this backend's products read it on `device`: the CubeCL
    /// backends upload it now (see [`crate::model::Model::place_weights`]); the others read
    /// it where it is.
    ///
    /// Whether this call uploaded it (`false`: already there, or read from the host).
    ///
    /// # Errors
    /// The device's message when it cannot take the weight.
    fn place_packed(w: &PackedWeight, device: &Self::Device) -> Result<bool, String> {
        let _ = (w, device);
        Ok(false)
    }

    /// Whether products on `device` can run in `dtype` (a half compute dtype): the CPU
    /// rounds to any; a CubeCL device has the types its shading language has (WGSL: no bf16).
    fn supports_float(dtype: FloatDType, device: &Self::Device) -> bool {
        let _ = (dtype, device);
        true
    }

    /// Softmax over the last dimension (attention probabilities; masked scores are −∞).
    fn softmax_last(x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        burn::tensor::activation::softmax(x, 2)
    }

    /// `x·Wᵀ` for a packed `W` plus each row run's adapter term: [`Self::packed_matmul`]
    /// then [`Self::lora_rows`], which the CPU backend fuses into one pass.
    ///
    /// # Shapes
    /// `x: [n, in]` → `[n, out]`
    fn packed_matmul_lora(
        x: Tensor<Self, 2>,
        w: &PackedWeight,
        runs: &RowAdapters<'_, Self>,
    ) -> Tensor<Self, 2> {
        let y = Self::packed_matmul(x.clone(), w);
        Self::lora_rows(y, x, runs)
    }

    /// `log softmax(head(h))[t]` for each row of `hidden` and its target (`[n, 1]`), soft-capped
    /// logits when `softcap` is set, without keeping the `[n, vocab]` logits
    /// ([`crate::model::token_logps`]); under autodiff the forward keeps each row's gradient
    /// with respect to `hidden` instead.
    ///
    /// # Shapes
    /// `hidden: [n, hidden]` → `[n]`
    fn token_logps(
        hidden: Tensor<Self, 2>,
        head: &Proj<Self>,
        softcap: Option<f32>,
        targets: Tensor<Self, 2, Int>,
    ) -> Tensor<Self, 1> {
        let rows = token_logps::chunk_rows(head.out_features);
        token_logps::forward(hidden, head, softcap, &targets, rows, false).0
    }
}

/// [`GraftBackend::lora_rows`] with one pair of matrix products per run of rows (any backend,
/// and the one that records gradients).
pub fn lora_rows_by_run<B: Backend>(
    y: Tensor<B, 2>,
    x: Tensor<B, 2>,
    runs: &RowAdapters<'_, B>,
) -> Tensor<B, 2> {
    match runs {
        [] | [(_, None)] => y,
        [(_, Some(lora))] => y + lora.delta(x),
        runs => {
            let parts = runs
                .iter()
                .map(|(range, lora)| {
                    let ys = y.clone().slice(range.clone());
                    match lora {
                        Some(l) => ys + l.delta(x.clone().slice(range.clone())),
                        None => ys,
                    }
                })
                .collect();
            Tensor::cat(parts, 0)
        }
    }
}

/// The f32 weight `[out, in]` on `device`.
pub fn dequantized<B: Backend>(w: &PackedWeight, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(w.dequantize(), [w.rows, w.cols]), device)
}

/// Rows up to which the CPU backend multiplies packed weights directly with f32 activations
/// (decode steps and small batches); larger products (prefill, training) dequantize and use the
/// dense GEMM. Weights on the 8-bit integer path take it at every size (batch-invariant).
pub const FUSED_MAX_ROWS: usize = 8;

impl GraftBackend for burn::backend::Flex {
    fn packed_matmul(x: Tensor<Self, 2>, w: &PackedWeight) -> Tensor<Self, 2> {
        Self::packed_matmul_lora(x, w, &[])
    }

    /// One gathered pass (the CPU counterpart of punica's BGMV, `adapters::gathered`): each
    /// row takes its own adapter's `A` and `B` straight from their storage.
    fn lora_rows(
        y: Tensor<Self, 2>,
        x: Tensor<Self, 2>,
        runs: &RowAdapters<'_, Self>,
    ) -> Tensor<Self, 2> {
        if runs.iter().all(|(_, l)| l.is_none()) {
            return y;
        }
        let ([n, d_in], [_, d_out]) = (x.dims(), y.dims());
        let held = adapter_tensors(runs);
        let xt = host(&x);
        let (Some(rows), Some(xv)) = (row_slices(&held, n), contiguous(&xt)) else {
            return lora_rows_by_run(y, x, runs);
        };
        let Some(term) = GatheredLora::new(xv, d_in, &rows) else {
            return y;
        };
        let device = y.device();
        let mut yt = y.into_primitive().tensor();
        if yt.is_contiguous() && yt.layout().start_offset() == 0 {
            // In place (copied first only if the storage is shared).
            term.add_to(&mut yt.storage_mut::<f32>()[..n * d_out], d_out);
            return Tensor::from_primitive(TensorPrimitive::Float(yt));
        }
        let mut out = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(yt))
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        term.add_to(&mut out, d_out);
        Tensor::from_data(TensorData::new(out, [n, d_out]), &device)
    }

    /// One pass per row over contiguous storage (burn's generic softmax took 13% of a
    /// 1,100-token prefill, more than the exponentials themselves).
    fn softmax_last(x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        use rayon::prelude::*;
        let dims = x.dims();
        let mut t = x.into_primitive().tensor();
        if t.dtype() != burn::tensor::DType::F32
            || !t.is_contiguous()
            || t.layout().start_offset() != 0
        {
            let x = Tensor::<Self, 3>::from_primitive(TensorPrimitive::Float(t));
            return burn::tensor::activation::softmax(x, 2);
        }
        let n = dims[0] * dims[1] * dims[2];
        let row = |r: &mut [f32]| {
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in r.iter_mut() {
                // (exp(−∞) is 0: masked scores need no branch.)
                *v = (*v - m).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            r.iter_mut().for_each(|v| *v *= inv);
        };
        let values = &mut t.storage_mut::<f32>()[..n];
        if n < 1 << 14 {
            values.chunks_mut(dims[2]).for_each(row);
        } else {
            values.par_chunks_mut(dims[2]).for_each(row);
        }
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    /// The cache's pieces read in place (`model::attention_cpu`).
    fn attention_unmasked(
        q: &Tensor<Self, 3>,
        pieces: &[(Tensor<Self, 3>, Tensor<Self, 3>)],
        scale: f32,
        softcap: Option<f32>,
        sinks: Option<&Tensor<Self, 1>>,
    ) -> Option<Tensor<Self, 3>> {
        use crate::model::attention_cpu::{attend, Queries};
        let [kv_heads, rows, head_dim] = q.dims();
        let qt = host(q);
        let st = sinks.map(host);
        let held: Vec<(FlexTensor, FlexTensor)> =
            pieces.iter().map(|(k, v)| (host(k), host(v))).collect();
        let views: Option<Vec<_>> = held
            .iter()
            .map(|(k, v)| {
                Some((
                    kv_view(k, kv_heads, head_dim)?,
                    kv_view(v, kv_heads, head_dim)?,
                ))
            })
            .collect();
        let sink_values = match &st {
            Some(s) => Some(contiguous(s)?),
            None => None,
        };
        let qs = Queries {
            q: contiguous(&qt)?,
            kv_heads,
            rows,
            head_dim,
            scale,
            softcap,
            sinks: sink_values,
        };
        let out = attend(&qs, &views?);
        Some(Tensor::from_data(
            TensorData::new(out, [kv_heads, rows, head_dim]),
            &q.device(),
        ))
    }

    /// The packed product with each row's adapter term added inside the product's own tasks
    /// (`adapters::gathered`): at decode sizes a separate pass over the pool costs more than
    /// its arithmetic.
    fn packed_matmul_lora(
        x: Tensor<Self, 2>,
        w: &PackedWeight,
        runs: &RowAdapters<'_, Self>,
    ) -> Tensor<Self, 2> {
        let dtype = x.dtype();
        if dtype != DType::F32 {
            // A half-precision input (`Model::set_compute_dtype`): the CPU kernels' f32
            // arithmetic on its values, the result rounded to its type.
            let y = Self::packed_matmul_lora(x.cast(FloatDType::F32), w, runs);
            return y.cast(dtype);
        }
        let [n, cols] = x.dims();
        if cols != w.cols || (n > FUSED_MAX_ROWS && !w.integer_path()) {
            let wd = dequantized(w, &x.device());
            let y = x.clone().matmul(wd.transpose());
            return Self::lora_rows(y, x, runs);
        }
        let device = x.device();
        let held = adapter_tensors(runs);
        let xt = host(&x);
        let (y, fused) = match (contiguous(&xt), row_slices(&held, n)) {
            (Some(xv), Some(rows)) => {
                let term = GatheredLora::new(xv, cols, &rows);
                let then = term
                    .as_ref()
                    .map(|t| move |o: usize, ys: &mut [f32]| t.add_to_outputs(o, ys));
                let then = then
                    .as_ref()
                    .map(|f| f as &(dyn Fn(usize, &mut [f32]) + Sync));
                (w.matmul_t_then(xv, n, then), true)
            }
            (Some(xv), None) => (w.matmul_t(xv, n), false),
            (None, _) => {
                let xs = x
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("f32");
                (w.matmul_t(&xs, n), false)
            }
        };
        let y = Tensor::from_data(TensorData::new(y, [n, w.rows]), &device);
        if fused {
            y
        } else {
            Self::lora_rows(y, x, runs)
        }
    }
}

/// A Flex tensor's primitive (shares its storage).
fn host<const D: usize>(t: &Tensor<burn::backend::Flex, D>) -> FlexTensor {
    t.clone().into_primitive().tensor()
}

/// A `[kv_heads, len, head_dim]` piece of a cache read in place; `None` unless each row's values
/// are contiguous.
fn kv_view(
    t: &FlexTensor,
    kv_heads: usize,
    head_dim: usize,
) -> Option<crate::model::attention_cpu::KvView<'_>> {
    let [h, len, d] = t.layout().shape().dims::<3>();
    let st = t.layout().strides();
    if t.dtype() != burn::tensor::DType::F32
        || h != kv_heads
        || d != head_dim
        || st[2] != 1
        || st[0] < 0
        || st[1] < 0
    {
        return None;
    }
    Some(crate::model::attention_cpu::KvView {
        data: t.storage::<f32>(),
        offset: t.layout().start_offset(),
        head_stride: st[0] as usize,
        row_stride: st[1] as usize,
        len,
    })
}

/// The values of a contiguous f32 tensor (any rank), or `None` if it is strided or not f32.
fn contiguous(t: &FlexTensor) -> Option<&[f32]> {
    if t.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let (a, b) = t.layout().contiguous_offsets()?;
    Some(&t.storage::<f32>()[a..b])
}

/// Each run's rows, and its adapter's `A` and `B` primitives (sharing their storage), scale
/// and rank.
type HeldAdapters = Vec<(
    std::ops::Range<usize>,
    Option<(FlexTensor, FlexTensor, f32, usize)>,
)>;

fn adapter_tensors(runs: &RowAdapters<'_, burn::backend::Flex>) -> HeldAdapters {
    runs.iter()
        .map(|(range, l)| {
            let held = l.map(|l| (host(&l.a), host(&l.b), l.scale, l.rank()));
            (range.clone(), held)
        })
        .collect()
}

/// A contiguous f32 or bf16 tensor's values as stored; `None` if strided or of another type.
fn stored(t: &FlexTensor) -> Option<Values<'_>> {
    match t.dtype() {
        burn::tensor::DType::BF16 => {
            let (a, b) = t.layout().contiguous_offsets()?;
            let v: &[half::bf16] = &t.storage::<half::bf16>()[a..b];
            Some(Values::Bf16(
                half::slice::HalfFloatSliceExt::reinterpret_cast(v),
            ))
        }
        _ => contiguous(t).map(Values::F32),
    }
}

/// Each of `n` rows' adapter as slices of the held storage; `None` if an `A` or `B` is
/// strided (never made by graft's loaders).
fn row_slices(held: &HeldAdapters, n: usize) -> Option<Vec<Option<RowLora<'_>>>> {
    let mut rows = vec![None; n];
    for (range, l) in held {
        if let Some((a, b, scale, rank)) = l {
            let row = RowLora {
                a: stored(a)?,
                b: stored(b)?,
                scale: *scale,
                rank: *rank,
            };
            rows.get_mut(range.clone())?.fill(Some(row));
        }
    }
    Some(rows)
}

/// The CubeCL backends (burn-cuda, burn-wgpu): packed products run on the device from the
/// weight's storage uploaded once ([`crate::quant::gpu`]).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl<R, F, I, BT> GraftBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    /// In `x`'s float type: f32, or the half type of a compute dtype, whose weights are
    /// dequantized to it for the half-precision GEMM.
    fn packed_matmul(x: Tensor<Self, 2>, w: &PackedWeight) -> Tensor<Self, 2> {
        use crate::quant::gpu;
        let n = x.dims()[0];
        if n == 0 {
            return Tensor::<Self, 2>::zeros([0, w.rows], &x.device()).cast(x.dtype());
        }
        if n <= gpu::SMALL_ROWS {
            let x = x.into_primitive().tensor();
            let y = gpu::matmul_small_in::<R, F>(x, w);
            return Tensor::from_primitive(TensorPrimitive::Float(y));
        }
        let wd = gpu::dequantize_to::<R, F>(w, &x.device(), x.dtype());
        x.matmul(Tensor::from_primitive(TensorPrimitive::Float(wd)).transpose())
    }

    fn packed_matmul_transposed(g: Tensor<Self, 2>, w: &PackedWeight) -> Tensor<Self, 2> {
        let wd = crate::quant::gpu::dequantize_to::<R, F>(w, &g.device(), g.dtype());
        g.matmul(Tensor::from_primitive(TensorPrimitive::Float(wd)))
    }

    fn unpacked(w: &PackedWeight, device: &Self::Device) -> Tensor<Self, 2> {
        let wd = crate::quant::gpu::dequantize_to::<R, F>(w, device, DType::F32);
        Tensor::from_primitive(TensorPrimitive::Float(wd))
    }

    /// Uploads the storage (once per weight and device). CubeCL reports a device that cannot
    /// allocate by panicking; that panic becomes the error.
    fn place_packed(w: &PackedWeight, device: &Self::Device) -> Result<bool, String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::quant::gpu::upload::<R>(w, device)
        }))
        .map_err(|p| {
            crate::panic::message(p.as_ref()).unwrap_or_else(|| "the upload failed".into())
        })
    }

    /// What the device registered for the type (cubecl's device properties).
    fn supports_float(dtype: FloatDType, device: &Self::Device) -> bool {
        use burn_cubecl::cubecl::ir::{ElemType, FloatKind, StorageType, Type};
        let kind = match dtype {
            FloatDType::F16 => FloatKind::F16,
            FloatDType::BF16 => FloatKind::BF16,
            FloatDType::F64 => FloatKind::F64,
            _ => return true,
        };
        let ty = Type::Scalar(StorageType::Scalar(ElemType::Float(kind)));
        R::client(device).properties().supports_type(ty)
    }

    /// One launch for the whole batch, whatever its mix of adapters
    /// ([`crate::adapters::gathered_gpu`]); adapters kept in another float type than the
    /// backend's, per-expert adapters and ranks over its cube size take the runs' products.
    fn lora_rows(
        y: Tensor<Self, 2>,
        x: Tensor<Self, 2>,
        runs: &RowAdapters<'_, Self>,
    ) -> Tensor<Self, 2> {
        use crate::adapters::gathered_gpu as gathered;
        let with: Vec<_> = runs
            .iter()
            .filter_map(|(rows, l)| l.map(|l| (rows, l)))
            .collect();
        if with.is_empty() {
            return y;
        }
        let readable = x.dtype() == F::dtype()
            && y.dtype() == F::dtype()
            && with.iter().all(|(_, l)| {
                l.experts <= 1 && l.a.dtype() == F::dtype() && l.b.dtype() == F::dtype()
            });
        if !readable || !gathered::fits(x.dims()[0], with.iter().map(|(_, l)| l.rank())) {
            return lora_rows_by_run(y, x, runs);
        }
        let runs = with
            .into_iter()
            .map(|(rows, l)| gathered::Run {
                rows: rows.clone(),
                a: l.a.clone().into_primitive().tensor(),
                b: l.b.clone().into_primitive().tensor(),
                scale: l.scale,
            })
            .collect();
        let out = gathered::lora_rows::<R, F>(
            y.into_primitive().tensor(),
            x.into_primitive().tensor(),
            runs,
        );
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[derive(Debug)]
struct PackedMatmulBackward;

impl<B: GraftBackend> Backward<B, 1> for PackedMatmulBackward {
    type State = PackedWeight;

    fn backward(self, ops: Ops<PackedWeight, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let g = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
            B::packed_matmul_transposed(g, &w).into_primitive().tensor()
        });
    }
}

impl<B: GraftBackend, C: CheckpointStrategy> GraftBackend for Autodiff<B, C> {
    fn packed_matmul(x: Tensor<Self, 2>, w: &PackedWeight) -> Tensor<Self, 2> {
        let x = x.into_primitive().tensor();
        let inner = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
        let y = B::packed_matmul(inner, w).into_primitive().tensor();
        let out = match PackedMatmulBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(w.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn attention_causal(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        sinks: Option<&Tensor<Self, 1>>,
        spec: &Causal,
    ) -> Tensor<Self, 3> {
        attention_blocked::tracked(q, k, v, sinks, spec)
    }

    fn token_logps(
        hidden: Tensor<Self, 2>,
        head: &Proj<Self>,
        softcap: Option<f32>,
        targets: Tensor<Self, 2, Int>,
    ) -> Tensor<Self, 1> {
        let rows = token_logps::chunk_rows(head.out_features);
        token_logps::tracked(hidden, head, softcap, targets, rows)
    }

    fn place_packed(w: &PackedWeight, device: &Self::Device) -> Result<bool, String> {
        B::place_packed(w, device)
    }

    fn unpacked(w: &PackedWeight, device: &Self::Device) -> Tensor<Self, 2> {
        Tensor::from_inner(B::unpacked(w, device))
    }

    fn supports_float(dtype: FloatDType, device: &Self::Device) -> bool {
        B::supports_float(dtype, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn fused_cpu_product_equals_dequantize_then_matmul() {
        type F = burn::backend::Flex;
        let (rows, cols) = (40, 256);
        let wv: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 700.0)
            .collect();
        let w = PackedWeight::nf4(rows, cols, &wv);
        let device = Default::default();
        for n in [1, 3, FUSED_MAX_ROWS] {
            let xv: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
                .collect();
            let x = Tensor::<F, 2>::from_data(TensorData::new(xv.clone(), [n, cols]), &device);
            let fused = F::packed_matmul(x.clone(), &w)
                .into_data()
                .to_vec::<f32>()
                .expect("f32");
            let dense = x
                .matmul(dequantized::<F>(&w, &device).transpose())
                .into_data()
                .to_vec::<f32>()
                .expect("f32");
            let d = max_abs_diff(&fused, &dense);
            assert!(d < 1e-4, "n={n}: max |Δ| {d}");
            // Batch-invariant: row 0 alone equals row 0 in the batch, bit for bit.
            let alone = w.matmul_t(&xv[..cols], 1);
            assert_eq!(&alone[..], &fused[..rows]);
        }
    }

    /// The fused packed product + LoRA term equals the product then each run's `scale·x·Aᵀ·Bᵀ`
    /// (the generic path), for mixed runs of two adapters and none, on the f32 and the 8-bit
    /// paths, adapters in f32 and in bf16; and a row's result alone equals its result in the
    /// batch, bit for bit.
    #[test]
    fn fused_lora_term_equals_the_generic_term_and_is_batch_invariant() {
        use crate::adapters::lora::{AdapterDtype, LoraWeights};
        use crate::quant::{Activations, GgmlType};
        type F = burn::backend::Flex;
        let device = Default::default();
        let (rows, cols) = (80, 256);
        let wv: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 700.0)
            .collect();
        let t = |n: usize, m: usize, seed: usize| {
            let v: Vec<f32> = (0..n * m)
                .map(|i| (((i + seed) * 31 % 97) as f32 - 48.0) / 50.0)
                .collect();
            Tensor::<F, 2>::from_data(TensorData::new(v, [n, m]), &device)
        };
        let lora = |r: usize, seed: usize, scale: f32| LoraWeights {
            a: t(r, cols, seed),
            b: t(rows, r, seed + 1),
            scale,
            dropout: 0.0,
            experts: 1,
        };
        let bytes = GgmlType::Q8_0.quantize(&wv).expect("Q8_0");
        let base = PackedWeight::ggml(GgmlType::Q8_0, rows, cols, bytes.into()).expect("layout");
        let weights = [base.clone(), base.with_activations(Activations::Q8)];
        for (w, dtype) in weights
            .iter()
            .flat_map(|w| [(w, AdapterDtype::F32), (w, AdapterDtype::Bf16)])
        {
            let (l1, l2) = (
                lora(16, 3, 2.0).stored_as(dtype),
                lora(4, 5, 0.25).stored_as(dtype),
            );
            let n = 6;
            let x = t(n, cols, 11);
            let runs: Vec<(std::ops::Range<usize>, Option<&LoraWeights<F>>)> =
                vec![(0..2, Some(&l1)), (2..3, None), (3..6, Some(&l2))];
            let fused = F::packed_matmul_lora(x.clone(), w, &runs);
            let generic = lora_rows_by_run(F::packed_matmul(x.clone(), w), x.clone(), &runs);
            let v = |t: Tensor<F, 2>| t.into_data().to_vec::<f32>().expect("f32");
            let (f, g) = (v(fused), v(generic));
            let d = max_abs_diff(&f, &g);
            assert!(d < 1e-3, "{:?}, {dtype}: max |Δ| {d}", w.activations());
            let plain = v(F::packed_matmul(x.clone(), w));
            assert_ne!(&f[..rows], &plain[..rows], "the adapter changed row 0");
            assert_eq!(
                &f[2 * rows..3 * rows],
                &plain[2 * rows..3 * rows],
                "row 2 has none"
            );
            for (i, l) in [(0, &l1), (4, &l2)] {
                let alone = F::packed_matmul_lora(
                    x.clone().slice([i..i + 1, 0..cols]),
                    w,
                    &[(0..1, Some(l))],
                );
                assert_eq!(v(alone), &f[i * rows..(i + 1) * rows], "row {i} alone");
            }
        }
    }

    /// The CPU softmax equals burn's, masked (−∞) scores included, on both sides of the
    /// parallel threshold.
    #[test]
    fn cpu_softmax_equals_burns() {
        type F = burn::backend::Flex;
        let device = Default::default();
        for (h, rows, keys) in [(2, 3, 5), (3, 40, 300)] {
            let v: Vec<f32> = (0..h * rows * keys)
                .map(|i| {
                    if i % keys > (i / keys) % keys + 1 {
                        f32::NEG_INFINITY
                    } else {
                        ((i * 7919 % 1013) as f32 - 506.0) / 60.0
                    }
                })
                .collect();
            let x = Tensor::<F, 3>::from_data(TensorData::new(v, [h, rows, keys]), &device);
            let ours = F::softmax_last(x.clone())
                .into_data()
                .to_vec::<f32>()
                .expect("f32");
            let burns = burn::tensor::activation::softmax(x, 2)
                .into_data()
                .to_vec::<f32>()
                .expect("f32");
            let d = max_abs_diff(&ours, &burns);
            assert!(d < 1e-6, "{h}×{rows}×{keys}: max |Δ| {d}");
            assert!(ours.contains(&0.0) && ours.iter().all(|p| p.is_finite()));
        }
    }

    type Ad = Autodiff<burn::backend::Flex>;

    #[test]
    fn packed_matmul_gradient_equals_the_dense_gradient() {
        let (rows, cols, n) = (6, 64, 3);
        let wv: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 97.0)
            .collect();
        let w = PackedWeight::nf4(rows, cols, &wv);
        let device = Default::default();
        let xv: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let x = || {
            Tensor::<Ad, 2>::from_data(TensorData::new(xv.clone(), [n, cols]), &device)
                .require_grad()
        };

        let x1 = x();
        let y1 = Ad::packed_matmul(x1.clone(), &w);
        let g1 = (y1.clone() * y1.clone()).sum().backward();
        let x2 = x();
        let y2 = x2
            .clone()
            .matmul(dequantized::<Ad>(&w, &device).transpose());
        let g2 = (y2.clone() * y2.clone()).sum().backward();

        let v = |t: Tensor<burn::backend::Flex, 2>| t.into_data().to_vec::<f32>().expect("f32");
        let (f1, f2) = (v(y1.inner()), v(y2.inner()));
        let dy = max_abs_diff(&f1, &f2);
        assert!(dy <= 1e-4, "forward max |Δ| {dy}");
        let (a, b) = (
            v(x1.grad(&g1).expect("x has a gradient")),
            v(x2.grad(&g2).expect("x has a gradient")),
        );
        let d = max_abs_diff(&a, &b);
        assert!(d <= 1e-4, "max |Δ| {d}");
        assert!(a.iter().any(|g| g.abs() > 1e-3), "a non-trivial gradient");
    }
}
