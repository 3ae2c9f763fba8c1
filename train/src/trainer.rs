//! The QLoRA training loop.
//!
//! The base model stays frozen and quantized; the adapter's A/B values live on the host as flat
//! f32 vectors (with AdamW's moments beside them). Each micro-batch builds the adapter as
//! gradient-tracked tensors, runs the model over its examples as one ragged batch (no padding,
//! no attention across examples), takes the cross-entropy of the loss-carrying positions only
//! (the LM head runs on those rows alone) and back-propagates; gradients of the micro-batches of
//! a step are summed with the loss normalized by the step's total trained tokens (as
//! transformers does with `num_items_in_batch`), clipped by global norm, and applied by AdamW.
//!
//! Everything that decides the result — adapter init, data order, dropout masks — is derived
//! from seeds and the step number, so a run resumed from a checkpoint continues exactly.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use graft_core::adapters::lora::LoraWeights;
use graft_core::adapters::lora::{Adapter, TargetModule};
use graft_core::adapters::peft::{self, PeftConfig};
use graft_core::backend::GraftBackend;
use graft_core::burn::prelude::*;
use graft_core::burn::tensor::activation::log_softmax;
use graft_core::burn::tensor::backend::AutodiffBackend;
use graft_core::burn::tensor::TensorData;
use graft_core::generation::generate::generate;
use graft_core::generation::sampling::SamplingParams;
use graft_core::model::{Model, SeqInput};
use graft_core::text::tokenizer::TokenizerBundle;
use graft_datasets::batch::{epoch_order, micro_batches};
use graft_datasets::prepare::Prepared;
use graft_datasets::tokenize::Tokenized;
use serde_json::json;

use crate::config::TrainConfig;
use crate::optim::{clip_grad_norm, learning_rate, AdamW};
use crate::run::{self, append_jsonl, Checkpoint, TrainerState};

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub state: TrainerState,
    pub final_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    /// Whether the run stopped early on request (SIGINT) after saving a checkpoint.
    pub interrupted: bool,
}

/// One adapted projection: where it is and its A/B shapes.
#[derive(Debug, Clone)]
struct Module {
    layer: usize,
    target: TargetModule,
    a: [usize; 2],
    b: [usize; 2],
}

pub struct Trainer<'a, B: AutodiffBackend + GraftBackend> {
    pub cfg: &'a TrainConfig,
    pub model: &'a Model<B>,
    pub tokenizer: &'a TokenizerBundle,
    pub data: &'a Prepared,
    pub run_dir: PathBuf,
    pub base_name: String,
    /// Set (by a SIGINT handler) to stop after the current step with a checkpoint.
    pub stop: &'a AtomicBool,
    modules: Vec<Module>,
}

impl<'a, B: AutodiffBackend + GraftBackend> Trainer<'a, B> {
    pub fn new(
        cfg: &'a TrainConfig,
        model: &'a Model<B>,
        tokenizer: &'a TokenizerBundle,
        data: &'a Prepared,
        run_dir: PathBuf,
        base_name: String,
        stop: &'a AtomicBool,
    ) -> Self {
        // The adapted projections in the order Adapter::modules yields them (layer, then
        // target); A is [r, in] and B is [out, r].
        let r = cfg.lora.r;
        let modules = model
            .adapter_shapes(&cfg.lora.target_modules)
            .into_iter()
            .map(|(layer, target, out_f, in_f)| Module {
                layer,
                target,
                a: [r, in_f],
                b: [out_f, r],
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
            modules,
        }
    }

    /// Parameter names in optimizer order (`layers.3.q_proj.lora_A`, …).
    pub fn param_names(&self) -> Vec<String> {
        self.modules
            .iter()
            .flat_map(|m| {
                ["lora_A", "lora_B"]
                    .map(|w| format!("layers.{}.{}.{w}", m.layer, m.target.hf_name()))
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

    /// The initial adapter values (PEFT init), flat, in optimizer order.
    pub fn initial_params(&self) -> Vec<Vec<f32>> {
        let init = self.model.init_adapter(&self.cfg.lora, self.cfg.lora_seed);
        init.modules()
            .flat_map(|(_, _, w)| [host(&w.a), host(&w.b)])
            .collect()
    }

    /// The adapter with values `params`; `track` makes them gradient leaves (with dropout).
    fn adapter(&self, params: &[Vec<f32>], track: bool) -> Adapter<B> {
        let device = self.model.device();
        let mut adapter = Adapter::empty(self.model.layers.len());
        let scale = self.cfg.lora.scale();
        for (i, m) in self.modules.iter().enumerate() {
            let t = |v: &Vec<f32>, shape: [usize; 2]| {
                let t = Tensor::<B, 2>::from_data(TensorData::new(v.clone(), shape), device);
                if track {
                    t.require_grad()
                } else {
                    t
                }
            };
            adapter.layers[m.layer][m.target.index()] = Some(LoraWeights {
                a: t(&params[2 * i], m.a),
                b: t(&params[2 * i + 1], m.b),
                scale,
                dropout: if track {
                    self.cfg.lora.lora_dropout
                } else {
                    0.0
                },
            });
        }
        adapter
    }

    /// Summed cross-entropy over the loss-carrying tokens of `examples`, and their count.
    fn loss_sum(&self, adapter: &Adapter<B>, examples: &[&Tokenized]) -> (Tensor<B, 1>, usize) {
        let device = self.model.device();
        let mut seqs: Vec<SeqInput<'_, B>> = examples
            .iter()
            .map(|e| SeqInput {
                tokens: &e.ids,
                cache: None,
                adapter: Some(adapter),
            })
            .collect();
        let hidden = self.model.final_hidden(&mut seqs);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut offset = 0;
        for e in examples {
            for t in 0..e.ids.len() - 1 {
                if e.trained[t + 1] {
                    rows.push((offset + t) as i32);
                    targets.push(e.ids[t + 1] as i32);
                }
            }
            offset += e.ids.len();
        }
        let n = rows.len();
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), device);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), device);
        let logits = self.model.logits(hidden.select(0, rows));
        let picked = log_softmax(logits, 1).gather(1, targets);
        (picked.sum().neg(), n)
    }

    /// Mean loss over the eval examples (untracked forward).
    fn eval_loss(&self, params: &[Vec<f32>]) -> Option<f64> {
        if self.data.eval.is_empty() {
            return None;
        }
        let adapter = self.adapter(params, false);
        let (mut sum, mut n) = (0.0, 0);
        for chunk in self.data.eval.chunks(self.cfg.train.micro_batch_size) {
            let refs: Vec<&Tokenized> = chunk.iter().collect();
            let (s, k) = self.loss_sum(&adapter, &refs);
            sum += f64::from(s.into_scalar().elem::<f32>());
            n += k;
        }
        Some(sum / n.max(1) as f64)
    }

    /// Greedy answers to the first eval prompts (the text before each example's first
    /// trained token).
    fn samples(&self, params: &[Vec<f32>], step: usize) -> std::io::Result<()> {
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
        for (i, ex) in pool.iter().take(self.cfg.train.eval_samples).enumerate() {
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
        params: &[Vec<f32>],
        step: usize,
        metrics: &std::path::Path,
        bar: &indicatif::ProgressBar,
    ) -> std::io::Result<()> {
        if self.cfg.eval.metrics.is_empty() || self.data.eval.is_empty() {
            return Ok(());
        }
        let adapter = self.adapter(params, false);
        let report = match crate::task_eval::evaluate(
            self.model,
            self.tokenizer,
            Some(&adapter),
            &self.data.eval,
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
        append_jsonl(metrics, &serde_json::Value::Object(record))?;
        for a in &report.answers {
            let mut v = serde_json::to_value(a).unwrap_or_default();
            v["step"] = step.into();
            append_jsonl(&self.run_dir.join("task_eval.jsonl"), &v)?;
        }
        say(bar, format!("step {step}: {}", report.summary()));
        Ok(())
    }

    /// Writes a checkpoint for `state` and prunes old ones.
    fn checkpoint(
        &self,
        state: &TrainerState,
        opt: &AdamW,
        params: &[Vec<f32>],
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
        self.save_adapter(&tmp.join("adapter"), params)?;
        run::save_state(&tmp, state, opt, params)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&tmp, &dir)?;
        run::prune_checkpoints(&self.run_dir, self.cfg.train.keep_last)?;
        Ok(dir)
    }

    /// Writes the adapter with values `params` as a PEFT directory.
    pub fn save_adapter(&self, dir: &Path, params: &[Vec<f32>]) -> std::io::Result<()> {
        let adapter = self.adapter(params, false);
        // Name the projections actually adapted ("all-linear" lists every kind; the model's
        // layout has some of them).
        let mut lora = self.cfg.lora.clone();
        lora.target_modules
            .retain(|t| self.modules.iter().any(|m| m.target == *t));
        let config = PeftConfig::from_lora(&lora, &self.base_name);
        peft::save(dir, &adapter, &config).map_err(|e| std::io::Error::other(e.to_string()))
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
        let steps_per_epoch = per_epoch.div_ceil(cfg.train.grad_accum);
        let total_steps = cfg
            .train
            .max_steps
            .unwrap_or(steps_per_epoch * cfg.train.epochs);
        let warmup = cfg
            .train
            .warmup_steps
            .unwrap_or((cfg.train.warmup_ratio * total_steps as f64).ceil() as usize);

        let (mut state, mut opt, mut params) = match resume {
            Some(c) => (c.state, c.optimizer, c.params),
            None => {
                let params = self.initial_params();
                let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
                let opt = AdamW::new(
                    &sizes,
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
        if state.param_names != self.param_names() {
            return Err(std::io::Error::other(
                "the checkpoint's adapter modules differ from the config's",
            ));
        }
        let metrics = self.run_dir.join("metrics.jsonl");
        let bar = progress_bar(total_steps as u64, state.step as u64);
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
            let step_batches = schedule.next_step(&mut state);
            let n_tokens: usize = step_batches
                .iter()
                .flatten()
                .map(|&i| self.data.train[i].n_trained())
                .sum();
            let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
            let mut loss_total = 0.0;
            // Seconds in the forward pass, the backward pass (with gradient read-back) and the
            // optimizer. The CPU backend runs eagerly, so a clock around each call measures it;
            // reading the loss scalar ends the forward on asynchronous devices.
            let (mut fwd, mut bwd) = (0.0, 0.0);
            for mb in &step_batches {
                let t = Instant::now();
                let adapter = self.adapter(&params, true);
                let examples: Vec<&Tokenized> = mb.iter().map(|&i| &self.data.train[i]).collect();
                let (sum, _) = self.loss_sum(&adapter, &examples);
                let loss = sum.div_scalar(n_tokens.max(1) as f32);
                loss_total += f64::from(loss.clone().into_scalar().elem::<f32>());
                fwd += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let g = loss.backward();
                for (i, (_, _, w)) in adapter.modules().enumerate() {
                    for (k, t) in [(2 * i, &w.a), (2 * i + 1, &w.b)] {
                        if let Some(gt) = t.grad(&g) {
                            let v = gt.into_data().to_vec::<f32>().expect("f32 gradients");
                            grads[k].iter_mut().zip(v).for_each(|(acc, x)| *acc += x);
                        }
                    }
                }
                bwd += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            let grad_norm = clip_grad_norm(&mut grads, cfg.train.max_grad_norm);
            let lr = learning_rate(
                cfg.train.learning_rate,
                cfg.train.scheduler,
                warmup,
                total_steps,
                state.step,
            );
            opt.update(&mut params, &grads, lr);
            let opt_secs = t.elapsed().as_secs_f64();
            state.step += 1;
            state.tokens_trained += n_tokens as u64;
            let all_tokens: usize = step_batches
                .iter()
                .flatten()
                .map(|&i| self.data.train[i].ids.len())
                .sum();
            let secs = t0.elapsed().as_secs_f64();
            last_loss = Some(loss_total);
            bar.set_position(state.step as u64);
            bar.set_message(format!(
                "loss {loss_total:.4} lr {lr:.2e} {:.0} tok/s",
                all_tokens as f64 / secs
            ));
            if state.step % cfg.train.logging_every == 0 || state.step == total_steps {
                let rec = json!({
                    "step": state.step, "epoch": state.epoch as f64 + state.batch_in_epoch as f64 / schedule.epoch_len().max(1) as f64,
                    "loss": loss_total, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": all_tokens as f64 / secs,
                    "trained_tokens": state.tokens_trained, "step_secs": secs,
                    "forward_secs": fwd, "backward_secs": bwd, "optimizer_secs": opt_secs, "tokens": all_tokens,
                    "rss_mib": graft_core::process::rss_bytes().map(|b| b as f64 / 1048576.0),
                });
                append_jsonl(&metrics, &rec)?;
                if bar.is_hidden() {
                    tracing::info!("step {}/{total_steps} loss {loss_total:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {:.0} tok/s", state.step, all_tokens as f64 / secs);
                }
            }
            let last = state.step == total_steps;
            if (cfg.train.eval_every > 0 && state.step % cfg.train.eval_every == 0) || last {
                if let Some(l) = self.eval_loss(&params) {
                    state.best_eval_loss = Some(state.best_eval_loss.map_or(l, |b: f64| b.min(l)));
                    last_eval = Some(l);
                    append_jsonl(&metrics, &json!({"step": state.step, "eval_loss": l}))?;
                    say(&bar, format!("step {}: eval loss {l:.4}", state.step));
                }
                self.samples(&params, state.step)?;
                self.task_metrics(&params, state.step, &metrics, &bar)?;
            }
            let stopping = self.stop.load(Ordering::SeqCst);
            if (cfg.train.save_every > 0 && state.step % cfg.train.save_every == 0)
                || last
                || stopping
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
        if !interrupted {
            self.save_adapter(&self.run_dir.join("adapter"), &params)?;
        }
        Ok(Outcome {
            state,
            final_loss: last_loss,
            final_eval_loss: last_eval,
            interrupted,
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
    pub fn new<B: AutodiffBackend + GraftBackend>(
        t: &Trainer<'_, B>,
        state: &TrainerState,
    ) -> Self {
        let cfg = t.cfg;
        let mut s = Schedule {
            lens: t.data.train.iter().map(|e| e.ids.len()).collect(),
            micro_batch: cfg.train.micro_batch_size,
            packing: cfg.data.packing.then_some(cfg.data.max_seq_len),
            seed: cfg.data.seed,
            grad_accum: cfg.train.grad_accum,
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

fn host<B: Backend>(t: &Tensor<B, 2>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("converted to f32")
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
