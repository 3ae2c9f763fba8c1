//! The QLoRA training loop.
//!
//! The base model stays frozen and quantized; the adapter's A/B values, their gradients and
//! AdamW's moments stay on the model's device for the whole run ([`crate::resident`]: they
//! cross to the host only for checkpoints, the written adapter and a data-parallel all-reduce).
//! Each micro-batch makes the values gradient leaves (no copy), runs the model over its
//! sequences as one ragged batch (no padding, no attention across sequences; a preference pair
//! is two sequences), takes the
//! log-probabilities of the scored positions only (the LM head runs on those rows alone), sums
//! them per sequence, and back-propagates the [`Objective`]'s loss of those sums (SFT's
//! cross-entropy, DPO or ORPO). Gradients of the micro-batches of a step are summed with the
//! loss normalized over the whole step (its trained tokens, as transformers does with
//! `num_items_in_batch`, or its pairs), clipped by global norm, and applied by AdamW. DPO's
//! reference is the same model with the adapter switched off, run without gradients (or once
//! before training, `precompute_ref_log_probs`).
//!
//! Everything that decides the result — adapter init, data order, dropout masks — is derived
//! from seeds and the step number, so a run resumed from a checkpoint continues exactly.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use graft_core::adapters::lora::LoraWeights;
use graft_core::adapters::lora::{Adapter, TargetModule};
use graft_core::adapters::peft::{self, PeftConfig};
use graft_core::backend::GraftBackend;
use graft_core::burn::prelude::*;
use graft_core::burn::tensor::backend::AutodiffBackend;
use graft_core::burn::tensor::TensorData;
use graft_core::generation::generate::generate;
use graft_core::generation::sampling::SamplingParams;
use graft_core::model::{Model, Recomputed, SeqInput};
use graft_core::text::tokenizer::TokenizerBundle;
use graft_datasets::batch::{epoch_order, micro_batches};
use graft_datasets::prepare::{Prepared, Sample};
use graft_datasets::tokenize::Tokenized;
use serde_json::json;

use crate::config::TrainConfig;
use crate::dist::{Group, Single};
use crate::objective::{Measured, Objective, PairMetrics, StepSize, Terms};
use crate::optim::{clip_grad_norm, learning_rate, AdamW};
use crate::resident::{self, to_f64, TransferCounts, Transfers, Values};
use crate::run::{self, append_jsonl, Checkpoint, TrainerState};

/// The backend the trained values live on: the model's, without autodiff.
pub type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub state: TrainerState,
    pub final_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    /// Whether the run stopped early on request (SIGINT) after saving a checkpoint.
    pub interrupted: bool,
    /// Processes that trained together (data parallel), and whether they all ended with the
    /// same adapter, bit for bit.
    pub ranks: usize,
    pub ranks_identical: bool,
    /// Adapter-state tensors that crossed between host and device during the run.
    pub transfers: TransferCounts,
}

/// A step's loss and gradient (see [`Trainer::gradients`]).
#[derive(Debug, Clone)]
pub struct Gradients<B: Backend> {
    /// d loss / d parameter, in optimizer order, on the device.
    pub grads: Values<B>,
    pub loss: f64,
    /// Preference metrics summed over the step's pairs (empty for SFT).
    pub pairs: PairMetrics,
    /// Seconds in the forward passes and in the backward passes.
    pub forward_secs: f64,
    pub backward_secs: f64,
}

/// One adapted projection: where it is and its A/B shapes.
#[derive(Debug, Clone)]
struct Module {
    layer: usize,
    target: TargetModule,
    a: [usize; 2],
    b: [usize; 2],
    /// 1, or the routed experts whose pairs A and B stack.
    experts: usize,
}

/// Where a sample comes from (for DPO's precomputed reference log-probabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Eval,
}

pub struct Trainer<'a, B: AutodiffBackend + GraftBackend, T: Sample = Tokenized> {
    pub cfg: &'a TrainConfig,
    pub model: &'a Model<B>,
    pub tokenizer: &'a TokenizerBundle,
    pub data: &'a Prepared<T>,
    pub run_dir: PathBuf,
    pub base_name: String,
    /// Set (by a SIGINT handler) to stop after the current step with a checkpoint.
    pub stop: &'a AtomicBool,
    /// The tracker run that gets every metrics record too (see [`crate::tracking`]).
    pub tracking: Option<crate::tracking::Run>,
    /// The processes training together ([`crate::dist`]); only the leader writes.
    pub group: &'a dyn Group,
    objective: Objective,
    modules: Vec<Module>,
    /// DPO with `precompute_ref_log_probs`: each train and eval sample's reference Σ log p per
    /// sequence, filled at the start of [`Trainer::run`].
    reference: std::sync::OnceLock<[Vec<Vec<f64>>; 2]>,
    /// The adapter state's crossings between host and device.
    transfers: Transfers,
    /// The step being run, and this rank's micro-batches of it run with recomputation so far:
    /// each draws its own dropout seed from them.
    recomputed: (AtomicU64, AtomicU64),
}

impl<'a, B: AutodiffBackend + GraftBackend, T: Sample> Trainer<'a, B, T> {
    pub fn new(
        cfg: &'a TrainConfig,
        model: &'a Model<B>,
        tokenizer: &'a TokenizerBundle,
        data: &'a Prepared<T>,
        run_dir: PathBuf,
        base_name: String,
        stop: &'a AtomicBool,
    ) -> Self {
        // The adapted projections in the order Adapter::modules yields them (layer, then
        // target); A is [r, in] and B is [out, r], or stacked per expert.
        let modules = model
            .adapter_shapes(&cfg.lora.target_modules)
            .into_iter()
            .map(|s| {
                let (a, b) = s.dims(cfg.lora.r);
                Module {
                    layer: s.layer,
                    target: s.target,
                    a,
                    b,
                    experts: s.experts,
                }
            })
            .collect();
        Trainer {
            cfg,
            model,
            tokenizer,
            data,
            run_dir,
            base_name,
            stop,
            tracking: None,
            group: &Single,
            objective: Objective::new(cfg.train.method, &cfg.preference),
            modules,
            reference: std::sync::OnceLock::new(),
            transfers: Transfers::default(),
            recomputed: (AtomicU64::new(0), AtomicU64::new(0)),
        }
    }

    /// Appends a record to `metrics.jsonl` and queues it for the tracker.
    fn log_metrics(
        &self,
        path: &std::path::Path,
        record: &serde_json::Value,
    ) -> std::io::Result<()> {
        append_jsonl(path, record)?;
        if let Some(t) = &self.tracking {
            t.metrics(record);
        }
        Ok(())
    }

    /// Parameter names in optimizer order (`layers.3.q_proj.lora_A`, …).
    pub fn param_names(&self) -> Vec<String> {
        self.modules
            .iter()
            .flat_map(|m| {
                ["lora_A", "lora_B"].map(|w| format!("layers.{}.{}.{w}", m.layer, m.target.name()))
            })
            .collect()
    }

    /// Number of trained values (all A and B matrices).
    pub fn n_params(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.a[0] * m.a[1] + m.b[0] * m.b[1])
            .sum()
    }

    /// Each parameter's shape, in optimizer order.
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        self.modules.iter().flat_map(|m| [m.a, m.b]).collect()
    }

    /// The initial adapter values (PEFT init, made on the host and uploaded once), in
    /// optimizer order.
    pub fn initial_params(&self) -> Values<Inner<B>> {
        let init = self.model.init_adapter(&self.cfg.lora, self.cfg.lora_seed);
        let params: Values<Inner<B>> = init
            .modules()
            .flat_map(|(_, _, w)| [w.a.clone().inner(), w.b.clone().inner()])
            .collect();
        self.transfers.count(params.len(), 0);
        params
    }

    /// Host values (a checkpoint's, or a test's) uploaded as the adapter's parameters.
    ///
    /// # Errors
    /// A vector's length does not fit its parameter's shape.
    pub fn upload(&self, host: Vec<Vec<f32>>) -> Result<Values<Inner<B>>, resident::ShapeMismatch> {
        self.transfers.upload(
            host,
            &self.param_names(),
            &self.param_shapes(),
            self.model.device(),
        )
    }

    /// The adapter with values `params`; `track` makes them gradient leaves (with dropout).
    fn adapter(&self, params: &[Tensor<Inner<B>, 2>], track: bool) -> Adapter<B> {
        let mut adapter = Adapter::empty(self.model.layers.len());
        let scale = self.cfg.lora.scale();
        for (i, m) in self.modules.iter().enumerate() {
            let t = |v: &Tensor<Inner<B>, 2>| {
                let t = Tensor::<B, 2>::from_inner(v.clone());
                if track {
                    t.require_grad()
                } else {
                    t
                }
            };
            adapter.layers[m.layer][m.target.index()] = Some(LoraWeights {
                a: t(&params[2 * i]),
                b: t(&params[2 * i + 1]),
                scale,
                dropout: if track {
                    self.cfg.lora.lora_dropout
                } else {
                    0.0
                },
                experts: m.experts,
            });
        }
        adapter
    }

    /// The dropout seed of the next recomputed micro-batch: from the run's seed, the step and
    /// the micro-batch's place in the step, so a resumed run draws the masks it would have.
    fn dropout_seed(&self) -> u64 {
        let (step, k) = (
            self.recomputed.0.load(Ordering::Relaxed),
            self.recomputed.1.fetch_add(1, Ordering::Relaxed),
        );
        let micro_batch = k * self.group.size() as u64 + self.group.rank() as u64;
        self.cfg.train.seed
            ^ step.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ micro_batch
                .wrapping_add(1)
                .wrapping_mul(0xd1b5_4a32_d192_ed03)
    }

    /// The sequences of `samples` in forward order: each sample's own, or for pairs every
    /// chosen sequence, then every rejected one.
    fn sequences<'s>(samples: &[&'s T]) -> Vec<&'s Tokenized> {
        if T::PAIRED {
            (0..2)
                .flat_map(|k| samples.iter().map(move |s| &s.sequences()[k]))
                .collect()
        } else {
            samples.iter().flat_map(|s| s.sequences()).collect()
        }
    }

    /// One forward pass over `seqs` (with `adapter`, or the base): per sequence, Σ log p of
    /// its trained tokens and, for the first `whole` sequences, Σ log p of every predicted
    /// token (each `[n_seq]`), with the token counts.
    #[allow(clippy::type_complexity)]
    fn forward(
        &self,
        adapter: Option<&Adapter<B>>,
        seqs: &[&Tokenized],
        whole: usize,
    ) -> (Tensor<B, 1>, Option<Tensor<B, 1>>, Vec<usize>, Vec<usize>) {
        self.head(self.final_hidden(adapter, seqs), seqs, whole)
    }

    /// The final hidden states of `seqs` (with `adapter`, or the base).
    fn final_hidden(&self, adapter: Option<&Adapter<B>>, seqs: &[&Tokenized]) -> Tensor<B, 2> {
        let mut inputs: Vec<SeqInput<'_, B>> = seqs
            .iter()
            .map(|e| SeqInput {
                tokens: &e.ids,
                cache: None,
                adapter,
            })
            .collect();
        self.model.final_hidden(&mut inputs)
    }

    /// [`Trainer::forward`]'s measures from the final hidden states of `seqs`.
    #[allow(clippy::type_complexity)]
    fn head(
        &self,
        hidden: Tensor<B, 2>,
        seqs: &[&Tokenized],
        whole: usize,
    ) -> (Tensor<B, 1>, Option<Tensor<B, 1>>, Vec<usize>, Vec<usize>) {
        let device = self.model.device();
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        // (sequence, row) of each trained and each whole-scored position
        let (mut trained, mut scored) = (Vec::new(), Vec::new());
        let (mut counts, mut whole_counts) = (vec![0; seqs.len()], vec![0; whole]);
        let mut offset = 0;
        for (s, e) in seqs.iter().enumerate() {
            for t in 0..e.ids.len() - 1 {
                let is_trained = e.trained[t + 1];
                if is_trained || s < whole {
                    let row = rows.len();
                    rows.push((offset + t) as i32);
                    targets.push(e.ids[t + 1] as i32);
                    if is_trained {
                        trained.push((s, row));
                        counts[s] += 1;
                    }
                    if s < whole {
                        scored.push((s, row));
                        whole_counts[s] += 1;
                    }
                }
            }
            offset += e.ids.len();
        }
        let n = rows.len();
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), device);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), device);
        let picked = self
            .model
            .token_logps(hidden.select(0, rows), targets)
            .reshape([n, 1]);
        // per-sequence sums as a [n_seq, n] 0/1 matrix times the picked column
        let per_seq = |pairs: &[(usize, usize)], n_seq: usize| {
            let mut m = vec![0f32; n_seq * n];
            for &(s, r) in pairs {
                m[s * n + r] = 1.0;
            }
            let m = Tensor::<B, 2>::from_data(TensorData::new(m, [n_seq, n]), device);
            m.matmul(picked.clone()).reshape([n_seq])
        };
        let sums = per_seq(&trained, seqs.len());
        let whole_sums = (whole > 0).then(|| per_seq(&scored, whole));
        (sums, whole_sums, counts, whole_counts)
    }

    /// The reference's Σ log p of each sequence's trained tokens (adapter off, no gradient),
    /// in forward order.
    fn reference_logps(&self, samples: &[&T]) -> Vec<f64> {
        let (sums, ..) = self.forward(None, &Self::sequences(samples), 0);
        to_f64(sums.detach())
    }

    /// The samples of `split`.
    fn pool(&self, split: Split) -> &'a [T] {
        match split {
            Split::Train => &self.data.train,
            Split::Eval => &self.data.eval,
        }
    }

    /// The reference log-probabilities of `samples` (indices into `split`), in forward order.
    fn reference_for(&self, split: Split, indices: &[usize]) -> Vec<f64> {
        match self.reference.get() {
            Some(pre) => {
                let table = &pre[split as usize];
                (0..2)
                    .flat_map(|k| indices.iter().map(move |&i| table[i][k]))
                    .collect()
            }
            None => {
                let pool = self.pool(split);
                self.reference_logps(&indices.iter().map(|&i| &pool[i]).collect::<Vec<_>>())
            }
        }
    }

    /// DPO with `precompute_ref_log_probs`: the reference log-probabilities of every sample.
    pub fn precompute_reference(&self) {
        if !(self.objective.uses_reference() && self.cfg.preference.precompute_ref_log_probs) {
            return;
        }
        let t0 = Instant::now();
        let mb = self.cfg.train.micro_batch_size;
        let table = |pool: &[T]| -> Vec<Vec<f64>> {
            let mut out = Vec::with_capacity(pool.len());
            for chunk in pool.chunks(mb) {
                let refs: Vec<&T> = chunk.iter().collect();
                let v = self.reference_logps(&refs);
                let b = chunk.len();
                out.extend((0..b).map(|i| vec![v[i], v[b + i]]));
            }
            out
        };
        let pre = [table(&self.data.train), table(&self.data.eval)];
        tracing::info!(
            "reference log-probabilities of {} pairs computed in {:.1}s",
            pre[0].len() + pre[1].len(),
            t0.elapsed().as_secs_f64()
        );
        let _ = self.reference.set(pre);
    }

    /// The loss terms of the samples `indices` of `split` under `adapter`, and the tensor
    /// whose gradient is the loss's (`Σ ∂loss/∂sum · sum`). With `recompute` (the dropout
    /// seed), the layers keep only their inputs, and the backward is finished by the
    /// returned [`Recomputed`].
    fn micro_batch(
        &self,
        adapter: &Adapter<B>,
        split: Split,
        indices: &[usize],
        step: &StepSize,
        recompute: Option<u64>,
    ) -> (Terms, Tensor<B, 1>, Option<Recomputed<'a, B>>) {
        let pool = self.pool(split);
        let samples: Vec<&T> = indices.iter().map(|&i| &pool[i]).collect();
        let seqs = Self::sequences(&samples);
        let reference = if self.objective.uses_reference() {
            self.reference_for(split, indices)
        } else {
            Vec::new()
        };
        let whole = if self.objective.scores_whole_chosen() {
            samples.len()
        } else {
            0
        };
        let (hidden, rec) = match recompute {
            Some(seed) => {
                let tokens: Vec<&[u32]> = seqs.iter().map(|e| e.ids.as_slice()).collect();
                let model: &'a Model<B> = self.model;
                let (hidden, rec) = model.final_hidden_recomputed(&tokens, adapter, seed);
                (hidden, Some(rec))
            }
            None => (self.final_hidden(Some(adapter), &seqs), None),
        };
        let (sums, whole_sums, counts, whole_counts) = self.head(hidden, &seqs, whole);
        let measured = Measured {
            logps: to_f64(sums.clone()),
            counts,
            whole: whole_sums.clone().map(to_f64).unwrap_or_default(),
            whole_counts,
            reference,
        };
        let terms = self.objective.terms(&measured, step);
        let device = self.model.device();
        let weights = |d: &[f64]| {
            let v: Vec<f32> = d.iter().map(|&x| x as f32).collect();
            Tensor::<B, 1>::from_data(TensorData::new(v, [d.len()]), device)
        };
        let mut surrogate = (sums * weights(&terms.d_logps)).sum();
        if let Some(w) = whole_sums {
            surrogate = surrogate + (w * weights(&terms.d_whole)).sum();
        }
        (terms, surrogate, rec)
    }

    /// The size a step over `batches` (indices into `split`) is averaged over.
    fn step_size(&self, split: Split, batches: &[Vec<usize>]) -> StepSize {
        let pool = self.pool(split);
        let samples = batches.iter().flatten().map(|&i| &pool[i]);
        StepSize {
            tokens: samples.clone().map(Sample::n_trained).sum(),
            pairs: if T::PAIRED {
                samples.clone().count()
            } else {
                0
            },
            whole_tokens: if T::PAIRED {
                samples.map(|s| s.reference().ids.len() - 1).sum()
            } else {
                0
            },
        }
    }

    /// The loss of one step over the training samples `batches` (micro-batches of indices)
    /// with adapter values `params`, and its gradient, in optimizer order.
    pub fn gradients(
        &self,
        params: &[Tensor<Inner<B>, 2>],
        batches: &[Vec<usize>],
    ) -> Gradients<Inner<B>> {
        self.gradients_in(params, batches, &self.step_size(Split::Train, batches))
    }

    /// [`Trainer::gradients`] of some of a step's micro-batches, normalized as the whole
    /// step's `size` (a data-parallel rank's share).
    fn gradients_in(
        &self,
        params: &[Tensor<Inner<B>, 2>],
        batches: &[Vec<usize>],
        size: &StepSize,
    ) -> Gradients<Inner<B>> {
        let size = *size;
        let mut out = Gradients {
            grads: params.iter().map(Tensor::zeros_like).collect(),
            loss: 0.0,
            pairs: PairMetrics::default(),
            forward_secs: 0.0,
            backward_secs: 0.0,
        };
        let device = self.model.device();
        // The CPU backend runs eagerly, so a clock around each call measures it; reading the
        // per-sequence sums ends the forward on asynchronous devices, a sync the backward.
        for mb in batches {
            let t = Instant::now();
            let adapter = self.adapter(params, true);
            let recompute = self
                .cfg
                .train
                .gradient_checkpointing
                .then(|| self.dropout_seed());
            let (terms, surrogate, rec) =
                self.micro_batch(&adapter, Split::Train, mb, &size, recompute);
            out.loss += terms.loss;
            out.pairs.merge(&terms.metrics);
            out.forward_secs += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let g = surrogate.backward();
            let mut found: Vec<Option<Tensor<Inner<B>, 2>>> = match rec {
                None => adapter
                    .modules()
                    .flat_map(|(_, _, w)| [w.a.grad(&g), w.b.grad(&g)])
                    .collect(),
                // each layer's values have their gradients in that layer's backward
                Some(rec) => {
                    let mut found = vec![None; params.len()];
                    rec.backward(&g, &adapter, |layer, grads| {
                        for (i, (l, _, w)) in adapter.modules().enumerate() {
                            if l == layer {
                                found[2 * i] = w.a.grad(grads);
                                found[2 * i + 1] = w.b.grad(grads);
                            }
                        }
                    });
                    found
                }
            };
            // Summed on the device; a value the loss does not reach keeps its sum.
            let mine: Values<Inner<B>> = found
                .iter_mut()
                .zip(params)
                .map(|(g, p)| g.take().unwrap_or_else(|| p.zeros_like()))
                .collect();
            out.grads = resident::add(std::mem::take(&mut out.grads), mine);
            // for the clock only (it keeps the next micro-batch from overlapping this one)
            if let Err(e) = B::sync(device) {
                tracing::warn!("waiting for the device after a backward pass: {e:?}");
            }
            out.backward_secs += t.elapsed().as_secs_f64();
        }
        out
    }

    /// Loss (and pair metrics) over the eval samples (untracked forward).
    fn eval_loss(&self, params: &[Tensor<Inner<B>, 2>]) -> Option<(f64, PairMetrics)> {
        if self.data.eval.is_empty() {
            return None;
        }
        let adapter = self.adapter(params, false);
        let batches: Vec<Vec<usize>> = (0..self.data.eval.len())
            .collect::<Vec<_>>()
            .chunks(self.cfg.train.micro_batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        let size = self.step_size(Split::Eval, &batches);
        let (mut loss, mut metrics) = (0.0, PairMetrics::default());
        for b in &batches {
            let (terms, ..) = self.micro_batch(&adapter, Split::Eval, b, &size, None);
            loss += terms.loss;
            metrics.merge(&terms.metrics);
        }
        Some((loss, metrics))
    }

    /// Greedy answers to the first eval prompts (the text before each example's first
    /// trained token).
    fn samples(&self, params: &[Tensor<Inner<B>, 2>], step: usize) -> std::io::Result<()> {
        let adapter = self.adapter(params, false);
        let sampling = SamplingParams {
            temperature: 0.0,
            max_new_tokens: self.cfg.train.sample_max_tokens,
            stop_token_ids: self.tokenizer.eos_ids.clone(),
            ..SamplingParams::default()
        };
        let pool = if self.data.eval.is_empty() {
            &self.data.train
        } else {
            &self.data.eval
        };
        for (i, ex) in pool
            .iter()
            .map(Sample::reference)
            .take(self.cfg.train.eval_samples)
            .enumerate()
        {
            let Some(first) = ex.trained.iter().skip(1).position(|&t| t).map(|p| p + 1) else {
                continue;
            };
            let prompt = &ex.ids[..first];
            let reference = self
                .tokenizer
                .decode(&ex.ids[first..], true)
                .unwrap_or_default();
            let answer = match generate(
                self.model,
                self.tokenizer,
                Some(&adapter),
                prompt,
                &sampling,
                |_| {},
            ) {
                Ok(g) => g.text,
                Err(e) => format!("<generation failed: {e}>"),
            };
            let prompt_text = self.tokenizer.decode(prompt, false).unwrap_or_default();
            append_jsonl(
                &self.run_dir.join("samples.jsonl"),
                &json!({"step": step, "index": i, "prompt": prompt_text, "reference": reference, "generated": answer}),
            )?;
        }
        Ok(())
    }

    /// `[eval]` task metrics on the eval examples: the scores go to the metrics file, every
    /// scored answer to `task_eval.jsonl`.
    fn task_metrics(
        &self,
        params: &[Tensor<Inner<B>, 2>],
        step: usize,
        metrics: &std::path::Path,
        bar: &indicatif::ProgressBar,
    ) -> std::io::Result<()> {
        if self.cfg.eval.metrics.is_empty() || self.data.eval.is_empty() {
            return Ok(());
        }
        let adapter = self.adapter(params, false);
        let examples: Vec<&Tokenized> = self.data.eval.iter().map(Sample::reference).collect();
        let report = match crate::task_eval::evaluate(
            self.model,
            self.tokenizer,
            Some(&adapter),
            &examples,
            &self.cfg.eval,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("step {step}: task metrics not computed: {e:#}");
                return Ok(());
            }
        };
        let mut record = report.record();
        record.insert("step".into(), step.into());
        self.log_metrics(metrics, &serde_json::Value::Object(record))?;
        for a in &report.answers {
            let mut v = serde_json::to_value(a).unwrap_or_default();
            v["step"] = step.into();
            append_jsonl(&self.run_dir.join("task_eval.jsonl"), &v)?;
        }
        say(bar, format!("step {step}: {}", report.summary()));
        Ok(())
    }

    /// Writes a checkpoint for `state` (the device state read back) and prunes old ones.
    fn checkpoint(
        &self,
        state: &TrainerState,
        opt: &AdamW<Tensor<Inner<B>, 2>>,
        params: &[Tensor<Inner<B>, 2>],
    ) -> std::io::Result<PathBuf> {
        let dir = run::checkpoint_dir(&self.run_dir, state.step);
        let parent = dir
            .parent()
            .expect("checkpoint dirs live under checkpoints/");
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".step-{:06}.tmp", state.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let host_opt: AdamW = opt
            .clone()
            .map_moments(|v| Ok::<_, std::convert::Infallible>(self.transfers.download(&v)))
            .unwrap_or_else(|e| match e {});
        let host_params = self.transfers.download(params);
        let written = self
            .save_adapter(&tmp.join("adapter"), params)
            .and_then(|()| run::save_state(&tmp, state, &host_opt, &host_params));
        if let Err(e) = written {
            // A full disk: leave the earlier checkpoints as they were, and no partial one.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(std::io::Error::new(
                e.kind(),
                format!("writing checkpoint {}: {e}", dir.display()),
            ));
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&tmp, &dir)?;
        graft_core::atomic::sync_parent(&dir)?;
        run::prune_checkpoints(&self.run_dir, self.cfg.train.keep_last)?;
        Ok(dir)
    }

    /// Writes the adapter with values `params` as a PEFT directory.
    pub fn save_adapter(&self, dir: &Path, params: &[Tensor<Inner<B>, 2>]) -> std::io::Result<()> {
        let adapter = self.adapter(params, false);
        // the PEFT writer reads each tensor back
        self.transfers.count(0, params.len());
        // Name the projections actually adapted ("all-linear" lists every kind; the model's
        // layout has some of them).
        let mut lora = self.cfg.lora.clone();
        lora.target_modules
            .retain(|t| self.modules.iter().any(|m| m.target == *t));
        let config = PeftConfig::from_lora(&lora, &self.base_name, self.model.config.family);
        peft::save(dir, &adapter, &config, &self.model.config)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Runs (or continues, from `resume`) training to the end or until `stop` is set.
    ///
    /// # Errors
    /// I/O failures writing the run directory.
    pub fn run(&self, resume: Option<Checkpoint>) -> std::io::Result<Outcome> {
        let cfg = self.cfg;
        if !cfg.eval.metrics.is_empty() {
            if self.data.eval.is_empty() {
                tracing::warn!(
                    "[eval] metrics are set but there are no eval examples (data.eval or \
                     data.eval_fraction): no task metrics will be computed"
                );
            } else if let Err(e) = crate::task_eval::Scorer::new(
                &cfg.eval,
                self.tokenizer,
                self.model.config.vocab_size,
            ) {
                // before the first step, not at the first evaluation
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{e:#}"),
                ));
            }
        }
        let per_epoch = Schedule::new(self, &TrainerState::default()).epoch_len();
        let (ranks, lead) = (self.group.size(), self.group.leads());
        let steps_per_epoch = per_epoch.div_ceil(cfg.train.grad_accum * ranks);
        let total_steps = cfg
            .train
            .max_steps
            .unwrap_or(steps_per_epoch * cfg.train.epochs);
        let warmup = cfg
            .train
            .warmup_steps
            .unwrap_or((cfg.train.warmup_ratio * total_steps as f64).ceil() as usize);

        let (mut state, mut opt, mut params) = match resume {
            Some(c) => {
                if c.state.param_names != self.param_names() {
                    return Err(std::io::Error::other(
                        "the checkpoint's adapter modules differ from the config's",
                    ));
                }
                let bad = |e: resident::ShapeMismatch| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("checkpoint at step {}: {e}", c.state.step),
                    )
                };
                let params = self.upload(c.params).map_err(bad)?;
                let opt = c.optimizer.map_moments(|v| self.upload(v)).map_err(bad)?;
                (c.state, opt, params)
            }
            None => {
                let params = self.initial_params();
                let opt = AdamW::new(
                    &params,
                    cfg.train.betas.0,
                    cfg.train.betas.1,
                    cfg.train.epsilon,
                    cfg.train.weight_decay,
                );
                let state = TrainerState {
                    step: 0,
                    total_steps,
                    epoch: 0,
                    batch_in_epoch: 0,
                    tokens_trained: 0,
                    best_eval_loss: None,
                    elapsed_secs: 0.0,
                    param_names: self.param_names(),
                };
                (state, opt, params)
            }
        };
        self.precompute_reference();
        let metrics = self.run_dir.join("metrics.jsonl");
        let bar = if lead {
            progress_bar(total_steps as u64, state.step as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let started = Instant::now();
        let elapsed_before = state.elapsed_secs;
        let mut schedule = Schedule::new(self, &state);
        let mut last_loss = None;
        let mut last_eval = None;
        let mut interrupted = false;
        let device = self.model.device().clone();

        while state.step < total_steps {
            let t0 = Instant::now();
            B::seed(&device, cfg.train.seed.wrapping_add(state.step as u64));
            self.recomputed
                .0
                .store(state.step as u64, Ordering::Relaxed);
            self.recomputed.1.store(0, Ordering::Relaxed);
            let step_batches = schedule.next_step(&mut state);
            let size = self.step_size(Split::Train, &step_batches);
            let n_tokens = size.tokens;
            // This rank's share of the step: micro-batches rank, rank + N, …
            let mine: Vec<Vec<usize>> = step_batches
                .iter()
                .skip(self.group.rank())
                .step_by(ranks)
                .cloned()
                .collect();
            let Gradients {
                grads,
                loss: mut loss_total,
                pairs: mut pair_metrics,
                forward_secs: fwd,
                backward_secs: bwd,
            } = self.gradients_in(&params, &mine, &size);
            // Every rank stops at the same step when any was asked to.
            let mut stop_votes = 0.0;
            let mut grads = grads;
            if ranks > 1 {
                // One all-reduce for the whole adapter's gradient, not one per tensor, through
                // a host copy (MPI reduces host memory).
                let host = self.transfers.download(&grads);
                let mut flat: Vec<f32> = host.iter().flatten().copied().collect();
                self.group.sum_f32(&mut flat);
                let mut rest = &flat[..];
                let summed = host
                    .iter()
                    .map(|g| {
                        let (mine, tail) = rest.split_at(g.len());
                        rest = tail;
                        mine.to_vec()
                    })
                    .collect();
                grads = self.upload(summed).map_err(std::io::Error::other)?;
                let mut scalars = vec![
                    loss_total,
                    f64::from(u8::from(self.stop.load(Ordering::SeqCst))),
                    pair_metrics.pairs as f64,
                ];
                scalars.extend(pair_metrics.sums.values());
                self.group.sum_f64(&mut scalars);
                loss_total = scalars[0];
                stop_votes = scalars[1];
                pair_metrics.pairs = scalars[2] as usize;
                for (v, s) in pair_metrics.sums.values_mut().zip(&scalars[3..]) {
                    *v = *s;
                }
            }
            let t = Instant::now();
            let (grads, grad_norm) = clip_grad_norm(grads, cfg.train.max_grad_norm);
            let lr = learning_rate(
                cfg.train.learning_rate,
                cfg.train.scheduler,
                warmup,
                total_steps,
                state.step,
            );
            opt.update(&mut params, grads, lr);
            let opt_secs = t.elapsed().as_secs_f64();
            state.step += 1;
            state.tokens_trained += n_tokens as u64;
            let all_tokens: usize = step_batches
                .iter()
                .flatten()
                .map(|&i| self.data.train[i].n_tokens())
                .sum();
            let secs = t0.elapsed().as_secs_f64();
            last_loss = Some(loss_total);
            bar.set_position(state.step as u64);
            bar.set_message(format!(
                "loss {loss_total:.4} lr {lr:.2e} {:.0} tok/s",
                all_tokens as f64 / secs
            ));
            if lead && (state.step % cfg.train.logging_every == 0 || state.step == total_steps) {
                let mut rec = json!({
                    "step": state.step, "epoch": state.epoch as f64 + state.batch_in_epoch as f64 / schedule.epoch_len().max(1) as f64,
                    "loss": loss_total, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": all_tokens as f64 / secs,
                    "trained_tokens": state.tokens_trained, "step_secs": secs,
                    "forward_secs": fwd, "backward_secs": bwd, "optimizer_secs": opt_secs, "tokens": all_tokens,
                    "rss_mib": graft_core::process::rss_bytes().map(|b| b as f64 / 1048576.0),
                });
                if let Some(r) = rec.as_object_mut() {
                    r.extend(pair_metrics.means(""));
                }
                self.log_metrics(&metrics, &rec)?;
                if bar.is_hidden() {
                    tracing::info!("step {}/{total_steps} loss {loss_total:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {:.0} tok/s", state.step, all_tokens as f64 / secs);
                }
            }
            let last = state.step == total_steps;
            if lead
                && ((cfg.train.eval_every > 0 && state.step % cfg.train.eval_every == 0) || last)
            {
                if let Some((l, pairs)) = self.eval_loss(&params) {
                    state.best_eval_loss = Some(state.best_eval_loss.map_or(l, |b: f64| b.min(l)));
                    last_eval = Some(l);
                    let mut rec = json!({"step": state.step, "eval_loss": l});
                    if let Some(r) = rec.as_object_mut() {
                        r.extend(pairs.means("eval_"));
                    }
                    self.log_metrics(&metrics, &rec)?;
                    let accuracy = pairs
                        .means("")
                        .get("rewards/accuracies")
                        .and_then(serde_json::Value::as_f64)
                        .map(|a| format!(", reward accuracy {:.1}%", 100.0 * a))
                        .unwrap_or_default();
                    say(
                        &bar,
                        format!("step {}: eval loss {l:.4}{accuracy}", state.step),
                    );
                }
                self.samples(&params, state.step)?;
                self.task_metrics(&params, state.step, &metrics, &bar)?;
            }
            let stopping = if ranks > 1 {
                stop_votes > 0.0
            } else {
                self.stop.load(Ordering::SeqCst)
            };
            if lead
                && ((cfg.train.save_every > 0 && state.step % cfg.train.save_every == 0)
                    || last
                    || stopping)
            {
                state.elapsed_secs = elapsed_before + started.elapsed().as_secs_f64();
                self.checkpoint(&state, &opt, &params)?;
            }
            if stopping && !last {
                interrupted = true;
                say(
                    &bar,
                    format!("interrupted: checkpoint saved at step {}", state.step),
                );
                break;
            }
        }
        bar.finish_and_clear();
        state.elapsed_secs = elapsed_before + started.elapsed().as_secs_f64();
        let ranks_identical = ranks == 1
            || self
                .group
                .all_equal(crate::dist::fingerprint(&self.transfers.download(&params)));
        if lead && !interrupted {
            self.save_adapter(&self.run_dir.join("adapter"), &params)?;
        }
        Ok(Outcome {
            state,
            final_loss: last_loss,
            final_eval_loss: last_eval,
            interrupted,
            ranks,
            ranks_identical,
            transfers: self.transfers.counts(),
        })
    }
}

/// The order of micro-batches: an epoch's shuffled order cut into micro-batches, the next
/// epoch's once it is used up. A step takes `gradient_accumulation_steps` micro-batches.
pub struct Schedule {
    lens: Vec<usize>,
    micro_batch: usize,
    packing: Option<usize>,
    seed: u64,
    grad_accum: usize,
    batches: Vec<Vec<usize>>,
}

impl Schedule {
    /// The schedule positioned where `state` left it.
    pub fn new<B: AutodiffBackend + GraftBackend, T: Sample>(
        t: &Trainer<'_, B, T>,
        state: &TrainerState,
    ) -> Self {
        let cfg = t.cfg;
        let mut s = Schedule {
            lens: t.data.train.iter().map(Sample::n_tokens).collect(),
            micro_batch: cfg.train.micro_batch_size,
            packing: cfg.data.packing.then_some(cfg.data.max_seq_len),
            seed: cfg.data.seed,
            grad_accum: cfg.train.grad_accum * t.group.size(),
            batches: Vec::new(),
        };
        s.batches = s.epoch(state.epoch);
        s
    }

    fn epoch(&self, epoch: usize) -> Vec<Vec<usize>> {
        let order = epoch_order(self.lens.len(), self.seed, epoch);
        micro_batches(&order, &self.lens, self.micro_batch, self.packing)
    }

    /// Micro-batches in the current epoch.
    pub fn epoch_len(&self) -> usize {
        self.batches.len()
    }

    /// The micro-batches (example indices) of the next step, advancing `state`'s position.
    pub fn next_step(&mut self, state: &mut TrainerState) -> Vec<Vec<usize>> {
        let mut step = Vec::with_capacity(self.grad_accum);
        for _ in 0..self.grad_accum {
            if state.batch_in_epoch >= self.batches.len() {
                state.epoch += 1;
                state.batch_in_epoch = 0;
                self.batches = self.epoch(state.epoch);
            }
            step.push(self.batches[state.batch_in_epoch].clone());
            state.batch_in_epoch += 1;
        }
        step
    }
}

/// A line above the progress bar, or a log line when there is no bar.
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        tracing::info!("{line}");
    } else {
        bar.println(line);
    }
}

fn progress_bar(total: u64, pos: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total).with_position(pos);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
