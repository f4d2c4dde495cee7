//! A run's checkpoint folders as `--resume` and `save_total_limit` see them: a run resumed from
//! an earlier checkpoint replaces the later ones of the run it continues (and never prunes its
//! own newest), a checkpoint missing its files is not taken for complete, and temporaries of a
//! process killed while saving are cleared by the next run.

mod common;

use common::*;
use orpo::config::Config;
use orpo::train::load_trainer;
use orpo::train::resume::latest_checkpoint;
use orpo::train::run_dir::checkpoints;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// The README's tiny-opt run (16 steps) with a checkpoint every 3 steps, no evaluations.
fn config(out: &Path, extra: &[&str]) -> Config {
    let mut sets = vec![
        format!("train.output_dir={}", out.display()),
        "train.save_every=3".to_string(),
        "train.eval_every=0".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(&repo().join("configs/tiny-opt.toml"), &sets).unwrap()
}

/// Trains to the end, from the start or from checkpoint `resume`.
fn train(config: &Config, resume: Option<&Path>) {
    load_trainer(config)
        .unwrap()
        .run(resume, &AtomicBool::new(false))
        .unwrap();
}

fn steps(dir: &Path) -> Vec<usize> {
    checkpoints(dir).into_iter().map(|(s, _)| s).collect()
}

fn hidden_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[test]
fn resuming_from_an_earlier_checkpoint_replaces_the_later_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    train(&config(&out, &[]), None);
    // Every third step, and the last (transformers' save at the end).
    assert_eq!(steps(&out), [3, 6, 9, 12, 15, 16]);
    let reference = std::fs::read(out.join("model.safetensors")).unwrap();
    assert!(
        hidden_entries(&out).is_empty(),
        "{:?}",
        hidden_entries(&out)
    );

    // Back to step 3, keeping two checkpoints, stopped after one step: its checkpoint-4 is the
    // newest (before: pruned at once, the old run's 15 and 16 kept and resumed).
    let limited = config(&out, &["train.save_total_limit=2"]);
    let err = load_trainer(&limited)
        .unwrap()
        .run(Some(&out.join("checkpoint-3")), &AtomicBool::new(true))
        .err()
        .unwrap();
    assert!(
        matches!(err, orpo::Error::Interrupted { step: 4, .. }),
        "{err}"
    );
    assert_eq!(steps(&out), [3, 4]);
    assert_eq!(latest_checkpoint(&out), Some(out.join("checkpoint-4")));

    train(&limited, Some(&out.join("checkpoint-4")));
    assert_eq!(steps(&out), [15, 16]);
    assert!(
        std::fs::read(out.join("model.safetensors")).unwrap() == reference,
        "the resumed run's model differs from the uninterrupted one"
    );
    assert!(
        hidden_entries(&out).is_empty(),
        "{:?}",
        hidden_entries(&out)
    );
}

#[test]
fn a_finished_run_leaves_no_later_checkpoint_of_the_run_it_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    train(&config(&out, &[]), None);
    // Resumed from step 9 with no checkpoints of its own: 12, 15 and 16 lie on the old run.
    train(
        &config(&out, &["train.save_every=0"]),
        Some(&out.join("checkpoint-9")),
    );
    assert_eq!(steps(&out), [3, 6, 9]);
}

#[test]
fn a_checkpoint_without_its_optimizer_state_is_not_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    for (step, files) in [
        (3, &["trainer_state.json", "optimizer.safetensors"][..]),
        (6, &["trainer_state.json"][..]),
        (9, &["optimizer.safetensors"][..]),
    ] {
        let dir = out.join(format!("checkpoint-{step}"));
        std::fs::create_dir(&dir).unwrap();
        for f in files {
            std::fs::write(dir.join(f), b"{}").unwrap();
        }
    }
    assert_eq!(latest_checkpoint(out), Some(out.join("checkpoint-3")));
}

#[test]
fn temporaries_of_a_process_that_died_while_saving_are_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    std::fs::create_dir(&out).unwrap();
    // No process has this id (above any pid_max); this one's own are still being written.
    let dead = i32::MAX;
    let me = std::process::id();
    for dir in [
        format!(".model.safetensors.tmp-{dead}"),
        format!(".checkpoint-8.tmp-{dead}"),
        format!(".checkpoint-4.old-{dead}"),
        format!(".checkpoint-2.tmp-{me}"),
    ] {
        std::fs::create_dir(out.join(&dir)).unwrap();
        std::fs::write(out.join(&dir).join("model.safetensors"), b"partial").unwrap();
    }
    for file in [
        format!(".metrics.jsonl.tmp-{dead}"),
        format!(".tokenizer.json.tmp-{dead}"),
        format!(".notes.txt.tmp-{dead}"),
        ".tmp-notes".to_string(),
        ".keep.tmp-x".to_string(),
    ] {
        std::fs::write(out.join(file), b"x").unwrap();
    }
    train(
        &config(&out, &["train.max_steps=2", "train.save_every=0"]),
        None,
    );
    assert_eq!(
        hidden_entries(&out),
        [
            format!(".checkpoint-2.tmp-{me}"),
            ".keep.tmp-x".to_string(),
            format!(".notes.txt.tmp-{dead}"),
            ".tmp-notes".to_string()
        ]
    );
}

#[test]
fn another_runs_checkpoints_are_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for (out, lr) in [(&a, "optim.lr=5e-4"), (&b, "optim.lr=1e-3")] {
        train(&config(out, &[lr, "train.max_steps=7"]), None);
    }
    assert_eq!(steps(&a), [3, 6, 7]);
    // b's checkpoint-3 resumed into a, which holds a run with another learning rate.
    let into_a = config(&a, &["optim.lr=1e-3", "train.max_steps=7"]);
    let err = load_trainer(&into_a)
        .unwrap()
        .run(Some(&b.join("checkpoint-3")), &AtomicBool::new(false))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("holds 3 checkpoint(s) of another run") && err.contains("optim.lr"),
        "{err}"
    );
    assert_eq!(steps(&a), [3, 6, 7]);
}
