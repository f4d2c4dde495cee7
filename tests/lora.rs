//! LoRA beyond the TRL goldens (tests/golden_train.rs): frozen base, adapter files in PEFT's
//! layout, merge, evaluation of an adapter folder, and exact resume from adapter checkpoints.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use orpo::config::{Config, SaveDtype};
use orpo::model::CausalLm;
use orpo::train::{load_model, load_trainer};
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// adapter_config.json of an adapter folder.
fn adapter_config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

/// The adapter folder `dir` loads (on the base its adapter_config.json names) to `model`'s
/// logits on the probe exactly; returns them.
fn assert_reloads(model: &CausalLm, dir: &Path, what: &str) -> Tensor {
    let (ids, mask) = probe();
    let live = model.logits(&ids, &mask).unwrap();
    let reloaded = load_model(
        &dir.to_string_lossy(),
        None,
        None,
        Default::default(),
        &Device::Cpu,
    )
    .unwrap();
    let again = reloaded.model.logits(&ids, &mask).unwrap();
    assert_eq!(
        max_diff(&live, &again),
        0.0,
        "{what}: reloaded logits differ"
    );
    live
}

#[test]
fn only_adapters_train_and_the_saved_adapter_merges_and_reloads() {
    for name in ["tiny-opt", "tiny-mistral", "tiny-gemma", "tiny-phi3"] {
        let tmp = tempfile::tempdir().unwrap();
        let config = lora_config(name, tmp.path(), &[]);
        let mut trainer = load_trainer(&config).unwrap();
        // Only LoRA matrices are trainable: two per adapted linear layer.
        let names: Vec<String> = trainer
            .model
            .params()
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert!(!names.is_empty());
        assert!(names
            .iter()
            .all(|n| n.starts_with("base_model.model.") && n.contains(".lora_")));
        if name == "tiny-phi3" {
            // Phi-3's fused projections are adapted as the single modules PEFT sees.
            for module in ["self_attn.qkv_proj", "mlp.gate_up_proj"] {
                let a = format!("base_model.model.model.layers.0.{module}.lora_A.weight");
                assert!(names.contains(&a), "{name}: no {a}");
            }
        }
        let before = trainer.model.params().snapshot().unwrap();
        trainer.run(None, &AtomicBool::new(false)).unwrap();
        for (pname, var) in trainer.model.params().iter() {
            assert!(
                max_diff(var.as_tensor(), &before[pname]) > 0.0,
                "{name}: {pname} did not change"
            );
        }
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
        ] {
            assert!(tmp.path().join(f).is_file(), "{name}: missing {f}");
        }
        assert!(!tmp.path().join("model.safetensors").exists());

        // The adapter folder loads on its base (from adapter_config.json) to the same logits.
        let live = assert_reloads(&trainer.model, tmp.path(), name);
        let (ids, mask) = probe();

        // The merged model gives the same logits up to rounding, and differs from the base.
        let merged_dir = tmp.path().join("merged");
        orpo::merge::merge(None, tmp.path(), &merged_dir, false, SaveDtype::F32).unwrap();
        let merged = CausalLm::load(&merged_dir, &Device::Cpu).unwrap();
        assert!(merged.adapter().is_none());
        let merged_logits = merged.logits(&ids, &mask).unwrap();
        assert!(
            max_diff(&live, &merged_logits) < 1e-5,
            "{name}: merged logits differ"
        );
        let base = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        assert!(max_diff(&base.logits(&ids, &mask).unwrap(), &merged_logits) > 1e-4);

        // `--dtype auto` writes the same weights in the base's dtype (bf16 or f16 here).
        let auto_dir = tmp.path().join("merged-auto");
        orpo::merge::merge(None, tmp.path(), &auto_dir, false, SaveDtype::Auto).unwrap();
        let want = orpo::train::save_dtype::base_dtype(&model_dir(name)).unwrap();
        let read = |d: &Path| {
            candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap()
        };
        let (full, auto) = (read(&merged_dir), read(&auto_dir));
        assert_eq!(full.len(), auto.len());
        for (n, t) in &auto {
            assert_eq!(t.dtype(), want, "{name}: {n}");
            let rounded = full[n]
                .to_dtype(want)
                .unwrap()
                .to_dtype(candle_core::DType::F32);
            let t = t.to_dtype(candle_core::DType::F32).unwrap();
            assert_eq!(max_diff(&t, &rounded.unwrap()), 0.0, "{name}: {n}");
        }
    }
}

#[test]
fn cli_evaluates_an_adapter_folder_and_merges_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out_set = format!("train.output_dir={}", run.display());
    let r = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "train.max_steps=2",
        "--set",
        "lora.enabled=true",
        "--set",
        "lora.targets=[\"q_proj\", \"v_proj\"]",
        "--set",
        &out_set,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(cfg["peft_type"], "LORA");

    // `orpo eval` on the adapter reproduces the end-of-training eval exactly.
    let run_s = run.to_string_lossy().into_owned();
    assert_eq!(
        cli_eval(&run, &[])["eval_loss"],
        final_eval(&run)["eval_loss"]
    );

    let merged = tmp.path().join("merged").to_string_lossy().into_owned();
    let base = model_dir("tiny-opt").to_string_lossy().into_owned();
    let r = orpo(&[
        "merge",
        "--base",
        &base,
        "--adapter",
        &run_s,
        "--out",
        &merged,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(Path::new(&merged).join("model.safetensors").is_file());
    // A folder that holds something is replaced only with --overwrite.
    let again = ["merge", "--adapter", &run_s, "--out", &merged];
    assert_eq!(orpo(&again).status.code(), Some(2));
    assert!(
        orpo(&[&again[..], &["--overwrite", "--dtype", "bf16"]].concat())
            .status
            .success()
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&merged).join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    let r = orpo(&[&again[..], &["--overwrite", "--dtype", "int8"]].concat());
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("bfloat16"));
    // Merging into the base folder itself is refused.
    let r = orpo(&["merge", "--adapter", &run_s, "--out", &base]);
    assert_eq!(r.status.code(), Some(2));
    // A target that matches nothing is a user error before training.
    let r = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "lora.enabled=true",
        "--set",
        "lora.targets=[\"qkv\"]",
        "--set",
        &format!("train.output_dir={}", tmp.path().join("bad").display()),
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("match no linear layer"));
}

#[test]
fn interrupted_lora_run_resumes_bit_identical() {
    for dora in [false, true] {
        interrupted_run_resumes_bit_identical(dora);
    }
}

fn interrupted_run_resumes_bit_identical(dora: bool) {
    let dora = format!("lora.use_dora={dora}");
    let extra = [
        "train.max_steps=3",
        "train.shuffle=true",
        "train.batch_size=3",
        &dora,
    ];
    let full_dir = tempfile::tempdir().unwrap();
    let mut full = load_trainer(&lora_config("tiny-qwen2", full_dir.path(), &extra)).unwrap();
    full.run(None, &AtomicBool::new(false)).unwrap();

    let cut_dir = tempfile::tempdir().unwrap();
    let config = lora_config("tiny-qwen2", cut_dir.path(), &extra);
    let mut first = load_trainer(&config).unwrap();
    let err = first.run(None, &AtomicBool::new(true)).err().unwrap();
    assert!(
        matches!(err, orpo::Error::Interrupted { step: 1, .. }),
        "{err}"
    );
    let ckpt = cut_dir.path().join("checkpoint-1");
    assert!(ckpt.join("adapter_model.safetensors").is_file());

    let mut resumed = load_trainer(&config).unwrap();
    resumed.run(Some(&ckpt), &AtomicBool::new(false)).unwrap();
    let a = std::fs::read(full_dir.path().join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut_dir.path().join("adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "{dora}: resumed adapter differs from the uninterrupted one"
    );
}

#[test]
fn shipped_configs_validate_and_the_mistral_recipe_runs_on_a_tiny_model() {
    for entry in std::fs::read_dir(repo().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let config = Config::load(&path, &[]).unwrap();
        config.validate_for_train().unwrap();
    }
    // configs/mistral.toml's recipe (LoRA r16 all-linear, bf16, gradient checkpointing) and
    // its QLoRA twin on the tiny Mistral, with local data.
    for recipe in ["configs/mistral.toml", "configs/mistral-qlora.toml"] {
        run_recipe_on_tiny_mistral(recipe);
    }
}

fn run_recipe_on_tiny_mistral(recipe: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = repo().join("examples/data/chat-10.jsonl");
    let sets = [
        format!("model.id={}", model_dir("tiny-mistral").display()),
        format!("data.train={}", data.display()),
        format!("data.eval={}", data.display()),
        format!("train.output_dir={}", tmp.path().display()),
        "train.max_steps=2".to_string(),
        "data.max_length=256".to_string(),
        "data.max_prompt_length=192".to_string(),
        "model.device=cpu".to_string(),
    ];
    let config = Config::load(&repo().join(recipe), &sets).unwrap();
    let mut trainer = load_trainer(&config).unwrap();
    let info = trainer.model.adapter().unwrap();
    assert_eq!(info.spec.r, 16);
    assert_eq!(info.modules.len(), 7);
    let summary = trainer.run(None, &AtomicBool::new(false)).unwrap();
    assert!(summary.log.iter().all(|e| e.metrics.loss.is_finite()));
    assert!(tmp.path().join("adapter_model.safetensors").is_file());
}

/// A copy of fixture `name` in `dir` with every weight rounded to bf16, stored as bf16 (`wide`
/// false) or widened back to f32 (the same values).
fn bf16_copy(name: &str, dir: &Path, wide: bool) {
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        let file = dir.join(path.file_name().unwrap());
        std::fs::copy(&path, &file).unwrap();
        if file.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let out: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(n, t)| {
                let t = t.to_dtype(candle_core::DType::BF16).unwrap();
                let t = if wide {
                    t.to_dtype(candle_core::DType::F32).unwrap()
                } else {
                    t
                };
                (n, t)
            })
            .collect();
        candle_core::safetensors::save(&out, &file).unwrap();
    }
}

/// Under LoRA with bf16 compute a bf16 checkpoint's frozen embeddings stay bf16 and the
/// untied head is bf16 whatever the file: memory only, the training is bit-identical to the
/// same values held in f32.
#[test]
fn frozen_bf16_embeddings_and_head_train_as_their_f32_copies() {
    for name in ["tiny-opt", "tiny-mistral"] {
        let runs: Vec<_> = [false, true]
            .iter()
            .map(|&wide| {
                let model = tempfile::tempdir().unwrap();
                bf16_copy(name, model.path(), wide);
                let out = tempfile::tempdir().unwrap();
                let mut config = lora_config(name, out.path(), &["model.dtype=bf16"]);
                config.model.id = model.path().display().to_string();
                let mut trainer = load_trainer(&config).unwrap();
                // tiny-opt's head is its embedding: bf16 where the file is.
                let head = trainer.model.lm_head().dtype();
                let tied_f32 = name == "tiny-opt" && wide;
                assert_eq!(head == candle_core::DType::BF16, !tied_f32, "{name} {wide}");
                let summary = trainer.run(None, &AtomicBool::new(false)).unwrap();
                let params: Vec<(String, Tensor)> = trainer
                    .model
                    .params()
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.as_tensor().copy().unwrap()))
                    .collect();
                (summary.log, params)
            })
            .collect();
        let (log_a, params_a) = &runs[0];
        let (log_b, params_b) = &runs[1];
        assert_eq!(log_a.len(), log_b.len());
        for (a, b) in log_a.iter().zip(log_b) {
            assert_eq!(a.to_json()["loss"], b.to_json()["loss"], "{name}");
            assert_eq!(a.metrics.values, b.metrics.values, "{name} step {}", a.step);
            assert_eq!(a.grad_norm, b.grad_norm, "{name} step {}", a.step);
        }
        for ((n, a), (_, b)) in params_a.iter().zip(params_b) {
            assert_eq!(max_diff(a, b), 0.0, "{name} {n}");
        }
    }
}

/// The head's column sums (the logit metrics) follow a trainable head's updates and are kept
/// for a frozen one.
#[test]
fn head_column_sums_follow_a_trainable_head_and_are_kept_for_a_frozen_one() {
    let sums = |m: &CausalLm| m.head_column_sums().unwrap().to_vec1::<f32>().unwrap();
    let full = CausalLm::load(&model_dir("tiny-opt"), &Device::Cpu).unwrap();
    let before = sums(&full);
    let head = full
        .params()
        .get("model.decoder.embed_tokens.weight")
        .unwrap();
    head.set(&(head.as_tensor() * 2.0).unwrap()).unwrap();
    let after = sums(&full);
    assert!(before.iter().zip(&after).all(|(b, a)| *a == 2.0 * b));

    let tmp = tempfile::tempdir().unwrap();
    let trainer = load_trainer(&lora_config("tiny-mistral", tmp.path(), &[])).unwrap();
    let frozen = &trainer.model;
    assert!(!frozen.lm_head().is_variable());
    let want = orpo::ops::column_sums(&frozen.lm_head()).unwrap();
    let want = want.to_vec1::<f32>().unwrap();
    assert_eq!(sums(frozen), want);
    assert_eq!(sums(frozen), want);
}

/// bf16 products with a LoRA pair on one MLP projection only: that projection's output is f32,
/// the other's bf16 (`Linear::forward_compute`), and SwiGLU takes the two in f32; the run
/// trains, and matches the same run with the pair on both projections in its first step's
/// loss (the adapters start at zero, so the first forward is the base model's).
#[test]
fn bf16_lora_on_one_mlp_projection_trains() {
    let run = |targets: &str| {
        let out = tempfile::tempdir().unwrap();
        let extra = [
            "model.dtype=bf16",
            "train.max_steps=2",
            "train.log_every=1",
            &format!("lora.targets={targets}"),
        ];
        let mut trainer = load_trainer(&lora_config("tiny-mistral", out.path(), &extra)).unwrap();
        let summary = trainer.run(None, &AtomicBool::new(false)).unwrap();
        assert_eq!(summary.log.len(), 2, "{targets}");
        assert!(
            summary.log.iter().all(|s| s.metrics.loss.is_finite()),
            "{targets}"
        );
        summary.log[0].metrics.loss
    };
    let one = run("[\"gate_proj\"]");
    let both = run("[\"gate_proj\", \"up_proj\"]");
    assert!((one - both).abs() <= 1e-6 * both.abs(), "{one} vs {both}");
}

#[test]
fn a_pattern_target_adapts_the_modules_whose_whole_name_it_matches() {
    // PEFT's string target_modules: re.fullmatch over names like
    // `model.layers.0.self_attn.q_proj`; here layer 0's q_proj and v_proj of two layers.
    let pattern = r"model\.layers\.0\.self_attn\.(q|v)_proj";
    let tmp = tempfile::tempdir().unwrap();
    let config = lora_config(
        "tiny-llama3",
        tmp.path(),
        &[&format!("lora.targets={pattern}")],
    );
    let mut trainer = load_trainer(&config).unwrap();
    let mut names: Vec<String> = trainer
        .model
        .params()
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    names.sort();
    let want: Vec<String> = [
        "q_proj.lora_A",
        "q_proj.lora_B",
        "v_proj.lora_A",
        "v_proj.lora_B",
    ]
    .iter()
    .map(|m| format!("base_model.model.model.layers.0.self_attn.{m}.weight"))
    .collect();
    assert_eq!(names, want);
    trainer.run(None, &AtomicBool::new(false)).unwrap();
    // adapter_config.json keeps the pattern (the module names alone would adapt layer 1 too).
    assert_eq!(adapter_config_json(tmp.path())["target_modules"], pattern);
    // ... and the adapter folder reloads onto the same four modules, to the same logits.
    assert_reloads(&trainer.model, tmp.path(), pattern);

    // A pattern that also matches a container or the head is refused, naming it: PEFT cannot
    // load the first and would adapt the second.
    for (pattern, named) in [
        (".*mlp.*", "`model.layers.0.mlp`"),
        (".*(q_proj|lm_head)", "`lm_head`"),
        (r"model\.layers\.0\..*", "`model.layers.0.input_layernorm`"),
    ] {
        let other = tmp.path().join("stray");
        let config = lora_config("tiny-llama3", &other, &[&format!("lora.targets={pattern}")]);
        let e = match load_trainer(&config) {
            Ok(_) => panic!("{pattern} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(named), "{pattern}: {e}");
    }

    // A bare module name as a string matches no whole name, as in PEFT; the error says how to
    // name modules.
    let other = tmp.path().join("bare");
    let config = lora_config("tiny-llama3", &other, &["lora.targets='q_proj'"]);
    let e = match load_trainer(&config) {
        Ok(_) => panic!("a bare name as a pattern trained"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("matches no linear layer") && e.contains(r#"targets = ["q_proj"]"#),
        "{e}"
    );
}

#[test]
fn a_dora_adapter_reloads_merges_and_trains_in_bf16() {
    for name in ["tiny-opt", "tiny-phi3"] {
        let tmp = tempfile::tempdir().unwrap();
        let config = lora_config(name, tmp.path(), &["lora.use_dora=true"]);
        let mut trainer = load_trainer(&config).unwrap();
        let before = trainer.model.params().snapshot().unwrap();
        trainer.run(None, &AtomicBool::new(false)).unwrap();
        // Every adapter tensor moved, magnitudes included (one per adapted layer).
        let mut magnitudes = 0;
        for (pname, var) in trainer.model.params().iter() {
            magnitudes += usize::from(pname.ends_with(".lora_magnitude_vector"));
            assert!(
                max_diff(var.as_tensor(), &before[pname]) > 0.0,
                "{name}: {pname} did not change"
            );
        }
        assert!(magnitudes > 0, "{name}");
        assert_eq!(adapter_config_json(tmp.path())["use_dora"], true);
        // The folder reloads to the same logits; the merged model (each row of W + s·B·A
        // rescaled to its magnitude) gives them up to rounding, and differs from the base.
        let live = assert_reloads(&trainer.model, tmp.path(), name);
        let (ids, mask) = probe();
        let merged_dir = tmp.path().join("merged");
        orpo::merge::merge(None, tmp.path(), &merged_dir, false, SaveDtype::F32).unwrap();
        let merged = CausalLm::load(&merged_dir, &Device::Cpu).unwrap();
        let merged_logits = merged.logits(&ids, &mask).unwrap();
        assert!(max_diff(&live, &merged_logits) < 1e-5, "{name}: merged");
        let base = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        assert!(max_diff(&base.logits(&ids, &mask).unwrap(), &merged_logits) > 1e-4);
        // An adapter file without its magnitudes is refused by name.
        let broken = tmp.path().join("broken");
        std::fs::create_dir(&broken).unwrap();
        for f in [
            "adapter_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            if tmp.path().join(f).exists() {
                std::fs::copy(tmp.path().join(f), broken.join(f)).unwrap();
            }
        }
        let tensors: std::collections::HashMap<String, Tensor> = candle_core::safetensors::load(
            tmp.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("lora_magnitude_vector"))
        .collect();
        candle_core::safetensors::save(&tensors, broken.join("adapter_model.safetensors")).unwrap();
        let e = match load_model(
            &broken.to_string_lossy(),
            None,
            None,
            Default::default(),
            &Device::Cpu,
        ) {
            Ok(_) => panic!("{name}: an adapter without magnitudes loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("lora_magnitude_vector"), "{name}: {e}");
    }
    // Under bf16 products the frozen base is kept in bf16, but a fresh magnitude is the row
    // norms of the file's f32 weights, as PEFT computes them.
    let tmp = tempfile::tempdir().unwrap();
    let config = lora_config(
        "tiny-phi3",
        tmp.path(),
        &["lora.use_dora=true", "model.dtype=bf16"],
    );
    let trainer = load_trainer(&config).unwrap();
    let file = candle_core::safetensors::load(
        model_dir("tiny-phi3").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let w = &file["model.layers.0.mlp.down_proj.weight"];
    assert_eq!(w.dtype(), candle_core::DType::F32);
    let m = trainer
        .model
        .params()
        .get("base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector")
        .unwrap()
        .as_tensor()
        .clone();
    let want = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    assert_eq!(max_diff(&m, &want), 0.0);
    // bf16 products: the same first loss as f32 within bf16's rounding, and training runs.
    let first_loss = |dtype: &str| {
        let out = tempfile::tempdir().unwrap();
        let extra = [
            "lora.use_dora=true",
            &format!("model.dtype={dtype}"),
            "train.log_every=1",
        ];
        let mut trainer = load_trainer(&lora_config("tiny-mistral", out.path(), &extra)).unwrap();
        let summary = trainer.run(None, &AtomicBool::new(false)).unwrap();
        assert!(summary.log.iter().all(|s| s.metrics.loss.is_finite()));
        summary.log[0].metrics.loss
    };
    let (f32_loss, bf16_loss) = (first_loss("f32"), first_loss("bf16"));
    assert!(
        (f32_loss - bf16_loss).abs() <= 2e-3 * f32_loss.abs(),
        "{f32_loss} vs {bf16_loss}"
    );
}

#[test]
fn init_from_goes_on_training_a_saved_adapter_with_its_own_settings() {
    let from = fixtures().join("adapters/tiny-opt-orpo3");
    let tmp = tempfile::tempdir().unwrap();
    // lora_config sets r 4 and alpha 8; the adapter's alpha is 16: its own applies.
    let config = lora_config(
        "tiny-opt",
        tmp.path(),
        &[&format!("lora.init_from={}", from.display())],
    );
    let trainer = load_trainer(&config).unwrap();
    let info = trainer.model.adapter().unwrap();
    assert_eq!((info.spec.r, info.spec.alpha), (4, 16.0));
    let modules: Vec<&str> = info.modules.iter().map(String::as_str).collect();
    assert_eq!(modules, ["fc2", "q_proj", "v_proj"]);
    // Training starts from the saved weights, every one of them.
    let saved =
        candle_core::safetensors::load(from.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(saved.len(), trainer.model.params().len());
    for (name, t) in &saved {
        let var = trainer.model.params().get(name).unwrap();
        assert_eq!(max_diff(var.as_tensor(), t), 0.0, "{name}");
    }
    // A setting the config makes otherwise is named as ignored.
    let r = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "train.max_steps=1",
        "--set",
        "lora.enabled=true",
        "--set",
        "lora.alpha=64",
        "--set",
        &format!("lora.init_from={}", from.display()),
        "--set",
        &format!("train.output_dir={}", tmp.path().join("cli").display()),
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(
        stderr.contains("ignored: lora.alpha = 64 (the adapter's: 16)"),
        "{stderr}"
    );
    // Errors name the key: an init_from without LoRA, and a folder that is no adapter.
    let e = Config::from_toml_str(
        "",
        "c.toml",
        &[
            "model.id=m".into(),
            format!("lora.init_from={}", from.display()),
        ],
    )
    .unwrap_err();
    assert_eq!(e.key(), Some("lora.init_from"), "{e}");
    let config = lora_config(
        "tiny-opt",
        tmp.path(),
        &[&format!(
            "lora.init_from={}",
            model_dir("tiny-opt").display()
        )],
    );
    let e = match load_trainer(&config) {
        Ok(_) => panic!("a full model as init_from loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("lora.init_from") && e.contains("adapter_config.json"),
        "{e}"
    );
}

/// `orpo eval` on a run's saved model evaluates it as the run did: the run's orpo.toml gives
/// the products' dtype (bf16 here), so the end-of-training evaluation is reproduced exactly,
/// for a full model and an adapter alike; `--set model.dtype` overrides it.
#[test]
fn cli_evaluates_a_saved_run_with_its_own_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("full", "lora.enabled=false"),
        ("adapter", "lora.enabled=true"),
    ] {
        let run = tmp.path().join(name);
        let out_set = format!("train.output_dir={}", run.display());
        let r = orpo(&[
            "train",
            "--config",
            "configs/tiny-opt.toml",
            "--set",
            "train.max_steps=2",
            "--set",
            "model.dtype=bf16",
            "--set",
            extra,
            "--set",
            &out_set,
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let want = final_eval(&run);
        let eval = |sets: &[&str]| cli_eval(&run, sets);
        assert_eq!(eval(&[])["eval_loss"], want["eval_loss"], "{name}");
        assert_ne!(
            eval(&["model.dtype=f32"])["eval_loss"],
            want["eval_loss"],
            "{name}"
        );
    }
}
