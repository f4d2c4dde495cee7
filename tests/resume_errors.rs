//! `orpo train --resume` refuses a broken checkpoint before training, with a message naming
//! the file (and the key) at fault; a valid one still resumes.

mod common;

use common::*;
use orpo::config::Config;
use orpo::train::{load_trainer, Trainer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// A 4-step run of tiny-opt (LoRA or not) writing into `out`.
fn config(out: &Path, lora: bool) -> Config {
    let mut sets = vec![
        format!("model.id={}", model_dir("tiny-opt").display()),
        format!("train.output_dir={}", out.display()),
        "train.max_steps=4".to_string(),
        "train.batch_size=2".to_string(),
        "train.log_every=1".to_string(),
        "optim.lr=1e-3".to_string(),
        "data.max_length=256".to_string(),
        "data.max_prompt_length=192".to_string(),
    ];
    if lora {
        sets.extend(["lora.enabled=true", "lora.r=4", "lora.alpha=8"].map(String::from));
    }
    let data = repo().join("examples/data/explicit-10.jsonl");
    sets.push(format!("data.train={}", data.display()));
    Config::from_toml_str("", "test.toml", &sets).unwrap()
}

/// A run interrupted after step 1: its trainer (reused for refused resumes, which train
/// nothing) and its checkpoint-1.
struct Interrupted {
    tmp: tempfile::TempDir,
    config: Config,
    trainer: Trainer,
    ckpt: PathBuf,
}

fn interrupted(lora: bool) -> Interrupted {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = config(&out, lora);
    let mut trainer = load_trainer(&config).unwrap();
    let err = trainer.run(None, &AtomicBool::new(true)).err().unwrap();
    assert!(
        matches!(err, orpo::Error::Interrupted { step: 1, .. }),
        "{err}"
    );
    let ckpt = out.join("checkpoint-1");
    assert!(ckpt.join("trainer_state.json").is_file());
    Interrupted {
        tmp,
        config,
        trainer,
        ckpt,
    }
}

impl Interrupted {
    /// A copy of the checkpoint as `case/NAME`, edited by `edit`.
    fn copy(&self, case: &str, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
        let dir = self.tmp.path().join(case).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&self.ckpt).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        edit(&dir);
        dir
    }

    /// A copy of the checkpoint with trainer_state.json edited.
    fn with_state(
        &self,
        case: &str,
        edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    ) -> PathBuf {
        self.copy(case, "checkpoint-1", |dir| {
            let path = dir.join("trainer_state.json");
            let mut v: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            edit(v.as_object_mut().unwrap());
            std::fs::write(&path, v.to_string()).unwrap();
        })
    }

    /// The message of a refused resume from `ckpt`, checked to be a user error that left the
    /// run's log alone.
    fn refused(&mut self, ckpt: &Path) -> String {
        let log = self.config.train.output_dir.clone() + "/metrics.jsonl";
        let before = std::fs::read_to_string(&log).unwrap();
        let err = match self.trainer.run(Some(ckpt), &AtomicBool::new(false)) {
            Ok(_) => panic!("resuming from {} succeeded", ckpt.display()),
            Err(e) => e,
        };
        assert_eq!(err.exit_code(), 2, "{err}");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            before,
            "log changed"
        );
        err.to_string()
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` not in: {msg}");
    }
}

fn state_file(ckpt: &Path) -> String {
    ckpt.join("trainer_state.json").display().to_string()
}

#[test]
fn valid_checkpoint_still_resumes_under_any_folder_name() {
    let run = interrupted(false);
    // A folder not named checkpoint-STEP is taken at its trainer_state.json's word.
    let ckpt = run.copy("renamed", "saved", |_| {});
    let mut trainer = load_trainer(&run.config).unwrap();
    let summary = trainer.run(Some(&ckpt), &AtomicBool::new(false)).unwrap();
    let steps: Vec<usize> = summary.log.iter().map(|e| e.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert!(Path::new(&run.config.train.output_dir)
        .join("model.safetensors")
        .is_file());
}

#[test]
fn global_step_outside_the_run_or_not_whole_is_refused() {
    let mut run = interrupted(false);
    for (case, value, found) in [
        ("beyond", json!(99), "is 99, outside this run's steps 1..=4"),
        ("zero", json!(0), "is 0, outside this run's steps 1..=4"),
        ("negative", json!(-1), "must be a whole number, found -1"),
        (
            "word",
            json!("twelve"),
            "must be a whole number, found \"twelve\"",
        ),
        ("fraction", json!(1.5), "must be a whole number, found 1.5"),
        // Within the run, but not the step the folder was written at.
        ("folder", json!(3), "is 3, but the folder is checkpoint-1"),
    ] {
        let ckpt = run.with_state(case, |s| {
            s.insert("global_step".into(), value);
        });
        let msg = run.refused(&ckpt);
        assert_names(&msg, &[&state_file(&ckpt), "`global_step`", found]);
    }
    let ckpt = run.with_state("missing", |s| {
        s.remove("global_step");
    });
    let msg = run.refused(&ckpt);
    assert_names(&msg, &[&state_file(&ckpt), "`global_step` is missing"]);
}

#[test]
fn malformed_histories_and_counters_are_refused() {
    let mut run = interrupted(false);
    for (key, value, found) in [
        ("log_history", json!(5), "must be an array, found 5"),
        ("pending_metrics", json!({}), "must be an array, found {}"),
        (
            "pending_losses",
            json!("x"),
            "must be an array, found \"x\"",
        ),
        ("eval_history", Value::Null, "must be an array, found null"),
        (
            "epoch",
            json!(-0.5),
            "must be a finite non-negative number, found -0.5",
        ),
        (
            "elapsed_s",
            json!("3"),
            "must be a finite non-negative number, found \"3\"",
        ),
        (
            "total_tokens",
            json!(1.5),
            "must be a whole number, found 1.5",
        ),
        (
            "pending_tokens",
            json!(-3),
            "must be a whole number, found -3",
        ),
    ] {
        let ckpt = run.with_state(key, |s| {
            s.insert(key.into(), value);
        });
        let msg = run.refused(&ckpt);
        assert_names(&msg, &[&state_file(&ckpt), &format!("`{key}` {found}")]);
    }
}

#[test]
fn unreadable_trainer_state_names_the_file() {
    let mut run = interrupted(false);
    let ckpt = run.copy("truncated", "checkpoint-1", |dir| {
        let path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    });
    let msg = run.refused(&ckpt);
    assert_names(&msg, &[&state_file(&ckpt), "invalid JSON"]);

    let ckpt = run.copy("array", "checkpoint-1", |dir| {
        std::fs::write(dir.join("trainer_state.json"), "[1]").unwrap();
    });
    let msg = run.refused(&ckpt);
    assert_names(&msg, &[&state_file(&ckpt), "must hold a JSON object"]);
}

#[test]
fn missing_or_truncated_optimizer_state_names_the_file() {
    let mut run = interrupted(false);
    let ckpt = run.copy("missing", "checkpoint-1", |dir| {
        std::fs::remove_file(dir.join("optimizer.safetensors")).unwrap();
    });
    let msg = run.refused(&ckpt);
    let file = ckpt.join("optimizer.safetensors").display().to_string();
    assert_names(
        &msg,
        &[&format!("cannot resume from {}: {file}: ", ckpt.display())],
    );

    let ckpt = run.copy("truncated", "checkpoint-1", |dir| {
        std::fs::write(dir.join("optimizer.safetensors"), [1u8, 2, 3]).unwrap();
    });
    let msg = run.refused(&ckpt);
    let file = ckpt.join("optimizer.safetensors").display().to_string();
    assert_names(
        &msg,
        &[&format!("cannot resume from {}: {file}: ", ckpt.display())],
    );
}

#[test]
fn missing_or_truncated_model_weights_name_the_file() {
    let mut run = interrupted(false);
    let ckpt = run.copy("missing", "checkpoint-1", |dir| {
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    });
    let msg = run.refused(&ckpt);
    let file = ckpt.join("model.safetensors").display().to_string();
    assert_names(&msg, &[&format!("{file}: not found")]);

    let ckpt = run.copy("truncated", "checkpoint-1", |dir| {
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    });
    let msg = run.refused(&ckpt);
    let file = ckpt.join("model.safetensors").display().to_string();
    assert_names(
        &msg,
        &[&format!("cannot resume from {}: {file}: ", ckpt.display())],
    );
}

#[test]
fn lora_checkpoint_and_full_model_config_mismatch_is_named() {
    let lora = interrupted(true);
    let mut full = interrupted(false);

    // A LoRA checkpoint resumed by a full-model config: the saved config says so first.
    let ckpt = lora.copy("lora-ckpt", "checkpoint-1", |_| {});
    let msg = full.refused(&ckpt);
    assert_names(&msg, &["lora.enabled = false (the run: true)", "orpo.toml"]);
    assert!(!msg.contains("lora.r"), "{msg}");

    // Without the saved config (older checkpoints), the weights' files say so.
    let no_config = |dir: &Path| std::fs::remove_file(dir.join("orpo.toml")).unwrap();
    let ckpt = lora.copy("lora-ckpt-old", "checkpoint-1", no_config);
    let msg = full.refused(&ckpt);
    assert_names(
        &msg,
        &[
            "adapter_model.safetensors",
            "checkpoint holds a LoRA adapter",
            "lora.enabled is false in this config",
        ],
    );

    // A full checkpoint resumed by a LoRA config.
    let mut lora = lora;
    let ckpt = full.copy("full-ckpt", "checkpoint-1", no_config);
    let msg = lora.refused(&ckpt);
    assert_names(
        &msg,
        &[
            "model.safetensors",
            "checkpoint holds a full model",
            "lora.enabled is true in this config",
        ],
    );

    // A LoRA checkpoint without its weights.
    let ckpt = lora.copy("no-adapter", "checkpoint-1", |dir| {
        std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    });
    let msg = lora.refused(&ckpt);
    let file = ckpt.join("adapter_model.safetensors").display().to_string();
    assert_names(
        &msg,
        &[&format!("cannot resume from {}: {file}: ", ckpt.display())],
    );
}

#[test]
fn a_config_that_changes_what_the_run_trains_is_refused_by_key() {
    let mut run = interrupted(false);
    let ckpt = run.ckpt.clone();
    let saved = ckpt.join("orpo.toml").display().to_string();

    run.trainer.config.optim.lr = 5e-4;
    run.trainer.config.orpo.beta = 0.5;
    let msg = run.refused(&ckpt);
    assert_names(
        &msg,
        &[
            "optim.lr = 0.0005 (the run: 0.001)",
            "orpo.beta = 0.5 (the run: 0.1)",
            &saved,
        ],
    );
    run.trainer.config = run.config.clone();

    // The same number of pairs in another order: the plan alone would not see it.
    run.trainer.train.pairs.reverse();
    let msg = run.refused(&ckpt);
    assert_names(&msg, &["the training pairs differ from the run's"]);
    run.trainer.train.pairs.reverse();

    // Where and how often it writes may change.
    run.trainer.config.train.log_every = orpo::config::Interval::Steps(2);
    run.trainer.config.train.save_every = orpo::config::Interval::Steps(1);
    run.trainer.config.train.save_total_limit = Some(1);
    run.trainer
        .run(Some(&ckpt), &AtomicBool::new(false))
        .unwrap();
}
