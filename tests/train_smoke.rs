//! End-to-end behaviour beyond the goldens: every trainable tensor moves after one step, a saved
//! model reloads to identical logits, and the binary's commands and exit codes.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use orpo::config::Config;
use orpo::model::CausalLm;
use orpo::train::load_trainer;
use orpo::train::plan::{Plan, ShuffleOrder};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

fn tiny_config(model: &str, out: &Path, extra: &[&str]) -> Config {
    let mut sets = vec![
        format!("model.id={}", model_dir(model).display()),
        format!("train.output_dir={}", out.display()),
        "train.max_steps=1".to_string(),
        "train.batch_size=2".to_string(),
        "optim.lr=1e-3".to_string(),
        "optim.weight_decay=0.1".to_string(),
        "data.max_length=256".to_string(),
        "data.max_prompt_length=192".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let data = repo().join("examples/data/explicit-10.jsonl");
    sets.push(format!("data.train={}", data.display()));
    Config::from_toml_str("", "test.toml", &sets).unwrap()
}

#[test]
fn every_trainable_tensor_changes_after_one_step() {
    // tiny-opt-legacy holds tiny-opt's weights in another file set.
    for name in MODELS.into_iter().filter(|&m| m != "tiny-opt-legacy") {
        let tmp = tempfile::tempdir().unwrap();
        let config = tiny_config(name, tmp.path(), &["train.log_every=1"]);
        let mut trainer = load_trainer(&config).unwrap();
        let before = trainer.model.params().snapshot().unwrap();
        trainer.run(None, &AtomicBool::new(false)).unwrap();
        for (pname, var) in trainer.model.params().iter() {
            let diff = (var.as_tensor() - &before[pname])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff > 0.0, "{name}: {pname} did not change");
        }
    }
}

#[test]
fn saved_model_reloads_to_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config("tiny-qwen2", tmp.path(), &[]);
    let mut trainer = load_trainer(&config).unwrap();
    trainer.run(None, &AtomicBool::new(false)).unwrap();
    let reloaded = CausalLm::load(tmp.path(), &Device::Cpu).unwrap();
    let ids = Tensor::new(
        &[[5u32, 17, 300, 42, 9], [7, 8, 9, 1000, 1000]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let a = trainer.model.logits(&ids, &mask).unwrap();
    let b = reloaded.logits(&ids, &mask).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.jsonl",
        "training_curves.svg",
    ] {
        assert!(tmp.path().join(f).is_file(), "missing {f}");
    }
}

/// Above the shard size the weights are written as transformers shards them; they load back
/// identical, and a later save in the other layout removes the first one's files.
#[test]
fn sharded_weights_round_trip_and_replace_each_other() {
    use orpo::train::shard::{save_weights, INDEX, SINGLE};
    let model = CausalLm::load(&model_dir("tiny-opt"), &Device::Cpu).unwrap();
    let tensors = || -> Vec<(String, Tensor)> {
        model
            .params()
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_tensor().detach()))
            .collect()
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(
        model_dir("tiny-opt").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let files = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("safetensors"))
            .collect();
        v.sort();
        v
    };
    let same_weights = |dir: &Path| {
        let back = CausalLm::load(dir, &Device::Cpu).unwrap();
        assert_eq!(back.params().len(), model.params().len());
        for (name, var) in model.params().iter() {
            let b = back.params().get(name).unwrap();
            assert_eq!(max_diff(var.as_tensor(), b.as_tensor()), 0.0, "{name}");
        }
    };
    // ~0.8 MB of f32 weights in shards of at most 200 kB.
    save_weights(dir, tensors(), 200_000).unwrap();
    let sharded = files(dir);
    assert!(sharded.len() > 3, "{sharded:?}");
    assert!(sharded.contains(&INDEX.to_string()));
    assert!(!sharded.contains(&SINGLE.to_string()));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(INDEX)).unwrap()).unwrap();
    let n = sharded.len() - 1;
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), model.params().len());
    assert!(map
        .values()
        .all(|f| sharded.contains(&f.as_str().unwrap().to_string())));
    assert!(sharded
        .iter()
        .any(|f| f == &format!("model-00001-of-{n:05}.safetensors")));
    let total: usize = model.params().iter().map(|(_, v)| v.elem_count() * 4).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    same_weights(dir);
    // One file now: the shards and index go.
    save_weights(dir, tensors(), u64::MAX).unwrap();
    assert_eq!(files(dir), vec![SINGLE.to_string()]);
    same_weights(dir);
    // And back.
    save_weights(dir, tensors(), 200_000).unwrap();
    assert_eq!(files(dir), sharded);
    same_weights(dir);
}

#[test]
fn cli_train_eval_and_data() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let out_set = format!("train.output_dir={}", out_dir.display());
    let r = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.save_every=2",
        "--set",
        &out_set,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let lines = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    assert!(out_dir.join("checkpoint-2/model.safetensors").is_file());
    assert!(out_dir.join("checkpoint-2/optimizer.safetensors").is_file());
    assert!(out_dir.join("checkpoint-2/trainer_state.json").is_file());

    // A second run into the same folder is refused unless --overwrite.
    let again = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "train.max_steps=1",
        "--set",
        &out_set,
    ]);
    assert_eq!(again.status.code(), Some(2));

    let model = out_dir.to_string_lossy().into_owned();
    let r = orpo(&[
        "eval",
        "--model",
        &model,
        "--data",
        "examples/data/hh-rlhf-eval-16.jsonl",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8_lossy(&r.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(v["eval_loss"].as_f64().unwrap().is_finite());
    assert!(v["eval_rewards/accuracies"].is_number());

    let r = orpo(&["data", "--config", "configs/tiny-opt.toml"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// A reader that goes away (`orpo data | head`, `orpo train 2>&1 | head -1`) ends a report
/// quietly with success and leaves a training run going: no panic on the broken pipe.
#[test]
fn a_closed_pipe_ends_a_report_quietly_and_leaves_training_running() {
    let bin = env!("CARGO_BIN_EXE_orpo");
    let mut child = Command::new(bin)
        .args(["data", "--config", "configs/tiny-opt.toml", "--show", "64"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the report (written once the data is tokenized) starts.
    drop(child.stdout.take());
    let r = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{:?}: {err}", r.status);
    assert!(!err.contains("panicked"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let out_set = format!("train.output_dir={}", out_dir.display());
    let mut child = Command::new(bin)
        .args(["train", "--config", "configs/tiny-opt.toml"])
        .args(["--set", "train.max_steps=2", "--set", &out_set])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(out_dir.join("model.safetensors").is_file());
    assert!(out_dir.join("eval_metrics.json").is_file());
}

#[test]
fn cli_refuses_bad_config_with_exit_code_2() {
    let r = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "optim.lrr=1e-3",
    ]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("optim.lr"), "{err}");
    let r = orpo(&["train", "--config", "does-not-exist.toml"]);
    assert_eq!(r.status.code(), Some(2));
    // An output_dir that is the model's own folder: refused, --overwrite or not, and the
    // weights untouched.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&model_dir("tiny-opt"), &model);
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let id = format!("model.id={}", model.display());
    let out = format!("train.output_dir={}/", model.display());
    for flag in [None, Some("--overwrite")] {
        let mut args = vec!["train", "--config", "configs/tiny-opt.toml"];
        args.extend(["--set", &id, "--set", &out]);
        args.extend(flag);
        let r = orpo(&args);
        assert_eq!(r.status.code(), Some(2), "{flag:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("model.id reads the weights from"), "{err}");
    }
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
}

#[test]
fn interrupted_run_resumes_bit_identical() {
    let extra = [
        "train.max_steps=4",
        "train.shuffle=true",
        "train.log_every=3",
        "train.batch_size=3",
    ];
    let full_dir = tempfile::tempdir().unwrap();
    let mut full = load_trainer(&tiny_config("tiny-opt", full_dir.path(), &extra)).unwrap();
    full.run(None, &AtomicBool::new(false)).unwrap();

    let cut_dir = tempfile::tempdir().unwrap();
    let config = tiny_config("tiny-opt", cut_dir.path(), &extra);
    let mut first = load_trainer(&config).unwrap();
    // A stop request that is already pending stops the run after its first step.
    let err = first.run(None, &AtomicBool::new(true)).err().unwrap();
    assert!(
        matches!(err, orpo::Error::Interrupted { step: 1, .. }),
        "{err}"
    );
    let ckpt = cut_dir.path().join("checkpoint-1");
    assert!(ckpt.join("optimizer.safetensors").is_file());
    assert!(!cut_dir.path().join("model.safetensors").exists());

    let mut resumed = load_trainer(&config).unwrap();
    resumed.run(Some(&ckpt), &AtomicBool::new(false)).unwrap();
    let a = std::fs::read(full_dir.path().join("model.safetensors")).unwrap();
    let b = std::fs::read(cut_dir.path().join("model.safetensors")).unwrap();
    assert!(a == b, "resumed model differs from the uninterrupted one");
    let log_a = std::fs::read_to_string(full_dir.path().join("metrics.jsonl")).unwrap();
    let log_b = std::fs::read_to_string(cut_dir.path().join("metrics.jsonl")).unwrap();
    // The text itself, every digit (a value read back from a checkpoint and rewritten must
    // not move in its last place), but for the wall time.
    assert_eq!(
        without_keys(&log_a, &["elapsed_s"]),
        without_keys(&log_b, &["elapsed_s"])
    );
}

/// A checkpoint written for an interrupt is off the save schedule: it prunes no scheduled
/// checkpoint, and the resumed run removes it once it has written a later checkpoint or
/// finished, so an interrupted run leaves the checkpoints an uninterrupted one leaves.
#[test]
fn an_interrupts_checkpoint_leaves_the_scheduled_ones_as_they_were() {
    let extra = [
        "train.max_steps=8",
        "train.save_every=2",
        "train.save_total_limit=3",
        "train.shuffle=false",
    ];
    let full_dir = tempfile::tempdir().unwrap();
    let full_cfg = tiny_config("tiny-opt", full_dir.path(), &extra);
    load_trainer(&full_cfg)
        .unwrap()
        .run(None, &AtomicBool::new(false))
        .unwrap();
    assert_eq!(checkpoint_steps(full_dir.path()), [4, 6, 8]);
    let state = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap())
            .unwrap()
    };
    assert!(state(&full_dir.path().join("checkpoint-6"))
        .get("interrupt")
        .is_none());

    // The run as it stood at step 4, interrupted during step 5 (a stop already pending: one
    // step, then the checkpoint).
    let cut_dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("tiny-opt", cut_dir.path(), &extra);
    let four = cut_dir.path().join("checkpoint-4");
    copy_dir(&full_dir.path().join("checkpoint-4"), &four);
    let err = load_trainer(&cfg)
        .unwrap()
        .run(Some(&four), &AtomicBool::new(true))
        .err()
        .unwrap();
    assert!(
        matches!(err, orpo::Error::Interrupted { step: 5, .. }),
        "{err}"
    );
    // Nothing pruned for it (checkpoint-2 is gone only because the copy began at 4).
    assert_eq!(checkpoint_steps(cut_dir.path()), [4, 5]);
    assert_eq!(
        state(&cut_dir.path().join("checkpoint-5"))["interrupt"],
        true
    );
    let five = cut_dir.path().join("checkpoint-5");
    load_trainer(&cfg)
        .unwrap()
        .run(Some(&five), &AtomicBool::new(false))
        .unwrap();
    // checkpoint-6 replaced the interrupt's; the run ends with the whole run's checkpoints
    // (checkpoint-4 copied in, -6 and the last step's written) and its model.
    assert_eq!(checkpoint_steps(cut_dir.path()), [4, 6, 8]);
    assert_eq!(
        std::fs::read(cut_dir.path().join("model.safetensors")).unwrap(),
        std::fs::read(full_dir.path().join("model.safetensors")).unwrap()
    );

    // Without a save schedule: the interrupt's checkpoint goes when the resumed run ends,
    // leaving none, as the uninterrupted run.
    let unsaved = ["train.max_steps=3", "train.shuffle=false"];
    let whole_dir = tempfile::tempdir().unwrap();
    let whole_cfg = tiny_config("tiny-opt", whole_dir.path(), &unsaved);
    load_trainer(&whole_cfg)
        .unwrap()
        .run(None, &AtomicBool::new(false))
        .unwrap();
    assert!(checkpoint_steps(whole_dir.path()).is_empty());
    let late_dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("tiny-opt", late_dir.path(), &unsaved);
    let mut first = load_trainer(&cfg).unwrap();
    assert!(first.run(None, &AtomicBool::new(true)).is_err());
    assert_eq!(checkpoint_steps(late_dir.path()), [1]);
    let one = late_dir.path().join("checkpoint-1");
    load_trainer(&cfg)
        .unwrap()
        .run(Some(&one), &AtomicBool::new(false))
        .unwrap();
    assert!(checkpoint_steps(late_dir.path()).is_empty());
    assert_eq!(
        std::fs::read(late_dir.path().join("model.safetensors")).unwrap(),
        std::fs::read(whole_dir.path().join("model.safetensors")).unwrap()
    );
}

#[test]
fn sigkilled_cli_run_resumes_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &Path| {
        vec![
            "train".to_string(),
            "--config".into(),
            "configs/tiny-opt.toml".into(),
            "--set".into(),
            "train.max_steps=12".into(),
            "--set".into(),
            "train.save_every=2".into(),
            "--set".into(),
            format!("train.output_dir={}", out.display()),
        ]
    };
    let full = tmp.path().join("full");
    let r = Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args(args(&full))
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let cut = tmp.path().join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args(args(&cut))
        .current_dir(repo())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = cut.join("checkpoint-4/trainer_state.json");
    let start = std::time::Instant::now();
    while !ckpt.is_file() {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint-4 written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it could be killed"
    );
    assert!(!cut.join("model.safetensors").exists());

    let mut resume = args(&cut);
    resume.push("--resume".into());
    let r = Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args(&resume)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed model differs from the uninterrupted one");
    let steps = |dir: &Path| -> Vec<u64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(steps(&full), steps(&cut), "metrics.jsonl steps differ");

    // Resumed again, the finished run is left as it is (its last checkpoint, step 12's
    // predecessor, would retrain the last steps); with another config it is refused.
    let before = std::fs::metadata(cut.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args(&resume)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("nothing to resume"));
    let after = std::fs::metadata(cut.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "the finished run's model was rewritten");
    let mut other = resume.clone();
    other.extend(["--set".to_string(), "optim.lr=1e-2".to_string()]);
    let r = Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args(&other)
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("optim.lr"));
}

#[test]
fn sigint_finishes_the_step_and_leaves_a_resumable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args([
            "train",
            "--config",
            "configs/tiny-opt.toml",
            "--set",
            "train.max_steps=30",
            "--set",
            "train.save_every=2",
            "--set",
            &format!("train.output_dir={}", out.display()),
        ])
        .current_dir(repo())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !out.join("checkpoint-2/trainer_state.json").is_file() {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint-2 written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let r = child.wait_with_output().unwrap();
    assert_eq!(r.status.code(), Some(130));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("--resume"), "{err}");
    let latest = orpo::train::resume::latest_checkpoint(&out).unwrap();
    assert!(latest.join("optimizer.safetensors").is_file());
    let r = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "train.max_steps=30",
        "--set",
        "train.save_every=2",
        "--set",
        &format!("train.output_dir={}", out.display()),
        "--resume",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.join("model.safetensors").is_file());
}

/// The non-padding tokens (chosen + rejected) of optimizer step `step` under `plan`.
fn step_tokens(pairs: &[orpo::data::TokenizedPair], plan: &Plan, step: usize) -> usize {
    plan.step(step)
        .micro_batches
        .concat()
        .iter()
        .map(|&i| pairs[i].chosen_input_ids.len() + pairs[i].rejected_input_ids.len())
        .sum()
}

#[test]
fn a_checkpoint_of_the_earlier_shuffled_order_resumes_over_its_own_pairs() {
    // Runs checkpointed before orpo drew torch's order name no `shuffle_order`; resumed, they
    // go on in the order they began with.
    let extra = [
        "train.max_steps=4",
        "train.shuffle=true",
        "train.log_every=1",
    ];
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config("tiny-opt", dir.path(), &extra);
    let mut first = load_trainer(&config).unwrap();
    first.run(None, &AtomicBool::new(true)).err().unwrap();
    let ckpt = dir.path().join("checkpoint-1");
    let state_path = ckpt.join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["plan"]["shuffle_order"], "torch");

    let torch_plan = first.plan();
    let mut chacha_plan = first.plan();
    chacha_plan.order = ShuffleOrder::ChaCha8;
    let pairs = &first.train.pairs;
    let want =
        |plan: &Plan| -> Vec<usize> { (1..4).map(|s| step_tokens(pairs, plan, s)).collect() };
    assert_ne!(
        want(&torch_plan),
        want(&chacha_plan),
        "the test needs orders that differ"
    );

    let logged_tokens = || -> Vec<usize> {
        json_lines(&dir.path().join("metrics.jsonl"))[1..]
            .iter()
            .map(|l| l["tokens"].as_u64().unwrap() as usize)
            .collect()
    };
    // The resumed run removes the interrupt's checkpoint when it finishes: a copy resumes
    // the second time.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&ckpt, copy.path());
    let mut resumed = load_trainer(&config).unwrap();
    resumed.run(Some(&ckpt), &AtomicBool::new(false)).unwrap();
    assert_eq!(logged_tokens(), want(&torch_plan));
    assert!(!ckpt.exists());
    copy_dir(copy.path(), &ckpt);

    state["plan"]
        .as_object_mut()
        .unwrap()
        .remove("shuffle_order");
    std::fs::write(&state_path, state.to_string()).unwrap();
    let mut resumed = load_trainer(&config).unwrap();
    resumed.run(Some(&ckpt), &AtomicBool::new(false)).unwrap();
    assert_eq!(logged_tokens(), want(&chacha_plan));
}

/// `train.dataloader_drop_last` with fewer pairs than a batch would leave nothing to train on
/// or evaluate: refused before the model loads, naming the data and the key.
#[test]
fn drop_last_needs_a_full_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let drop = "train.dataloader_drop_last=true";
    for (extra, key) in [
        (&[drop, "train.batch_size=16"][..], "train.batch_size = 16"),
        (&[drop, "data.eval_size=3"][..], "train.eval_batch_size = 4"),
    ] {
        let mut extra = extra.to_vec();
        extra.push("train.eval_batch_size=4");
        let err = load_trainer(&tiny_config("tiny-opt", tmp.path(), &extra))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(key) && err.contains("explicit-10.jsonl"),
            "{err}"
        );
    }
    // Without it the short batches are trained on.
    assert!(load_trainer(&tiny_config(
        "tiny-opt",
        tmp.path(),
        &["train.batch_size=16"]
    ))
    .is_ok());
}
