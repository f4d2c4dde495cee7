//! `train.load_best_model_at_end` (transformers' `load_best_model_at_end`,
//! `metric_for_best_model`, `greater_is_better`, with `save_total_limit`): which checkpoint is
//! the best, which checkpoints stay, which weights the final model holds, and a resumed run.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// tiny-opt for 10 steps, evaluated and saved every 2, the best by the smallest reward
/// margin (the first evaluation's here: margins grow as it trains), at most one checkpoint
/// (`extra` settings come after these and override them).
fn train(out: &Path, extra: &[&str], flags: &[&str]) -> std::process::Output {
    let out_dir = format!("train.output_dir={}", out.display());
    let mut sets = vec![
        "train.max_steps=10",
        "train.eval_every=2",
        "train.save_every=2",
        "train.save_total_limit=1",
        "train.load_best_model_at_end=true",
        "train.metric_for_best_model=rewards/margins",
        "train.greater_is_better=false",
        "optim.lr=3e-3",
        out_dir.as_str(),
    ];
    sets.extend_from_slice(extra);
    train_tiny_opt(&sets, flags)
}

fn state(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap()
}

#[test]
fn the_final_model_is_the_best_checkpoint_and_survives_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = train(&out, &[], &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let evals = json_lines(&out.join("eval_metrics.jsonl"));
    let margins: Vec<f64> = evals
        .iter()
        .map(|e| e["eval_rewards/margins"].as_f64().unwrap())
        .collect();
    assert_eq!(evals.len(), 5);
    assert!(
        margins.windows(2).all(|w| w[0] < w[1]),
        "the test expects margins growing: {margins:?}"
    );
    // The best (step 2) outlives the limit of 1, and at the end transformers deletes every
    // other checkpoint.
    assert_eq!(checkpoint_steps(&out), [2]);
    let s = state(&out.join("checkpoint-2"));
    assert_eq!(s["best_model_checkpoint"], "checkpoint-2");
    assert_eq!(s["best_global_step"], 2);
    assert_eq!(s["best_metric"].as_f64(), Some(margins[0]));
    // The final model is checkpoint-2's weights; eval_metrics.json its evaluation.
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoint-2/model.safetensors")).unwrap()
    );
    let reported: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_metrics.json")).unwrap())
            .unwrap();
    assert_eq!(reported["step"], 2);
    assert_eq!(reported["eval_rewards/margins"].as_f64(), Some(margins[0]));

    // Greater is better: the last evaluation is the best, so the final model is the last
    // step's own, and eval_metrics.json its evaluation. transformers saves a checkpoint at
    // the last step and keeps only it at a limit of 1.
    let out = tmp.path().join("greater");
    let run = train(&out, &["train.greater_is_better=true"], &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(checkpoint_steps(&out), [10]);
    assert_eq!(
        state(&out.join("checkpoint-10"))["best_model_checkpoint"],
        "checkpoint-10"
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoint-10/model.safetensors")).unwrap()
    );
    let reported: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_metrics.json")).unwrap())
            .unwrap();
    assert_eq!(reported["step"], 10);
}

/// A run resumed after its best checkpoint picks the same one: the best so far is in each
/// checkpoint's trainer_state.json.
#[test]
fn a_resumed_run_loads_the_same_best_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let keep_all = ["train.save_total_limit=10"];
    let whole = tmp.path().join("whole");
    assert!(train(&whole, &keep_all, &[]).status.success());
    // The run cut after step 8: its checkpoints as they were then.
    let cut = tmp.path().join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    for step in [2, 4, 6, 8] {
        let name = format!("checkpoint-{step}");
        copy_dir(&whole.join(&name), &cut.join(&name));
    }
    let resumed = train(&cut, &keep_all, &["--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        std::fs::read(cut.join("model.safetensors")).unwrap(),
        std::fs::read(whole.join("model.safetensors")).unwrap()
    );
    assert_eq!(checkpoint_steps(&cut), [2, 4, 6, 8, 10]);
    assert_eq!(checkpoint_steps(&whole), [2, 4, 6, 8, 10]);
    assert_eq!(
        std::fs::read(cut.join("model.safetensors")).unwrap(),
        std::fs::read(cut.join("checkpoint-2/model.safetensors")).unwrap()
    );
}

/// `train.save_every = "best"` (transformers' `save_strategy = "best"`): a checkpoint at each
/// evaluation better than all before it, on any evaluation schedule.
#[test]
fn checkpoints_at_new_best_evaluations_only() {
    let tmp = tempfile::tempdir().unwrap();
    // Margins grow: with the smallest the best, only the first evaluation is one.
    let out = tmp.path().join("smallest");
    let sets = [
        "train.save_every=best",
        "train.eval_every=3",
        "train.save_total_limit=10",
    ];
    let run = train(&out, &sets, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(checkpoint_steps(&out), [3]);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoint-3/model.safetensors")).unwrap()
    );
    // With the largest, every evaluation is a new best, the last step's too: a checkpoint at
    // each, each its own best.
    let out = tmp.path().join("largest");
    let mut more = sets.to_vec();
    more.push("train.greater_is_better=true");
    let run = train(&out, &more, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(checkpoint_steps(&out), [3, 6, 9, 10]);
    for step in [3, 6, 9, 10] {
        let s = state(&out.join(format!("checkpoint-{step}")));
        assert_eq!(s["best_global_step"], step);
        assert_eq!(s["best_model_checkpoint"], format!("checkpoint-{step}"));
    }
}

/// `train.save_only_model` (transformers' `save_only_model`): checkpoints without optimizer
/// state, from which the best model still loads, and from which no run resumes.
#[test]
fn model_only_checkpoints_serve_the_best_model_but_no_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let sets = ["train.save_only_model=true", "train.save_total_limit=10"];
    let run = train(&out, &sets, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(checkpoint_steps(&out), [2, 4, 6, 8, 10]);
    for step in [2, 4, 6, 8, 10] {
        let dir = out.join(format!("checkpoint-{step}"));
        assert!(dir.join("model.safetensors").is_file());
        assert!(!dir.join("optimizer.safetensors").exists(), "{step}");
        assert_eq!(state(&dir)["save_only_model"], true);
    }
    // The smallest margins are the first evaluation's: its weights are the final model.
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoint-2/model.safetensors")).unwrap()
    );
    let ckpt = out.join("checkpoint-4");
    let ckpt = ckpt.to_string_lossy();
    let r = train(&out, &sets, &["--resume", &ckpt]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("save_only_model") && err.contains("checkpoint-4"),
        "{err}"
    );
}
