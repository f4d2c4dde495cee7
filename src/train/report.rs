//! The run's curves in TensorBoard (`train.report_to = "tensorboard"`): every metrics.jsonl and
//! eval_metrics.jsonl line as scalars at its step, under the tags transformers'
//! `TensorBoardCallback` gives them (`eval_loss` as `eval/loss`, `loss` as `train/loss`).

use super::log::{EvalEntry, LogEntry};
use super::tensorboard::EventWriter;
use crate::Error;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct TensorBoard {
    writer: EventWriter,
    /// Unix time at which the run (its first segment, for a resumed run) started training.
    started: f64,
}

/// Whether `name` is a TensorBoard event file.
pub fn is_event_file(name: &str) -> bool {
    name.starts_with("events.out.tfevents.")
}

/// The event files in `dir`.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| is_event_file(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect()
}

/// transformers' `rewrite_logs`: `eval_*` keys under `eval/`, every other under `train/`.
fn tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl TensorBoard {
    /// Replaces the event files in `dir` with one holding the run's lines so far (a resumed
    /// run's history up to its checkpoint), so that TensorBoard shows one run's curves, as
    /// metrics.jsonl does, without the steps an interrupted run logged past its checkpoint.
    /// `elapsed_s`: the seconds the run had trained before now.
    pub fn start(
        dir: &Path,
        log: &[LogEntry],
        evals: &[EvalEntry],
        elapsed_s: f64,
    ) -> Result<Self, Error> {
        for path in event_files(dir) {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        let writer = EventWriter::create(dir).map_err(|e| Error::io(dir, e))?;
        let mut tb = TensorBoard {
            writer,
            started: unix_now() - elapsed_s,
        };
        // In the order a live run writes them: by step, a step's log line before its
        // evaluation (TensorBoard drops the later points of a tag whose step goes back, and
        // evaluations carry `epoch` too).
        let mut lines: Vec<(usize, usize, Value, f64)> = log
            .iter()
            .map(|l| (l.step, 0, l.to_json(), l.elapsed_s))
            .collect();
        for entry in evals {
            // Evaluations carry no time of their own: that of the log line of their step.
            let at = log
                .iter()
                .rfind(|l| l.step <= entry.step)
                .map_or(0.0, |l| l.elapsed_s);
            lines.push((entry.step, 1, entry.to_json(), at));
        }
        lines.sort_by_key(|(step, kind, _, _)| (*step, *kind));
        for (_, _, line, at) in &lines {
            tb.line(line, *at)?;
        }
        Ok(tb)
    }

    /// One line's numbers (all but `step`) at its step; `elapsed_s` since the run started.
    pub fn line(&mut self, line: &Value, elapsed_s: f64) -> Result<(), Error> {
        let Some(obj) = line.as_object() else {
            return Ok(());
        };
        let step = obj.get("step").and_then(Value::as_u64).unwrap_or(0);
        let tags: Vec<(String, f64)> = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| v.as_f64().map(|x| (tag(k), x)))
            .collect();
        let values: Vec<(&str, f64)> = tags.iter().map(|(t, x)| (t.as_str(), *x)).collect();
        let path = self.writer.path().to_path_buf();
        self.writer
            .scalars(step, &values, self.started + elapsed_s)
            .map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_transformers() {
        assert_eq!(tag("loss"), "train/loss");
        assert_eq!(tag("rewards/chosen"), "train/rewards/chosen");
        assert_eq!(tag("eval_loss"), "eval/loss");
        assert_eq!(tag("eval_rewards/accuracies"), "eval/rewards/accuracies");
        assert_eq!(tag("epoch"), "train/epoch");
    }
}
