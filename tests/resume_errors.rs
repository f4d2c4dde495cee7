//! `orpo train --resume` refuses a broken checkpoint before training, with a message naming
//! the file (and the key) at fault; a valid one still resumes.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use orpo::config::Config;
use orpo::train::{load_trainer, Trainer};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// A 4-step run of tiny-opt (LoRA or not, with `extra` settings) writing into `out`.
fn config(out: &Path, lora: bool, extra: &[&str]) -> Config {
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
    sets.extend(extra.iter().map(|s| s.to_string()));
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
    interrupted_with(lora, &[])
}

fn interrupted_with(lora: bool, extra: &[&str]) -> Interrupted {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = config(&out, lora, extra);
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

    /// A copy of the checkpoint with optimizer.safetensors' tensors edited.
    fn with_optimizer(
        &self,
        case: &str,
        edit: impl FnOnce(&mut HashMap<String, Tensor>),
    ) -> PathBuf {
        self.copy(case, "checkpoint-1", |dir| {
            let path = dir.join("optimizer.safetensors");
            let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            edit(&mut t);
            candle_core::safetensors::save(&t, &path).unwrap();
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

/// Token counts no run could have (beyond JSON's exact integers) are refused by key, rather
/// than overflowing the resumed run's sums or logging nonsense.
#[test]
fn token_counts_beyond_any_run_are_refused() {
    let mut run = interrupted(false);
    for (key, value) in [
        ("pending_tokens", json!(u64::MAX)),
        ("total_tokens", json!(u64::MAX)),
        ("total_tokens", json!(1u64 << 63)),
        ("pending_tokens", json!((1u64 << 53) + 1)),
    ] {
        let ckpt = run.with_state(&format!("{key}-{value}"), |s| {
            s.insert(key.into(), value.clone());
        });
        let msg = run.refused(&ckpt);
        assert_names(
            &msg,
            &[
                &state_file(&ckpt),
                &format!("`{key}` is {value}, more tokens than any run holds"),
            ],
        );
    }
}

/// Histories out of order or past the checkpoint's step, and more pending step losses than
/// steps since the last logged line, are refused by key; a step-0 evaluation
/// (train.eval_on_start) and null (NaN) metrics still resume.
#[test]
fn inconsistent_histories_are_refused() {
    // Logged every 2 steps, evaluated at 0 and every step: checkpoint-1 holds evaluations at
    // steps 0 and 1, no logged line and one pending step loss.
    let extra = [
        "train.log_every=2",
        "train.eval_every=1",
        "train.eval_on_start=true",
        "data.eval_size=2",
    ];
    let mut run = interrupted_with(false, &extra);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(run.ckpt.join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    let evals = state["eval_history"].as_array().unwrap().clone();
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 1]);
    assert_eq!(state["log_history"], json!([]));
    assert_eq!(state["pending_losses"].as_array().unwrap().len(), 1);
    let at = |step: u64, mut e: Value| {
        e["step"] = json!(step);
        e
    };
    // A well-formed line as the run logs it.
    let mut log_line = json!({"step": 1, "epoch": 0.25, "loss": 1.0, "grad_norm": 1.0,
        "learning_rate": 1e-3, "tokens": 10, "elapsed_s": 1.0});
    for name in orpo::train::loss::METRIC_NAMES {
        log_line[name] = json!(0.5);
    }
    for (case, key, value, found) in [
        (
            "repeated",
            "eval_history",
            Value::Array(vec![evals[1].clone(); 10]),
            "entry 1 is at step 1, not after the previous entry's step 1",
        ),
        (
            "reversed",
            "eval_history",
            json!([evals[1], evals[0]]),
            "entry 1 is at step 0, not after the previous entry's step 1",
        ),
        (
            "eval-later",
            "eval_history",
            json!([evals[0], at(999, evals[1].clone())]),
            "entry 1 is at step 999, after the checkpoint's global_step 1",
        ),
        (
            "log-later",
            "log_history",
            json!([at(50, log_line.clone())]),
            "entry 0 is at step 50, after the checkpoint's global_step 1",
        ),
        (
            "log-reversed",
            "log_history",
            json!([log_line, at(0, log_line.clone())]),
            "entry 1 is at step 0, not after the previous entry's step 1",
        ),
        (
            "log-no-step",
            "log_history",
            json!([{"loss": 1.0}]),
            "entry 0 has no whole `step`",
        ),
        (
            "losses",
            "pending_losses",
            json!([1.0, 1.0, 1.0, 1.0, 1.0]),
            "holds 5 losses, but 1 step(s) passed since the last logged line",
        ),
        (
            "metrics",
            "pending_metrics",
            json!([]),
            "holds 0 micro-batches' metrics, fewer than the 1 steps in `pending_losses`",
        ),
    ] {
        let ckpt = run.with_state(case, |s| {
            s.insert(key.into(), value);
        });
        let msg = run.refused(&ckpt);
        assert_names(&msg, &[&state_file(&ckpt), &format!("`{key}` {found}")]);
    }
    // A line logged at step 1 leaves no step for a pending loss.
    let ckpt = run.with_state("logged", |s| {
        s.insert("log_history".into(), json!([log_line]));
    });
    let msg = run.refused(&ckpt);
    assert_names(
        &msg,
        &[
            &state_file(&ckpt),
            "`pending_losses` holds 1 losses, but 0 step(s) passed",
        ],
    );

    // As saved, with a NaN evaluation metric (written as null), it resumes.
    let ckpt = run.with_state("null-metric", |s| {
        s["eval_history"][1]["eval_loss"] = Value::Null;
    });
    let mut trainer = load_trainer(&run.config).unwrap();
    trainer.run(Some(&ckpt), &AtomicBool::new(false)).unwrap();
}

fn optimizer_file(ckpt: &Path) -> String {
    ckpt.join("optimizer.safetensors").display().to_string()
}

/// Replaces one value of a saved tensor.
fn poke(t: &mut HashMap<String, Tensor>, key: &str, at: usize, value: f32) {
    let old = &t[key];
    let mut v: Vec<f32> = old.flatten_all().unwrap().to_vec1().unwrap();
    v[at] = value;
    let new = Tensor::from_vec(v, old.shape(), &Device::Cpu).unwrap();
    t.insert(key.into(), new);
}

/// Damaged AdamW moments and step are refused naming optimizer.safetensors and the tensor,
/// before any training: missing, reshaped, non-finite or negative second moments, a step that
/// is no step count or not the checkpoint's, tensors of no parameter, or another file.
#[test]
fn damaged_optimizer_state_is_refused_by_tensor() {
    let mut run = interrupted(false);
    let bias = "model.decoder.layers.0.fc2.bias";
    let weight = "model.decoder.layers.1.fc1.weight";
    type Edit = Box<dyn FnOnce(&mut HashMap<String, Tensor>)>;
    let cases: Vec<(&str, Edit, String)> = vec![
        (
            "no-sq",
            Box::new(move |t| {
                t.remove(&format!("exp_avg_sq.{bias}"));
            }),
            format!("lacks `exp_avg_sq.{bias}`"),
        ),
        (
            "no-state",
            Box::new(move |t| {
                t.remove(&format!("exp_avg.{weight}"));
                t.remove(&format!("exp_avg_sq.{weight}"));
            }),
            format!("lacks `exp_avg.{weight}`"),
        ),
        (
            "reshaped",
            Box::new(move |t| {
                let k = format!("exp_avg.{bias}");
                let r = t[&k].reshape((32, 2)).unwrap();
                t.insert(k, r);
            }),
            format!("`exp_avg.{bias}` has shape [32, 2], not [64]"),
        ),
        (
            "inf",
            Box::new(move |t| poke(t, &format!("exp_avg.{weight}"), 5, f32::INFINITY)),
            format!("`exp_avg.{weight}` holds a non-finite value"),
        ),
        (
            "nan",
            Box::new(move |t| poke(t, &format!("exp_avg.{bias}"), 63, f32::NAN)),
            format!("`exp_avg.{bias}` holds a non-finite value"),
        ),
        (
            "negative-sq",
            Box::new(move |t| poke(t, &format!("exp_avg_sq.{weight}"), 0, -1e-9)),
            format!("`exp_avg_sq.{weight}` holds a negative or non-finite value"),
        ),
        (
            "nan-sq",
            Box::new(move |t| poke(t, &format!("exp_avg_sq.{bias}"), 1, f32::NAN)),
            format!("`exp_avg_sq.{bias}` holds a negative or non-finite value"),
        ),
        (
            "integer",
            Box::new(move |t| {
                let k = format!("exp_avg.{bias}");
                let r = t[&k].to_dtype(candle_core::DType::I64).unwrap();
                t.insert(k, r);
            }),
            format!("`exp_avg.{bias}` is I64, not floating point"),
        ),
        (
            "extra",
            Box::new(|t| {
                t.insert("exp_avg.lm_head.weight".into(), Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap());
            }),
            "holds `exp_avg.lm_head.weight`, no optimizer state of this model's trainable parameters".into(),
        ),
        (
            "step-nan",
            Box::new(|t| {
                t.insert("step".into(), Tensor::new(&[f64::NAN], &Device::Cpu).unwrap());
            }),
            "`step` is NaN, not a whole number of steps".into(),
        ),
        (
            "step-fraction",
            Box::new(|t| {
                t.insert("step".into(), Tensor::new(&[1.5f64], &Device::Cpu).unwrap());
            }),
            "`step` is 1.5, not a whole number of steps".into(),
        ),
        (
            "step-negative",
            Box::new(|t| {
                t.insert("step".into(), Tensor::new(&[-1f64], &Device::Cpu).unwrap());
            }),
            "`step` is -1, not a whole number of steps".into(),
        ),
        (
            "step-other",
            Box::new(|t| {
                t.insert("step".into(), Tensor::new(&[3f64], &Device::Cpu).unwrap());
            }),
            "`step` is 3, but the checkpoint's global_step is 1".into(),
        ),
        (
            "step-missing",
            Box::new(|t| {
                t.remove("step");
            }),
            "lacks `step`".into(),
        ),
    ];
    for (case, edit, found) in cases {
        let ckpt = run.with_optimizer(case, edit);
        let msg = run.refused(&ckpt);
        assert_names(&msg, &[&format!("{}: {found}", optimizer_file(&ckpt))]);
    }

    // The model's weights in place of the optimizer's state.
    let ckpt = run.copy("weights", "checkpoint-1", |dir| {
        std::fs::copy(
            dir.join("model.safetensors"),
            dir.join("optimizer.safetensors"),
        )
        .unwrap();
    });
    let msg = run.refused(&ckpt);
    assert_names(
        &msg,
        &[&format!(
            "{}: holds no AdamW moments",
            optimizer_file(&ckpt)
        )],
    );
}

/// The 8-bit optimizer's state (codes and absmax per moment; small tensors and embeddings in
/// f32) is checked alike: every part there, of its size and type, absmax values finite and
/// non-negative.
#[test]
fn damaged_8bit_optimizer_state_is_refused_by_tensor() {
    let mut run = interrupted_with(false, &["optim.optimizer=adamw_8bit"]);
    // 16,384 values: 64 blocks of 256.
    let w = "model.decoder.layers.0.fc1.weight";
    type Edit = Box<dyn FnOnce(&mut HashMap<String, Tensor>)>;
    let cases: Vec<(&str, Edit, String)> =
        vec![
        (
            "no-absmax",
            Box::new(move |t| {
                t.remove(&format!("exp_avg_sq_absmax.{w}"));
            }),
            format!("lacks `exp_avg_sq_absmax.{w}`"),
        ),
        (
            "no-codes",
            Box::new(move |t| {
                t.remove(&format!("exp_avg_8bit.{w}"));
            }),
            format!("lacks `exp_avg_8bit.{w}`"),
        ),
        (
            "short-absmax",
            Box::new(move |t| {
                let k = format!("exp_avg_absmax.{w}");
                let r = t[&k].narrow(0, 0, 63).unwrap();
                t.insert(k, r);
            }),
            format!("`exp_avg_absmax.{w}` has shape [63], not [64]"),
        ),
        (
            "f32-codes",
            Box::new(move |t| {
                let k = format!("exp_avg_sq_8bit.{w}");
                let r = t[&k].to_dtype(candle_core::DType::F32).unwrap();
                t.insert(k, r);
            }),
            format!("`exp_avg_sq_8bit.{w}` is F32, not U8"),
        ),
        (
            "negative-absmax",
            Box::new(move |t| poke(t, &format!("exp_avg_absmax.{w}"), 3, -0.5)),
            format!("`exp_avg_absmax.{w}` holds a negative or non-finite value"),
        ),
        (
            "inf-absmax",
            Box::new(move |t| poke(t, &format!("exp_avg_sq_absmax.{w}"), 63, f32::INFINITY)),
            format!("`exp_avg_sq_absmax.{w}` holds a negative or non-finite value"),
        ),
        (
            // The embedding keeps f32 moments under the 8-bit optimizer.
            "embedding",
            Box::new(|t| {
                poke(t, "exp_avg_sq.model.decoder.embed_tokens.weight", 7, f32::NAN)
            }),
            "`exp_avg_sq.model.decoder.embed_tokens.weight` holds a negative or non-finite value"
                .into(),
        ),
    ];
    for (case, edit, found) in cases {
        let ckpt = run.with_optimizer(case, edit);
        let msg = run.refused(&ckpt);
        assert_names(&msg, &[&format!("{}: {found}", optimizer_file(&ckpt))]);
    }
    // As saved, it resumes.
    let mut trainer = load_trainer(&run.config).unwrap();
    trainer
        .run(Some(&run.ckpt), &AtomicBool::new(false))
        .unwrap();
}
