//! The training loop: the plan's steps in order, each logged, evaluated and checkpointed on
//! its schedule; at the end the final (or best) model saved and evaluated.

use super::checkpoint::{save_checkpoint, save_model, save_tensors, write_atomic};
use super::grad_norm::{clip_coefficient, global_norm};
use super::log::{EvalEntry, JsonLines, LogEntry};
use super::loss::Metrics;
use super::optim::{AdamW, AdamWSettings};
use super::plan::Plan;
use super::report::TensorBoard;
use super::resume::{self, ResumeState};
use super::run_dir::{self, RUN_CONFIG};
use super::run_state::RunState;
use super::same_run;
use super::schedule::{warmup_steps, Schedule};
use super::trainer::{gib2, StepGradients, TrainSummary, Trainer};
use crate::config::{Interval, Optimizer, Scheduler};
use crate::Error;
use candle_core::DType;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A run between two steps: its state (what a checkpoint holds) and what it writes to.
struct Run {
    out_dir: PathBuf,
    plan: Plan,
    data_fingerprint: String,
    opt: AdamW,
    st: RunState,
    /// The interrupt's checkpoint this run resumes from, in its output_dir.
    interrupt_checkpoint: Option<PathBuf>,
    /// The step this run began from, and the checkpoints it has written since.
    start_step: usize,
    written: Vec<usize>,
    warmup: usize,
    schedule: Schedule,
    metrics_file: JsonLines,
    eval_file: Option<JsonLines>,
    tensorboard: Option<TensorBoard>,
    bar: indicatif::ProgressBar,
    /// When this process started training, and the seconds the run spent before it.
    start: Instant,
    elapsed_before: f64,
    /// The schedules, with fractions of the run's steps resolved to steps.
    log_every: Interval,
    eval_every: Interval,
    save_every: Interval,
}

/// An optimizer step's values for its log line.
struct StepDone {
    lr: f64,
    grad_norm: f64,
}

impl Trainer {
    /// Trains from step 0, or from `resume` (a checkpoint folder) onwards. `stop` is polled
    /// after every step: when set, a checkpoint is written and `Error::Interrupted` returned.
    pub fn run(&mut self, resume: Option<&Path>, stop: &AtomicBool) -> Result<TrainSummary, Error> {
        let mut run = self.open_run(resume)?;
        if self.config.train.eval_on_start && run.st.step == 0 {
            if let (Some(data), Some(file)) = (&self.eval, run.eval_file.as_mut()) {
                let entry = self.evaluate_at(data, 0, 0.0)?;
                let wall = run.st.elapsed_s;
                run.st
                    .record_eval(entry, file, &mut run.tensorboard, wall)?;
            }
        }
        // A run resumed from the checkpoint of the evaluation that stopped it is done.
        let last = match self.early_stop_due(&run.st.evals) {
            true => run.st.step,
            false => run.plan.total_steps,
        };
        for step in run.st.step..last {
            let done = self.train_step(&mut run, step)?;
            if self.after_step(&mut run, done, stop)? {
                break;
            }
        }
        self.finish_run(run)
    }

    /// Everything before the first step: the plan, the optimizer, the state resumed, checks on
    /// output_dir, and the run's log files opened (rewritten up to the resumed step).
    fn open_run(&self, resume: Option<&Path>) -> Result<Run, Error> {
        let cfg = &self.config;
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
            eight_bit: cfg.optim.optimizer == Optimizer::AdamW8bit,
        });
        let (st, interrupt_checkpoint) = match resume {
            Some(dir) => self.resume_from(dir, &plan, &data_fingerprint, &out_dir, &mut opt)?,
            None => (RunState::default(), None),
        };
        // This run replaces and prunes checkpoints in its output_dir: they must be its own run's.
        let strangers: Vec<String> = run_dir::checkpoints(&out_dir)
            .into_iter()
            .filter_map(|(_, p)| resume::another_run(&p, &plan, cfg, &data_fingerprint))
            .collect();
        if let Some(first) = strangers.first() {
            return Err(Error::Input(format!(
                "train.output_dir `{}` holds {} checkpoint(s) of another run, which this run would \
                 replace or prune ({first}); write this run to another output_dir, or remove them",
                out_dir.display(),
                strangers.len()
            )));
        }
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
        if warmup > 0 && cfg.optim.scheduler == Scheduler::Constant {
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
        let metrics_file = JsonLines::create(
            &out_dir.join("metrics.jsonl"),
            st.log.iter().map(LogEntry::to_json),
        )?;
        let eval_file = match self.eval {
            Some(_) => Some(JsonLines::create(
                &out_dir.join("eval_metrics.jsonl"),
                st.evals.iter().map(EvalEntry::to_json),
            )?),
            None => None,
        };
        let tensorboard = if cfg.train.tensorboard() {
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
        Ok(Run {
            log_every: cfg.train.log_every.resolve(total),
            eval_every: cfg.train.eval_every.resolve(total),
            save_every: cfg.train.save_every.resolve(total),
            out_dir,
            plan,
            data_fingerprint,
            opt,
            start_step: st.step,
            elapsed_before: st.elapsed_s,
            st,
            interrupt_checkpoint,
            written: Vec::new(),
            warmup,
            schedule,
            metrics_file,
            eval_file,
            tensorboard,
            bar,
            start: Instant::now(),
        })
    }

    /// The state, weights and optimizer moments of checkpoint `dir`, and that checkpoint's
    /// folder when it is an interrupt's in this run's `out_dir` (removed once a later one is
    /// written).
    fn resume_from(
        &self,
        dir: &Path,
        plan: &Plan,
        data_fingerprint: &str,
        out_dir: &Path,
        opt: &mut AdamW,
    ) -> Result<(RunState, Option<PathBuf>), Error> {
        let r = ResumeState::load(dir, plan, &self.config, data_fingerprint, &self.device)?;
        r.restore_weights(&self.model, &self.device)?;
        opt.load_state(self.model.params(), &r.optimizer)?;
        let mut st = RunState::from_resume(&r)?;
        let own = out_dir.join(format!("checkpoint-{}", r.step));
        let interrupt_checkpoint = (r.interrupt && run_dir::same_folder(dir, &own)).then_some(own);
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
        Ok((st, interrupt_checkpoint))
    }

    /// Optimizer step `step` (0-based): gradients, their norm, clipping and AdamW; its
    /// metrics join those pending for the next log line.
    fn train_step(&self, run: &mut Run, step: usize) -> Result<StepDone, Error> {
        let cfg = &self.config;
        let total = run.plan.total_steps;
        let sb = run.plan.step(step);
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
        let lr = cfg.optim.lr * run.schedule.factor(step, run.warmup, total);
        let scale = clip_coefficient(norm, cfg.optim.max_grad_norm);
        let t_opt = Instant::now();
        run.opt.step(self.model.params(), &grads, lr, scale)?;
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
        let st = &mut run.st;
        st.pending.extend(micro_metrics);
        st.pending_losses.push(step_metrics.loss);
        st.pending_tokens += tokens;
        st.total_tokens += tokens;
        st.step = step + 1;
        st.epoch = sb.epoch_progress;
        st.elapsed_s = run.elapsed_before + run.start.elapsed().as_secs_f64();
        run.bar.set_position(st.step as u64);
        run.bar.set_message(format!(
            "loss {:.4}  acc {:.2}  {:.0} tok/s",
            step_metrics.loss,
            step_metrics.rewards_accuracy(),
            st.total_tokens as f64 / st.elapsed_s.max(1e-9)
        ));
        Ok(StepDone {
            lr,
            grad_norm: norm,
        })
    }

    /// What follows a step on the schedules: its evaluation, log line and checkpoint. Returns
    /// whether early stopping ends the run here; an interrupt (`stop`) returns
    /// `Error::Interrupted` once its checkpoint is written.
    fn after_step(&self, run: &mut Run, step: StepDone, stop: &AtomicBool) -> Result<bool, Error> {
        let cfg = &self.config;
        let total = run.plan.total_steps;
        let steps_per_epoch = run.plan.steps_per_epoch;
        let (done, epoch, elapsed) = (run.st.step, run.st.epoch, run.st.elapsed_s);
        // transformers saves a checkpoint at the last step under any save schedule ("best":
        // when its evaluation is a new best), its evaluation first.
        let save_at_end = done == total && run.save_every != Interval::Never;
        // The last step's evaluation is the final one: here when a checkpoint there holds
        // it, else in `finish_run` (where a run without scheduled evaluations makes its own).
        // It runs before this step's line is written, which is logged anyway when the
        // evaluation ends the run.
        // transformers' eval_delay: in steps, or epochs under an epoch schedule.
        let delayed = match run.eval_every {
            Interval::Epoch => epoch < cfg.train.eval_delay,
            _ => (done as f64) < cfg.train.eval_delay,
        };
        let eval_due = !delayed
            && match done < total {
                true => run.eval_every.due(done, steps_per_epoch),
                false => save_at_end && run.eval_every != Interval::Never,
            };
        let evaluation = match (eval_due, &self.eval) {
            (true, Some(data)) => Some(self.evaluate_at(data, done, epoch)?),
            _ => None,
        };
        let stop_early = done < total
            && evaluation.as_ref().is_some_and(|e| {
                let mut evals = run.st.evals.clone();
                evals.push(e.clone());
                self.early_stop_due(&evals)
            });
        let first = done == 1 && cfg.train.logging_first_step;
        if run.log_every.due(done, steps_per_epoch) || done == total || first || stop_early {
            let entry = LogEntry {
                step: done,
                epoch,
                learning_rate: step.lr,
                grad_norm: step.grad_norm,
                metrics: run.st.pending_mean(),
                tokens: run.st.pending_tokens,
                elapsed_s: elapsed,
            };
            let line = entry.to_json();
            run.metrics_file.push(&line)?;
            if let Some(tb) = run.tensorboard.as_mut() {
                tb.line(&line, elapsed)?;
            }
            run.st.log.push(entry);
            run.st.clear_pending();
        }
        if let (Some(entry), Some(file)) = (evaluation, run.eval_file.as_mut()) {
            run.st
                .record_eval(entry, file, &mut run.tensorboard, elapsed)?;
        }
        let due = match run.save_every {
            // transformers' save_strategy = "best": an evaluation here that is the best.
            Interval::Best => self.best_eval_of(&run.st).is_some_and(|e| e.step == done),
            // transformers ends an epoch when early stopping ends the run mid-epoch too.
            Interval::Epoch => {
                run.save_every.due(done, steps_per_epoch) || save_at_end || stop_early
            }
            every => every.due(done, steps_per_epoch) || save_at_end,
        };
        // An interrupt at the last step lets the run finish.
        let interrupted = stop.load(Ordering::SeqCst) && done < total;
        if interrupted || due {
            run_dir::remove_replaced_checkpoints(&run.out_dir, run.start_step, &run.written)?;
            // Only a scheduled checkpoint can be the best: one written for an interrupt
            // stands in for no checkpoint of an uninterrupted run.
            if due && self.best_eval_of(&run.st).is_some_and(|e| e.step == done) {
                run.st.best_checkpoint = Some(done);
            }
            let dir = self.save_checkpoint(run, !due)?;
            run.written.push(done);
            // An interrupt's checkpoint is off the schedule: it neither prunes scheduled
            // ones nor outlives a later checkpoint of the run resumed from it.
            if let Some(old) = run.interrupt_checkpoint.take() {
                run_dir::remove_checkpoint(&old)?;
            }
            if let (true, Some(keep)) = (due, cfg.train.save_total_limit) {
                run_dir::prune_checkpoints(&run.out_dir, keep, run.st.best_checkpoint)?;
            }
            if interrupted {
                run.bar.finish_and_clear();
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
        }
        Ok(stop_early)
    }

    /// After the last step: the final evaluation, the best checkpoint's weights loaded when
    /// asked, the model saved, leftover checkpoints removed, and the summary files written.
    fn finish_run(&self, run: Run) -> Result<TrainSummary, Error> {
        let cfg = &self.config;
        let Run {
            out_dir,
            plan,
            opt,
            mut st,
            mut interrupt_checkpoint,
            start_step,
            written,
            mut eval_file,
            mut tensorboard,
            bar,
            ..
        } = run;
        bar.finish_and_clear();
        // The last step trained: `total`, or the one whose evaluation stopped the run.
        let end = st.step;
        let total = plan.total_steps;
        let elapsed = st.elapsed_s;
        self.memory_read();
        tracing::info!(
            steps = end,
            seconds = format!("{elapsed:.1}"),
            tokens_per_s = format!("{:.1}", st.total_tokens as f64 / elapsed.max(1e-9)),
            peak_memory_gib = self.memory.as_ref().map(|m| gib2(m.run_peak_gib())),
            "done"
        );
        run_dir::remove_replaced_checkpoints(&out_dir, start_step, &written)?;
        // The moments are done with: the final save and evaluation get their memory.
        drop(opt);
        let best_at_end = cfg.train.load_best_model_at_end;
        let epoch = st.epoch;
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

    /// `checkpoint-STEP` at the run's current step. `interrupt`: written off the save
    /// schedule, for an interrupt (marked so in trainer_state.json).
    fn save_checkpoint(&self, run: &Run, interrupt: bool) -> Result<PathBuf, Error> {
        let st = &run.st;
        let dir = run.out_dir.join(format!("checkpoint-{}", st.step));
        let mut state = st.to_json(&run.plan, &run.data_fingerprint);
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
            let key = self.config.train.best_metric_key();
            if let Some(best) = self.best_eval_of(st) {
                state["best_metric"] = best.metrics.to_json()[&key].clone();
                state["best_global_step"] = json!(best.step);
            }
            state["best_model_checkpoint"] = match st.best_checkpoint {
                Some(step) => json!(format!("checkpoint-{step}")),
                None => Value::Null,
            };
        }
        let opt_state = match model_only {
            true => HashMap::new(),
            false => run.opt.state_tensors()?,
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

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style =
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}
