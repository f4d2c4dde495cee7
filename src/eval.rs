//! ORPO metrics on held-out pairs, computed as TRL's evaluation loop does: micro-batches of
//! `batch_size` in file order; `eval_loss` weighted by pairs, every other metric a plain mean
//! over micro-batches.

use crate::data::Dataset;
use crate::model::CausalLm;
use crate::train::batch::collate;
use crate::train::forward::forward;
use crate::train::loss::{Metrics, METRIC_NAMES};
use crate::Error;
use serde_json::{json, Map, Value};

#[derive(Debug, Clone)]
pub struct EvalMetrics {
    pub pairs: usize,
    pub loss: f64,
    pub metrics: Metrics,
}

pub fn evaluate(
    model: &CausalLm,
    data: &Dataset,
    batch_size: usize,
    beta: f64,
    pad_id: u32,
    nll_on_prompt: bool,
) -> Result<EvalMetrics, Error> {
    let device = model.lm_head().device().clone();
    // No graph: nothing is differentiated here.
    let model = &model.detached();
    let pairs: Vec<_> = data.pairs.iter().collect();
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
    })
}

impl EvalMetrics {
    /// TRL's `eval_*` keys.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("eval_loss".into(), json!(self.loss));
        for (name, v) in METRIC_NAMES.iter().zip(self.metrics.values) {
            m.insert(format!("eval_{name}"), json!(v));
        }
        m.insert("eval_pairs".into(), json!(self.pairs));
        Value::Object(m)
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
