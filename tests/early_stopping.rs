//! `train.early_stopping_patience` (transformers' `EarlyStoppingCallback`), `eval_on_start`
//! and `logging_first_step` in whole runs: where a run stops, what it keeps, and resumed runs
//! that decide as the uninterrupted one. TRL's own numbers for them are in
//! tests/golden_log_eval.rs.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// tiny-opt for 10 steps, evaluated and saved every 2, the best by the smallest reward margin
/// (margins grow as it trains, so the first evaluation stays the best) with a patience of 2:
/// the evaluations at 4 and 6 do not improve and the run stops at step 6.
fn train(out: &Path, extra: &[&str], flags: &[&str]) -> std::process::Output {
    let out_dir = format!("train.output_dir={}", out.display());
    let mut sets = vec![
        "train.max_steps=10",
        "train.log_every=3",
        "train.eval_every=2",
        "train.save_every=2",
        "train.load_best_model_at_end=true",
        "train.metric_for_best_model=rewards/margins",
        "train.greater_is_better=false",
        "train.early_stopping_patience=2",
        "optim.lr=3e-3",
        out_dir.as_str(),
    ];
    sets.extend_from_slice(extra);
    let run = train_tiny_opt(&sets, flags);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    run
}

fn steps(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|l| l["step"].as_u64().unwrap()).collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The lines of a JSON Lines file without their wall-clock keys.
fn timeless(path: &Path) -> Vec<Value> {
    json_lines(path)
        .into_iter()
        .map(|mut l| {
            let m = l.as_object_mut().unwrap();
            m.retain(|k, _| {
                !(k == "elapsed_s" || k.contains("runtime") || k.contains("per_second"))
            });
            l
        })
        .collect()
}

/// A copy of `from`'s checkpoints at `at` in a new output_dir: the run as an interrupt left it.
fn cut_after(from: &Path, to: &Path, at: &[u64]) {
    for step in at {
        let name = format!("checkpoint-{step}");
        copy_dir(&from.join(&name), &to.join(&name));
    }
}

#[test]
fn the_run_stops_after_patience_evaluations_without_improvement() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = train(&out, &[], &[]);
    let evals = json_lines(&out.join("eval_metrics.jsonl"));
    let margins: Vec<f64> = evals
        .iter()
        .map(|e| e["eval_rewards/margins"].as_f64().unwrap())
        .collect();
    assert!(
        margins.windows(2).all(|w| w[0] < w[1]),
        "the test expects margins growing: {margins:?}"
    );
    // Stopped at 6 of 10: no evaluation at the end beyond the one that stopped it, and the
    // steps since the last logged line (4..6) logged at the stop.
    assert_eq!(steps(&evals), [2, 4, 6]);
    assert_eq!(steps(&json_lines(&out.join("metrics.jsonl"))), [3, 6]);
    assert_eq!(checkpoint_steps(&out), [2, 4, 6]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("stopping early"), "{stderr}");
    // The final model is the best checkpoint's, as load_best_model_at_end has it.
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoint-2/model.safetensors")).unwrap()
    );
    assert_eq!(read_json(&out.join("eval_metrics.json"))["step"], 2);

    // A threshold every improvement falls short of, on a metric that does improve: greater
    // margins are better here, yet none beats the best by 10, so the run stops at 6 too.
    let high = tmp.path().join("high");
    train(
        &high,
        &[
            "train.greater_is_better=true",
            "train.early_stopping_threshold=10",
        ],
        &[],
    );
    assert_eq!(
        steps(&json_lines(&high.join("eval_metrics.jsonl"))),
        [2, 4, 6]
    );
}

/// An interrupted run resumed before its stop stops where the uninterrupted one did; one
/// resumed from the checkpoint of the evaluation that stopped it trains no further step.
#[test]
fn a_resumed_run_stops_where_the_whole_run_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let first = ["train.logging_first_step=true", "train.eval_on_start=true"];
    train(&whole, &first, &[]);
    let evals = timeless(&whole.join("eval_metrics.jsonl"));
    assert_eq!(steps(&evals), [0, 2, 4, 6]);
    assert_eq!(evals[0]["epoch"].as_f64(), Some(0.0));
    let log = timeless(&whole.join("metrics.jsonl"));
    assert_eq!(steps(&log), [1, 3, 6]);
    for at in [&[2u64, 4][..], &[2, 4, 6][..]] {
        let cut = tmp.path().join(format!("cut-{}", at.len()));
        cut_after(&whole, &cut, at);
        train(&cut, &first, &["--resume"]);
        // No second evaluation at the start: the step-0 one is in the checkpoint's history.
        assert_eq!(timeless(&cut.join("eval_metrics.jsonl")), evals, "{at:?}");
        assert_eq!(timeless(&cut.join("metrics.jsonl")), log, "{at:?}");
        assert_eq!(checkpoint_steps(&cut), [2, 4, 6], "{at:?}");
        assert_eq!(
            std::fs::read(cut.join("model.safetensors")).unwrap(),
            std::fs::read(whole.join("model.safetensors")).unwrap(),
            "{at:?}"
        );
    }
}

/// A NaN evaluation metric is written as null; a checkpoint holding one resumes (it used to
/// be refused as malformed).
#[test]
fn a_checkpoint_with_a_nan_metric_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    train(&whole, &["train.early_stopping_patience=0"], &[]);
    let cut = tmp.path().join("cut");
    cut_after(&whole, &cut, &[2, 4]);
    let state_path = cut.join("checkpoint-4/trainer_state.json");
    let mut state = read_json(&state_path);
    state["eval_history"][0]["eval_logits/chosen"] = Value::Null;
    state["log_history"][0]["logps/rejected"] = Value::Null;
    std::fs::write(&state_path, state.to_string()).unwrap();
    train(&cut, &["train.early_stopping_patience=0"], &["--resume"]);
    let evals = json_lines(&cut.join("eval_metrics.jsonl"));
    assert!(evals[0]["eval_logits/chosen"].is_null());
    assert!(json_lines(&cut.join("metrics.jsonl"))[0]["logps/rejected"].is_null());
    assert_eq!(
        std::fs::read(cut.join("model.safetensors")).unwrap(),
        std::fs::read(whole.join("model.safetensors")).unwrap()
    );
}

/// Under `save_every = "epoch"` a run that early stopping ends mid-epoch still ends that epoch
/// as transformers does (`on_epoch_end` after the loop), with a checkpoint at the stopping step;
/// the best metric alone (no load_best) leaves that checkpoint the only one.
#[test]
fn an_epoch_schedule_saves_where_early_stopping_ends_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // 16 steps an epoch (64 pairs in fours): no epoch ends within the 10 steps.
    train(
        &out,
        &[
            "train.save_every=epoch",
            "train.load_best_model_at_end=false",
        ],
        &[],
    );
    assert_eq!(
        steps(&json_lines(&out.join("eval_metrics.jsonl"))),
        [2, 4, 6]
    );
    assert_eq!(checkpoint_steps(&out), [6]);
    let state = read_json(&out.join("checkpoint-6/trainer_state.json"));
    assert_eq!(state["best_global_step"], 2);
    // The last step's weights are the final model (nothing is loaded without load_best).
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoint-6/model.safetensors")).unwrap()
    );
}
