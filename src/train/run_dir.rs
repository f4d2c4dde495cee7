//! A run's files in `train.output_dir`: whether a run is there, and clearing it for
//! `--overwrite`, so that nothing of the old run (a checkpoint `--resume` or
//! `save_total_limit` would then pick up, an adapter that `orpo eval` would load instead of a
//! new full model, a stale evaluation) outlives it.

use super::shard::is_shard_name;
use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::Error;
use std::path::Path;

/// Whether `dir` holds a run's log, weights or checkpoints.
pub fn holds_run(dir: &Path) -> bool {
    names(dir).any(|name| {
        matches!(
            name.as_str(),
            "metrics.jsonl" | "model.safetensors" | "model.safetensors.index.json"
        ) || is_checkpoint(&name)
    })
}

/// Removes what a run wrote to `dir`: checkpoints, log, evaluations, plot, model or adapter
/// files, and unfinished temporary files of these. Tokenizer files stay (every save rewrites
/// them), and so does anything else. Returns how many entries went.
pub fn clear_run(dir: &Path) -> Result<usize, Error> {
    let doomed: Vec<String> = names(dir)
        .filter(|n| is_run_output(n) || unfinished(n).is_some_and(is_run_output))
        .collect();
    for name in &doomed {
        let path = dir.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(doomed.len())
}

fn names(dir: &Path) -> impl Iterator<Item = String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn is_checkpoint(name: &str) -> bool {
    name.strip_prefix("checkpoint-")
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

fn is_run_output(name: &str) -> bool {
    matches!(
        name,
        "metrics.jsonl"
            | "eval_metrics.json"
            | "eval_metrics.jsonl"
            | "training_curves.svg"
            | "config.json"
            | "generation_config.json"
            | "model.safetensors"
            | "model.safetensors.index.json"
            | ADAPTER_WEIGHTS
            | ADAPTER_CONFIG
    ) || is_shard_name(name)
        || is_checkpoint(name)
}

/// The name a temporary file or folder (`.NAME.tmp-PID`, see `checkpoint::tmp_sibling`) stands
/// in for.
fn unfinished(name: &str) -> Option<&str> {
    name.strip_prefix('.')?.rsplit_once(".tmp-").map(|(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clears_only_run_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for f in [
            "metrics.jsonl",
            "eval_metrics.json",
            "model-00001-of-00002.safetensors",
            "adapter_model.safetensors",
            ".model.safetensors.tmp-77",
            "tokenizer.json",
            "notes.txt",
            "checkpoint-final.txt",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        for sub in ["checkpoint-4", ".checkpoint-8.tmp-12", "plots"] {
            std::fs::create_dir(d.join(sub)).unwrap();
            std::fs::write(d.join(sub).join("a"), b"x").unwrap();
        }
        assert!(holds_run(d));
        assert_eq!(clear_run(d).unwrap(), 7);
        let mut left: Vec<String> = names(d).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "checkpoint-final.txt",
                "notes.txt",
                "plots",
                "tokenizer.json"
            ]
        );
        assert!(!holds_run(d));
    }
}
