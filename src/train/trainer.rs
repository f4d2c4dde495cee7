//! The training loop: plan -> micro-batches -> forward/backward -> clip -> AdamW -> log/save.

use super::batch::collate;
use super::checkpoint::{save_checkpoint, save_model, save_tensors, write_atomic};
use super::forward::forward;
use super::loss::{Metrics, METRIC_NAMES};
use super::optim::{clip, global_norm, AdamW, AdamWSettings};
use super::plan::Plan;
use super::schedule::lr_factor;
use crate::config::Config;
use crate::data::{Dataset, Tokenizer};
use crate::eval::{evaluate, EvalMetrics};
use crate::model::CausalLm;
use crate::Error;
use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub step: usize,
    pub epoch: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub metrics: Metrics,
    pub tokens: usize,
    pub elapsed_s: f64,
}

impl LogEntry {
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("step".into(), json!(self.step));
        m.insert("epoch".into(), json!(self.epoch));
        m.insert("loss".into(), json!(self.metrics.loss));
        m.insert("grad_norm".into(), json!(self.grad_norm));
        m.insert("learning_rate".into(), json!(self.learning_rate));
        for (name, v) in METRIC_NAMES.iter().zip(self.metrics.values) {
            m.insert((*name).into(), json!(v));
        }
        m.insert("tokens".into(), json!(self.tokens));
        m.insert("elapsed_s".into(), json!(self.elapsed_s));
        Value::Object(m)
    }
}

/// Everything a run needs, loaded and validated before the first step.
pub struct Trainer {
    pub config: Config,
    pub model: CausalLm,
    pub model_dir: PathBuf,
    pub tokenizer: Tokenizer,
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub device: Device,
}

pub struct TrainSummary {
    pub log: Vec<LogEntry>,
    pub eval: Option<EvalMetrics>,
    pub output_dir: PathBuf,
}

/// One optimizer step's summed gradients, its micro-batches' metrics and its token count.
pub struct StepGradients {
    pub grads: HashMap<String, Tensor>,
    pub metrics: Vec<Metrics>,
    pub tokens: usize,
}

/// Gradients of `objective` for every parameter, added into `acc`.
fn accumulate(
    model: &CausalLm,
    objective: &Tensor,
    acc: &mut HashMap<String, Tensor>,
) -> Result<(), Error> {
    let grads = objective.backward()?;
    for (name, var) in model.params().iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            let g = match acc.remove(name) {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            };
            acc.insert(name.to_string(), g);
        }
    }
    Ok(())
}

impl Trainer {
    pub fn plan(&self) -> Plan {
        let t = &self.config.train;
        Plan::new(
            self.train.pairs.len(),
            t.batch_size,
            t.grad_accum,
            t.epochs,
            t.max_steps,
            t.shuffle,
            t.seed,
        )
    }

    /// Runs one optimizer step's forward and backward passes; returns the summed gradients
    /// (already divided by the number of micro-batches), the micro-batch metrics and tokens.
    pub fn step_gradients(&self, micro_batches: &[Vec<usize>]) -> Result<StepGradients, Error> {
        let cfg = &self.config;
        let n_micro = micro_batches.len() as f64;
        let mut grads = HashMap::new();
        let mut metrics = Vec::with_capacity(micro_batches.len());
        let mut tokens = 0;
        for idx in micro_batches {
            let pairs: Vec<_> = idx.iter().map(|&i| &self.train.pairs[i]).collect();
            let batch = collate(
                &pairs,
                self.tokenizer.pad_id(),
                cfg.orpo.nll_on_prompt,
                &self.device,
            )?;
            tokens += batch.tokens;
            let out = forward(&self.model, &batch, cfg.orpo.beta)?;
            let objective = (out.objective / n_micro)?;
            accumulate(&self.model, &objective, &mut grads)?;
            metrics.push(out.metrics);
        }
        Ok(StepGradients {
            grads,
            metrics,
            tokens,
        })
    }

    pub fn run(&mut self) -> Result<TrainSummary, Error> {
        let cfg = self.config.clone();
        let out_dir = PathBuf::from(&cfg.train.output_dir);
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        let plan = self.plan();
        let total = plan.total_steps;
        tracing::info!(
            pairs = self.train.pairs.len(),
            steps = total,
            steps_per_epoch = plan.steps_per_epoch,
            params = self.model.params().num_elements(),
            "training"
        );
        let mut opt = AdamW::new(AdamWSettings {
            beta1: cfg.optim.adam_beta1,
            beta2: cfg.optim.adam_beta2,
            eps: cfg.optim.adam_epsilon,
            weight_decay: cfg.optim.weight_decay,
        });
        let metrics_path = out_dir.join("metrics.jsonl");
        let mut metrics_file =
            std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
        let bar = progress_bar(total as u64);
        let start = Instant::now();
        let mut log = Vec::new();
        let mut pending: Vec<Metrics> = Vec::new();
        let mut pending_tokens = 0;
        let mut total_tokens = 0usize;
        let log_every = cfg.train.log_every.max(1);
        for step in 0..total {
            let sb = plan.step(step);
            let StepGradients {
                mut grads,
                metrics: micro_metrics,
                tokens,
            } = self.step_gradients(&sb.micro_batches)?;
            let norm = global_norm(&grads)?;
            if !norm.is_finite() {
                return Err(Error::NonFinite {
                    step: step + 1,
                    what: "gradient norm",
                });
            }
            clip(&mut grads, norm, cfg.optim.max_grad_norm)?;
            let lr =
                cfg.optim.lr * lr_factor(cfg.optim.scheduler, step, cfg.optim.warmup_steps, total);
            opt.step(self.model.params(), &grads, lr)?;
            let step_metrics = Metrics::mean(&micro_metrics);
            if !step_metrics.loss.is_finite() {
                return Err(Error::NonFinite {
                    step: step + 1,
                    what: "loss",
                });
            }
            pending.extend(micro_metrics);
            pending_tokens += tokens;
            total_tokens += tokens;
            let elapsed = start.elapsed().as_secs_f64();
            bar.set_position(step as u64 + 1);
            bar.set_message(format!(
                "loss {:.4}  acc {:.2}  {:.0} tok/s",
                step_metrics.loss,
                step_metrics.rewards_accuracy(),
                total_tokens as f64 / elapsed.max(1e-9)
            ));
            let done = step + 1;
            if done % log_every == 0 || done == total {
                let entry = LogEntry {
                    step: done,
                    epoch: sb.epoch_progress,
                    learning_rate: lr,
                    grad_norm: norm,
                    metrics: Metrics::mean(&pending),
                    tokens: pending_tokens,
                    elapsed_s: elapsed,
                };
                writeln!(metrics_file, "{}", entry.to_json())
                    .map_err(|e| Error::io(&metrics_path, e))?;
                metrics_file
                    .flush()
                    .map_err(|e| Error::io(&metrics_path, e))?;
                tracing::debug!(step = done, loss = entry.metrics.loss, "logged");
                log.push(entry);
                pending.clear();
                pending_tokens = 0;
            }
            let save_every = cfg.train.save_every;
            if save_every > 0 && done % save_every == 0 && done < total {
                self.save_checkpoint(&out_dir, done, sb.epoch_progress, &opt, &log)?;
            }
        }
        bar.finish_and_clear();
        let elapsed = start.elapsed().as_secs_f64();
        tracing::info!(
            steps = total,
            seconds = format!("{elapsed:.1}"),
            tokens_per_s = format!("{:.1}", total_tokens as f64 / elapsed.max(1e-9)),
            "done"
        );
        save_model(&out_dir, &self.model, &self.tokenizer, &self.model_dir)?;
        let eval = match &self.eval {
            Some(ds) => {
                let m = evaluate(
                    &self.model,
                    ds,
                    cfg.train.batch_size,
                    cfg.orpo.beta,
                    self.tokenizer.pad_id(),
                    cfg.orpo.nll_on_prompt,
                )?;
                let mut v = m.to_json();
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("epoch".into(), json!(log.last().map_or(0.0, |e| e.epoch)));
                }
                let path = out_dir.join("eval_metrics.json");
                write_atomic(
                    &path,
                    serde_json::to_string_pretty(&v)
                        .unwrap_or_default()
                        .as_bytes(),
                )?;
                Some(m)
            }
            None => None,
        };
        Ok(TrainSummary {
            log,
            eval,
            output_dir: out_dir,
        })
    }

    fn save_checkpoint(
        &self,
        out_dir: &Path,
        step: usize,
        epoch: f64,
        opt: &AdamW,
        log: &[LogEntry],
    ) -> Result<(), Error> {
        let dir = out_dir.join(format!("checkpoint-{step}"));
        let state = json!({
            "global_step": step,
            "epoch": epoch,
            "seed": self.config.train.seed,
            "log_history": log.iter().map(LogEntry::to_json).collect::<Vec<_>>(),
        });
        let opt_state = opt.state_tensors()?;
        let config_text = self.config.to_toml_string();
        save_checkpoint(&dir, &self.model, &self.tokenizer, &self.model_dir, |tmp| {
            save_tensors(&opt_state, &tmp.join("optimizer.safetensors"))?;
            write_atomic(
                &tmp.join("trainer_state.json"),
                serde_json::to_string_pretty(&state)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
            write_atomic(&tmp.join("orpo.toml"), config_text.as_bytes())
        })?;
        tracing::info!(path = %dir.display(), "checkpoint saved");
        if let Some(keep) = self.config.train.save_total_limit {
            prune_checkpoints(out_dir, keep)?;
        }
        Ok(())
    }
}

/// Keeps the newest `keep` complete `checkpoint-STEP` folders.
fn prune_checkpoints(out_dir: &Path, keep: usize) -> Result<(), Error> {
    let entries = std::fs::read_dir(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut steps: Vec<(usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for (_, path) in steps.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
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
