//! The log-probability of a given next token at each row, `log softmax(head(h))[t]`, without
//! keeping the `[rows, vocab]` logits: a fused LM head and cross-entropy, as Liger's and
//! Unsloth's kernels do. The rows go through the head a chunk at a time (about 8 M logits).
//!
//! The gradient of a row's log-probability with respect to its hidden state is
//! `(onehot(t) − softmax(l))·W` (times `1 − (l/cap)²` inside for a soft-capped head), whatever
//! the loss does with it afterwards: the loss only scales each row's. So when gradients are
//! recorded the forward computes it while the chunk's logits are at hand, keeps that
//! `[rows, hidden]` matrix, and the backward scales its rows. That is the unfused graph's
//! arithmetic (one product through the head each way) without its memory: it keeps the logits,
//! their log-softmax and, in the backward, as many again, 200 MB each for SmolLM2's 49,152-token
//! vocabulary and 1,024 trained tokens, more than the whole model's saved activations with
//! layer recomputation.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{IndexingUpdateOp, TensorPrimitive};

use super::proj::{BaseWeight, Proj};
use crate::backend::GraftBackend;

/// Logits per chunk of rows, at most (and at least one row).
const CHUNK_LOGITS: usize = 1 << 23;

/// Rows per chunk for a vocabulary of `vocab`: [`CHUNK_LOGITS`] logits, at least one row.
pub(crate) fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_LOGITS / vocab.max(1)).max(1)
}

/// `0..n` in ranges of `rows`.
fn chunks(n: usize, rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n).step_by(rows).map(move |s| s..(s + rows).min(n))
}

/// The logits of `h`, soft-capped when the family caps them (what [`super::Model::logits`]
/// computes).
fn logits<B: GraftBackend>(h: Tensor<B, 2>, head: &Proj<B>, softcap: Option<f32>) -> Tensor<B, 2> {
    let logits = head.forward(h, &[]);
    match softcap {
        Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
        None => logits,
    }
}

/// `head` with its packed weight dequantized once, when `reused` (more than one chunk, or the
/// gradient's product too: each product would dequantize it again).
fn unpacked<B: GraftBackend>(head: &Proj<B>, reused: bool, device: &B::Device) -> Option<Proj<B>> {
    match &head.base {
        BaseWeight::Packed(p) if reused => Some(Proj {
            base: BaseWeight::Dense(B::unpacked(p, device)),
            ..head.clone()
        }),
        _ => None,
    }
}

/// `log softmax(logits(h))[t]` per row (`[n]`), `rows` rows at a time, and with `gradient` each
/// row's gradient of it with respect to `h` (`[n, hidden]`).
///
/// # Shapes
/// `hidden: [n, hidden]`, `targets: [n, 1]`
pub(crate) fn forward<B: GraftBackend>(
    hidden: Tensor<B, 2>,
    head: &Proj<B>,
    softcap: Option<f32>,
    targets: &Tensor<B, 2, Int>,
    rows: usize,
    gradient: bool,
) -> (Tensor<B, 1>, Option<Tensor<B, 2>>) {
    let [n, width] = hidden.dims();
    if n == 0 {
        let device = hidden.device();
        return (
            Tensor::zeros([0], &device),
            gradient.then(|| Tensor::zeros([0, width], &device)),
        );
    }
    let dense = unpacked(head, n > rows || gradient, &hidden.device());
    let head = dense.as_ref().unwrap_or(head);
    let (mut picked, mut grads) = (Vec::new(), Vec::new());
    for r in chunks(n, rows) {
        let t = targets.clone().slice(r.clone());
        let l = logits(hidden.clone().slice(r), head, softcap);
        let max = l.clone().max_dim(1);
        let lse = (l.clone() - max.clone()).exp().sum_dim(1).log() + max;
        picked.push(l.clone().gather(1, t.clone()) - lse.clone());
        if gradient {
            let [m, _] = l.dims();
            // onehot(t) − softmax(l)
            let mut d = (l.clone() - lse).exp().neg().scatter(
                1,
                t,
                Tensor::ones([m, 1], &l.device()),
                IndexingUpdateOp::Add,
            );
            if let Some(cap) = softcap {
                // l = cap·tanh(z/cap): dl/dz = 1 − (l/cap)²
                d = d * (l.div_scalar(cap).powi_scalar(2).neg() + 1.0);
            }
            grads.push(match &head.base {
                BaseWeight::Dense(w) => d.matmul(w.clone()),
                BaseWeight::Packed(p) => B::packed_matmul_transposed(d, p),
            });
        }
    }
    let grads = gradient.then(|| super::joined(grads, 0));
    (super::joined(picked, 0).reshape([n]), grads)
}

/// The autodiff op: [`forward`] on the inner backend; the backward scales the rows of the
/// gradient the forward kept (`[n, hidden]`) by the incoming `[n]`.
#[derive(Debug)]
struct TokenLogpsBackward;

impl<B: GraftBackend> Backward<B, 1> for TokenLogpsBackward {
    type State = Tensor<B, 2>;

    fn backward(self, ops: Ops<Tensor<B, 2>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let n = g.dims()[0];
            let d = ops.state * g.reshape([n, 1]);
            grads.register::<B>(node.id, d.into_primitive().tensor());
        }
    }
}

/// [`forward`] under autodiff, recorded as one op that keeps only the rows' gradients.
pub(crate) fn tracked<B: GraftBackend, C: CheckpointStrategy>(
    hidden: Tensor<Autodiff<B, C>, 2>,
    head: &Proj<Autodiff<B, C>>,
    softcap: Option<f32>,
    targets: Tensor<Autodiff<B, C>, 2, Int>,
    rows: usize,
) -> Tensor<Autodiff<B, C>, 1> {
    let h = hidden.into_primitive().tensor();
    let hi = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(h.primitive.clone()));
    let head = Proj {
        base: match &head.base {
            BaseWeight::Dense(w) => BaseWeight::Dense(w.clone().inner()),
            BaseWeight::Packed(p) => BaseWeight::Packed(p.clone()),
        },
        bias: head.bias.clone().map(Tensor::inner),
        out_features: head.out_features,
        in_features: head.in_features,
        compute: head.compute,
    };
    let targets = Tensor::<B, 2, Int>::from_primitive(targets.into_primitive());
    let kind = TokenLogpsBackward
        .prepare::<C>([h.node])
        .compute_bound()
        .stateful();
    let out = match kind {
        OpsKind::Tracked(prep) => {
            let (out, grads) = forward(hi.clone(), &head, softcap, &targets, rows, true);
            let grads = grads.unwrap_or_else(|| hi.zeros_like());
            prep.finish(grads, out.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => {
            let (out, _) = forward(hi, &head, softcap, &targets, rows, false);
            prep.finish(out.into_primitive().tensor())
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::tensor::activation::log_softmax;
    use burn::tensor::TensorData;

    use super::*;

    type F = burn::backend::Flex;
    type Ad = Autodiff<F>;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 900.0)
            .collect()
    }

    /// A head of `vocab` rows over `hidden` inputs, dense, with a bias.
    fn head<B: GraftBackend>(vocab: usize, hidden: usize, dev: &B::Device) -> Proj<B> {
        let w = Tensor::from_data(
            TensorData::new(values(vocab * hidden, 1), [vocab, hidden]),
            dev,
        );
        let b = Tensor::from_data(TensorData::new(values(vocab, 2), [vocab]), dev);
        Proj::new(BaseWeight::Dense(w), Some(b))
    }

    /// Values and gradients equal those of the unfused log-softmax under autodiff, with and
    /// without a soft-cap, over chunks of two rows and a last one of one.
    #[test]
    fn fused_equals_log_softmax_and_its_gradient() {
        let dev = Default::default();
        let (n, hidden, vocab) = (5, 8, 37);
        let head = head::<Ad>(vocab, hidden, &dev);
        let t: Vec<i32> = vec![0, 7, (vocab - 1) as i32, 3, 7];
        let targets = Tensor::<Ad, 2, Int>::from_data(TensorData::new(t, [n, 1]), &dev);
        let weights = Tensor::<Ad, 1>::from_data(TensorData::new(values(n, 3), [n]), &dev);
        for softcap in [None, Some(2.5)] {
            let h = || {
                Tensor::<Ad, 2>::from_data(
                    TensorData::new(values(n * hidden, 4), [n, hidden]),
                    &dev,
                )
                .require_grad()
            };
            let (h1, h2) = (h(), h());
            let fused =
                tracked::<F, NoCheckpointing>(h1.clone(), &head, softcap, targets.clone(), 2);
            let plain = log_softmax(logits(h2.clone(), &head, softcap), 1)
                .gather(1, targets.clone())
                .reshape([n]);
            let (a, b) = (
                fused.clone().into_data().to_vec::<f32>().unwrap(),
                plain.clone().into_data().to_vec::<f32>().unwrap(),
            );
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() < 1e-4 * (1.0 + y.abs()),
                    "{softcap:?}: {x} vs {y}"
                );
            }
            let g1 = (fused * weights.clone()).sum().backward();
            let g2 = (plain * weights.clone()).sum().backward();
            let d1 = h1.grad(&g1).unwrap().into_data().to_vec::<f32>().unwrap();
            let d2 = h2.grad(&g2).unwrap().into_data().to_vec::<f32>().unwrap();
            let scale = d2.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 1e-3, "the gradient is not trivial");
            for (x, y) in d1.iter().zip(&d2) {
                assert!((x - y).abs() < 1e-5 * scale, "{softcap:?}: {x} vs {y}");
            }
        }
    }
}
