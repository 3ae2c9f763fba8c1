//! Log-probabilities from logits rows: of a sampled token with the most likely alternatives,
//! and of each prompt token (`echo` + `logprobs` on completions, how clients score text).

/// A token with its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenProb {
    pub id: u32,
    pub logprob: f32,
}

/// A token, its log-probability where it has one (not the first prompt token, nor text
/// flushed at the end), and the most likely tokens at its position, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top: Vec<TokenProb>,
}

/// `log softmax(row)[i]` for every `i` is `row[i] - log_sum_exp(row)`.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln()
}

/// The `k` most likely tokens of a logits row with their log-probabilities, best first.
pub fn top_k(row: &[f32], k: usize, lse: f32) -> Vec<TokenProb> {
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
    best.into_iter()
        .map(|(id, x)| TokenProb {
            id,
            logprob: x - lse,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_normalized() {
        let row = [0.0f32, 3.0, 1.0, 3.0, -2.0];
        let lse = log_sum_exp(&row);
        let t = top_k(&row, 3, lse);
        assert_eq!(t.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f32 = row.iter().map(|x| (x - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((t[0].logprob - (3.0 - lse)).abs() < 1e-6);
    }
}
