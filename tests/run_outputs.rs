//! What a run writes beyond the goldens' numbers: evaluations during training, the log's
//! averaging over several steps, warmup by ratio, `--overwrite`, the sequence-length check and
//! `orpo eval`'s reading of a config's columns, the weights files' header.

mod common;

use common::*;
use orpo::config::Config;
use orpo::train::load_trainer;
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::AtomicBool;

fn data(name: &str) -> String {
    repo()
        .join("examples/data")
        .join(name)
        .display()
        .to_string()
}

fn config(out: &Path, extra: &[&str]) -> Config {
    let mut sets = vec![
        format!("model.id={}", model_dir("tiny-opt").display()),
        format!("train.output_dir={}", out.display()),
        format!("data.train={}", data("explicit-10.jsonl")),
        "train.batch_size=2".to_string(),
        "optim.lr=1e-3".to_string(),
        "data.max_length=256".to_string(),
        "data.max_prompt_length=192".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::from_toml_str("", "test.toml", &sets).unwrap()
}

fn train(config: &Config) {
    let mut trainer = load_trainer(config).unwrap();
    trainer.run(None, &AtomicBool::new(false)).unwrap();
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

fn close(a: f64, b: f64, rel: f64, what: &str) {
    assert!(
        (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-30),
        "{what}: {a} vs {b}"
    );
}

/// The metric keys of an evaluation, without its timings.
fn eval_metrics(v: &Value) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = v
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| {
            k.starts_with("eval_") && !k.contains("runtime") && !k.contains("per_second")
        })
        .map(|(k, x)| (k.clone(), x.as_f64().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn evaluations_during_training_are_the_checkpoints_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &[
            "train.max_steps=4",
            "train.eval_every=2",
            "train.save_every=2",
            &format!("data.eval={}", data("hh-rlhf-eval-16.jsonl")),
        ],
    );
    let mut trainer = load_trainer(&cfg).unwrap();
    let summary = trainer.run(None, &AtomicBool::new(false)).unwrap();
    let lines = json_lines(&tmp.path().join("eval_metrics.jsonl"));
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4]);
    assert!(f(&lines[0], "eval_loss") != f(&lines[1], "eval_loss"));

    // Each line is what `orpo eval` computes on the weights of that step.
    let held_out = trainer.eval.as_ref().unwrap();
    for (line, dir) in [
        (&lines[0], tmp.path().join("checkpoint-2")),
        (&lines[1], tmp.path().to_path_buf()),
    ] {
        let loaded = orpo::train::load_model(
            &dir.display().to_string(),
            None,
            None,
            Default::default(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let m = orpo::eval::evaluate(
            &loaded.model,
            held_out,
            2,
            cfg.orpo.beta,
            loaded.tokenizer.pad_id(),
            true,
            false,
        )
        .unwrap();
        for ((k, a), (_, b)) in eval_metrics(line).iter().zip(eval_metrics(&m.to_json())) {
            close(*a, b, 1e-12, &format!("{} {k}", dir.display()));
        }
    }
    let last: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("eval_metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(eval_metrics(&last), eval_metrics(&lines[1]));
    assert_eq!(summary.eval.unwrap().loss, f(&lines[1], "eval_loss"));
}

#[test]
fn evaluations_survive_an_interrupted_run() {
    let extra = [
        "train.max_steps=4",
        "train.eval_every=1",
        "train.batch_size=3",
        &format!("data.eval={}", data("hh-rlhf-eval-16.jsonl")),
    ];
    let full = tempfile::tempdir().unwrap();
    train(&config(full.path(), &extra));

    let cut = tempfile::tempdir().unwrap();
    let cfg = config(cut.path(), &extra);
    let mut first = load_trainer(&cfg).unwrap();
    // A pending stop request ends the run after its first step, with a checkpoint.
    assert!(first.run(None, &AtomicBool::new(true)).is_err());
    let ckpt = cut.path().join("checkpoint-1");
    let mut resumed = load_trainer(&cfg).unwrap();
    resumed.run(Some(&ckpt), &AtomicBool::new(false)).unwrap();

    let a = json_lines(&full.path().join("eval_metrics.jsonl"));
    let b = json_lines(&cut.path().join("eval_metrics.jsonl"));
    assert_eq!(a.len(), 4);
    assert_eq!(
        a.iter().map(eval_metrics).collect::<Vec<_>>(),
        b.iter().map(eval_metrics).collect::<Vec<_>>()
    );
    // Character for character, but for the timings.
    let timings = [
        "eval_runtime",
        "eval_samples_per_second",
        "eval_steps_per_second",
    ];
    let text = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    for f in ["eval_metrics.jsonl", "eval_metrics.json"] {
        assert_eq!(
            without_keys(&text(full.path(), f), &timings),
            without_keys(&text(cut.path(), f), &timings),
            "{f}"
        );
    }
    assert_eq!(
        without_keys(&text(full.path(), "metrics.jsonl"), &["elapsed_s"]),
        without_keys(&text(cut.path(), "metrics.jsonl"), &["elapsed_s"])
    );
}

#[test]
fn evaluating_during_training_needs_eval_data() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_trainer(&config(tmp.path(), &["train.eval_every=2"]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("train.eval_every") && err.contains("data.eval"),
        "{err}"
    );
}

/// 10 pairs in micro-batches of 2 with `grad_accum` 4: steps of 4 and 1 micro-batches.
#[test]
fn a_line_over_several_steps_averages_the_loss_by_step() {
    let extra = ["train.grad_accum=4", "train.shuffle=false"];
    let each = tempfile::tempdir().unwrap();
    train(&config(
        each.path(),
        &[&extra[..], &["train.log_every=1"]].concat(),
    ));
    let both = tempfile::tempdir().unwrap();
    train(&config(
        both.path(),
        &[&extra[..], &["train.log_every=2"]].concat(),
    ));
    let steps = json_lines(&each.path().join("metrics.jsonl"));
    let line = json_lines(&both.path().join("metrics.jsonl"));
    assert_eq!((steps.len(), line.len()), (2, 1));
    let (s1, s2, l) = (&steps[0], &steps[1], &line[0]);

    // transformers: the loss is averaged over steps ...
    let by_step = (f(s1, "loss") + f(s2, "loss")) / 2.0;
    let by_micro_batch = (4.0 * f(s1, "loss") + f(s2, "loss")) / 5.0;
    assert!(
        (by_step - by_micro_batch).abs() > 1e-6,
        "the two averages must differ here"
    );
    close(f(l, "loss"), by_step, 1e-12, "loss");
    // ... TRL's stored metrics over micro-batches.
    for key in [
        "rewards/margins",
        "nll_loss",
        "log_odds_ratio",
        "logits/chosen",
    ] {
        let want = (4.0 * f(s1, key) + f(s2, key)) / 5.0;
        close(f(l, key), want, 1e-12, key);
    }
    assert_eq!(
        l["tokens"].as_u64().unwrap(),
        s1["tokens"].as_u64().unwrap() + s2["tokens"].as_u64().unwrap()
    );
    close(f(l, "grad_norm"), f(s2, "grad_norm"), 0.0, "grad_norm");
}

#[test]
fn warmup_ratio_rounds_up_to_whole_steps() {
    let lrs = |extra: &[&str]| -> Vec<f64> {
        let tmp = tempfile::tempdir().unwrap();
        let base = [
            "train.max_steps=4",
            "train.log_every=1",
            "optim.scheduler=\"linear\"",
        ];
        train(&config(tmp.path(), &[&base[..], extra].concat()));
        json_lines(&tmp.path().join("metrics.jsonl"))
            .iter()
            .map(|l| f(l, "learning_rate"))
            .collect()
    };
    // ceil(4 * 0.3) = 2 warmup steps: 0, 1/2, then (4 - k) / 2.
    let by_ratio = lrs(&["optim.warmup_ratio=0.3"]);
    for (a, b) in by_ratio.iter().zip([0.0, 0.5e-3, 1e-3, 0.5e-3]) {
        close(*a, b, 1e-12, "learning_rate");
    }
    assert_eq!(by_ratio, lrs(&["optim.warmup_steps=2"]));
}

#[test]
fn overwrite_replaces_the_previous_run_once_the_new_one_is_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_set = format!("train.output_dir={}", out.display());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--config",
            "configs/tiny-opt.toml",
            "--set",
            &out_set,
        ];
        for e in extra {
            args.extend(["--set", e]);
        }
        orpo(&args)
    };
    let r = run(&["train.max_steps=5", "train.save_every=2"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.join("checkpoint-4").is_dir());

    // A new run that fails validation leaves the old one whole.
    let mut bad = vec!["train", "--config", "configs/tiny-opt.toml", "--overwrite"];
    bad.extend(["--set", &out_set, "--set", "data.train=no-such-file.jsonl"]);
    assert_eq!(orpo(&bad).status.code(), Some(2));
    assert!(out.join("checkpoint-4").is_dir());
    std::fs::write(out.join("notes.txt"), "mine").unwrap();

    let mut args = vec!["train", "--config", "configs/tiny-opt.toml", "--overwrite"];
    args.extend(["--set", &out_set, "--set", "train.max_steps=1"]);
    let r = orpo(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(!out.join("checkpoint-2").exists() && !out.join("checkpoint-4").exists());
    assert_eq!(json_lines(&out.join("metrics.jsonl")).len(), 1);
    assert!(out.join("model.safetensors").is_file());
    assert!(
        out.join("notes.txt").is_file(),
        "files of the user's own stay"
    );
}

#[test]
fn a_max_length_beyond_the_position_table_is_refused_only_for_a_sequence_that_long() {
    // tiny-opt has 512 positions; explicit-10's pairs are short, one HH-RLHF pair is not.
    let tmp = tempfile::tempdir().unwrap();
    let long = ["data.max_length=1024", "data.max_prompt_length=1024"];
    load_trainer(&config(tmp.path(), &long)).unwrap();
    let eval = format!("data.eval={}", data("hh-rlhf-eval-16.jsonl"));
    let err = load_trainer(&config(tmp.path(), &[&long[..], &[&eval]].concat()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("hh-rlhf-eval-16.jsonl:11") && err.contains("max_position_embeddings (512)"),
        "{err}"
    );
    // `orpo data`, which checks a dataset before a run, refuses it the same way.
    let cfg = tmp.path().join("long.toml");
    let text = config(tmp.path(), &[&long[..], &[&eval]].concat()).to_toml_string();
    std::fs::write(&cfg, text).unwrap();
    let r = orpo(&["data", "--config", &cfg.display().to_string()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("hh-rlhf-eval-16.jsonl:11") && err.contains("max_position_embeddings (512)"),
        "{err}"
    );
}

#[test]
fn eval_reads_the_data_with_the_configs_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let renamed = tmp.path().join("renamed.jsonl");
    let text: Vec<String> = std::fs::read_to_string(data("explicit-10.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"q": v["prompt"], "good": v["chosen"], "bad": v["rejected"]})
                .to_string()
        })
        .collect();
    std::fs::write(&renamed, text.join("\n")).unwrap();
    // No model.id: --model gives it.
    let cfg = tmp.path().join("cols.toml");
    std::fs::write(
        &cfg,
        "[data]\nprompt_column = \"q\"\nchosen_column = \"good\"\nrejected_column = \"bad\"\n",
    )
    .unwrap();
    let model = model_dir("tiny-opt").display().to_string();
    let loss = |args: &[&str]| -> f64 {
        let mut all = vec!["eval", "--model", &model, "--json"];
        all.extend(args);
        let r = orpo(&all);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let v: Value = serde_json::from_slice(&r.stdout).unwrap();
        f(&v, "eval_loss")
    };
    let want = loss(&["--data", &data("explicit-10.jsonl")]);
    let renamed = renamed.display().to_string();
    let cfg = cfg.display().to_string();
    assert_eq!(loss(&["--data", &renamed, "--config", &cfg]), want);
    let sets = [
        "--set",
        "data.prompt_column=q",
        "--set",
        "data.chosen_column=good",
        "--set",
        "data.rejected_column=bad",
    ];
    assert_eq!(
        loss(&[&["--data", renamed.as_str()][..], &sets[..]].concat()),
        want
    );
}

#[test]
fn a_tokenizer_with_ids_beyond_the_vocabulary_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    edited_copy("tiny-opt", &model, "config.json", |c| {
        c["vocab_size"] = 50.into();
    });
    let mut cfg = config(&tmp.path().join("run"), &[]);
    cfg.model.id = model.display().to_string();
    let err = load_trainer(&cfg).err().unwrap().to_string();
    assert!(
        err.contains("explicit-10.jsonl:1: token id") && err.contains("vocabulary (50 ids"),
        "{err}"
    );
    assert!(!tmp.path().join("run").exists());
}

#[test]
fn a_misspelt_lora_target_beside_a_matching_one_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("train.output_dir={}", tmp.path().join("run").display());
    let r = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "lora.enabled=true",
        "--set",
        "lora.targets=[\"q_proj\", \"v_prj\"]",
        "--set",
        "train.max_steps=1",
        "--set",
        &out,
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("lora.targets: `v_prj` matches no linear layer")
            && err.contains("adapted: q_proj"),
        "{err}"
    );
    // Logs that go to a pipe or a file carry no terminal colour codes.
    assert!(!err.contains('\x1b'), "{err:?}");
}

#[test]
fn an_output_dir_that_is_a_file_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("run");
    std::fs::write(&file, "not a folder").unwrap();
    let out = format!("train.output_dir={}", file.display());
    let r = orpo(&["train", "--config", "configs/tiny-opt.toml", "--set", &out]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("train.output_dir") && err.contains("is a file"),
        "{err}"
    );
}

/// The `__metadata__` of a safetensors file's header.
fn safetensors_metadata(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

fn safetensors_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(safetensors_files(&path));
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            out.push(path);
        }
    }
    out
}

#[test]
fn every_weights_file_says_it_is_pytorch_format() {
    // transformers before 4.48 calls `metadata.get("format")` on the header's metadata and
    // fails with "'NoneType' object has no attribute 'get'" on a file without it.
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let lora = tmp.path().join("lora");
    train(&config(&full, &["train.save_every=3", "train.max_steps=4"]));
    train(&config(
        &lora,
        &[
            "train.save_every=3",
            "train.max_steps=4",
            "lora.enabled=true",
        ],
    ));
    let mut files = safetensors_files(&full);
    files.extend(safetensors_files(&lora));
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(tmp.path()).unwrap().display().to_string())
        .collect();
    for name in [
        "full/model.safetensors",
        "full/checkpoint-3/model.safetensors",
        "full/checkpoint-3/optimizer.safetensors",
        "lora/adapter_model.safetensors",
        "lora/checkpoint-3/adapter_model.safetensors",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
    for path in &files {
        assert_eq!(
            safetensors_metadata(path),
            serde_json::json!({"format": "pt"}),
            "{}",
            path.display()
        );
    }
}

#[test]
fn evaluation_batches_follow_eval_batch_size() {
    // TRL's per_device_eval_batch_size: every eval_* metric but the loss is a mean over
    // micro-batches, so 10 pairs in batches of 3 (3, 3, 3, 1) and of 5 give different means.
    let model = model_dir("tiny-opt").display().to_string();
    let pairs = data("explicit-10.jsonl");
    let eval = |sets: &[&str]| -> Vec<(String, f64)> {
        let mut all = vec!["eval", "--model", &model, "--data", &pairs, "--json"];
        for s in sets {
            all.extend(["--set", s]);
        }
        let r = orpo(&all);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        eval_metrics(&serde_json::from_slice(&r.stdout).unwrap())
    };
    let by_train_batch = eval(&["train.batch_size=3"]);
    assert_eq!(
        eval(&["train.batch_size=5", "train.eval_batch_size=3"]),
        by_train_batch
    );
    assert_ne!(
        eval(&["train.batch_size=3", "train.eval_batch_size=5"]),
        by_train_batch
    );

    // During training too: the final evaluation equals `orpo eval` of the saved model, which
    // takes the run's settings from its orpo.toml (batches of 3, beta, lengths that truncate).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let sets = [
        "train.max_steps=2".to_string(),
        "train.eval_batch_size=3".to_string(),
        "orpo.beta=0.5".to_string(),
        "data.max_length=48".to_string(),
        "data.max_prompt_length=24".to_string(),
        format!("data.eval={pairs}"),
    ];
    train(&config(
        &out,
        &sets.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let last: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_metrics.json")).unwrap())
            .unwrap();
    let saved = out.display().to_string();
    let eval_saved = |sets: &[&str]| {
        let mut all = vec!["eval", "--model", &saved, "--data", &pairs, "--json"];
        for s in sets {
            all.extend(["--set", s]);
        }
        let r = orpo(&all);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        eval_metrics(&serde_json::from_slice(&r.stdout).unwrap())
    };
    let again = eval_saved(&[]);
    for ((k, a), (_, b)) in eval_metrics(&last).iter().zip(&again) {
        close(*a, *b, 1e-5, k);
    }
    // --set still overrides the run's settings.
    let rebatched = eval_saved(&["train.eval_batch_size=5"]);
    assert_ne!(rebatched, again);
    let with_config = {
        let cfg = tmp.path().join("eval.toml");
        std::fs::write(&cfg, "[train]\neval_batch_size = 5\n[orpo]\nbeta = 0.5\n[data]\nmax_length = 48\nmax_prompt_length = 24\n").unwrap();
        let cfg = cfg.display().to_string();
        let r = orpo(&[
            "eval", "--model", &saved, "--data", &pairs, "--json", "--config", &cfg,
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        eval_metrics(&serde_json::from_slice(&r.stdout).unwrap())
    };
    // A --config replaces the run's settings: there, the same as --set gave.
    assert_eq!(with_config, rebatched);
}

#[test]
fn a_configured_chat_template_trains_and_is_saved_with_the_model() {
    // tiny-opt has no template; chat rows need one, which data.chat_template gives (as TRL
    // recipes' `chat_template`), and the trained model keeps.
    let tmp = tempfile::tempdir().unwrap();
    let template =
        std::fs::read_to_string(model_dir("tiny-llama3").join("chat_template.jinja")).unwrap();
    let file = tmp.path().join("chat.jinja");
    std::fs::write(&file, &template).unwrap();
    let chat = fixtures()
        .join("golden/pairs-chat.jsonl")
        .display()
        .to_string();
    let run_with = |out: &str, extra: &[String], flags: &[String]| {
        let mut args = vec![
            "train".to_string(),
            "--config".into(),
            "configs/tiny-opt.toml".into(),
        ];
        args.extend(flags.iter().cloned());
        let mut sets = vec![
            format!("train.output_dir={}", tmp.path().join(out).display()),
            format!("data.train={chat}"),
            "train.max_steps=1".into(),
            "train.eval_every=0".into(),
        ];
        sets.extend(extra.iter().cloned());
        for s in sets {
            args.extend(["--set".to_string(), s]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        orpo(&args)
    };
    let run = |out: &str, extra: &[String]| run_with(out, extra, &[]);
    let without = run("a", &[]);
    assert_eq!(without.status.code(), Some(2));
    let err = String::from_utf8_lossy(&without.stderr);
    assert!(err.contains("data.chat_template"), "{err}");

    let with = run(
        "b",
        &[
            format!("data.chat_template={}", file.display()),
            "train.max_steps=2".into(),
            "train.save_every=1".into(),
        ],
    );
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let saved = tmp.path().join("b");
    assert_eq!(
        std::fs::read_to_string(saved.join("chat_template.jinja")).unwrap(),
        template
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(saved.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["chat_template"].as_str(), Some(template.as_str()));

    // The template file moved: the checkpoint's pairs decide, so the run resumes.
    let moved = tmp.path().join("moved.jinja");
    std::fs::rename(&file, &moved).unwrap();
    let resumed = run_with(
        "b",
        &[
            format!("data.chat_template={}", moved.display()),
            "train.max_steps=2".into(),
            "train.save_every=1".into(),
        ],
        &[
            "--resume".into(),
            saved.join("checkpoint-1").display().to_string(),
        ],
    );
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );

    let missing = run("c", &["data.chat_template=no-such.jinja".into()]);
    assert_eq!(missing.status.code(), Some(2));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("data.chat_template") && err.contains("neither a file nor a Jinja template"),
        "{err}"
    );
}

#[test]
fn a_schedule_with_arguments_sets_each_steps_rate() {
    // cosine_with_min_lr (min_lr_rate 0.1) over 10 steps with 2 of warmup: each line's
    // learning_rate is the rate its step trained with, transformers' get_scheduler values.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    train(&config(
        &out,
        &[
            "train.batch_size=1",
            "train.shuffle=false",
            "train.log_every=1",
            "optim.scheduler=cosine_with_min_lr",
            "optim.min_lr_rate=0.1",
            "optim.warmup_steps=2",
        ],
    ));
    let want = [
        0.0,
        0.0005,
        0.001,
        0.000965745789630079,
        0.0008681980515339464,
        0.0007222075445642904,
        0.00055,
        0.0003777924554357096,
        0.00023180194846605365,
        0.00013425421036992097,
    ];
    let got: Vec<f64> = json_lines(&out.join("metrics.jsonl"))
        .iter()
        .map(|l| f(l, "learning_rate"))
        .collect();
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        close(*g, w, 1e-12, &format!("step {}", k + 1));
    }
}

/// Every scalar of the run's TensorBoard event file, by (step, tag), and how many event files
/// `dir` holds.
fn tensorboard_scalars(dir: &Path) -> (std::collections::BTreeMap<(u64, String), f32>, usize) {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for f in &files {
        for ev in orpo::train::tensorboard::read_events(f).unwrap() {
            for (tag, v) in ev.values {
                out.insert((ev.step, tag), v);
            }
        }
    }
    (out, files.len())
}

#[test]
fn tensorboard_holds_the_logged_lines_and_a_resumed_run_rewrites_them() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = data("explicit-10.jsonl");
    let sets = |out: &Path| {
        config(
            out,
            &[
                "train.max_steps=4",
                "train.log_every=1",
                "train.eval_every=2",
                "train.report_to=tensorboard",
                &format!("data.eval={pairs}"),
            ],
        )
    };
    let full = tmp.path().join("full");
    train(&sets(&full));
    let (scalars, files) = tensorboard_scalars(&full);
    assert_eq!(files, 1);
    // Each line of metrics.jsonl and eval_metrics.jsonl under transformers' tags.
    let mut expected = 0;
    for (file, prefix) in [("metrics.jsonl", "train/"), ("eval_metrics.jsonl", "eval/")] {
        for line in json_lines(&full.join(file)) {
            let step = line["step"].as_u64().unwrap();
            for (key, v) in line.as_object().unwrap() {
                if key == "step" || (prefix == "eval/" && key == "epoch") {
                    continue;
                }
                let tag = format!("{prefix}{}", key.strip_prefix("eval_").unwrap_or(key));
                let got = scalars.get(&(step, tag.clone()));
                assert_eq!(got, Some(&(v.as_f64().unwrap() as f32)), "{tag} at {step}");
                expected += 1;
            }
        }
    }
    assert!(expected > 40, "{expected}");

    // Resumed from step 3 (past an evaluation) of a run that went on: one file, the same
    // curves (times apart), each tag's steps rising as TensorBoard needs them.
    let cut = tmp.path().join("cut");
    let mut config = sets(&cut);
    config.train.save_every = orpo::config::Interval::Steps(3);
    train(&config);
    let mut resumed = load_trainer(&config).unwrap();
    resumed
        .run(Some(&cut.join("checkpoint-3")), &AtomicBool::new(false))
        .unwrap();
    let (again, files) = tensorboard_scalars(&cut);
    assert_eq!(files, 1);
    let file = std::fs::read_dir(&cut)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("tfevents"))
        .unwrap();
    let mut last_step = std::collections::HashMap::new();
    for ev in orpo::train::tensorboard::read_events(&file).unwrap() {
        for (tag, _) in ev.values {
            let before = last_step.insert(tag.clone(), ev.step).unwrap_or(0);
            assert!(ev.step >= before, "{tag}: step {} after {before}", ev.step);
        }
    }
    let timing =
        |t: &str| t.ends_with("elapsed_s") || t.contains("runtime") || t.contains("per_second");
    let untimed = |m: &std::collections::BTreeMap<(u64, String), f32>| {
        m.iter()
            .filter(|((_, t), _)| !timing(t))
            .map(|(k, v)| (k.clone(), *v))
            .collect::<Vec<_>>()
    };
    assert_eq!(untimed(&again), untimed(&scalars));

    // --overwrite clears them with the rest of the run.
    orpo::train::run_dir::clear_run(&cut).unwrap();
    assert_eq!(tensorboard_scalars(&cut).1, 0);
}

#[test]
fn held_out_pairs_are_evaluated_during_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = config(
        &out,
        &[
            "data.eval_size=3",
            "train.eval_every=2",
            "train.max_steps=4",
        ],
    );
    let mut trainer = load_trainer(&config).unwrap();
    assert_eq!(trainer.train.pairs.len(), 7);
    assert_eq!(trainer.eval.as_ref().map(|e| e.pairs.len()), Some(3));
    trainer.run(None, &AtomicBool::new(false)).unwrap();
    let evals = json_lines(&out.join("eval_metrics.jsonl"));
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4]);
    assert!(evals.iter().all(|e| e["eval_pairs"] == 3), "{evals:?}");
}

#[test]
fn epoch_intervals_save_and_evaluate_at_each_epochs_end() {
    // 7 training pairs in batches of 2 with grad_accum 2: 2 steps an epoch (the second of one
    // micro-batch of 2 and one of 1); 2.5 epochs are ceil(2.5 × 2) = 5 steps, as
    // transformers' num_train_epochs = 2.5. transformers' "epoch" strategies then save and
    // evaluate after steps 2 and 4 and the last.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = config(
        &out,
        &[
            "data.eval_size=3",
            "train.grad_accum=2",
            "train.epochs=2.5",
            "train.shuffle=false",
            "train.log_every=1",
            "train.eval_every=epoch",
            "train.save_every=epoch",
        ],
    );
    train(&config);
    let steps = |file: &str| -> Vec<(u64, f64)> {
        json_lines(&out.join(file))
            .iter()
            .map(|e| (e["step"].as_u64().unwrap(), f(e, "epoch")))
            .collect()
    };
    assert_eq!(
        steps("metrics.jsonl"),
        [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0), (5, 2.5)]
    );
    assert_eq!(steps("eval_metrics.jsonl"), [(2, 1.0), (4, 2.0), (5, 2.5)]);
    let mut checkpoints: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    checkpoints.sort();
    // At each epoch's end, the third cut short by the run's length (transformers' save at
    // the end).
    assert_eq!(
        checkpoints,
        ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    );
    // The run resumed from the first epoch's checkpoint ends where it did.
    let again = tmp.path().join("again");
    let mut config2 = config.clone();
    config2.train.output_dir = again.display().to_string();
    std::fs::create_dir(&again).unwrap();
    copy_dir(&out.join("checkpoint-2"), &again.join("checkpoint-2"));
    let mut trainer = load_trainer(&config2).unwrap();
    trainer
        .run(Some(&again.join("checkpoint-2")), &AtomicBool::new(false))
        .unwrap();
    assert_eq!(
        std::fs::read(again.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
}

/// Each tensor's dtype in a safetensors file, by name.
fn stored_dtypes(path: &Path) -> std::collections::BTreeMap<String, candle_core::DType> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.dtype()))
        .collect()
}

#[test]
fn the_final_model_is_saved_in_save_dtype_and_checkpoints_in_f32() {
    use candle_core::DType;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = config(
        &out,
        &[
            "train.max_steps=2",
            "train.save_every=1",
            "train.save_dtype=bf16",
        ],
    );
    let mut trainer = load_trainer(&config).unwrap();
    trainer.run(None, &AtomicBool::new(false)).unwrap();
    let saved =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    // The f32 master weights rounded to bf16, every one.
    let params = trainer.model.params();
    assert!(!saved.is_empty());
    for (name, t) in &saved {
        assert_eq!(t.dtype(), DType::BF16, "{name}");
        let master = params
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is no parameter"))
            .1
            .as_tensor()
            .to_dtype(DType::BF16)
            .unwrap();
        let f32 = |t: &candle_core::Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(max_diff(&f32(t), &f32(&master)), 0.0, "{name}");
    }
    let config_json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config_json["dtype"], "bfloat16");
    assert!(config_json.get("torch_dtype").is_none());
    // The checkpoint keeps the masters for an exact resume.
    let ckpt = out.join("checkpoint-1");
    assert!(stored_dtypes(&ckpt.join("model.safetensors"))
        .values()
        .all(|d| *d == DType::F32));
    let ckpt_config: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(ckpt_config["dtype"], "float32");
    // A bf16 model evaluates like any other.
    let r = orpo(&[
        "eval",
        "--model",
        &out.display().to_string(),
        "--data",
        &data("explicit-10.jsonl"),
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // `auto` follows the base: config.json's dtype, here bf16 in a copy of the f16 fixture.
    let base = tmp.path().join("base");
    edited_copy("tiny-opt", &base, "config.json", |c| {
        c["dtype"] = "bfloat16".into();
    });
    let auto = tmp.path().join("auto");
    let mut config = config.clone();
    config.model.id = base.display().to_string();
    config.train.output_dir = auto.display().to_string();
    config.train.save_dtype = orpo::config::SaveDtype::Auto;
    config.train.save_every = orpo::config::Interval::Never;
    train(&config);
    assert!(stored_dtypes(&auto.join("model.safetensors"))
        .values()
        .all(|d| *d == DType::BF16));
    // ... and the fixture itself (float16 on file and in config.json) saves f16.
    let plain = tmp.path().join("plain");
    config.model.id = model_dir("tiny-opt").display().to_string();
    config.train.output_dir = plain.display().to_string();
    train(&config);
    assert!(stored_dtypes(&plain.join("model.safetensors"))
        .values()
        .all(|d| *d == DType::F16));
}

#[test]
fn a_saved_model_passes_on_the_bases_sentencepiece_files() {
    // llama.cpp's GGUF converter (and transformers' slow tokenizers) read tokenizer.model;
    // orpo does not, but the model it saves must keep it.
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for entry in std::fs::read_dir(model_dir("tiny-llama3")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, base.join(p.file_name().unwrap())).unwrap();
    }
    let spm = b"\x0a\x05<unk>not really a sentencepiece model".to_vec();
    let added = br#"{"<|extra|>": 1005}"#.to_vec();
    std::fs::write(base.join("tokenizer.model"), &spm).unwrap();
    std::fs::write(base.join("added_tokens.json"), &added).unwrap();
    let chat = fixtures()
        .join("golden/pairs-chat.jsonl")
        .display()
        .to_string();
    let run = |out: &Path, model: &Path, extra: &[&str]| {
        let mut sets = vec![
            format!("model.id={}", model.display()),
            format!("data.train={chat}"),
            "train.max_steps=2".to_string(),
            "train.save_every=1".to_string(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let mut config = config(out, &[]);
        config = config.with_overrides("test", &sets).unwrap();
        train(&config);
    };
    let full = tmp.path().join("full");
    run(&full, &base, &[]);
    for dir in [full.clone(), full.join("checkpoint-1")] {
        assert_eq!(std::fs::read(dir.join("tokenizer.model")).unwrap(), spm);
        assert_eq!(std::fs::read(dir.join("added_tokens.json")).unwrap(), added);
    }
    // A merged adapter too.
    let lora = tmp.path().join("lora");
    run(&lora, &base, &["lora.enabled=true"]);
    let merged = tmp.path().join("merged");
    let (b, a, m) = (
        base.display().to_string(),
        lora.display().to_string(),
        merged.display().to_string(),
    );
    let r = orpo(&["merge", "--base", &b, "--adapter", &a, "--out", &m]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(merged.join("tokenizer.model")).unwrap(), spm);
    // A model without them saved over it (as --overwrite: tokenizer files stay until then):
    // no stale tokenizer.model of the other model.
    orpo::train::run_dir::clear_run(&full).unwrap();
    assert!(full.join("tokenizer.model").exists());
    run(&full, &model_dir("tiny-llama3"), &[]);
    assert!(!full.join("tokenizer.model").exists());
    assert!(!full.join("added_tokens.json").exists());
}
