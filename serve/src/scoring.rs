//! Log-probabilities: of sampled tokens (with the most likely alternatives) and of a whole
//! prompt (`echo` + `logprobs` on completions, how clients score text).

use graft_core::adapters::lora::Adapter;
use graft_core::backend::GraftBackend;
use graft_core::model::{Logits, Model, SeqInput};

/// `log softmax(row)[i]` for every `i` is `row[i] - log_sum_exp(row)`.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln()
}

/// The `k` most likely tokens of a logits row with their log-probabilities, best first.
pub fn top_k(row: &[f32], k: usize, lse: f32) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in row.iter().enumerate() {
        if best.len() < k || x > best[best.len() - 1].1 {
            let pos = best.partition_point(|&(_, y)| y >= x);
            best.insert(pos, (i as u32, x));
            best.truncate(k);
        }
    }
    best.into_iter().map(|(i, x)| (i, x - lse)).collect()
}

/// For each prompt token: its log-probability given the tokens before it (`None` for the
/// first) and the `top` most likely tokens at that position.
pub fn score_prompt<B: GraftBackend>(
    model: &Model<B>,
    adapter: Option<&Adapter<B>>,
    ids: &[u32],
    top: usize,
) -> Vec<(Option<f32>, Vec<(u32, f32)>)> {
    let logits = model.forward(
        &mut [SeqInput {
            tokens: ids,
            cache: None,
            adapter,
        }],
        Logits::All,
    );
    let vocab = model.config.vocab_size;
    let rows: Vec<f32> = logits.into_data().to_vec().unwrap_or_default();
    let mut out = vec![(None, Vec::new())];
    for t in 1..ids.len() {
        let row = &rows[(t - 1) * vocab..t * vocab];
        let lse = log_sum_exp(row);
        out.push((Some(row[ids[t] as usize] - lse), top_k(row, top, lse)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_normalized() {
        let row = [0.0f32, 3.0, 1.0, 3.0, -2.0];
        let lse = log_sum_exp(&row);
        let t = top_k(&row, 3, lse);
        assert_eq!(t.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f32 = row.iter().map(|x| (x - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((t[0].1 - (3.0 - lse)).abs() < 1e-6);
    }
}
