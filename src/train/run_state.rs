//! Where a training run stands between steps: everything in it goes into a checkpoint's
//! `trainer_state.json` and comes back from it on `--resume`.

use super::log::{EvalEntry, JsonLines, LogEntry};
use super::loss::Metrics;
use super::plan::Plan;
use super::report::TensorBoard;
use super::resume::{plan_fingerprint, ResumeState};
use crate::Error;
use serde_json::{json, Value};

#[derive(Default)]
pub(super) struct RunState {
    pub step: usize,
    pub epoch: f64,
    pub elapsed_s: f64,
    pub total_tokens: usize,
    /// Micro-batch metrics, step losses and tokens since the last logged line.
    pub pending: Vec<Metrics>,
    pub pending_losses: Vec<f64>,
    pub pending_tokens: usize,
    pub log: Vec<LogEntry>,
    pub evals: Vec<EvalEntry>,
    /// `load_best_model_at_end`: the step of the best evaluation's checkpoint so far.
    pub best_checkpoint: Option<usize>,
}

impl RunState {
    /// A logged line's metrics, averaged as transformers and TRL do: the loss over the steps
    /// (each step's the mean of its micro-batches), every other metric over the micro-batches.
    /// They differ when steps hold different numbers of micro-batches (an epoch's last step
    /// under gradient accumulation).
    pub fn pending_mean(&self) -> Metrics {
        let mut m = Metrics::mean(&self.pending);
        // Checkpoints written before step losses were kept hold none: the old average stands.
        if !self.pending_losses.is_empty() {
            m.loss = self.pending_losses.iter().sum::<f64>() / self.pending_losses.len() as f64;
        }
        m
    }

    /// Starts a new logged line: what was pending went into the last one.
    pub fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_losses.clear();
        self.pending_tokens = 0;
    }

    /// trainer_state.json's fields that say where the run stands (the caller adds the best
    /// evaluation's and the checkpoint's kind).
    pub fn to_json(&self, plan: &Plan, data_fingerprint: &str) -> Value {
        json!({
            "global_step": self.step,
            "epoch": self.epoch,
            "elapsed_s": self.elapsed_s,
            "total_tokens": self.total_tokens,
            "pending_tokens": self.pending_tokens,
            "pending_metrics": self.pending.iter().map(Metrics::to_vec).collect::<Vec<_>>(),
            "pending_losses": self.pending_losses,
            "plan": plan_fingerprint(plan),
            "data_fingerprint": data_fingerprint,
            "log_history": self.log.iter().map(LogEntry::to_json).collect::<Vec<_>>(),
            "eval_history": self.evals.iter().map(EvalEntry::to_json).collect::<Vec<_>>(),
        })
    }

    pub fn from_resume(r: &ResumeState) -> Result<Self, Error> {
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

    /// An evaluation into the run's history, eval_metrics.jsonl and TensorBoard (at wall time
    /// `wall`, seconds since the run began).
    pub fn record_eval(
        &mut self,
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
        self.evals.push(entry);
        Ok(())
    }
}
