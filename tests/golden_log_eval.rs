//! `orpo train` with `train.log_every > 1`, `train.eval_every` and `optim.warmup_ratio` against
//! TRL's log (tests/fixtures/golden/extra/tiny-opt.log-eval.trl.json, from
//! scripts/trl_log_golden.py): every logged line (the loss averaged over the window's steps, the
//! other metrics over its micro-batches, an epoch's partial last step inside a window) and every
//! evaluation (each `eval_steps` steps and transformers' one at the last step); and the same
//! with the pairs shuffled as transformers' Trainer shuffles them
//! (tiny-opt.shuffled.trl.json); a run of 2.5 epochs that evaluates and saves at each
//! epoch's end (`"epoch"` strategies, tiny-opt.epochs.trl.json); the same run logging,
//! evaluating and saving at fractions of its steps (tiny-opt.fractions.trl.json); and
//! transformers' best model (`load_best_model_at_end`, `save_strategy="best"`), early stopping
//! (`EarlyStoppingCallback`), `eval_on_start` and `logging_first_step` (tiny-opt.best*,
//! tiny-opt.save-best, tiny-opt.early-stop*, tiny-opt.first-step): the checkpoints left, the
//! best fields in each, which weights are final and where a run stops.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// The golden's settings as `--set` overrides (TRL has no prompt truncation: orpo's
/// `max_prompt_length` is `max_length`, and the script checks that no prompt fills it).
fn overrides(s: &Value, out: &Path) -> Vec<String> {
    let str_of = |k: &str| match &s[k] {
        Value::String(v) => v.clone(),
        v => v.to_string(),
    };
    vec![
        format!("model.id={}", str_of("model")),
        "model.device=cpu".into(),
        "model.dtype=f32".into(),
        format!("data.train={}", str_of("train")),
        format!("data.eval={}", str_of("eval")),
        format!("data.max_length={}", s["max_length"]),
        format!("data.max_prompt_length={}", s["max_length"]),
        format!("orpo.beta={}", s["beta"]),
        format!("optim.lr={}", s["lr"]),
        format!("optim.scheduler={}", str_of("scheduler")),
        "optim.warmup_steps=0".into(),
        format!("optim.warmup_ratio={}", s["warmup_ratio"]),
        format!("optim.weight_decay={}", s["weight_decay"]),
        format!("optim.max_grad_norm={}", s["max_grad_norm"]),
        format!("train.batch_size={}", s["batch"]),
        format!("train.grad_accum={}", s["grad_accum"]),
        // Goldens of a run's length in epochs (a fraction) hold no `steps`.
        match s.get("epochs") {
            Some(e) => format!("train.epochs={e}"),
            None => format!("train.max_steps={}", s["steps"]),
        },
        // Goldens from before the script's shuffle=/seed= settings read the pairs in file order.
        format!("train.shuffle={}", s["shuffle"].as_u64().unwrap_or(0) == 1),
        format!("train.seed={}", s["seed"].as_u64().unwrap_or(0)),
        format!("train.log_every={}", s["logging_steps"]),
        match s.get("eval_strategy").and_then(Value::as_str) {
            Some("epoch") => "train.eval_every=epoch".into(),
            _ => format!("train.eval_every={}", s["eval_steps"]),
        },
        match s.get("save_strategy").and_then(Value::as_str) {
            Some("epoch") => "train.save_every=epoch".into(),
            Some("best") => "train.save_every=best".into(),
            // The script saves each save_steps (else eval_steps) steps.
            Some("steps") => format!(
                "train.save_every={}",
                s.get("save_steps").unwrap_or(&s["eval_steps"])
            ),
            _ => "train.save_every=0".into(),
        },
        format!("train.output_dir={}", out.display()),
    ]
    .into_iter()
    .chain(best_model_overrides(s))
    .collect()
}

/// The script's `load_best` settings (transformers' `load_best_model_at_end`,
/// `metric_for_best_model`, `greater_is_better`, `save_total_limit`), as orpo's keys.
fn best_model_overrides(s: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if s["load_best"].as_u64() == Some(1) {
        out.push("train.load_best_model_at_end=true".to_string());
    }
    if let Some(m) = s["metric"].as_str().filter(|m| !m.is_empty()) {
        out.push(format!("train.metric_for_best_model={m}"));
    }
    // Written as 0/1 by older goldens, as a JSON bool by later ones.
    let greater = &s["greater_is_better"];
    if let Some(g) = greater.as_bool().or(greater.as_u64().map(|g| g == 1)) {
        out.push(format!("train.greater_is_better={g}"));
    }
    if let Some(n) = s["save_total_limit"].as_u64().filter(|&n| n > 0) {
        out.push(format!("train.save_total_limit={n}"));
    }
    if let Some(d) = s["eval_delay"].as_f64() {
        out.push(format!("train.eval_delay={d}"));
    }
    // transformers' EarlyStoppingCallback, eval_on_start, logging_first_step and
    // dataloader_drop_last.
    if let Some(n) = s["patience"].as_u64().filter(|&n| n > 0) {
        out.push(format!("train.early_stopping_patience={n}"));
        out.push(format!(
            "train.early_stopping_threshold={}",
            s["threshold"].as_f64().unwrap_or(0.0)
        ));
    }
    for (key, ours) in [
        ("eval_on_start", "train.eval_on_start"),
        ("logging_first_step", "train.logging_first_step"),
        ("drop_last", "train.dataloader_drop_last"),
    ] {
        if s[key].as_u64() == Some(1) {
            out.push(format!("{ours}=true"));
        }
    }
    out
}

/// A golden's JSON list of whole numbers (steps).
fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// Every numeric key of each golden line against the same line of `got`.
/// `rel`: the tolerance of the metrics that are not differences of log-probabilities.
fn compare(what: &str, got: &[Value], want: &[Value], skip: impl Fn(&str) -> bool, rel: f64) {
    let steps =
        |v: &[Value]| -> Vec<u64> { v.iter().map(|e| e["step"].as_u64().unwrap()).collect() };
    assert_eq!(steps(got), steps(want), "{what}: the steps of the lines");
    for (g, w) in got.iter().zip(want) {
        let step = w["step"].as_u64().unwrap();
        for (key, wv) in w.as_object().unwrap() {
            if key == "step" || skip(key) {
                continue;
            }
            let gv = g[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{what} step {step}: no number `{key}` in {g}"));
            // Margins and log_odds_chosen are differences of two nearly equal log-probabilities
            // (about -6.7 each, apart by under 0.05): f32 rounding of the operands, which agree
            // within 1e-6 relative, is up to 3e-4 of the difference (golden_train.rs's 2e-3),
            // or ~1.5e-5 absolute where the difference itself nears zero (5e-4 at one step of
            // the epochs golden).
            let difference = key.ends_with("rewards/margins") || key.ends_with("log_odds_chosen");
            let (rel, abs) = if difference {
                (rel.max(2e-3), 2e-5)
            } else {
                (rel, 1e-6)
            };
            assert_close(
                &format!("{what} step {step} {key}"),
                gv,
                wv.as_f64().unwrap(),
                rel,
                abs,
            );
        }
    }
}

fn golden_of(name: &str) -> Value {
    let path = fixtures().join("golden/extra").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Trains with the golden's settings and compares the logs; returns the golden and the run's
/// folder (in a temporary folder the caller keeps).
fn check(golden: &str, extra: &[&str]) -> (Value, tempfile::TempDir) {
    check_within(golden, extra, 1e-4)
}

/// `check` with `rel` as the logs' relative tolerance.
fn check_within(golden: &str, extra: &[&str], rel: f64) -> (Value, tempfile::TempDir) {
    let g = golden_of(golden);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut sets = overrides(&g["settings"], &out);
    sets.extend(extra.iter().map(|s| s.to_string()));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let run = train_tiny_opt(&sets, &[]);
    assert!(
        run.status.success(),
        "orpo train failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );

    let want_log = g["train_log"].as_array().unwrap();
    let want_eval = g["eval_log"].as_array().unwrap();
    // The golden pins the windows this test is about.
    assert!(want_log.len() >= 3 && want_eval.len() >= 2);
    let mut got_log = json_lines(&out.join("metrics.jsonl"));
    // A run whose length is not a multiple of the window logs its last steps too (TRL only
    // folds them into train_loss), as does one that stops early: that line is orpo's own.
    let total = g["early_stopping"]["stopped_at"]
        .as_u64()
        .or(g["max_steps"].as_u64())
        .or(g["settings"]["steps"].as_u64());
    let last_logged = want_log.last().and_then(|e| e["step"].as_u64());
    if total != last_logged && got_log.last().and_then(|e| e["step"].as_u64()) == total {
        got_log.pop();
    }
    compare("metrics.jsonl", &got_log, want_log, |_| false, rel);
    let timing = |k: &str| k.contains("runtime") || k.contains("per_second");
    compare(
        "eval_metrics.jsonl",
        &json_lines(&out.join("eval_metrics.jsonl")),
        want_eval,
        timing,
        rel,
    );
    // eval_metrics.json is the last evaluation (with load_best_model_at_end, the loaded
    // model's: best_model_goldens checks it).
    let last: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_metrics.json")).unwrap())
            .unwrap();
    if g.get("best").is_none() {
        compare(
            "eval_metrics.json",
            &[last],
            &want_eval[want_eval.len() - 1..],
            timing,
            rel,
        );
    }
    (g, tmp)
}

/// A `load_best_model_at_end` golden: the checkpoints left (TRL's, the last step's among them
/// when it wrote one there), the best evaluation each holds, the final model's parameter norms
/// (the loaded checkpoint's, or the last step's) and its evaluation.
fn check_best_model(golden: &str) {
    // 20 steps at lr 1e-2 or 2e-2 (margins that peak mid-run, by 15% or more over the
    // runner-up): f32 rounding grows to ~4e-3 in a late grad_norm, so the numbers are held
    // to 1e-2 and the choices (steps, folders, which weights) exactly.
    let (g, tmp) = check_within(golden, &[], 1e-2);
    let out = tmp.path().join("run");
    let best = &g["best"];
    let trl = u64s(&g["checkpoints"]);
    assert_eq!(checkpoint_steps(&out), trl, "{golden}: checkpoints left");
    for step in &trl {
        let name = format!("checkpoint-{step}");
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(&name).join("trainer_state.json")).unwrap(),
        )
        .unwrap();
        let want = &best["checkpoint_states"][&name];
        assert_eq!(
            state["best_global_step"], want["best_global_step"],
            "{name}"
        );
        assert_eq!(
            state["best_model_checkpoint"], want["best_model_checkpoint"],
            "{name}"
        );
        assert_close(
            &format!("{golden} {name} best_metric"),
            state["best_metric"].as_f64().unwrap(),
            want["best_metric"].as_f64().unwrap(),
            1e-2,
            2e-5,
        );
    }
    // The final model: the loaded checkpoint's weights, byte for byte, or (nothing loaded)
    // the last step's, which only a checkpoint written at that step holds (the run's end, or
    // where early stopping ended it).
    let model = std::fs::read(out.join("model.safetensors")).unwrap();
    let held = |step: u64| {
        std::fs::read(out.join(format!("checkpoint-{step}/model.safetensors"))).unwrap()
    };
    match best["loaded_checkpoint"].as_str() {
        Some(name) => {
            let step: u64 = name.strip_prefix("checkpoint-").unwrap().parse().unwrap();
            assert!(
                model == held(step),
                "{golden}: the final model is not {name}"
            );
        }
        None => {
            let last = u64s(&best["final_weights_saved_at"]);
            for &s in &trl {
                assert_eq!(
                    model == held(s),
                    last.contains(&s),
                    "{golden}: the final model against checkpoint-{s}"
                );
            }
        }
    }
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_metrics.json")).unwrap())
            .unwrap();
    for (key, w) in g["eval_after_training"].as_object().unwrap() {
        if !key.starts_with("eval_") || key.contains("runtime") || key.contains("per_second") {
            continue;
        }
        let difference = key.ends_with("rewards/margins") || key.ends_with("log_odds_chosen");
        let abs = if difference { 2e-5 } else { 1e-6 };
        let rel = 1e-2;
        let got = eval[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{golden}: eval_metrics.json lacks {key}"));
        assert_close(
            &format!("{golden} final {key}"),
            got,
            w.as_f64().unwrap(),
            rel,
            abs,
        );
    }
    let weights =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for (name, w) in g["final_param_norms"].as_object().unwrap() {
        // Rounding noise in both libraries (an exactly-zero gradient): see golden_train.rs.
        if name.ends_with("k_proj.bias") {
            continue;
        }
        let t = &weights[name];
        let norm = t
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert_close(
            &format!("{golden} final norm {name}"),
            norm as f64,
            w.as_f64().unwrap(),
            1e-2,
            1e-6,
        );
    }
}

#[test]
fn the_best_checkpoint_is_kept_and_loaded_as_trl_does() {
    // Margins peak at step 8 of 20 (evaluations and checkpoints every 4, at most one kept):
    // checkpoint-8 outlives the limit and is the final model.
    check_best_model("tiny-opt.best.trl.json");
}

#[test]
fn a_best_evaluation_between_checkpoints_loads_the_last_best_checkpoint() {
    // Evaluations every 3 steps, checkpoints every 6: the best evaluation (step 9) has no
    // checkpoint, so transformers loads checkpoint-6, the best one written.
    check_best_model("tiny-opt.best-unsaved.trl.json");
}

#[test]
fn a_first_best_evaluation_without_a_checkpoint_keeps_the_last_weights() {
    // The best evaluation is the first (step 5), before any checkpoint: nothing is loaded.
    check_best_model("tiny-opt.best-unsaved-first.trl.json");
}

#[test]
fn checkpoints_at_each_new_best_evaluation_as_trl_saves_them() {
    // save_strategy = "best" (evaluations every 4 steps, margins best at 8): checkpoints at 4
    // and 8 only, the limit of 1 leaving checkpoint-8, which is the final model.
    check_best_model("tiny-opt.save-best.trl.json");
}

#[test]
fn early_stopping_ends_the_run_where_trl_stops() {
    // Margins peak at step 8 (evaluations and checkpoints every 4) and a patience of 2 ends
    // the run at step 16 of 20; checkpoint-8 is the final model.
    check_best_model("tiny-opt.early-stop.trl.json");
}

#[test]
fn early_stopping_counts_improvements_below_the_threshold_as_none() {
    // eval_loss improves at every evaluation (every 3 steps); with a threshold of 0.2 those
    // at 12 and 15 do not count, and a patience of 2 ends the run at step 15 of 30. A metric
    // without load_best_model_at_end: the final model is step 15's, and with a limit of 1
    // its checkpoint, the best, is the one left.
    let g = golden_of("tiny-opt.early-stop-threshold.trl.json");
    assert_eq!(g["early_stopping"]["stopped_at"], 15);
    check_best_model("tiny-opt.early-stop-threshold.trl.json");
}

#[test]
fn a_best_evaluation_that_stops_the_run_without_a_checkpoint_is_not_the_final_model() {
    // The same run saving every 6 steps with load_best_model_at_end: step 15 stops it and is
    // the best, but has no checkpoint (transformers saves at the end only at the run's full
    // length), so checkpoint-12 is loaded and is the one a limit of 1 leaves.
    let g = golden_of("tiny-opt.early-stop-best-unsaved.trl.json");
    assert_eq!(g["best"]["best_global_step"], 15);
    assert_eq!(g["best"]["loaded_checkpoint"], "checkpoint-12");
    check_best_model("tiny-opt.early-stop-best-unsaved.trl.json");
}

#[test]
fn an_evaluation_at_the_start_is_logged_and_never_the_best() {
    // eval_on_start and logging_first_step: an evaluation at step 0 and a line for step 1.
    // The best is by the greatest loss, which the initial weights have, yet transformers
    // picks step 4: the evaluation at the start takes no part.
    let g = golden_of("tiny-opt.first-step.trl.json");
    assert_eq!(g["eval_log"][0]["step"], 0);
    assert_eq!(g["train_log"][0]["step"], 1);
    assert_eq!(g["best"]["best_global_step"], 4);
    check_best_model("tiny-opt.first-step.trl.json");
}

#[test]
fn an_eval_delay_skips_the_early_evaluations_as_trl() {
    // eval_delay 7 with evaluations and checkpoints every 3 of 15 steps: evaluations at 9, 12
    // and 15 only; the checkpoints at 3 and 6 hold no evaluation, and a limit of 2 with the
    // margins as the metric leaves 12 and 15.
    let (g, tmp) = check("tiny-opt.eval-delay.trl.json", &[]);
    let evals: Vec<u64> = g["eval_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [9, 12, 15]);
    let trl = u64s(&g["checkpoints"]);
    assert_eq!(checkpoint_steps(&tmp.path().join("run")), trl);
}

#[test]
fn dropping_each_epochs_short_last_batch_matches_trl() {
    // dataloader_drop_last over 2 epochs of 64 shuffled pairs in batches of 6: 10 micro-batches
    // an epoch (each epoch's permutation loses its last 4), steps of 3, 3, 3 and 1, and
    // evaluations over 2 batches of the 16 held-out pairs. Without it an epoch has 11
    // micro-batches and every line moves.
    let (g, tmp) = check("tiny-opt.drop-last.trl.json", &[]);
    assert_eq!(g["settings"]["drop_last"], 1);
    assert_eq!(g["max_steps"], 8);
    assert_eq!(g["train_log"][0]["epoch"], 0.6);
    let evals = json_lines(&tmp.path().join("run/eval_metrics.jsonl"));
    assert!(evals.iter().all(|e| e["eval_pairs"] == 12), "{evals:?}");
}

#[test]
fn log_windows_evaluations_and_warmup_ratio_match_trl() {
    check("tiny-opt.log-eval.trl.json", &[]);
}

#[test]
fn a_shuffled_run_trains_on_trls_batches() {
    // The Trainer's own order (accelerate's seeded sampler, torch.randperm per epoch) over
    // nearly four epochs of 64 pairs with seed 42: any other order changes every line.
    check("tiny-opt.shuffled.trl.json", &[]);
}

#[test]
fn epoch_strategies_and_a_fractional_epoch_count_match_trl() {
    // num_train_epochs 2.5 over 4 steps an epoch: ceil(2.5 × 4) = 10 steps, the last ending
    // 6 of the third epoch's 11 micro-batches in; evaluations at steps 4, 8 and the last.
    let (g, tmp) = check("tiny-opt.epochs.trl.json", &[]);
    let out = tmp.path().join("run");
    assert_eq!(json_lines(&out.join("metrics.jsonl")).len(), 10);
    // TRL saves checkpoint-4, -8 and -10 (the last step's under any save schedule), and the
    // final model at the run's root.
    let trl = u64s(&g["checkpoints"]);
    assert_eq!(trl, [4, 8, 10]);
    assert_eq!(checkpoint_steps(&out), trl);
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn fractions_of_the_run_as_log_eval_and_save_intervals_match_trl() {
    // transformers' logging/eval/save steps below 1 over the 10-step run: ceil(2.5) = 3,
    // ceil(4.5) = 5 and ceil(7.0) = 7. TRL logs at 3, 6 and 9, evaluates at 5 and the last
    // step, and saves at 7 and 10 (the last step).
    let (g, tmp) = check("tiny-opt.fractions.trl.json", &[]);
    assert_eq!(
        g["resolved_steps"],
        serde_json::json!({"logging": 3, "eval": 5, "save": 7})
    );
    let out = tmp.path().join("run");
    let logged: Vec<u64> = json_lines(&out.join("metrics.jsonl"))
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, [3, 6, 9, 10]);
    let checkpoints = checkpoint_steps(&out);
    assert_eq!(checkpoints, [7, 10]);
    assert_eq!(g["checkpoints"], serde_json::json!([7, 10]));
}
