//! The run's records: a line of `metrics.jsonl` per logged step and a line of
//! `eval_metrics.jsonl` per evaluation, both kept in `trainer_state.json` for resuming.

use super::loss::{Metrics, METRIC_NAMES};
use crate::eval::EvalMetrics;
use crate::Error;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`: a logged step (averaged over the steps since the previous line).
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
    pub fn from_json(v: &Value) -> Option<Self> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        let mut metrics = Metrics {
            loss: f("loss")?,
            ..Metrics::default()
        };
        for (slot, name) in metrics.values.iter_mut().zip(METRIC_NAMES) {
            *slot = f(name)?;
        }
        Some(LogEntry {
            step: v.get("step")?.as_u64()? as usize,
            epoch: f("epoch")?,
            learning_rate: f("learning_rate")?,
            grad_norm: f("grad_norm")?,
            metrics,
            tokens: v.get("tokens")?.as_u64()? as usize,
            elapsed_s: f("elapsed_s")?,
        })
    }

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

/// One line of `eval_metrics.jsonl`: the held-out metrics after optimizer step `step`.
#[derive(Debug, Clone)]
pub struct EvalEntry {
    pub step: usize,
    pub epoch: f64,
    pub metrics: EvalMetrics,
}

impl EvalEntry {
    pub fn from_json(v: &Value) -> Option<Self> {
        Some(EvalEntry {
            step: v.get("step")?.as_u64()? as usize,
            epoch: v.get("epoch")?.as_f64()?,
            metrics: EvalMetrics::from_json(v)?,
        })
    }

    /// `step`, `epoch` and TRL's `eval_*` keys.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("step".into(), json!(self.step));
        m.insert("epoch".into(), json!(self.epoch));
        if let Value::Object(metrics) = self.metrics.to_json() {
            m.extend(metrics);
        }
        Value::Object(m)
    }
}

/// A JSON Lines file written as a run goes, each line flushed as it is added.
pub(super) struct JsonLines {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonLines {
    /// Creates (or truncates) the file and writes `lines`: on resume, the history up to the
    /// checkpoint, dropping what an interrupted run logged after it.
    pub(super) fn create(
        path: &Path,
        lines: impl IntoIterator<Item = Value>,
    ) -> Result<Self, Error> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut out = JsonLines {
            path: path.to_path_buf(),
            file,
        };
        for line in lines {
            out.push(&line)?;
        }
        Ok(out)
    }

    pub(super) fn push(&mut self, line: &Value) -> Result<(), Error> {
        writeln!(self.file, "{line}")
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed run rewrites its log from trainer_state.json: every number must read back
    /// as the same f64, or the resumed files differ in their last digits.
    #[test]
    fn a_log_line_reads_back_digit_for_digit() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Metric-like values: magnitudes 1e-6 … 1e2, both signs, all mantissa bits.
            let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
            let scale = 10f64.powi((x % 9) as i32 - 6);
            if x & 1 == 0 {
                unit * scale
            } else {
                -unit * scale
            }
        };
        for step in 1..=2000 {
            let mut metrics = Metrics {
                loss: next(),
                ..Metrics::default()
            };
            for v in metrics.values.iter_mut() {
                *v = next();
            }
            let entry = LogEntry {
                step,
                epoch: next().abs(),
                learning_rate: next().abs(),
                grad_norm: next().abs(),
                metrics,
                tokens: step * 7,
                elapsed_s: next().abs(),
            };
            let text = entry.to_json().to_string();
            let back = LogEntry::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
            assert_eq!(back.to_json().to_string(), text);
        }
    }
}
