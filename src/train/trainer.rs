//! The training loop: plan -> micro-batches -> forward/backward -> clip -> AdamW -> log/save.

use super::batch::collate;
use super::best::{best_eval, patience_counter};
use super::checkpoint::{save_checkpoint, save_model, save_tensors, write_atomic, BaseModel};
use super::forward::{forward, Readout};
use super::log::{EvalEntry, JsonLines, LogEntry};
use super::loss::Metrics;
use super::optim::{clip_coefficient, global_norm, AdamW, AdamWSettings};
use super::plan::{Batching, Plan};
use super::report::TensorBoard;
use super::resume::{self, plan_fingerprint, ResumeState};
use super::run_dir::{self, RUN_CONFIG};
use super::same_run;
use super::schedule::{warmup_steps, Schedule};
use crate::config::{Config, Interval};
use crate::data::{Dataset, Tokenizer};
use crate::eval::{evaluate, EvalMetrics};
use crate::memory::{MemoryMeter, Usage};
use crate::model::CausalLm;
use crate::Error;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Everything a run needs, loaded and validated before the first step.
pub struct Trainer {
    pub config: Config,
    pub model: CausalLm,
    pub base: BaseModel,
    pub tokenizer: Tokenizer,
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub device: Device,
    /// Memory in use, for the debug logs and the run's peak (`None` where nothing counts).
    pub memory: Option<MemoryMeter>,
}

pub struct TrainSummary {
    pub log: Vec<LogEntry>,
    pub eval: Option<EvalMetrics>,
    pub output_dir: PathBuf,
}

/// One optimizer step's summed gradients, its micro-batches' metrics and its token count.
pub struct StepGradients {
    pub grads: HashMap<String, Tensor>,
    /// Each micro-batch's metrics, still on the device, with how many of its pairs the pair
    /// metrics count (all when `None`).
    readouts: Vec<(Readout, Option<usize>)>,
    pub tokens: usize,
}

impl StepGradients {
    /// The micro-batches' metrics. This reads the device, so on a GPU it waits for the
    /// backward passes: call it once whatever follows them has been queued.
    pub fn metrics(&self) -> Result<Vec<Metrics>, Error> {
        Ok(self
            .readouts
            .iter()
            .map(|(r, k)| r.metrics(*k))
            .collect::<candle_core::Result<_>>()?)
    }
}

/// GiB to two decimals, for logs.
fn gib2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Gradients of `objective` for every parameter, added into `acc`.
fn accumulate(
    model: &CausalLm,
    objective: &Tensor,
    acc: &mut HashMap<String, Tensor>,
) -> Result<(), Error> {
    let grads = model.gradients(objective)?;
    for (name, var) in model.params().iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            // A gradient is data: should an op's backward have built it from tracked tensors,
            // its graph (the step's activations) must not live on with it.
            let g = g.detach();
            // Micro-batches add in the parameter's dtype (a gradient may be kept narrower,
            // see `ops::bf16_copy`).
            let g = match acc.remove(name) {
                Some(prev) => crate::ops::add_grads(&prev, &g, var.dtype())?,
                None => g,
            };
            acc.insert(name.to_string(), g);
        }
    }
    Ok(())
}

impl Trainer {
    /// Memory now and its peak since the previous reading.
    fn memory_read(&self) -> Option<Usage> {
        self.memory.as_ref().map(MemoryMeter::read)
    }

    pub fn plan(&self) -> Plan {
        let t = &self.config.train;
        let batching = Batching {
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            drop_last: t.dataloader_drop_last,
        };
        Plan::new(
            self.train.pairs.len(),
            batching,
            t.epochs,
            t.max_steps,
            t.shuffle,
            t.seed,
        )
    }

    /// Runs one optimizer step's forward and backward passes; returns the summed gradients
    /// (already divided by the number of micro-batches), the micro-batch metrics (still on the
    /// device) and tokens.
    pub fn step_gradients(
        &self,
        micro_batches: &[Vec<usize>],
        metric_pairs: Option<usize>,
    ) -> Result<StepGradients, Error> {
        let cfg = &self.config;
        let n_micro = micro_batches.len() as f64;
        let mut grads = HashMap::new();
        let mut readouts = Vec::with_capacity(micro_batches.len());
        let mut tokens = 0;
        for idx in micro_batches {
            let pairs: Vec<_> = idx.iter().map(|&i| &self.train.pairs[i]).collect();
            let batch = collate(
                &pairs,
                self.tokenizer.pad_id(),
                cfg.orpo.nll_on_prompt,
                self.model.packed_padding(),
                &self.device,
            )?;
            tokens += batch.tokens;
            self.memory_read();
            let t0 = Instant::now();
            let out = forward(&self.model, &batch, cfg.orpo.beta)?;
            let t1 = Instant::now();
            // Kept for backward: activations, the bf16 weight copies, the batch.
            let fwd_mem = self.memory_read();
            let objective = (out.objective / n_micro)?;
            accumulate(&self.model, &objective, &mut grads)?;
            let bwd_mem = self.memory_read();
            // On a GPU both times are the host's (queuing kernels): nothing here reads the device.
            tracing::debug!(
                forward_s = (t1 - t0).as_secs_f64(),
                backward_s = t1.elapsed().as_secs_f64(),
                len = batch.len,
                tokens = batch.tokens,
                forward_peak_gib = fwd_mem.map(|u| gib2(u.peak_gib())),
                after_forward_gib = fwd_mem.map(|u| gib2(u.now_gib())),
                backward_peak_gib = bwd_mem.map(|u| gib2(u.peak_gib())),
                after_backward_gib = bwd_mem.map(|u| gib2(u.now_gib())),
                pool_peak_gib = [fwd_mem, bwd_mem]
                    .iter()
                    .filter_map(|u| u.and_then(|u| u.reserved_peak_gib()))
                    .reduce(f64::max)
                    .map(gib2),
                "micro-batch"
            );
            readouts.push((out.readout, metric_pairs));
        }
        Ok(StepGradients {
            grads,
            readouts,
            tokens,
        })
    }

    /// Trains from step 0, or from `resume` (a checkpoint folder) onwards. `stop` is polled
    /// after every step: when set, a checkpoint is written and `Error::Interrupted` returned.
    pub fn run(&mut self, resume: Option<&Path>, stop: &AtomicBool) -> Result<TrainSummary, Error> {
        let cfg = self.config.clone();
        let out_dir = PathBuf::from(&cfg.train.output_dir);
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        let mut plan = self.plan();
        if let Some(dir) = resume {
            plan.order = resume::checkpoint_order(dir)?;
        }
        let data_fingerprint = same_run::data_fingerprint(&self.train.pairs);
        let total = plan.total_steps;
        let mut opt = AdamW::new(AdamWSettings {
            beta1: cfg.optim.adam_beta1,
            beta2: cfg.optim.adam_beta2,
            eps: cfg.optim.adam_epsilon,
            weight_decay: cfg.optim.weight_decay,
            eight_bit: cfg.optim.optimizer == crate::config::Optimizer::AdamW8bit,
        });
        let mut st = RunState::default();
        // The interrupt's checkpoint this run resumes from, in its output_dir.
        let mut interrupt_checkpoint: Option<PathBuf> = None;
        if let Some(dir) = resume {
            let r = ResumeState::load(dir, &plan, &cfg, &data_fingerprint, &self.device)?;
            r.restore_weights(&self.model, &self.device)?;
            opt.load_state(self.model.params(), &r.optimizer)?;
            st = RunState::from_resume(&r)?;
            let own = out_dir.join(format!("checkpoint-{}", r.step));
            if r.interrupt && same_folder(dir, &own) {
                interrupt_checkpoint = Some(own);
            }
            // transformers forgets a best checkpoint whose folder is gone (here: not in this
            // run's output_dir, which may differ from the resumed checkpoint's).
            if let Some(step) = st.best_checkpoint {
                if !out_dir.join(format!("checkpoint-{step}")).is_dir() {
                    tracing::warn!(
                        step,
                        output_dir = %out_dir.display(),
                        "the best checkpoint so far is not in output_dir; no checkpoint counts \
                         as the best"
                    );
                    st.best_checkpoint = None;
                }
            }
            tracing::info!(checkpoint = %dir.display(), step = st.step, "resuming");
        }
        // This run replaces and prunes checkpoints in its output_dir: they must be its own run's.
        let strangers: Vec<String> = run_dir::checkpoints(&out_dir)
            .into_iter()
            .filter_map(|(_, p)| resume::another_run(&p, &plan, &cfg, &data_fingerprint))
            .collect();
        if let Some(first) = strangers.first() {
            return Err(Error::Input(format!(
                "train.output_dir `{}` holds {} checkpoint(s) of another run, which this run would \
                 replace or prune ({first}); write this run to another output_dir, or remove them",
                out_dir.display(),
                strangers.len()
            )));
        }
        let start_step = st.step;
        let mut written: Vec<usize> = Vec::new();
        let leftovers = run_dir::remove_unfinished(&out_dir)?;
        if leftovers > 0 {
            tracing::info!(
                output_dir = %out_dir.display(),
                entries = leftovers,
                "removed temporary files of an earlier run that did not finish saving"
            );
        }
        let warmup = warmup_steps(cfg.optim.warmup_steps, cfg.optim.warmup_ratio, total);
        let schedule = Schedule::from_config(&cfg.optim);
        if warmup > 0 && cfg.optim.scheduler == crate::config::Scheduler::Constant {
            tracing::warn!(
                "optim.scheduler = \"constant\" ignores the warmup, as transformers does; \
                 use \"constant_with_warmup\" to warm up"
            );
        }
        tracing::info!(
            pairs = self.train.pairs.len(),
            steps = total,
            steps_per_epoch = plan.steps_per_epoch,
            warmup_steps = warmup,
            params = self.model.params().num_elements(),
            "training"
        );
        if cfg.train.early_stopping_patience > 0 && !cfg.train.load_best_model_at_end {
            tracing::warn!(
                "train.early_stopping_patience without train.load_best_model_at_end: the final \
                 model is the last step's, not the best evaluation's (as transformers warns)"
            );
        }
        let mut metrics_file = JsonLines::create(
            &out_dir.join("metrics.jsonl"),
            st.log.iter().map(LogEntry::to_json),
        )?;
        let mut eval_file = match self.eval {
            Some(_) => Some(JsonLines::create(
                &out_dir.join("eval_metrics.jsonl"),
                st.evals.iter().map(EvalEntry::to_json),
            )?),
            None => None,
        };
        let mut tensorboard = if cfg.train.tensorboard() {
            Some(TensorBoard::start(
                &out_dir,
                &st.log,
                &st.evals,
                st.elapsed_s,
            )?)
        } else {
            if resume.is_some() && !super::report::event_files(&out_dir).is_empty() {
                tracing::warn!(
                    "{} holds TensorBoard event files of this run's earlier part, which stop \
                     where it was interrupted; with train.report_to = \"tensorboard\" the \
                     resumed run would rewrite them",
                    out_dir.display()
                );
            }
            None
        };
        let bar = progress_bar(total as u64);
        bar.set_position(st.step as u64);
        let start = Instant::now();
        let elapsed_before = st.elapsed_s;
        // Fractions of the run's steps, as steps.
        let log_every = cfg.train.log_every.resolve(total);
        let eval_every = cfg.train.eval_every.resolve(total);
        let save_every = cfg.train.save_every.resolve(total);
        let mut epoch = st.epoch;
        if cfg.train.eval_on_start && st.step == 0 {
            if let (Some(data), Some(file)) = (&self.eval, eval_file.as_mut()) {
                let entry = self.evaluate_at(data, 0, 0.0)?;
                let wall = st.elapsed_s;
                record_eval(&mut st, entry, file, &mut tensorboard, wall)?;
            }
        }
        // A run resumed from the checkpoint of the evaluation that stopped it is done.
        let last = match self.early_stop_due(&st.evals) {
            true => st.step,
            false => total,
        };
        for step in st.step..last {
            let sb = plan.step(step);
            let step_grads = self.step_gradients(&sb.micro_batches, sb.metric_pairs)?;
            // On a GPU this waits for the backward pass's kernels (the step's first host read);
            // the norm's own kernels are queued behind them first.
            let t_norm = Instant::now();
            let norm = global_norm(&step_grads.grads)?;
            let norm_s = t_norm.elapsed().as_secs_f64();
            let micro_metrics = step_grads.metrics()?;
            let StepGradients { grads, tokens, .. } = step_grads;
            let step_metrics = Metrics::mean(&micro_metrics);
            if !norm.is_finite() || !step_metrics.loss.is_finite() {
                let what = if norm.is_finite() {
                    "loss"
                } else {
                    "gradient norm"
                };
                return Err(Error::NonFinite {
                    step: step + 1,
                    what,
                });
            }
            let lr = cfg.optim.lr * schedule.factor(step, warmup, total);
            let scale = clip_coefficient(norm, cfg.optim.max_grad_norm);
            let t_opt = Instant::now();
            opt.step(self.model.params(), &grads, lr, scale)?;
            let optimizer_s = t_opt.elapsed().as_secs_f64();
            drop(grads);
            // What stays between steps: weights, optimizer moments, caches.
            let opt_mem = self.memory_read();
            tracing::debug!(
                norm_s,
                optimizer_s,
                optimizer_peak_gib = opt_mem.map(|u| gib2(u.peak_gib())),
                between_steps_gib = opt_mem.map(|u| gib2(u.now_gib())),
                "optimizer step"
            );
            st.pending.extend(micro_metrics);
            st.pending_losses.push(step_metrics.loss);
            st.pending_tokens += tokens;
            st.total_tokens += tokens;
            let elapsed = elapsed_before + start.elapsed().as_secs_f64();
            let done = step + 1;
            epoch = sb.epoch_progress;
            st.step = done;
            st.epoch = epoch;
            st.elapsed_s = elapsed;
            bar.set_position(done as u64);
            bar.set_message(format!(
                "loss {:.4}  acc {:.2}  {:.0} tok/s",
                step_metrics.loss,
                step_metrics.rewards_accuracy(),
                st.total_tokens as f64 / elapsed.max(1e-9)
            ));
            // transformers saves a checkpoint at the last step under any save schedule ("best":
            // when its evaluation is a new best), its evaluation first.
            let save_at_end = done == total && save_every != Interval::Never;
            // The last step's evaluation is the final one: here when a checkpoint there holds
            // it, else below (where a run without scheduled evaluations makes its own). It
            // runs before this step's line is written, which is logged anyway when the
            // evaluation ends the run.
            // transformers' eval_delay: in steps, or epochs under an epoch schedule.
            let delayed = match eval_every {
                Interval::Epoch => epoch < cfg.train.eval_delay,
                _ => (done as f64) < cfg.train.eval_delay,
            };
            let eval_due = !delayed
                && match done < total {
                    true => eval_every.due(done, plan.steps_per_epoch),
                    false => save_at_end && eval_every != Interval::Never,
                };
            let evaluation = match (eval_due, &self.eval) {
                (true, Some(data)) => Some(self.evaluate_at(data, done, epoch)?),
                _ => None,
            };
            let stop_early = done < total
                && evaluation.as_ref().is_some_and(|e| {
                    let mut evals = st.evals.clone();
                    evals.push(e.clone());
                    self.early_stop_due(&evals)
                });
            let first = done == 1 && cfg.train.logging_first_step;
            if log_every.due(done, plan.steps_per_epoch) || done == total || first || stop_early {
                let entry = LogEntry {
                    step: done,
                    epoch,
                    learning_rate: lr,
                    grad_norm: norm,
                    metrics: st.pending_mean(),
                    tokens: st.pending_tokens,
                    elapsed_s: elapsed,
                };
                let line = entry.to_json();
                metrics_file.push(&line)?;
                if let Some(tb) = tensorboard.as_mut() {
                    tb.line(&line, elapsed)?;
                }
                st.log.push(entry);
                st.pending.clear();
                st.pending_losses.clear();
                st.pending_tokens = 0;
            }
            if let (Some(entry), Some(file)) = (evaluation, eval_file.as_mut()) {
                record_eval(&mut st, entry, file, &mut tensorboard, elapsed)?;
            }
            let interrupted = stop.load(Ordering::SeqCst);
            let due = match save_every {
                // transformers' save_strategy = "best": an evaluation here that is the best.
                Interval::Best => self.best_eval_of(&st).is_some_and(|e| e.step == done),
                // transformers ends an epoch when early stopping ends the run mid-epoch too.
                Interval::Epoch => {
                    save_every.due(done, plan.steps_per_epoch) || save_at_end || stop_early
                }
                every => every.due(done, plan.steps_per_epoch) || save_at_end,
            };
            // An interrupt at the last step lets the run finish.
            let interrupted = interrupted && done < total;
            if interrupted || due {
                remove_replaced_checkpoints(&out_dir, start_step, &written)?;
                // Only a scheduled checkpoint can be the best: one written for an interrupt
                // stands in for no checkpoint of an uninterrupted run.
                if due && self.best_eval_of(&st).is_some_and(|e| e.step == done) {
                    st.best_checkpoint = Some(done);
                }
                let dir =
                    self.save_checkpoint(&out_dir, &plan, &data_fingerprint, &st, &opt, !due)?;
                written.push(done);
                // An interrupt's checkpoint is off the schedule: it neither prunes scheduled
                // ones nor outlives a later checkpoint of the run resumed from it.
                if let Some(old) = interrupt_checkpoint.take() {
                    run_dir::remove_checkpoint(&old)?;
                }
                if let (true, Some(keep)) = (due, cfg.train.save_total_limit) {
                    prune_checkpoints(&out_dir, keep, st.best_checkpoint)?;
                }
                if interrupted {
                    bar.finish_and_clear();
                    return Err(Error::Interrupted {
                        step: done,
                        checkpoint: dir,
                    });
                }
            }
            if stop_early {
                tracing::info!(
                    step = done,
                    patience = cfg.train.early_stopping_patience,
                    metric = %cfg.train.best_metric_key(),
                    "stopping early: no improvement in the last evaluations"
                );
                break;
            }
        }
        bar.finish_and_clear();
        // The last step trained: `total`, or the one whose evaluation stopped the run.
        let end = st.step;
        let elapsed = st.elapsed_s;
        self.memory_read();
        tracing::info!(
            steps = end,
            seconds = format!("{elapsed:.1}"),
            tokens_per_s = format!("{:.1}", st.total_tokens as f64 / elapsed.max(1e-9)),
            peak_memory_gib = self.memory.as_ref().map(|m| gib2(m.run_peak_gib())),
            "done"
        );
        remove_replaced_checkpoints(&out_dir, start_step, &written)?;
        // The moments are done with: the final save and evaluation get their memory.
        drop(opt);
        let best_at_end = cfg.train.load_best_model_at_end;
        // The last step's evaluation (logged as every other), before the save when it takes
        // part in choosing the model to save.
        let mut final_eval = None;
        if best_at_end {
            final_eval =
                self.final_evaluation(&mut st, end, epoch, &mut eval_file, &mut tensorboard)?;
        }
        let mut reported = final_eval.clone();
        if best_at_end {
            reported = self.load_best(&st, end, total, &out_dir)?.or(reported);
        }
        let wanted = super::save_dtype::resolve(cfg.train.save_dtype, &self.base.dir);
        let saved = save_model(&out_dir, &self.model, &self.tokenizer, &self.base, wanted)?;
        // The settings the model was trained with, beside it (`orpo eval` reads a QLoRA
        // adapter's quantization from it).
        write_atomic(&out_dir.join(RUN_CONFIG), cfg.to_toml_string().as_bytes())?;
        if let Some(old) = interrupt_checkpoint.take() {
            run_dir::remove_checkpoint(&old)?;
        }
        // transformers ends a run with `save_total_limit = 1` and a best checkpoint (its
        // `best_model_checkpoint`) by deleting every other one.
        if let (Some(1), Some(keep)) = (cfg.train.save_total_limit, st.best_checkpoint) {
            for (step, path) in run_dir::checkpoints(&out_dir) {
                if step != keep {
                    run_dir::remove_checkpoint(&path)?;
                }
            }
        }
        if self.model.adapter().is_some() && wanted != DType::F32 {
            tracing::info!(
                "the adapter is saved in float32 as PEFT keeps adapters (train.save_dtype = {} \
                 applies to full models; `orpo merge --dtype` writes the merged model in it)",
                cfg.train.save_dtype
            );
        } else if saved != DType::F32 {
            tracing::info!(
                "model saved in {} (train.save_dtype = {})",
                super::save_dtype::config_name(saved),
                cfg.train.save_dtype
            );
        }
        if !best_at_end {
            final_eval =
                self.final_evaluation(&mut st, end, epoch, &mut eval_file, &mut tensorboard)?;
            reported = final_eval;
        }
        // eval_metrics.json: the saved model's evaluation.
        if let Some(entry) = &reported {
            let path = out_dir.join("eval_metrics.json");
            let text = serde_json::to_string_pretty(&entry.to_json()).unwrap_or_default();
            write_atomic(&path, text.as_bytes())?;
        }
        let eval = reported.map(|e| e.metrics);
        let plot = out_dir.join("training_curves.svg");
        let svg = super::plot::training_curves(&st.log, &st.evals);
        write_atomic(&plot, svg.as_bytes())?;
        Ok(TrainSummary {
            log: st.log,
            eval,
            output_dir: out_dir,
        })
    }

    /// The held-out metrics of the weights after optimizer step `step`.
    fn evaluate_at(&self, data: &Dataset, step: usize, epoch: f64) -> Result<EvalEntry, Error> {
        let cfg = &self.config;
        let metrics = evaluate(
            &self.model,
            data,
            cfg.train.eval_batch_size(),
            cfg.orpo.beta,
            self.tokenizer.pad_id(),
            cfg.orpo.nll_on_prompt,
            cfg.train.dataloader_drop_last,
        )?;
        tracing::info!(
            step,
            eval_loss = format!("{:.4}", metrics.loss),
            accuracy = format!("{:.3}", metrics.metrics.rewards_accuracy()),
            seconds = format!("{:.1}", metrics.runtime_s),
            "evaluation"
        );
        Ok(EvalEntry {
            step,
            epoch,
            metrics,
        })
    }

    /// The evaluation after the last step `end`, logged to eval_metrics.jsonl (and
    /// TensorBoard) and kept in the run's history; the one made there already when it stopped
    /// the run early; `None` without held-out pairs.
    fn final_evaluation(
        &self,
        st: &mut RunState,
        end: usize,
        epoch: f64,
        eval_file: &mut Option<JsonLines>,
        tensorboard: &mut Option<TensorBoard>,
    ) -> Result<Option<EvalEntry>, Error> {
        if let Some(done) = st.evals.last().filter(|e| e.step == end && end > 0) {
            return Ok(Some(done.clone()));
        }
        let (Some(data), Some(file)) = (&self.eval, eval_file.as_mut()) else {
            return Ok(None);
        };
        let entry = self.evaluate_at(data, end, epoch)?;
        let wall = st.elapsed_s;
        record_eval(st, entry.clone(), file, tensorboard, wall)?;
        Ok(Some(entry))
    }

    /// The best evaluation so far, when the run tracks one: with `load_best_model_at_end`, or
    /// (as transformers) a `metric_for_best_model` alone, which keeps the best checkpoint from
    /// `save_total_limit` without loading it at the end.
    fn best_eval_of<'a>(&self, st: &'a RunState) -> Option<&'a EvalEntry> {
        let t = &self.config.train;
        if !t.tracks_best() {
            return None;
        }
        best_eval(&st.evals, &t.best_metric_key(), t.best_is_greater())
    }

    /// Whether `evals` end the run: `train.early_stopping_patience` evaluations in a row
    /// without an improvement (transformers' `EarlyStoppingCallback`).
    fn early_stop_due(&self, evals: &[EvalEntry]) -> bool {
        let t = &self.config.train;
        let patience = t.early_stopping_patience;
        patience > 0
            && patience_counter(
                evals,
                &t.best_metric_key(),
                t.best_is_greater(),
                t.early_stopping_threshold,
            ) >= patience
    }

    /// Where a run's best model is at its end, as transformers has it: the weights of a run
    /// that trained all `total` steps and is best at the last (the final model, and that
    /// step's checkpoint under a save schedule), else the best checkpoint written (an
    /// evaluation between checkpoints never is one, nor the step where early stopping ended a
    /// run unless a checkpoint was due there).
    fn best_at_end(&self, st: &RunState, end: usize, total: usize) -> BestAtEnd {
        match self.best_eval_of(st) {
            None => BestAtEnd::Nothing,
            Some(best) if best.step == end && end == total => BestAtEnd::LastStep,
            Some(_) => st
                .best_checkpoint
                .map_or(BestAtEnd::Nothing, BestAtEnd::Checkpoint),
        }
    }

    /// At the end of a `load_best_model_at_end` run: the best checkpoint's weights into the
    /// model, as transformers' `_load_best_model` does (see [`Trainer::best_at_end`]). Returns
    /// the loaded checkpoint's evaluation.
    fn load_best(
        &self,
        st: &RunState,
        end: usize,
        total: usize,
        out_dir: &Path,
    ) -> Result<Option<EvalEntry>, Error> {
        let key = self.config.train.best_metric_key();
        let BestAtEnd::Checkpoint(step) = self.best_at_end(st, end, total) else {
            return Ok(None);
        };
        let dir = out_dir.join(format!("checkpoint-{step}"));
        if !dir.is_dir() {
            tracing::warn!(
                checkpoint = %dir.display(),
                "the best checkpoint is gone; the final model is the last step's"
            );
            return Ok(None);
        }
        super::resume::restore_model_weights(&dir, &self.model, &self.device)?;
        let entry = st.evals.iter().find(|e| e.step == step).cloned();
        tracing::info!(
            checkpoint = %dir.display(),
            metric = %key,
            value = entry.as_ref().and_then(|e| e.metrics.to_json()[&key].as_f64()),
            "loaded the best checkpoint (train.load_best_model_at_end)"
        );
        Ok(entry)
    }

    /// `interrupt`: written off the save schedule, for an interrupt (marked so in
    /// trainer_state.json).
    fn save_checkpoint(
        &self,
        out_dir: &Path,
        plan: &Plan,
        data_fingerprint: &str,
        st: &RunState,
        opt: &AdamW,
        interrupt: bool,
    ) -> Result<PathBuf, Error> {
        let dir = out_dir.join(format!("checkpoint-{}", st.step));
        let mut state = json!({
            "global_step": st.step,
            "epoch": st.epoch,
            "elapsed_s": st.elapsed_s,
            "total_tokens": st.total_tokens,
            "pending_tokens": st.pending_tokens,
            "pending_metrics": st.pending.iter().map(Metrics::to_vec).collect::<Vec<_>>(),
            "pending_losses": st.pending_losses,
            "plan": plan_fingerprint(plan),
            "data_fingerprint": data_fingerprint,
            "log_history": st.log.iter().map(LogEntry::to_json).collect::<Vec<_>>(),
            "eval_history": st.evals.iter().map(EvalEntry::to_json).collect::<Vec<_>>(),
        });
        if interrupt {
            state["interrupt"] = json!(true);
        }
        // An interrupt's checkpoint exists to be resumed from: it keeps the optimizer state.
        let model_only = self.config.train.save_only_model && !interrupt;
        if model_only {
            state[super::resume::MODEL_ONLY_KEY] = json!(true);
        }
        if self.config.train.tracks_best() {
            // transformers' names, so its tools read them too.
            let t = &self.config.train;
            if let Some(best) = best_eval(&st.evals, &t.best_metric_key(), t.best_is_greater()) {
                state["best_metric"] = best.metrics.to_json()[t.best_metric_key()].clone();
                state["best_global_step"] = json!(best.step);
            }
            state["best_model_checkpoint"] = match st.best_checkpoint {
                Some(step) => json!(format!("checkpoint-{step}")),
                None => Value::Null,
            };
        }
        let opt_state = match model_only {
            true => HashMap::new(),
            false => opt.state_tensors()?,
        };
        let config_text = self.config.to_toml_string();
        save_checkpoint(&dir, &self.model, &self.tokenizer, &self.base, |tmp| {
            if !model_only {
                save_tensors(&opt_state, &tmp.join("optimizer.safetensors"))?;
            }
            let text = serde_json::to_string_pretty(&state).unwrap_or_default();
            write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
            write_atomic(&tmp.join(RUN_CONFIG), config_text.as_bytes())
        })?;
        tracing::info!(path = %dir.display(), "checkpoint saved");
        Ok(dir)
    }
}

/// Where a run's best model is at its end ([`Trainer::best_at_end`]).
enum BestAtEnd {
    /// No best evaluation, or none with a checkpoint.
    Nothing,
    /// The last step's weights: the final model itself (nothing to load).
    LastStep,
    Checkpoint(usize),
}

/// Where the loop stands; everything here goes into trainer_state.json.
#[derive(Default)]
struct RunState {
    step: usize,
    epoch: f64,
    elapsed_s: f64,
    total_tokens: usize,
    /// Micro-batch metrics, step losses and tokens since the last logged line.
    pending: Vec<Metrics>,
    pending_losses: Vec<f64>,
    pending_tokens: usize,
    log: Vec<LogEntry>,
    evals: Vec<EvalEntry>,
    /// `load_best_model_at_end`: the step of the best evaluation's checkpoint so far.
    best_checkpoint: Option<usize>,
}

impl RunState {
    /// A logged line's metrics, averaged as transformers and TRL do: the loss over the steps
    /// (each step's the mean of its micro-batches), every other metric over the micro-batches.
    /// They differ when steps hold different numbers of micro-batches (an epoch's last step
    /// under gradient accumulation).
    fn pending_mean(&self) -> Metrics {
        let mut m = Metrics::mean(&self.pending);
        // Checkpoints written before step losses were kept hold none: the old average stands.
        if !self.pending_losses.is_empty() {
            m.loss = self.pending_losses.iter().sum::<f64>() / self.pending_losses.len() as f64;
        }
        m
    }

    fn from_resume(r: &ResumeState) -> Result<Self, Error> {
        let bad = |what: &str| {
            Error::Input(format!(
                "{}: trainer_state.json has a malformed {what}",
                r.dir.display()
            ))
        };
        let log = r
            .log_history
            .iter()
            .map(|v| LogEntry::from_json(v).ok_or_else(|| bad("log_history")))
            .collect::<Result<Vec<_>, _>>()?;
        let pending = r
            .pending_metrics
            .iter()
            .map(|v| Metrics::from_vec(v).ok_or_else(|| bad("pending_metrics")))
            .collect::<Result<Vec<_>, _>>()?;
        let pending_losses = r
            .pending_losses
            .iter()
            .map(|v| v.as_f64().ok_or_else(|| bad("pending_losses")))
            .collect::<Result<Vec<_>, _>>()?;
        let evals = r
            .eval_history
            .iter()
            .map(|v| EvalEntry::from_json(v).ok_or_else(|| bad("eval_history")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RunState {
            step: r.step,
            epoch: r.epoch,
            elapsed_s: r.elapsed_s,
            total_tokens: r.total_tokens,
            pending,
            pending_losses,
            pending_tokens: r.pending_tokens,
            log,
            evals,
            best_checkpoint: r.best_checkpoint,
        })
    }
}

/// An evaluation into the run's history, eval_metrics.jsonl and TensorBoard (at wall time
/// `wall`, seconds since the run began).
fn record_eval(
    st: &mut RunState,
    entry: EvalEntry,
    file: &mut JsonLines,
    tensorboard: &mut Option<TensorBoard>,
    wall: f64,
) -> Result<(), Error> {
    let line = entry.to_json();
    file.push(&line)?;
    if let Some(tb) = tensorboard.as_mut() {
        tb.line(&line, wall)?;
    }
    st.evals.push(entry);
    Ok(())
}

/// Whether two paths name one folder.
fn same_folder(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Keeps the newest `keep` `checkpoint-STEP` folders.
fn prune_checkpoints(out_dir: &Path, keep: usize, best: Option<usize>) -> Result<(), Error> {
    let mut found = run_dir::checkpoints(out_dir);
    // The best checkpoint (load_best_model_at_end) counts as the newest but one, as
    // transformers sorts it; with a limit of 1 the newest stays beside it.
    let mut keep = keep;
    if let Some(i) = best.and_then(|b| found.iter().position(|(s, _)| *s == b)) {
        if i + 1 < found.len() {
            let entry = found.remove(i);
            found.insert(found.len() - 1, entry);
            keep = keep.max(2);
        }
    }
    let excess = found.len().saturating_sub(keep);
    for (_, path) in found.into_iter().take(excess) {
        run_dir::remove_checkpoint(&path)?;
    }
    Ok(())
}

/// Removes the checkpoints after `start` (the step this run began from) that this run did not
/// write: they belong to the run it replaces, resumed from an earlier checkpoint, and would
/// otherwise be taken by `--resume` or kept by `save_total_limit` over this run's own.
fn remove_replaced_checkpoints(
    out_dir: &Path,
    start: usize,
    written: &[usize],
) -> Result<(), Error> {
    for (step, path) in run_dir::checkpoints(out_dir) {
        if step > start && !written.contains(&step) {
            run_dir::remove_checkpoint(&path)?;
            tracing::info!(
                path = %path.display(),
                "removed a checkpoint of the replaced run (it lies after the step this run resumed from)"
            );
        }
    }
    Ok(())
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style =
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    /// save_total_limit keeps the best checkpoint as if it were the newest but one, and with a
    /// limit of 1 the newest beside it (transformers' `_sorted_checkpoints`).
    #[test]
    fn pruning_keeps_the_best_checkpoint() {
        let kept = |keep: usize, best: Option<usize>| {
            let tmp = tempfile::tempdir().unwrap();
            for s in [2, 4, 6, 8] {
                std::fs::create_dir(tmp.path().join(format!("checkpoint-{s}"))).unwrap();
            }
            prune_checkpoints(tmp.path(), keep, best).unwrap();
            run_dir::checkpoints(tmp.path())
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>()
        };
        assert_eq!(kept(1, None), [8]);
        assert_eq!(kept(1, Some(4)), [4, 8]);
        assert_eq!(kept(1, Some(8)), [8]);
        assert_eq!(kept(2, Some(2)), [2, 8]);
        assert_eq!(kept(3, Some(2)), [2, 6, 8]);
        assert_eq!(kept(2, None), [6, 8]);
    }
}
