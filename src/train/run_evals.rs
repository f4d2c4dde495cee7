//! A run's evaluations: on held-out pairs at a step, the final one, the best so far (for
//! `load_best_model_at_end`, `save_every = "best"` and `save_total_limit`) and early stopping.

use super::best::{best_eval, checkpoint_to_load, patience_counter};
use super::log::{EvalEntry, JsonLines};
use super::report::TensorBoard;
use super::run_state::RunState;
use super::trainer::Trainer;
use crate::data::Dataset;
use crate::eval::evaluate;
use crate::Error;
use std::path::Path;

impl Trainer {
    /// The held-out metrics of the weights after optimizer step `step`.
    pub(super) fn evaluate_at(
        &self,
        data: &Dataset,
        step: usize,
        epoch: f64,
    ) -> Result<EvalEntry, Error> {
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
    pub(super) fn final_evaluation(
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
        st.record_eval(entry.clone(), file, tensorboard, wall)?;
        Ok(Some(entry))
    }

    /// The best evaluation so far, when the run tracks one: with `load_best_model_at_end`, or
    /// (as transformers) a `metric_for_best_model` alone, which keeps the best checkpoint from
    /// `save_total_limit` without loading it at the end.
    pub(super) fn best_eval_of<'a>(&self, st: &'a RunState) -> Option<&'a EvalEntry> {
        let t = &self.config.train;
        if !t.tracks_best() {
            return None;
        }
        best_eval(&st.evals, &t.best_metric_key(), t.best_is_greater())
    }

    /// Whether `evals` end the run: `train.early_stopping_patience` evaluations in a row
    /// without an improvement (transformers' `EarlyStoppingCallback`).
    pub(super) fn early_stop_due(&self, evals: &[EvalEntry]) -> bool {
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

    /// At the end of a `load_best_model_at_end` run that ended at step `end` of `total`: the
    /// best checkpoint's weights into the model, as transformers' `_load_best_model` does
    /// ([`checkpoint_to_load`]). Returns the loaded checkpoint's evaluation.
    pub(super) fn load_best(
        &self,
        st: &RunState,
        end: usize,
        total: usize,
        out_dir: &Path,
    ) -> Result<Option<EvalEntry>, Error> {
        let key = self.config.train.best_metric_key();
        let best = self.best_eval_of(st);
        let Some(step) = checkpoint_to_load(best, st.best_checkpoint, end, total) else {
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
}
