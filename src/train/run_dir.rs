//! A run's files in `train.output_dir`: whether a run is there, clearing it for
//! `--overwrite` (so that nothing of the old run — a checkpoint `--resume` or
//! `save_total_limit` would then pick up, an adapter that `orpo eval` would load instead of a
//! new full model, a stale evaluation — outlives it), its checkpoint folders, and the hidden
//! leftovers (`.NAME.tmp-PID`, `.NAME.old-PID`) of a process that died while writing.

use super::shard::is_shard_name;
use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::Error;
use std::path::{Path, PathBuf};

/// The run's configuration, in each checkpoint and beside the final model.
pub const RUN_CONFIG: &str = "orpo.toml";

/// The settings of the run that wrote the model or adapter folder `dir` (its orpo.toml), if
/// it is a local folder with one; an unreadable one is named in a warning.
pub fn run_config(dir: &Path) -> Option<crate::config::Config> {
    let path = dir.join(RUN_CONFIG);
    if !path.is_file() {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    match crate::config::Config::from_toml_str(&text, &path.display().to_string(), &[]) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("{e}: not read for the run's settings");
            None
        }
    }
}

/// Whether `dir` holds a finished run: its settings beside the final model and the curves,
/// written after the final save and evaluation. (Runs of versions that wrote no orpo.toml
/// there are not recognised.)
pub fn finished(dir: &Path) -> bool {
    dir.join(RUN_CONFIG).is_file() && dir.join("training_curves.svg").is_file()
}

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
        remove_entry(&dir.join(name))?;
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
    super::report::is_event_file(name)
        || matches!(
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
                | RUN_CONFIG
        )
        || is_shard_name(name)
        || is_checkpoint(name)
}

/// The name a hidden temporary (`.NAME.tmp-PID`, being written) or set-aside (`.NAME.old-PID`,
/// being removed) file or folder stands in for (see `checkpoint::hidden_sibling`).
fn unfinished(name: &str) -> Option<&str> {
    leftover(name).map(|(n, _)| n)
}

/// `(NAME, PID)` of a hidden temporary or set-aside name.
fn leftover(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix('.')?;
    let (stem, pid) = rest.rsplit_once('-')?;
    let pid = pid.parse().ok()?;
    let name = stem
        .strip_suffix(".tmp")
        .or_else(|| stem.strip_suffix(".old"))?;
    (!name.is_empty()).then_some((name, pid))
}

/// Whether process `pid` may still be running (and writing its temporaries).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only asks whether the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// What a save writes beside the run's outputs (`Tokenizer::saved_files`, and the base
/// model's files passed on as they are).
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
];

/// Removes the hidden temporaries and set-aside folders of the run's files that processes no
/// longer running left in `dir` (a run killed while saving: up to a whole model's size each).
/// Returns how many.
pub fn remove_unfinished(dir: &Path) -> Result<usize, Error> {
    let doomed: Vec<String> = names(dir)
        .filter(|n| {
            leftover(n).is_some_and(|(name, pid)| {
                (is_run_output(name) || TOKENIZER_FILES.contains(&name)) && !alive(pid)
            })
        })
        .collect();
    for name in &doomed {
        remove_entry(&dir.join(name))?;
    }
    Ok(doomed.len())
}

fn remove_entry(path: &Path) -> Result<(), Error> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    removed.map_err(|e| Error::io(path, e))
}

/// The `checkpoint-STEP` folders in `dir`, by step.
pub fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = names(dir)
        .filter(|n| is_checkpoint(n))
        .filter_map(|n| {
            let step = n.strip_prefix("checkpoint-")?.parse().ok()?;
            let path = dir.join(&n);
            path.is_dir().then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// Removes a checkpoint folder without ever leaving a half-deleted `checkpoint-STEP` (which
/// `--resume` would take for complete): it is renamed aside first.
pub fn remove_checkpoint(path: &Path) -> Result<(), Error> {
    let aside = super::checkpoint::hidden_sibling(path, "old");
    std::fs::rename(path, &aside).map_err(|e| Error::io(path, e))?;
    remove_entry(&aside)
}

/// Keeps the newest `keep` `checkpoint-STEP` folders (`train.save_total_limit`).
pub fn prune_checkpoints(out_dir: &Path, keep: usize, best: Option<usize>) -> Result<(), Error> {
    let mut found = checkpoints(out_dir);
    // The best checkpoint (load_best_model_at_end) counts as the newest but one, as
    // transformers sorts it; with a limit of 1 the newest stays beside it.
    let mut keep = keep;
    if let Some(i) = best.and_then(|b| found.iter().position(|(s, _)| *s == b)) {
        if i + 1 < found.len() {
            let entry = found.remove(i);
            found.insert(found.len() - 1, entry);
            keep = keep.max(2);
        }
    }
    let excess = found.len().saturating_sub(keep);
    for (_, path) in found.into_iter().take(excess) {
        remove_checkpoint(&path)?;
    }
    Ok(())
}

/// Removes the checkpoints after `start` (the step this run began from) that this run did not
/// write: they belong to the run it replaces, resumed from an earlier checkpoint, and would
/// otherwise be taken by `--resume` or kept by `save_total_limit` over this run's own.
pub fn remove_replaced_checkpoints(
    out_dir: &Path,
    start: usize,
    written: &[usize],
) -> Result<(), Error> {
    for (step, path) in checkpoints(out_dir) {
        if step > start && !written.contains(&step) {
            remove_checkpoint(&path)?;
            tracing::info!(
                path = %path.display(),
                "removed a checkpoint of the replaced run (it lies after the step this run resumed from)"
            );
        }
    }
    Ok(())
}

/// Whether two paths name one folder.
pub fn same_folder(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
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

    /// save_total_limit keeps the best checkpoint as if it were the newest but one, and with a
    /// limit of 1 the newest beside it (transformers' `_sorted_checkpoints`).
    #[test]
    fn pruning_keeps_the_best_checkpoint() {
        let kept = |keep: usize, best: Option<usize>| {
            let tmp = tempfile::tempdir().unwrap();
            for s in [2, 4, 6, 8] {
                std::fs::create_dir(tmp.path().join(format!("checkpoint-{s}"))).unwrap();
            }
            prune_checkpoints(tmp.path(), keep, best).unwrap();
            checkpoints(tmp.path())
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>()
        };
        assert_eq!(kept(1, None), [8]);
        assert_eq!(kept(1, Some(4)), [4, 8]);
        assert_eq!(kept(1, Some(8)), [8]);
        assert_eq!(kept(2, Some(2)), [2, 8]);
        assert_eq!(kept(3, Some(2)), [2, 6, 8]);
        assert_eq!(kept(2, None), [6, 8]);
    }
}
