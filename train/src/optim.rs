//! AdamW (Loshchilov & Hutter 2019) as `torch.optim.AdamW` computes it, over the adapter's
//! flat f32 parameters, and the learning-rate schedules of `transformers.get_scheduler`.
//!
//! Per step t (from 1), for each value: `p ← p − lr·λ·p`; `m ← β1·m + (1−β1)·g`;
//! `v ← β2·v + (1−β2)·g²`; `p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)`.

use serde::{Deserialize, Serialize};

use crate::config::Scheduler;

/// AdamW state for a list of parameter tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub step: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(sizes: &[usize], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let decay = (1.0 - lr * self.weight_decay) as f32;
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        let bc2_sqrt = bc2_sqrt as f32;
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for i in 0..p.len() {
                p[i] *= decay;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
            }
        }
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm` (0: no clipping); returns
/// the norm before clipping (`torch.nn.utils.clip_grad_norm_`).
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flatten()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let coef = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().flatten().for_each(|g| *g *= coef);
    }
    norm
}

/// The learning rate of step `step` (0-based: the first update uses step 0), as
/// transformers' schedulers with warmup compute it.
pub fn learning_rate(
    peak: f64,
    scheduler: Scheduler,
    warmup: usize,
    total: usize,
    step: usize,
) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    peak * match scheduler {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => (1.0 - progress).max(0.0),
        Scheduler::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_adamw_step_moves_each_value_by_lr_against_its_gradient_sign() {
        // With m̂ = g and v̂ = g² after one step, the update is lr·g/(|g|+ε) ≈ lr·sign(g).
        let mut opt = AdamW::new(&[3], 0.9, 0.999, 1e-8, 0.0);
        let mut p = vec![vec![1.0f32, -2.0, 0.5]];
        opt.update(&mut p, &[vec![0.3, -4.0, 0.0]], 0.1);
        let want = [0.9f32, -1.9, 0.5];
        for (a, b) in p[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut opt = AdamW::new(&[1], 0.9, 0.999, 1e-8, 0.5);
        let mut p = vec![vec![2.0f32]];
        opt.update(&mut p, &[vec![0.0]], 0.1);
        assert!((p[0][0] - 1.9).abs() < 1e-6, "{}", p[0][0]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        let after = (g[0][0].powi(2) + g[1][0].powi(2)).sqrt();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn schedules_match_transformers() {
        let lr = |s, st| learning_rate(1.0, s, 2, 10, st);
        assert_eq!(lr(Scheduler::Linear, 0), 0.0);
        assert_eq!(lr(Scheduler::Linear, 1), 0.5);
        assert_eq!(lr(Scheduler::Linear, 2), 1.0);
        assert!((lr(Scheduler::Linear, 6) - 0.5).abs() < 1e-12);
        assert!((lr(Scheduler::Cosine, 6) - 0.5).abs() < 1e-12);
        assert_eq!(lr(Scheduler::Constant, 9), 1.0);
        assert_eq!(lr(Scheduler::Linear, 10), 0.0);
    }
}
