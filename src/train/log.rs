//! The run's records: a line of `metrics.jsonl` per logged step and a line of
//! `eval_metrics.jsonl` per evaluation, both kept in `trainer_state.json` for resuming.

use super::loss::{Metrics, METRIC_NAMES};
use crate::eval::EvalMetrics;
use crate::Error;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A number as the run's files hold it: NaN is written as `null` (JSON has no NaN), so `null`
/// reads back as NaN and a resumed run keeps a NaN metric rather than refusing its
/// checkpoint. `None` for anything else that is not a number.
pub fn json_number(v: &Value) -> Option<f64> {
    match v {
        Value::Null => Some(f64::NAN),
        v => v.as_f64(),
    }
}

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
        let f = |k: &str| v.get(k).and_then(json_number);
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
            epoch: v.get("epoch").and_then(json_number)?,
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

    /// A NaN metric is written as `null` and reads back as NaN, in a log line, an evaluation
    /// and the metrics pending a line; a missing key is still malformed.
    #[test]
    fn a_nan_metric_reads_back_as_nan() {
        let mut metrics = Metrics {
            loss: 0.5,
            ..Metrics::default()
        };
        metrics.values[0] = f64::NAN;
        let entry = LogEntry {
            step: 3,
            epoch: 0.5,
            learning_rate: 1e-3,
            grad_norm: 1.0,
            metrics: metrics.clone(),
            tokens: 10,
            elapsed_s: 1.0,
        };
        let line = entry.to_json();
        assert!(line[METRIC_NAMES[0]].is_null());
        let back = LogEntry::from_json(&line).unwrap();
        assert!(back.metrics.values[0].is_nan());
        assert_eq!(back.to_json(), line);
        let eval = EvalEntry {
            step: 3,
            epoch: 0.5,
            metrics: EvalMetrics {
                pairs: 4,
                loss: f64::NAN,
                metrics: metrics.clone(),
                batches: 1,
                runtime_s: 1.0,
            },
        };
        let back = EvalEntry::from_json(&eval.to_json()).unwrap();
        assert!(back.metrics.loss.is_nan() && back.metrics.metrics.values[0].is_nan());
        let pending = Metrics::from_vec(&serde_json::json!(metrics.to_vec())).unwrap();
        assert!(pending.values[0].is_nan());
        let mut partial = line.clone();
        partial.as_object_mut().unwrap().remove("loss");
        assert!(LogEntry::from_json(&partial).is_none());
    }
}
