//! ORPO metrics on held-out pairs, computed as TRL's evaluation loop does: micro-batches of
//! `batch_size` in file order; `eval_loss` weighted by pairs, every other metric a plain mean
//! over micro-batches. The output adds TRL's timing keys (`eval_runtime`,
//! `eval_samples_per_second`, `eval_steps_per_second`) and the number of pairs.

use crate::data::Dataset;
use crate::model::CausalLm;
use crate::train::batch::collate;
use crate::train::forward::forward;
use crate::train::loss::{Metrics, METRIC_NAMES};
use crate::Error;
use serde_json::{json, Map, Value};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct EvalMetrics {
    pub pairs: usize,
    pub loss: f64,
    pub metrics: Metrics,
    /// Micro-batches (TRL's evaluation steps).
    pub batches: usize,
    /// Wall seconds the evaluation took.
    pub runtime_s: f64,
}

pub fn evaluate(
    model: &CausalLm,
    data: &Dataset,
    batch_size: usize,
    beta: f64,
    pad_id: u32,
    nll_on_prompt: bool,
    drop_last: bool,
) -> Result<EvalMetrics, Error> {
    let start = Instant::now();
    let device = model.lm_head().device().clone();
    // No graph: nothing is differentiated here.
    let model = &model.detached();
    let mut pairs: Vec<_> = data.pairs.iter().collect();
    if drop_last {
        // transformers' `dataloader_drop_last` drops a short last batch here too.
        pairs.truncate(pairs.len() - pairs.len() % batch_size.max(1));
        if pairs.is_empty() {
            return Err(Error::Input(format!(
                "{}: {} pairs, fewer than the evaluation batch of {batch_size}; with \
                 train.dataloader_drop_last that short batch is dropped and nothing is left",
                data.source,
                data.pairs.len()
            )));
        }
    }
    // Every batch is queued before any is read: on a GPU the host prepares the next batch
    // while the device runs the last.
    let mut readouts = Vec::new();
    for chunk in pairs.chunks(batch_size.max(1)) {
        let batch = collate(
            chunk,
            pad_id,
            nll_on_prompt,
            model.packed_padding(),
            &device,
        )?;
        readouts.push((forward(model, &batch, beta)?.readout, chunk.len()));
    }
    let mut per_batch = Vec::with_capacity(readouts.len());
    let mut weighted_loss = 0.0;
    for (readout, n_pairs) in &readouts {
        let metrics = readout.metrics(None)?;
        weighted_loss += metrics.loss * *n_pairs as f64;
        per_batch.push(metrics);
    }
    let n = pairs.len();
    Ok(EvalMetrics {
        pairs: n,
        loss: weighted_loss / n.max(1) as f64,
        metrics: Metrics::mean(&per_batch),
        batches: per_batch.len(),
        runtime_s: start.elapsed().as_secs_f64(),
    })
}

impl EvalMetrics {
    /// The metric TRL names `key` (`eval_loss`, `eval_rewards/margins`, ...), NaN as it is;
    /// `None` for any other key.
    pub fn value(&self, key: &str) -> Option<f64> {
        let name = key.strip_prefix("eval_")?;
        if name == "loss" {
            return Some(self.loss);
        }
        let i = METRIC_NAMES.iter().position(|n| *n == name)?;
        Some(self.metrics.values[i])
    }

    /// TRL's `eval_*` keys.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("eval_loss".into(), json!(self.loss));
        for (name, v) in METRIC_NAMES.iter().zip(self.metrics.values) {
            m.insert(format!("eval_{name}"), json!(v));
        }
        m.insert("eval_pairs".into(), json!(self.pairs));
        // Unrounded (transformers rounds them), so that `from_json` recovers the batches.
        let rt = self.runtime_s.max(1e-9);
        m.insert("eval_runtime".into(), json!(self.runtime_s));
        let per_s = |n: usize| json!(n as f64 / rt);
        m.insert("eval_samples_per_second".into(), per_s(self.pairs));
        m.insert("eval_steps_per_second".into(), per_s(self.batches));
        Value::Object(m)
    }

    /// Reads what [`EvalMetrics::to_json`] wrote (other keys are ignored).
    pub fn from_json(v: &Value) -> Option<Self> {
        let f = |k: &str| v.get(k).and_then(crate::train::log::json_number);
        let loss = f("eval_loss")?;
        // The unweighted mean of the micro-batch losses is not written; the weighted one
        // stands in for it.
        let mut metrics = Metrics {
            loss,
            ..Metrics::default()
        };
        for (slot, name) in metrics.values.iter_mut().zip(METRIC_NAMES) {
            *slot = f(&format!("eval_{name}"))?;
        }
        let runtime_s = f("eval_runtime").unwrap_or(0.0);
        let batches =
            f("eval_steps_per_second").map_or(0, |r| (r * runtime_s.max(1e-9)).round() as usize);
        Some(EvalMetrics {
            pairs: v.get("eval_pairs")?.as_u64()? as usize,
            loss,
            metrics,
            batches,
            runtime_s,
        })
    }

    pub fn render(&self) -> String {
        let mut s = format!("{:<28} {:>14}\n", "eval_loss", format!("{:.6}", self.loss));
        for (name, v) in METRIC_NAMES.iter().zip(self.metrics.values) {
            s.push_str(&format!(
                "{:<28} {:>14}\n",
                format!("eval_{name}"),
                format!("{v:.6}")
            ));
        }
        s.push_str(&format!("{:<28} {:>14}\n", "pairs", self.pairs));
        s
    }
}
