//! What a training step minimizes, as a function of per-sequence log-probabilities.
//!
//! The trainer's forward pass measures, for every sequence of a micro-batch, Σ log p of its
//! trained tokens (SFT: the assistant turns; preference pairs: the completion) and, for ORPO's
//! chosen sequences, Σ log p of every predicted token. Each objective turns those sums into
//! the loss and its derivative with respect to each sum, computed here in f64; the trainer
//! back-propagates `Σ_s (∂loss/∂sum_s) · sum_s`, which has exactly the loss's gradient.
//!
//! The preference losses are TRL's (`DPOTrainer._compute_loss`, `ORPOTrainer`):
//! - DPO: Δ = (log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r)) with log π the summed
//!   completion log-probability and π_ref the base with the adapter switched off; `sigmoid`:
//!   −log σ(βΔ); `ipo`: ((log π(c) − log π_ref(c))/|c| − (log π(r) − log π_ref(r))/|r| −
//!   1/(2β))². Rewards β(log π − log π_ref).
//! - ORPO: with mean completion log-probabilities p_c, p_r, log-odds
//!   (p_c − p_r) − (log(1 − e^{p_c}) − log(1 − e^{p_r})); loss = NLL − β·mean log σ(log-odds),
//!   the NLL being the mean cross-entropy over every token of the chosen sequences (prompt
//!   included, as TRL computes it). Rewards β·p.
//!
//! A step's loss is the mean over its trained tokens (SFT) or its pairs, whatever its split
//! into micro-batches (for ORPO's NLL, over the chosen sequences' tokens).

use std::collections::BTreeMap;

use crate::config::{DpoLoss, Method, PreferenceSettings};

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    Sft,
    Dpo { beta: f64, loss: DpoLoss },
    Orpo { beta: f64 },
}

/// What the forward pass measured for one micro-batch. Pairs are laid out with every chosen
/// sequence first, then the rejected ones in the same order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measured {
    /// Σ log p of each sequence's trained tokens.
    pub logps: Vec<f64>,
    /// Trained tokens of each sequence.
    pub counts: Vec<usize>,
    /// ORPO: Σ log p of every predicted token of each chosen sequence.
    pub whole: Vec<f64>,
    /// ORPO: predicted tokens of each chosen sequence.
    pub whole_counts: Vec<usize>,
    /// DPO: the reference's `logps` (adapter off).
    pub reference: Vec<f64>,
}

/// The sizes a step's loss is averaged over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepSize {
    pub tokens: usize,
    pub pairs: usize,
    /// ORPO: predicted tokens of the chosen sequences.
    pub whole_tokens: usize,
}

/// One micro-batch's share of the loss, its derivatives, and metric sums over its pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Terms {
    pub loss: f64,
    /// ∂loss/∂`logps[s]`.
    pub d_logps: Vec<f64>,
    /// ∂loss/∂`whole[s]` (ORPO).
    pub d_whole: Vec<f64>,
    pub metrics: PairMetrics,
}

/// Sums of per-pair metrics (TRL's names), averaged when logged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairMetrics {
    pub pairs: usize,
    pub sums: BTreeMap<&'static str, f64>,
}

impl PairMetrics {
    fn add(&mut self, key: &'static str, v: f64) {
        *self.sums.entry(key).or_default() += v;
    }

    pub fn merge(&mut self, other: &PairMetrics) {
        self.pairs += other.pairs;
        for (k, v) in &other.sums {
            self.add(k, *v);
        }
    }

    /// Each metric's mean over the pairs, keyed `prefix` + name.
    pub fn means(&self, prefix: &str) -> serde_json::Map<String, serde_json::Value> {
        self.sums
            .iter()
            .map(|(k, v)| {
                (
                    format!("{prefix}{k}"),
                    (v / self.pairs.max(1) as f64).into(),
                )
            })
            .collect()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log σ(x), stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// log(1 − eˣ) for x < 0 (TRL's `log1mexp`).
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

impl Objective {
    /// The objective of `method` with its `[preference]` settings.
    pub fn new(method: Method, p: &PreferenceSettings) -> Self {
        match method {
            Method::Sft => Objective::Sft,
            Method::Dpo => Objective::Dpo {
                beta: p.beta,
                loss: p.loss_type,
            },
            Method::Orpo => Objective::Orpo { beta: p.beta },
        }
    }

    /// Whether the objective needs the reference model's log-probabilities.
    pub fn uses_reference(&self) -> bool {
        matches!(self, Objective::Dpo { .. })
    }

    /// Whether the chosen sequences are scored on every token (ORPO's NLL).
    pub fn scores_whole_chosen(&self) -> bool {
        matches!(self, Objective::Orpo { .. })
    }

    /// The micro-batch's share of the loss of a step of size `step`, with derivatives.
    pub fn terms(&self, m: &Measured, step: &StepSize) -> Terms {
        let n = m.logps.len();
        let mut t = Terms {
            d_logps: vec![0.0; n],
            d_whole: vec![0.0; m.whole.len()],
            ..Terms::default()
        };
        match *self {
            Objective::Sft => {
                let scale = 1.0 / step.tokens.max(1) as f64;
                t.loss = -m.logps.iter().sum::<f64>() * scale;
                t.d_logps.iter_mut().for_each(|d| *d = -scale);
            }
            Objective::Dpo { beta, loss } => {
                let b = n / 2;
                let scale = 1.0 / step.pairs.max(1) as f64;
                t.metrics.pairs = b;
                for i in 0..b {
                    let (c, r) = (i, b + i);
                    let chosen_ratio = m.logps[c] - m.reference[c];
                    let rejected_ratio = m.logps[r] - m.reference[r];
                    let delta = chosen_ratio - rejected_ratio;
                    let (l, dc, dr) = match loss {
                        DpoLoss::Sigmoid => {
                            let g = -beta * sigmoid(-beta * delta);
                            (-log_sigmoid(beta * delta), g, -g)
                        }
                        DpoLoss::Ipo => {
                            let (lc, lr) = (m.counts[c].max(1) as f64, m.counts[r].max(1) as f64);
                            let d = chosen_ratio / lc - rejected_ratio / lr - 1.0 / (2.0 * beta);
                            (d * d, 2.0 * d / lc, -2.0 * d / lr)
                        }
                    };
                    t.loss += l * scale;
                    t.d_logps[c] = dc * scale;
                    t.d_logps[r] = dr * scale;
                    let (rc, rr) = (beta * chosen_ratio, beta * rejected_ratio);
                    let mt = &mut t.metrics;
                    mt.add("rewards/chosen", rc);
                    mt.add("rewards/rejected", rr);
                    mt.add("rewards/margins", rc - rr);
                    mt.add("rewards/accuracies", f64::from(u8::from(rc > rr)));
                    mt.add("logps/chosen", m.logps[c]);
                    mt.add("logps/rejected", m.logps[r]);
                    // not TRL's: how often the policy, and the reference, give the chosen
                    // completion the higher log-probability
                    mt.add(
                        "logps/accuracies",
                        f64::from(u8::from(m.logps[c] > m.logps[r])),
                    );
                    mt.add(
                        "ref_logps/accuracies",
                        f64::from(u8::from(m.reference[c] > m.reference[r])),
                    );
                }
            }
            Objective::Orpo { beta } => {
                let b = n / 2;
                let scale = 1.0 / step.pairs.max(1) as f64;
                let nll_scale = 1.0 / step.whole_tokens.max(1) as f64;
                t.metrics.pairs = b;
                let nll: f64 = -m.whole.iter().sum::<f64>() * nll_scale;
                t.loss += nll;
                t.d_whole.iter_mut().for_each(|d| *d = -nll_scale);
                t.metrics.add("nll_loss", nll * step.pairs as f64);
                for i in 0..b {
                    let (c, r) = (i, b + i);
                    let (lc, lr) = (m.counts[c].max(1) as f64, m.counts[r].max(1) as f64);
                    let (pc, pr) = (m.logps[c] / lc, m.logps[r] / lr);
                    let log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr));
                    let ratio = log_sigmoid(log_odds);
                    t.loss -= beta * ratio * scale;
                    // d ratio / d log_odds = σ(−log_odds); d log_odds / dp = ±1/(1 − eᵖ)
                    let g = -beta * scale * sigmoid(-log_odds);
                    t.d_logps[c] = g / (-pc.exp_m1()) / lc;
                    t.d_logps[r] = -g / (-pr.exp_m1()) / lr;
                    let (rc, rr) = (beta * pc, beta * pr);
                    let mt = &mut t.metrics;
                    mt.add("rewards/chosen", rc);
                    mt.add("rewards/rejected", rr);
                    mt.add("rewards/margins", rc - rr);
                    mt.add("rewards/accuracies", f64::from(u8::from(rc > rr)));
                    mt.add("logps/chosen", pc);
                    mt.add("logps/rejected", pr);
                    mt.add("log_odds_ratio", ratio);
                    mt.add("log_odds_chosen", log_odds);
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> Measured {
        Measured {
            logps: vec![-12.5, -30.25, -20.0, -18.75],
            counts: vec![5, 11, 7, 6],
            whole: vec![-40.0, -55.5],
            whole_counts: vec![16, 21],
            reference: vec![-13.0, -29.0, -19.5, -19.25],
        }
    }

    /// Every derivative the objective reports matches a central finite difference of its loss.
    #[test]
    fn derivatives_match_finite_differences() {
        let step = StepSize {
            tokens: 29,
            pairs: 3,
            whole_tokens: 37,
        };
        for obj in [
            Objective::Sft,
            Objective::Dpo {
                beta: 0.1,
                loss: DpoLoss::Sigmoid,
            },
            Objective::Dpo {
                beta: 0.5,
                loss: DpoLoss::Ipo,
            },
            Objective::Orpo { beta: 0.2 },
        ] {
            let m = measured();
            let t = obj.terms(&m, &step);
            assert!(t.loss.is_finite());
            let h = 1e-5;
            for s in 0..m.logps.len() {
                let at = |d: f64| {
                    let mut m2 = m.clone();
                    m2.logps[s] += d;
                    obj.terms(&m2, &step).loss
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (fd - t.d_logps[s]).abs() < 1e-7,
                    "{obj:?} logps[{s}]: {fd} vs {}",
                    t.d_logps[s]
                );
            }
            for s in 0..m.whole.len() {
                let mut m2 = m.clone();
                m2.whole[s] += h;
                let fd = (obj.terms(&m2, &step).loss - t.loss) / h;
                assert!((fd - t.d_whole[s]).abs() < 1e-7, "{obj:?} whole[{s}]");
            }
        }
    }

    #[test]
    fn dpo_metrics_are_trl_rewards() {
        let m = measured();
        let beta = 0.1;
        let t = Objective::Dpo {
            beta,
            loss: DpoLoss::Sigmoid,
        }
        .terms(
            &m,
            &StepSize {
                pairs: 2,
                ..StepSize::default()
            },
        );
        let means = t.metrics.means("");
        let chosen = (beta * (-12.5 + 13.0) + beta * (-30.25 + 29.0)) / 2.0;
        assert!((means["rewards/chosen"].as_f64().unwrap() - chosen).abs() < 1e-12);
        // pair 0: chosen reward 0.05 > rejected −0.05; pair 1: −0.125 < 0.05
        assert_eq!(means["rewards/accuracies"].as_f64(), Some(0.5));
        // loss = mean −log σ(βΔ)
        let l0 = -log_sigmoid(beta * ((-12.5 + 13.0) - (-20.0 + 19.5)));
        let l1 = -log_sigmoid(beta * ((-30.25 + 29.0) - (-18.75 + 19.25)));
        assert!((t.loss - (l0 + l1) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn stable_helpers() {
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-12);
        for x in [-1e-6, -0.3, -0.7, -5.0, -60.0] {
            let direct = (1.0 - f64::exp(x)).ln();
            assert!(
                (log1mexp(x) - direct).abs() < 1e-6 * direct.abs().max(1.0),
                "{x}"
            );
        }
    }
}
