//! Causal attention of a sequence's new rows in blocks of query positions, never the whole
//! `[heads, n, keys]` scores: each block's scores, probabilities and their gradients are made,
//! used and dropped before the next block. Under autodiff it is one recorded op whose backward
//! recomputes each block's probabilities from the saved queries and keys (as flash attention's
//! backward does) instead of keeping every layer's `[heads, n, n]` probabilities alive until the
//! backward pass: training memory grows with the sequence, not with its square.
//!
//! A block's rows see their whole visible key range at once, so each row's softmax is the
//! one-shot softmax of the unblocked form (no running maximum): blocking changes which rows
//! are computed together, not what a row computes. Keys a block cannot see (past its last
//! row, or before its first row's window) are cut from the block, halving a causal prefill's
//! score work; within the block the triangle is masked.

use std::ops::Range;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{TensorData, TensorPrimitive};

use crate::backend::GraftBackend;

/// Score elements (`heads × rows × keys`) one block may hold: 8 MB in f32. The backward holds
/// about four tensors of a block's size at once.
const BLOCK_SCORES: usize = 1 << 21;

/// Query positions per block at least, however long the keys (smaller products run far below
/// the GEMM's speed).
const MIN_BLOCK_ROWS: usize = 16;

/// What each query row of one sequence sees, and how its scores are made.
///
/// Query row `i` is at position `past + i`, key `j` at position `start + j`; row `i` sees key
/// `j` when `start + j ≤ past + i` and, with a window `w`, `start + j > past + i − w`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Causal {
    /// Multiplier of `q·k`.
    pub scale: f32,
    /// `cap·tanh(s/cap)` of the scaled scores, before masking.
    pub softcap: Option<f32>,
    /// Query heads per key head: each key head's query rows are `groups·n`, row `g·n + i`
    /// being query `i` of the head's group member `g` (query head `kv·groups + g`).
    pub groups: usize,
    /// Position of query row 0.
    pub past: usize,
    /// Position of key 0.
    pub start: usize,
    /// Sliding window of the layer.
    pub window: Option<usize>,
    /// Query positions per block; `None` chooses them so a block's scores stay near 8 MB.
    pub block_rows: Option<usize>,
}

/// One block: its query positions (row indices of the sequence) and the keys they may see.
#[derive(Debug, Clone, PartialEq)]
struct Block {
    rows: Range<usize>,
    keys: Range<usize>,
}

impl Causal {
    /// The blocks of `n` query positions over `keys` keys, for `heads` query heads.
    fn blocks(&self, heads: usize, n: usize, keys: usize) -> Vec<Block> {
        let per = self
            .block_rows
            .unwrap_or_else(|| (BLOCK_SCORES / (heads * keys).max(1)).max(MIN_BLOCK_ROWS))
            .clamp(1, n.max(1));
        (0..n)
            .step_by(per)
            .map(|a| {
                let b = (a + per).min(n);
                let first = self.window.map_or(0, |w| {
                    (self.past + a + 1)
                        .saturating_sub(w)
                        .saturating_sub(self.start)
                });
                Block {
                    rows: a..b,
                    keys: first..(self.past + b - self.start).min(keys),
                }
            })
            .collect()
    }

    /// The additive mask `[1, rows, keys]` of a block (−∞ where a row may not look), `None`
    /// when every row sees every key of the block.
    fn mask<B: Backend>(&self, block: &Block, device: &B::Device) -> Option<Tensor<B, 3>> {
        let (c, w) = (block.rows.len(), block.keys.len());
        let hidden = |i: usize, j: usize| {
            let (pos, key) = (
                self.past + block.rows.start + i,
                self.start + block.keys.start + j,
            );
            key > pos || self.window.is_some_and(|win| key + win <= pos)
        };
        let corners = [(0, w - 1), (c - 1, 0)];
        if !corners.iter().any(|&(i, j)| hidden(i, j)) {
            // Rows see keys up to their own position: if the first row sees the last key and
            // the last row the first key (window), every row sees every key of the block.
            return None;
        }
        let mut mask = vec![0f32; c * w];
        for (i, row) in mask.chunks_exact_mut(w).enumerate() {
            for (j, m) in row.iter_mut().enumerate() {
                if hidden(i, j) {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        Some(Tensor::from_data(TensorData::new(mask, [1, c, w]), device))
    }
}

/// A block's query rows `[kv, groups·c, dk]`, its probabilities `[kv, groups·c, w]` and, with
/// a soft-cap, the `tanh` of the capped scores (for the backward).
struct BlockProbs<B: Backend> {
    q: Tensor<B, 3>,
    probs: Tensor<B, 3>,
    tanh: Option<Tensor<B, 3>>,
}

fn block_probs<B: GraftBackend>(
    q4: &Tensor<B, 4>,
    k: &Tensor<B, 3>,
    sinks: Option<&Tensor<B, 1>>,
    s: &Causal,
    block: &Block,
) -> BlockProbs<B> {
    let [kvh, g, _, dk] = q4.dims();
    let (c, w) = (block.rows.len(), block.keys.len());
    let q = q4
        .clone()
        .slice([0..kvh, 0..g, block.rows.clone(), 0..dk])
        .reshape([kvh, g * c, dk]);
    let keys = k.clone().slice([0..kvh, block.keys.clone(), 0..dk]);
    let mut scores = q.clone().matmul(keys.swap_dims(1, 2)).mul_scalar(s.scale);
    let mut tanh = None;
    if let Some(cap) = s.softcap {
        let t = scores.div_scalar(cap).tanh();
        scores = t.clone().mul_scalar(cap);
        tanh = Some(t);
    }
    if let Some(m) = s.mask::<B>(block, &q.device()) {
        // As `[heads, c·w] + [1, c·w]`: a shared row, which the CPU backend adds with SIMD
        // (a `[1, c, w]` broadcast over `[heads, c, w]` goes element by element through strides).
        scores =
            (scores.reshape([kvh * g, c * w]) + m.reshape([1, c * w])).reshape([kvh, g * c, w]);
    }
    let probs = softmax_with_sinks(scores, sinks, kvh, g, c);
    BlockProbs { q, probs, tanh }
}

/// The softmax of `scores` `[kv, groups·c, w]` over keys, each query head's sink (`[kv·groups]`,
/// head `kv·groups + g` for rows `g·c..(g + 1)·c`) joining its rows' softmax as one more logit
/// that is then dropped.
pub(crate) fn softmax_with_sinks<B: GraftBackend>(
    scores: Tensor<B, 3>,
    sinks: Option<&Tensor<B, 1>>,
    kvh: usize,
    groups: usize,
    c: usize,
) -> Tensor<B, 3> {
    let Some(sinks) = sinks else {
        return B::softmax_last(scores);
    };
    let w = scores.dims()[2];
    let column = sinks
        .clone()
        .reshape([kvh, groups, 1])
        .repeat_dim(2, c)
        .reshape([kvh, groups * c, 1]);
    B::softmax_last(Tensor::cat(vec![scores, column], 2)).slice([0..kvh, 0..groups * c, 0..w])
}

/// The attention output of every query row.
///
/// # Shapes
/// `q: [kv_heads, groups·n, dk]`, `k: [kv_heads, keys, dk]`, `v: [kv_heads, keys, dv]`,
/// `sinks: [kv_heads·groups]` → `[kv_heads, groups·n, dv]`
pub(crate) fn forward<B: GraftBackend>(
    q: Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    sinks: Option<&Tensor<B, 1>>,
    s: &Causal,
) -> Tensor<B, 3> {
    let ([kvh, rows, dk], [_, keys, dv]) = (q.dims(), v.dims());
    let (g, n) = (s.groups, rows / s.groups);
    let q4 = q.reshape([kvh, g, n, dk]);
    let outs: Vec<Tensor<B, 4>> = s
        .blocks(kvh * g, n, keys)
        .iter()
        .map(|b| {
            let p = block_probs(&q4, k, sinks, s, b).probs;
            p.matmul(v.clone().slice([0..kvh, b.keys.clone(), 0..dv]))
                .reshape([kvh, g, b.rows.len(), dv])
        })
        .collect();
    super::joined(outs, 2).reshape([kvh, g * n, dv])
}

/// The gradients of `q`, `k` and `v` from the output's gradient `d_out`, block by block:
/// `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(P∘dP))` (through the soft-cap's
/// `1 − tanh²`), `dQ = dS·K·scale`, `dK += dSᵀ·Q·scale`. Sinks get no gradient (they are
/// frozen base weights).
///
/// # Shapes
/// as [`forward`], `d_out: [kv_heads, groups·n, dv]` → `[dq, dk, dv]` shaped as `q`, `k`, `v`
pub(crate) fn backward<B: GraftBackend>(
    q: Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    sinks: Option<&Tensor<B, 1>>,
    s: &Causal,
    d_out: Tensor<B, 3>,
) -> [Tensor<B, 3>; 3] {
    let ([kvh, rows, dk], [_, keys, dv]) = (q.dims(), v.dims());
    let (g, n) = (s.groups, rows / s.groups);
    let device = q.device();
    let q4 = q.reshape([kvh, g, n, dk]);
    let d4 = d_out.reshape([kvh, g, n, dv]);
    let mut grad_k = Tensor::<B, 3>::zeros([kvh, keys, dk], &device);
    let mut grad_v = Tensor::<B, 3>::zeros([kvh, keys, dv], &device);
    let mut grad_q = Vec::new();
    for b in s.blocks(kvh * g, n, keys) {
        let c = b.rows.len();
        let BlockProbs { q, probs, tanh } = block_probs(&q4, k, sinks, s, &b);
        let d = d4
            .clone()
            .slice([0..kvh, 0..g, b.rows.clone(), 0..dv])
            .reshape([kvh, g * c, dv]);
        let kb = k.clone().slice([0..kvh, b.keys.clone(), 0..dk]);
        let vb = v.clone().slice([0..kvh, b.keys.clone(), 0..dv]);
        grad_v = add_at(
            grad_v,
            &b.keys,
            probs.clone().swap_dims(1, 2).matmul(d.clone()),
        );
        let dp = d.matmul(vb.swap_dims(1, 2));
        let row_dot = (dp.clone() * probs.clone()).sum_dim(2);
        let mut ds = probs * (dp - row_dot);
        if let Some(t) = tanh {
            ds = ds * (t.powi_scalar(2).neg() + 1.0);
        }
        let ds = ds.mul_scalar(s.scale);
        grad_q.push(ds.clone().matmul(kb).reshape([kvh, g, c, dk]));
        grad_k = add_at(grad_k, &b.keys, ds.swap_dims(1, 2).matmul(q));
    }
    [
        super::joined(grad_q, 2).reshape([kvh, g * n, dk]),
        grad_k,
        grad_v,
    ]
}

/// `t` with `part` added to its rows `at` (dimension 1).
fn add_at<B: Backend>(t: Tensor<B, 3>, at: &Range<usize>, part: Tensor<B, 3>) -> Tensor<B, 3> {
    let [h, len, d] = t.dims();
    if *at == (0..len) {
        return t + part;
    }
    let ranges = [0..h, at.clone(), 0..d];
    let sum = t.clone().slice(ranges.clone()) + part;
    t.slice_assign(ranges, sum)
}

/// The autodiff op: forward on the inner backend, backward by [`backward`] from the saved
/// `q`, `k`, `v` (no probabilities kept).
#[derive(Debug)]
struct CausalBackward;

type Saved<B> = (
    Tensor<B, 3>,
    Tensor<B, 3>,
    Tensor<B, 3>,
    Option<Tensor<B, 1>>,
    Causal,
);

impl<B: GraftBackend> Backward<B, 3> for CausalBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, k, v, sinks, spec) = ops.state;
        let d_out =
            Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let grads_qkv = backward(q, &k, &v, sinks.as_ref(), &spec, d_out);
        for (parent, grad) in ops.parents.into_iter().zip(grads_qkv) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// [`forward`] under autodiff, recorded as one op with the blocked [`backward`].
pub(crate) fn tracked<B: GraftBackend, C: CheckpointStrategy>(
    q: Tensor<Autodiff<B, C>, 3>,
    k: Tensor<Autodiff<B, C>, 3>,
    v: Tensor<Autodiff<B, C>, 3>,
    sinks: Option<&Tensor<Autodiff<B, C>, 1>>,
    s: &Causal,
) -> Tensor<Autodiff<B, C>, 3> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let inner = |p: &B::FloatTensorPrimitive| {
        Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(p.clone()))
    };
    let (qi, ki, vi) = (
        inner(&q.primitive),
        inner(&k.primitive),
        inner(&v.primitive),
    );
    // Frozen base weights: their gradient is not asked for.
    let sinks = sinks.map(|t| {
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(
            t.clone().into_primitive().tensor().primitive,
        ))
    });
    let out = forward(qi.clone(), &ki, &vi, sinks.as_ref(), s)
        .into_primitive()
        .tensor();
    let out = match CausalBackward
        .prepare::<C>([q.node, k.node, v.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((qi, ki, vi, sinks, *s), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    type F = burn::backend::Flex;
    type Ad = Autodiff<F>;

    /// A case with every option: grouped heads, a cached prefix (`past`), keys cut by the
    /// window (`start`), a soft-cap, sinks, and a value width unlike the key width.
    const KVH: usize = 2;
    const G: usize = 2;
    const N: usize = 13;
    const DK: usize = 8;
    const DV: usize = 6;
    const PAST: usize = 6;
    const WINDOW: usize = 5;

    fn spec(block_rows: Option<usize>) -> Causal {
        Causal {
            scale: 0.3,
            softcap: Some(5.0),
            groups: G,
            past: PAST,
            start: PAST + 1 - WINDOW,
            window: Some(WINDOW),
            block_rows,
        }
    }

    fn keys() -> usize {
        PAST + N - spec(None).start
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 400.0)
            .collect()
    }

    fn host(t: Tensor<F, 3>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().expect("f32")
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    }

    /// The attention of every row written out with loops over positions, from the
    /// definition (transformers' eager attention with its masks, soft-cap and sinks).
    fn by_definition(q: &[f32], k: &[f32], v: &[f32], sinks: &[f32], s: &Causal) -> Vec<f32> {
        let keys = keys();
        let mut out = vec![0f32; KVH * G * N * DV];
        for h in 0..KVH {
            for g in 0..G {
                for i in 0..N {
                    let row = &q[((h * G + g) * N + i) * DK..][..DK];
                    let pos = s.past + i;
                    let mut logits: Vec<(usize, f64)> = (0..keys)
                        .filter(|&j| {
                            let kp = s.start + j;
                            kp <= pos && kp + WINDOW > pos
                        })
                        .map(|j| {
                            let key = &k[(h * keys + j) * DK..][..DK];
                            let dot: f64 = row.iter().zip(key).map(|(a, b)| (a * b) as f64).sum();
                            let cap = s.softcap.unwrap_or(f32::INFINITY) as f64;
                            (j, cap * (dot * s.scale as f64 / cap).tanh())
                        })
                        .collect();
                    let sink = sinks[h * G + g] as f64;
                    let m = logits.iter().map(|l| l.1).fold(sink, f64::max);
                    let total: f64 =
                        logits.iter().map(|l| (l.1 - m).exp()).sum::<f64>() + (sink - m).exp();
                    for (j, l) in logits.iter_mut() {
                        let p = (*l - m).exp() / total;
                        for d in 0..DV {
                            out[((h * G + g) * N + i) * DV + d] +=
                                (p * v[(h * keys + *j) * DV + d] as f64) as f32;
                        }
                    }
                }
            }
        }
        out
    }

    fn inputs<B: Backend>(device: &B::Device) -> [Tensor<B, 3>; 3] {
        let k = keys();
        [
            Tensor::from_data(
                TensorData::new(values(KVH * G * N * DK, 1), [KVH, G * N, DK]),
                device,
            ),
            Tensor::from_data(
                TensorData::new(values(KVH * k * DK, 2), [KVH, k, DK]),
                device,
            ),
            Tensor::from_data(
                TensorData::new(values(KVH * k * DV, 3), [KVH, k, DV]),
                device,
            ),
        ]
    }

    fn sinks<B: Backend>(device: &B::Device) -> Tensor<B, 1> {
        Tensor::from_data(
            TensorData::new(vec![0.5, -1.0, 2.0, 0.0], [KVH * G]),
            device,
        )
    }

    #[test]
    fn blocks_equal_the_definition() {
        let device = Default::default();
        let [q, k, v] = inputs::<F>(&device);
        let sk = sinks::<F>(&device);
        let want = by_definition(
            &host(q.clone()),
            &host(k.clone()),
            &host(v.clone()),
            &sk.clone().into_data().to_vec::<f32>().expect("f32"),
            &spec(None),
        );
        // One block, uneven blocks, one row per block.
        for rows in [None, Some(4), Some(1)] {
            let got = host(forward(q.clone(), &k, &v, Some(&sk), &spec(rows)));
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "block rows {rows:?}: max |Δ| {d}");
        }
    }

    #[test]
    fn blocks_hold_only_the_keys_their_rows_see() {
        let s = spec(Some(4));
        let blocks = s.blocks(KVH * G, N, keys());
        assert_eq!(blocks.len(), 4);
        for b in &blocks {
            // The first row's window start and the last row's own position bound the keys.
            let first = s.past + b.rows.start + 1 - WINDOW;
            assert!(first >= s.start);
            assert_eq!(s.start + b.keys.start, first, "{b:?}");
            assert_eq!(s.start + b.keys.end - 1, s.past + b.rows.end - 1, "{b:?}");
        }
        // A training sequence of 2,048 tokens with 9 heads: no block near [heads, n, n].
        let long = Causal {
            past: 0,
            start: 0,
            window: None,
            block_rows: None,
            ..s
        };
        let blocks = long.blocks(9, 2048, 2048);
        let largest = blocks
            .iter()
            .map(|b| 9 * b.rows.len() * b.keys.len())
            .max()
            .unwrap_or(0);
        assert!(largest <= BLOCK_SCORES, "{largest} scores in one block");
        assert!(blocks.len() > 1);
        let covered: usize = blocks.iter().map(|b| b.rows.len()).sum();
        assert_eq!(covered, 2048);
    }

    /// The recorded op's gradients equal autodiff's through the unblocked tensor ops.
    #[test]
    fn blocked_backward_equals_autodiff_of_the_unblocked_form() {
        let device = Default::default();
        let s = spec(None);
        let keys = keys();
        // The unblocked form: all scores at once, the mask over every (row, key).
        let mut mask = vec![0f32; KVH * G * N * keys];
        for (r, row) in mask.chunks_exact_mut(keys).enumerate() {
            let pos = s.past + r % N;
            for (j, m) in row.iter_mut().enumerate() {
                let kp = s.start + j;
                if kp > pos || kp + WINDOW <= pos {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::<Ad, 3>::from_data(TensorData::new(mask, [KVH, G * N, keys]), &device);
        let weights = Tensor::<Ad, 3>::from_data(
            TensorData::new(values(KVH * G * N * DV, 4), [KVH, G * N, DV]),
            &device,
        );
        let grads_of = |out: Tensor<Ad, 3>, leaves: &[Tensor<Ad, 3>; 3]| {
            let g = (out * weights.clone()).sum().backward();
            leaves
                .clone()
                .map(|t| host(t.grad(&g).expect("a gradient")))
        };

        let leaves = inputs::<Ad>(&device).map(|t| t.require_grad());
        let [q, k, v] = leaves.clone();
        let cap = s.softcap.unwrap_or(f32::INFINITY);
        let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(s.scale);
        let scores = scores.div_scalar(cap).tanh().mul_scalar(cap) + mask;
        let probs = softmax_with_sinks(scores, Some(&sinks::<Ad>(&device)), KVH, G, N);
        let want = grads_of(probs.matmul(v), &leaves);

        for rows in [None, Some(4), Some(1)] {
            let leaves = inputs::<Ad>(&device).map(|t| t.require_grad());
            let [q, k, v] = leaves.clone();
            let out = Ad::attention_causal(q, k, v, Some(&sinks::<Ad>(&device)), &spec(rows));
            let got = grads_of(out, &leaves);
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-5, "block rows {rows:?}: d{name} max |Δ| {d}");
                assert!(a.iter().any(|x| x.abs() > 1e-3), "d{name} is not trivial");
            }
        }
    }
}
