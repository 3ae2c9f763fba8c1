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
use burn::tensor::{TensorData, TensorPrimitive};

use crate::adapters::lora::RowAdapters;
use crate::quant::PackedWeight;

/// A burn backend graft's model runs on.
pub trait GraftBackend: Backend {
    /// `x·Wᵀ` for a packed `W: [out, in]`.
    ///
    /// # Shapes
    /// `x: [n, in]` → `[n, out]`
    fn packed_matmul(x: Tensor<Self, 2>, w: &PackedWeight) -> Tensor<Self, 2> {
        let wd = dequantized(w, &x.device());
        x.matmul(wd.transpose())
    }

    /// `g·W` for a packed `W: [out, in]` (the input gradient of [`Self::packed_matmul`]).
    ///
    /// # Shapes
    /// `g: [n, out]` → `[n, in]`
    fn packed_matmul_transposed(g: Tensor<Self, 2>, w: &PackedWeight) -> Tensor<Self, 2> {
        let wd = dequantized(w, &g.device());
        g.matmul(wd)
    }

    /// `y` plus each row run's adapter term `scale·(x·Aᵀ)·Bᵀ` (rows of a serving batch may
    /// each have their own adapter; PEFT groups rows by adapter the same way). The default
    /// runs one pair of matrix products per run of rows; the CPU backend overrides it with one
    /// gathered pass over the rows.
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
        let [n, cols] = x.dims();
        if cols != w.cols || (n > FUSED_MAX_ROWS && !w.integer_path()) {
            let wd = dequantized(w, &x.device());
            return x.matmul(wd.transpose());
        }
        let device = x.device();
        let xs = x
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("converted to f32");
        Tensor::from_data(TensorData::new(w.matmul_t(&xs, n), [n, w.rows]), &device)
    }

    /// One gathered pass (the CPU counterpart of punica's BGMV): each row takes its own
    /// adapter's `A` and `B` straight from their storage, `t = scale·A·xᵢ` (r values), then
    /// `yᵢ += B·t`, rows in parallel. No per-run slicing, concatenation or small-matrix calls,
    /// which cost more than the arithmetic at decode sizes; each row's result depends only on
    /// that row (batch-invariant).
    fn lora_rows(
        y: Tensor<Self, 2>,
        x: Tensor<Self, 2>,
        runs: &RowAdapters<'_, Self>,
    ) -> Tensor<Self, 2> {
        use rayon::prelude::*;
        if runs.iter().all(|(_, l)| l.is_none()) {
            return y;
        }
        let ([n, d_in], [_, d_out]) = (x.dims(), y.dims());
        let host = |t: &Tensor<Self, 2>| t.clone().into_primitive().tensor();
        let xt = host(&x);
        // The flat storage of each adapter's A and B in run order (the tensors kept alive
        // beside their element ranges); `None` if any is strided.
        let weights: Option<Vec<_>> = runs
            .iter()
            .filter_map(|(_, l)| *l)
            .map(|l| {
                let (a, b) = (host(&l.a), host(&l.b));
                let (ar, br) = (
                    a.layout().contiguous_offsets()?,
                    b.layout().contiguous_offsets()?,
                );
                Some((a, ar, b, br, l.scale, l.rank()))
            })
            .collect();
        let (Some(weights), Some((x0, x1))) = (weights, xt.layout().contiguous_offsets()) else {
            // Strided operands (never made by graft's loaders): the generic path.
            return lora_rows_by_run(y, x, runs);
        };
        let xs = &xt.storage::<f32>()[x0..x1];
        // Which adapter (index into `weights`) each row uses.
        let mut row_adapter = vec![usize::MAX; n];
        let mut k = 0;
        for (range, l) in runs {
            if l.is_some() {
                row_adapter[range.clone()].fill(k);
                k += 1;
            }
        }
        let slices: Vec<(&[f32], &[f32], f32, usize)> = weights
            .iter()
            .map(|(a, (a0, a1), b, (b0, b1), scale, r)| {
                (
                    &a.storage::<f32>()[*a0..*a1],
                    &b.storage::<f32>()[*b0..*b1],
                    *scale,
                    *r,
                )
            })
            .collect();
        let device = y.device();
        let mut out = y.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
        let row = |(i, yi): (usize, &mut [f32])| {
            let Some(&(a, b, scale, r)) = slices.get(row_adapter[i]) else {
                return;
            };
            let xi = &xs[i * d_in..(i + 1) * d_in];
            let t: Vec<f32> = a
                .chunks_exact(d_in)
                .map(|ak| scale * crate::quant::dot(ak, xi))
                .collect();
            for (yo, bo) in yi.iter_mut().zip(b.chunks_exact(r)) {
                *yo += crate::quant::dot(bo, &t);
            }
        };
        if n > 1 {
            out.par_chunks_mut(d_out).enumerate().for_each(row);
        } else {
            out.chunks_mut(d_out).enumerate().for_each(row);
        }
        Tensor::from_data(TensorData::new(out, [n, d_out]), &device)
    }
}

#[cfg(feature = "cuda")]
impl GraftBackend for burn_cuda::Cuda {}

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let d = fused
                .iter()
                .zip(&dense)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "n={n}: max |Δ| {d}");
            // Batch-invariant: row 0 alone equals row 0 in the batch, bit for bit.
            let alone = w.matmul_t(&xv[..cols], 1);
            assert_eq!(&alone[..], &fused[..rows]);
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
        let dy = f1
            .iter()
            .zip(&f2)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(dy <= 1e-4, "forward max |Δ| {dy}");
        let (a, b) = (
            v(x1.grad(&g1).expect("x has a gradient")),
            v(x2.grad(&g2).expect("x has a gradient")),
        );
        let d = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4, "max |Δ| {d}");
        assert!(a.iter().any(|g| g.abs() > 1e-3), "a non-trivial gradient");
    }
}
