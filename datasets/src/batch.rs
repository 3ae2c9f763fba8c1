//! Epoch order and micro-batches.
//!
//! graft's model runs ragged batches (every sequence its own attention, no padding), so a
//! micro-batch is simply a list of examples. Without packing it holds `micro_batch_size`
//! examples; with packing it holds as many whole examples as fit in
//! `micro_batch_size × max_seq_len` tokens, each still attending only to itself (positions
//! restart per example, no attention crosses examples).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The order of `n` examples in epoch `epoch` (0-based): a shuffle determined by `seed` and
/// the epoch alone, so a resumed run sees the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// Groups `order` into micro-batches; `lens[i]` is example `i`'s token count.
pub fn micro_batches(
    order: &[usize],
    lens: &[usize],
    micro_batch_size: usize,
    packing: Option<usize>,
) -> Vec<Vec<usize>> {
    let micro_batch_size = micro_batch_size.max(1);
    match packing {
        None => order
            .chunks(micro_batch_size)
            .map(<[usize]>::to_vec)
            .collect(),
        Some(max_seq_len) => {
            let budget = micro_batch_size * max_seq_len;
            let mut out: Vec<Vec<usize>> = Vec::new();
            let mut cur = Vec::new();
            let mut used = 0;
            for &i in order {
                if !cur.is_empty() && used + lens[i] > budget {
                    out.push(std::mem::take(&mut cur));
                    used = 0;
                }
                cur.push(i);
                used += lens[i];
            }
            if !cur.is_empty() {
                out.push(cur);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(50, 3, 0);
        assert_eq!(a, epoch_order(50, 3, 0));
        assert_ne!(a, epoch_order(50, 3, 1));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn packing_fills_the_token_budget_with_whole_examples() {
        let lens = [5, 5, 5, 9, 2, 3];
        let order: Vec<usize> = (0..6).collect();
        let b = micro_batches(&order, &lens, 2, Some(6));
        assert_eq!(b, vec![vec![0, 1], vec![2], vec![3, 4], vec![5]]);
        for mb in &b {
            let used: usize = mb.iter().map(|&i| lens[i]).sum();
            assert!(used <= 12 || mb.len() == 1);
        }
        assert_eq!(
            micro_batches(&order, &lens, 4, None),
            vec![vec![0, 1, 2, 3], vec![4, 5]]
        );
    }
}
