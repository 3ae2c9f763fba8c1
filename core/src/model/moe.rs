//! Routed experts, the MLP of a Mixture-of-Experts layer (Mixtral, Qwen3-MoE, OLMoE): a router
//! scores every expert for each token, the `top_k` best run on that token, and their outputs
//! are summed weighted by the router's softmax probabilities (renormalized over the chosen
//! ones when the config says so), as transformers' `*SparseMoeBlock`s do.
//!
//! Tokens are grouped by expert: each chosen expert runs once over the rows that chose it, so
//! a step reads the weights of the experts some token chose and no others. Adapters on the
//! router and on the experts (stacked per expert, see [`crate::adapters::lora`]) apply to the
//! rows of their own requests, so a batch that mixes adapters stays one pass. The routing weights
//! stay tensors (a softmax and a gather of the router's logits), so gradients reach the hidden
//! state through them as through the experts; only the choice itself (the top-k) is made on
//! the host.

use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::{IndexingUpdateOp, TensorData};

use super::block::{gelu_tanh, Runs};
use super::config::{Activation, ClampedSwiglu, MoeConfig, Routing};
use crate::adapters::lora::{LoraWeights, RowAdapters};
use crate::backend::GraftBackend;
use crate::model::proj::Proj;

/// The adapters of a sparse layer's batch rows: on the router, and on the experts' gate/up and
/// down projections (each adapter stacked per expert).
pub(crate) struct ExpertRuns<'r, B: GraftBackend> {
    pub router: Runs<'r, B>,
    pub gate_up: Runs<'r, B>,
    pub down: Runs<'r, B>,
}

/// An expert's own adapter pairs over the rows that chose it, `(range, weights)` per run.
type OwnedRuns<B> = Vec<(std::ops::Range<usize>, Option<LoraWeights<B>>)>;

/// The layer's `runs` restricted to `rows` (ascending layer rows, renumbered `0..rows.len()`),
/// each adapter replaced by `pick(adapter)`. Runs that no row falls in are dropped; with no
/// adapter in any run, there are none.
fn sub_runs<B: GraftBackend>(
    runs: &Runs<'_, B>,
    rows: &[usize],
    pick: impl Fn(&LoraWeights<B>) -> LoraWeights<B>,
) -> OwnedRuns<B> {
    let mut out = Vec::new();
    if runs.iter().all(|(_, l)| l.is_none()) {
        return out;
    }
    for (range, lora) in runs {
        let start = rows.partition_point(|&r| r < range.start);
        let end = rows.partition_point(|&r| r < range.end);
        if start < end {
            out.push((start..end, lora.map(&pick)));
        }
    }
    out
}

/// Borrowed view of [`OwnedRuns`] for [`Proj::forward`].
fn borrowed<B: GraftBackend>(
    runs: &OwnedRuns<B>,
) -> Vec<(std::ops::Range<usize>, Option<&LoraWeights<B>>)> {
    runs.iter().map(|(r, w)| (r.clone(), w.as_ref())).collect()
}

/// One expert: a gated MLP of its own.
#[derive(Debug, Clone)]
pub struct Expert<B: GraftBackend> {
    pub gate: Proj<B>,
    pub up: Proj<B>,
    pub down: Proj<B>,
}

/// A layer's router and routed experts.
#[derive(Debug, Clone)]
pub struct Experts<B: GraftBackend> {
    /// `[num_experts, hidden]`: a token's score for each expert.
    pub router: Proj<B>,
    /// Added to the scores for the choice only (DeepSeek-V3's `e_score_correction_bias`).
    pub score_bias: Option<Tensor<B, 1>>,
    pub experts: Vec<Expert<B>>,
}

/// The experts a batch's tokens chose: per token, `top_k` expert ids by descending weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    pub top_k: usize,
    /// `[tokens · top_k]`, row-major.
    pub experts: Vec<u32>,
}

impl<B: GraftBackend> Expert<B> {
    /// Bytes held by the expert's weights.
    pub fn n_bytes(&self) -> usize {
        self.gate.n_bytes() + self.up.n_bytes() + self.down.n_bytes()
    }

    /// `f` on each of the expert's projections.
    pub fn for_each_proj(&mut self, f: &mut dyn FnMut(&mut Proj<B>)) {
        for p in [&mut self.gate, &mut self.up, &mut self.down] {
            f(p);
        }
    }

    /// `down(act(gate(x)) · up(x))`, each projection with its rows' adapters.
    ///
    /// # Shapes
    /// `x: [m, hidden]` → `[m, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 2>,
        act: Activation,
        clamped: Option<ClampedSwiglu>,
        lora: [&RowAdapters<'_, B>; 3],
    ) -> Tensor<B, 2> {
        let gate = self.gate.forward(x.clone(), lora[0]);
        let up = self.up.forward(x, lora[1]);
        let hidden = match (clamped, act) {
            (Some(c), _) => {
                let gate = gate.clamp_max(c.limit);
                let up = up.clamp(-c.limit, c.limit);
                let glu = gate.clone() * sigmoid(gate.mul_scalar(c.alpha));
                (up + 1.0) * glu
            }
            (None, Activation::Silu) => silu(gate) * up,
            (None, Activation::GeluTanh) => gelu_tanh(gate) * up,
        };
        self.down.forward(hidden, lora[2])
    }

    /// This expert's (number `e`) share of the layer's adapters over `rows`: gate and up take
    /// the first and last halves of the stacked gate/up pair's rows.
    fn runs(&self, e: usize, rows: &[usize], lora: &ExpertRuns<'_, B>) -> [OwnedRuns<B>; 3] {
        let (i, h) = (self.gate.out_features, self.down.out_features);
        [
            sub_runs(&lora.gate_up, rows, |w| w.expert(e, 0..i)),
            sub_runs(&lora.gate_up, rows, |w| w.expert(e, i..2 * i)),
            sub_runs(&lora.down, rows, |w| w.expert(e, 0..h)),
        ]
    }
}

impl<B: GraftBackend> Experts<B> {
    /// Bytes held by the router and the experts.
    pub fn n_bytes(&self) -> usize {
        self.router.n_bytes()
            + self.score_bias.as_ref().map_or(0, |b| b.dims()[0] * 4)
            + self.experts.iter().map(Expert::n_bytes).sum::<usize>()
    }

    /// `f` on the router and each expert's projections.
    pub fn for_each_proj(&mut self, f: &mut dyn FnMut(&mut Proj<B>)) {
        f(&mut self.router);
        for e in &mut self.experts {
            e.for_each_proj(f);
        }
    }

    /// The weighted sum of each token's chosen experts, and the choices.
    ///
    /// # Shapes
    /// `h: [n, hidden]` → `[n, hidden]`
    pub(crate) fn forward(
        &self,
        h: Tensor<B, 2>,
        moe: &MoeConfig,
        act: Activation,
        lora: &ExpertRuns<'_, B>,
    ) -> (Tensor<B, 2>, Routes) {
        let [n, hidden] = h.dims();
        let k = moe.top_k;
        let device = h.device();
        let logits = self.router.forward(h.clone(), &lora.router);
        // The routing weights of every expert (softmax probabilities or sigmoid scores), the
        // choice, and the weights of the chosen ones, `[n, k]`, renormalized if asked.
        let (scores, chosen) = match moe.routing {
            Routing::Softmax => {
                let probs = softmax(logits, 1);
                let chosen = top_k(&probs, k);
                (probs, chosen)
            }
            Routing::SigmoidGrouped {
                groups,
                topk_groups,
            } => {
                let scores = sigmoid(logits);
                let bias = self.score_bias.as_ref().map(host_f32);
                let chosen = grouped_top_k(&scores, bias.as_deref(), groups, topk_groups, k);
                (scores, chosen)
            }
        };
        let idx: Vec<i32> = chosen.iter().map(|&e| e as i32).collect();
        let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [n, k]), &device);
        let mut weights = scores.gather(1, idx);
        if moe.norm_topk {
            weights = match moe.routing {
                Routing::Softmax => weights.clone() / weights.sum_dim(1),
                // transformers adds 1e-20 to the sigmoid scores' sum
                Routing::SigmoidGrouped { .. } => {
                    weights.clone() / weights.sum_dim(1).add_scalar(1e-20)
                }
            };
        }
        if moe.weights_scale != 1.0 {
            weights = weights.mul_scalar(moe.weights_scale);
        }
        // Entry `t·k + j` weighs token t's j-th expert.
        let weights = weights.reshape([n * k]);
        // By expert, the (token, slot) pairs that chose it, tokens ascending.
        let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); self.experts.len()];
        for (pair, &e) in chosen.iter().enumerate() {
            by_expert[e as usize].push(pair);
        }
        let mut out = Tensor::<B, 2>::zeros([n, hidden], &device);
        for (e, (expert, pairs)) in self.experts.iter().zip(&by_expert).enumerate() {
            if pairs.is_empty() {
                continue;
            }
            let m = pairs.len();
            // A token chooses an expert at most once, so its rows ascend without repeats.
            let token_rows: Vec<usize> = pairs.iter().map(|&p| p / k).collect();
            let [g, u, d] = expert.runs(e, &token_rows, lora);
            let rows: Vec<i32> = token_rows.iter().map(|&r| r as i32).collect();
            let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [m]), &device);
            let slots: Vec<i32> = pairs.iter().map(|&p| p as i32).collect();
            let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [m]), &device);
            let (g, u, d) = (borrowed(&g), borrowed(&u), borrowed(&d));
            let y = expert.forward(
                h.clone().select(0, rows.clone()),
                act,
                moe.clamped_swiglu,
                [&g, &u, &d],
            );
            let w = weights.clone().select(0, slots).reshape([m, 1]);
            out = out.select_assign(0, rows, y * w, IndexingUpdateOp::Add);
        }
        (
            out,
            Routes {
                top_k: k,
                experts: chosen,
            },
        )
    }
}

/// A tensor's values on the host, as f32.
fn host_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_else(|e| unreachable!("an f32 tensor reads back as f32: {e:?}"))
}

/// DeepSeek-V3's choice (transformers' `DeepseekV3TopkRouter`), per row of `scores`
/// (`[n, experts]`, sigmoid): with `bias` added, each of the `groups` equal groups of experts
/// is worth its two best scores; the `k` best experts of the `topk_groups` best groups are
/// chosen (ties: the lower index first), listed by descending unbiased score. `[n · k]`.
fn grouped_top_k<B: Backend>(
    scores: &Tensor<B, 2>,
    bias: Option<&[f32]>,
    groups: usize,
    topk_groups: usize,
    k: usize,
) -> Vec<u32> {
    let [n, e] = scores.dims();
    let values = host_f32(scores);
    let per = e / groups;
    let mut out = Vec::with_capacity(n * k);
    for row in values.chunks_exact(e) {
        let biased: Vec<f32> = match bias {
            Some(b) => row.iter().zip(b).map(|(s, b)| s + b).collect(),
            None => row.to_vec(),
        };
        let group_score = |g: usize| {
            let mut best = biased[g * per..(g + 1) * per].to_vec();
            best.sort_by(|a, b| b.total_cmp(a));
            best.iter().take(2).fold(0f32, |acc, v| acc + v)
        };
        let worth: Vec<f32> = (0..groups).map(group_score).collect();
        let mut order: Vec<usize> = (0..groups).collect();
        order.sort_by(|&a, &b| worth[b].total_cmp(&worth[a]));
        let mut candidates: Vec<usize> = order[..topk_groups]
            .iter()
            .flat_map(|&g| g * per..(g + 1) * per)
            .collect();
        candidates.sort_unstable();
        candidates.sort_by(|&a, &b| biased[b].total_cmp(&biased[a]));
        let mut picked: Vec<usize> = candidates[..k].to_vec();
        picked.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        out.extend(picked.iter().map(|&x| x as u32));
    }
    out
}

/// Per row of `probs` (`[n, experts]`), the `k` largest entries' columns by descending value
/// (ties: the lower column first), `[n · k]`.
fn top_k<B: Backend>(probs: &Tensor<B, 2>, k: usize) -> Vec<u32> {
    let [n, e] = probs.dims();
    let values = host_f32(probs);
    let mut out = Vec::with_capacity(n * k);
    let mut order: Vec<u32> = Vec::with_capacity(e);
    for row in values.chunks_exact(e) {
        order.clear();
        order.extend(0..e as u32);
        // Stable: equal values keep the lower column first.
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        out.extend_from_slice(&order[..k]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    #[test]
    fn top_k_takes_the_largest_by_descending_value_and_the_lower_index_on_ties() {
        let dev = Default::default();
        let p = Tensor::<B, 2>::from_data(
            TensorData::new(vec![0.1f32, 0.4, 0.2, 0.3, 0.25, 0.25, 0.4, 0.1], [2, 4]),
            &dev,
        );
        assert_eq!(top_k(&p, 2), vec![1, 3, 2, 0]);
        assert_eq!(top_k(&p, 4), vec![1, 3, 2, 0, 2, 0, 1, 3]);
    }

    #[test]
    fn grouped_top_k_keeps_to_the_best_groups_and_lists_by_unbiased_score() {
        let dev = Default::default();
        // Two groups of three. Group 0's two best biased scores sum to 1.1, group 1's to 1.3.
        let s = Tensor::<B, 2>::from_data(
            TensorData::new(vec![0.9f32, 0.2, 0.1, 0.5, 0.6, 0.7], [1, 6]),
            &dev,
        );
        // Unbiased, expert 0 is the best of all, but its group loses.
        assert_eq!(grouped_top_k(&s, None, 2, 1, 2), vec![5, 4]);
        // Both groups allowed: the two best overall.
        assert_eq!(grouped_top_k(&s, None, 2, 2, 2), vec![0, 5]);
        // The bias lifts expert 3 over 4 in the choice; the list is by unbiased score.
        let bias = [0.0, 0.0, 0.0, 0.2, 0.0, 0.0];
        assert_eq!(grouped_top_k(&s, Some(&bias), 2, 1, 2), vec![5, 3]);
    }
}
