//! AdamW (Loshchilov & Hutter 2019) as `torch.optim.AdamW` computes it, over the adapter's
//! f32 tensors on the training device, gradient clipping by global norm, and the
//! learning-rate schedules of `transformers.get_scheduler`.
//!
//! Per step t (from 1), for each value: `p ← p − lr·λ·p`; `m ← β1·m + (1−β1)·g`;
//! `v ← β2·v + (1−β2)·g²`; `p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)`.

use graft_core::burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::Scheduler;
use crate::resident::{to_f64, Values};

/// AdamW state for a list of parameter tensors: its moments are `S` — device tensors while
/// training ([`AdamW::update`]), host vectors in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamW<S = Vec<f32>> {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub step: u64,
    pub m: Vec<S>,
    pub v: Vec<S>,
}

impl<S> AdamW<S> {
    /// The same state with its moments converted by `f` (`m`, then `v`): uploaded to the
    /// device or read back.
    ///
    /// # Errors
    /// The first error of `f`.
    pub fn map_moments<T, E>(
        self,
        mut f: impl FnMut(Vec<S>) -> Result<Vec<T>, E>,
    ) -> Result<AdamW<T>, E> {
        Ok(AdamW {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step: self.step,
            m: f(self.m)?,
            v: f(self.v)?,
        })
    }
}

impl<B: Backend> AdamW<Tensor<B, 2>> {
    /// Zero moments shaped like `params`, on their device.
    pub fn new(
        params: &[Tensor<B, 2>],
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Self {
        let zeros = || params.iter().map(Tensor::zeros_like).collect::<Values<B>>();
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// One update of `params` with `grads` at learning rate `lr`, on the device.
    pub fn update(&mut self, params: &mut Values<B>, grads: Values<B>, lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let decay = (1.0 - lr * self.weight_decay) as f32;
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        let bc2_sqrt = bc2_sqrt as f32;
        assert_eq!(params.len(), grads.len(), "a gradient per parameter");
        let (m, v) = (std::mem::take(&mut self.m), std::mem::take(&mut self.v));
        let old = std::mem::take(params);
        for (((p, g), m), v) in old.into_iter().zip(grads).zip(m).zip(v) {
            // torch's order of operations: (1 − β2)·g·g, (lr/bc1)·m / denom
            let m = m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
            let v = v.mul_scalar(b2) + g.clone().mul_scalar(1.0 - b2) * g;
            let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(eps);
            let p = p.mul_scalar(decay) - m.clone().mul_scalar(step_size) / denom;
            params.push(p);
            self.m.push(m);
            self.v.push(v);
        }
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm` (0: no clipping); returns
/// the norm before clipping (`torch.nn.utils.clip_grad_norm_`). Each tensor's sum of squares
/// is taken on the device and the sums read back together (one small read: the norm is
/// logged), added in f64; the scaling stays on the device.
pub fn clip_grad_norm<B: Backend>(grads: Values<B>, max_norm: f64) -> (Values<B>, f64) {
    if grads.is_empty() {
        return (grads, 0.0);
    }
    let squares = grads
        .iter()
        .map(|g| (g.clone() * g.clone()).sum())
        .collect();
    let norm = to_f64(Tensor::<B, 1>::cat(squares, 0))
        .into_iter()
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let coef = (max_norm / (norm + 1e-6)) as f32;
        let grads = grads.into_iter().map(|g| g.mul_scalar(coef)).collect();
        return (grads, norm);
    }
    (grads, norm)
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
    use graft_core::burn::tensor::TensorData;
    use graft_core::device::Cpu;

    fn tensors(v: &[&[f32]]) -> Values<Cpu> {
        v.iter()
            .map(|x| {
                Tensor::from_data(
                    TensorData::new(x.to_vec(), [1, x.len()]),
                    &Default::default(),
                )
            })
            .collect()
    }

    fn host(v: &Values<Cpu>) -> Vec<Vec<f32>> {
        v.iter()
            .map(|t| t.clone().into_data().to_vec::<f32>().expect("f32"))
            .collect()
    }

    #[test]
    fn first_adamw_step_moves_each_value_by_lr_against_its_gradient_sign() {
        // With m̂ = g and v̂ = g² after one step, the update is lr·g/(|g|+ε) ≈ lr·sign(g).
        let mut p = tensors(&[&[1.0, -2.0, 0.5]]);
        let mut opt = AdamW::new(&p, 0.9, 0.999, 1e-8, 0.0);
        opt.update(&mut p, tensors(&[&[0.3, -4.0, 0.0]]), 0.1);
        let want = [0.9f32, -1.9, 0.5];
        for (a, b) in host(&p)[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(opt.step, 1);
        // m = (1 − β1)·g, v = (1 − β2)·g²
        let m = host(&opt.m)[0].clone();
        assert!((m[1] - 0.1 * -4.0).abs() < 1e-6, "{m:?}");
        let v = host(&opt.v)[0].clone();
        assert!((v[1] - 0.001 * 16.0).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn a_second_step_uses_the_bias_corrected_moments() {
        // torch.optim.AdamW(lr=0.1), g = 1 then g = 3 from p = 0: after step 2,
        // m = 0.1·0.9 + 0.3 = 0.39, v = 0.001·0.999 + 0.009 = 0.009999,
        // p = −0.1 − 0.1/(1 − 0.81) · 0.39 / (√0.009999 / √(1 − 0.998001) + 1e-8)
        let mut p = tensors(&[&[0.0]]);
        let mut opt = AdamW::new(&p, 0.9, 0.999, 1e-8, 0.0);
        opt.update(&mut p, tensors(&[&[1.0]]), 0.1);
        opt.update(&mut p, tensors(&[&[3.0]]), 0.1);
        let want =
            -0.1 - 0.1 / 0.19 * 0.39 / ((0.009_999f64).sqrt() / (0.001_999f64).sqrt() + 1e-8);
        let got = f64::from(host(&p)[0][0]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut p = tensors(&[&[2.0]]);
        let mut opt = AdamW::new(&p, 0.9, 0.999, 1e-8, 0.5);
        opt.update(&mut p, tensors(&[&[0.0]]), 0.1);
        assert!((host(&p)[0][0] - 1.9).abs() < 1e-6, "{:?}", host(&p));
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let (g, n) = clip_grad_norm(tensors(&[&[3.0], &[4.0]]), 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        let g = host(&g);
        let after = (g[0][0].powi(2) + g[1][0].powi(2)).sqrt();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        let (g, n) = clip_grad_norm(tensors(&[&[0.3], &[0.4]]), 1.0);
        assert!((n - 0.5).abs() < 1e-6);
        assert_eq!(
            host(&g),
            vec![vec![0.3], vec![0.4]],
            "under the max: unchanged"
        );
    }

    #[test]
    fn moments_map_between_host_and_device() {
        let p = tensors(&[&[1.0, 2.0]]);
        let opt = AdamW::new(&p, 0.9, 0.999, 1e-8, 0.0);
        let on_host: AdamW = opt
            .map_moments(|v| Ok::<_, std::convert::Infallible>(host(&v)))
            .expect("infallible");
        assert_eq!(on_host.m, vec![vec![0.0, 0.0]]);
        assert_eq!(on_host.v, vec![vec![0.0, 0.0]]);
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
