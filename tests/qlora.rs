//! QLoRA beyond the TRL goldens (tests/golden_train.rs) and bitsandbytes' codes (tests/nf4.rs):
//! a 4-bit base under fused projections, DoRA, bf16 and checkpointing; the adapter evaluated
//! on the quantized base; exact resume.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use orpo::config::Config;
use orpo::model::{CausalLm, LoadOptions, Quantize};
use orpo::train::{load_model, load_trainer};
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// `lora_config`'s run with the base quantized to NF4.
fn qlora_config(model: &str, out: &Path, extra: &[&str]) -> Config {
    let mut all = vec!["lora.quantize=nf4"];
    all.extend_from_slice(extra);
    lora_config(model, out, &all)
}

/// `name`'s logits on the probe with its linear layers quantized (a fresh adapter: B = 0).
fn quantized_logits(name: &str, double_quant: bool) -> Tensor {
    let spec = orpo::model::lora::LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        use_dora: false,
        targets: orpo::model::lora::Targets::AllLinear,
    };
    let opts = LoadOptions {
        lora: Some((spec, orpo::model::lora::AdapterInit::Fresh { seed: 42 })),
        quantize: Some(Quantize { double_quant }),
        ..LoadOptions::default()
    };
    let model = CausalLm::load_with(&model_dir(name), &Device::Cpu, opts).unwrap();
    let (ids, mask) = probe();
    model.logits(&ids, &mask).unwrap()
}

#[test]
fn a_quantized_base_moves_the_logits_by_its_rounding_only() {
    let (ids, mask) = probe();
    for name in ["tiny-opt", "tiny-phi3", "tiny-llama3"] {
        let full = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        let full = full.logits(&ids, &mask).unwrap();
        let scale = full
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let single = quantized_logits(name, false);
        let double = quantized_logits(name, true);
        // 4 bits move the logits, but by a fraction of their size; double quantization moves
        // the scales by their own 8-bit rounding on top.
        for (what, q) in [("nf4", &single), ("double", &double)] {
            let d = max_diff(&full, q);
            assert!(
                d > 1e-4 * scale && d < 0.5 * scale,
                "{name} {what}: {d} vs {scale}"
            );
        }
        assert!(
            max_diff(&single, &double) > 0.0,
            "{name}: double quantization changed nothing"
        );
    }
}

#[test]
fn qlora_trains_every_adapter_and_evaluates_on_its_quantized_base() {
    for (name, extra) in [
        ("tiny-phi3", vec!["lora.double_quant=true"]),
        ("tiny-opt", vec!["lora.use_dora=true"]),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut trainer = load_trainer(&qlora_config(name, tmp.path(), &extra)).unwrap();
        let before = trainer.model.params().snapshot().unwrap();
        assert!(trainer
            .model
            .params()
            .iter()
            .all(|(n, _)| n.contains(".lora_")));
        trainer.run(None, &AtomicBool::new(false)).unwrap();
        for (pname, var) in trainer.model.params().iter() {
            assert!(
                max_diff(var.as_tensor(), &before[pname]) > 0.0,
                "{name}: {pname} did not change"
            );
        }
        // The adapter on its base quantized as it trained gives the live logits exactly; on
        // the full-precision base (what a merge folds it into) they differ by the rounding.
        let (ids, mask) = probe();
        let live = trainer.model.logits(&ids, &mask).unwrap();
        let dir = tmp.path().to_string_lossy();
        let q = Some(Quantize {
            double_quant: extra.contains(&"lora.double_quant=true"),
        });
        let setup = orpo::train::EvalSetup {
            quantize: q,
            ..Default::default()
        };
        let again = load_model(&dir, None, None, setup, &Device::Cpu).unwrap();
        assert_eq!(
            max_diff(&live, &again.model.logits(&ids, &mask).unwrap()),
            0.0,
            "{name}"
        );
        let full = load_model(&dir, None, None, Default::default(), &Device::Cpu).unwrap();
        assert!(
            max_diff(&live, &full.model.logits(&ids, &mask).unwrap()) > 1e-5,
            "{name}"
        );
    }
}

#[test]
fn bf16_qlora_with_checkpointing_follows_the_f32_run() {
    // Fused projections (rows of one quantized weight), DoRA, bf16 products, recomputation.
    let losses = |extra: &[&str]| -> Vec<f64> {
        let tmp = tempfile::tempdir().unwrap();
        let mut all = vec![
            "lora.use_dora=true",
            "lora.double_quant=true",
            "train.log_every=1",
        ];
        all.extend_from_slice(extra);
        let mut trainer = load_trainer(&qlora_config("tiny-phi3", tmp.path(), &all)).unwrap();
        trainer.run(None, &AtomicBool::new(false)).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v["loss"].as_f64())
            .collect()
    };
    let f32_run = losses(&[]);
    let bf16_run = losses(&["model.dtype=bf16", "train.gradient_checkpointing=true"]);
    assert_eq!(f32_run.len(), 2);
    for (a, b) in f32_run.iter().zip(&bf16_run) {
        assert!((a - b).abs() < 1e-2 * a.abs(), "f32 {a} vs bf16 {b}");
    }
}

#[test]
fn an_interrupted_qlora_run_resumes_bit_identical() {
    let extra = [
        "train.max_steps=3",
        "train.shuffle=true",
        "train.batch_size=3",
        "lora.double_quant=true",
    ];
    let full_dir = tempfile::tempdir().unwrap();
    let mut full = load_trainer(&qlora_config("tiny-qwen2", full_dir.path(), &extra)).unwrap();
    full.run(None, &AtomicBool::new(false)).unwrap();

    let cut_dir = tempfile::tempdir().unwrap();
    let config = qlora_config("tiny-qwen2", cut_dir.path(), &extra);
    let mut first = load_trainer(&config).unwrap();
    let err = first.run(None, &AtomicBool::new(true)).err().unwrap();
    assert!(
        matches!(err, orpo::Error::Interrupted { step: 1, .. }),
        "{err}"
    );
    let ckpt = cut_dir.path().join("checkpoint-1");
    // The checkpoint's base was quantized: resuming without it is another run. (Checked
    // first: the resumed run below removes the interrupt's checkpoint when it finishes.)
    let plain = qlora_config("tiny-qwen2", cut_dir.path(), &["lora.quantize=none"]);
    let mut other = load_trainer(&plain).unwrap();
    let e = other
        .run(Some(&ckpt), &AtomicBool::new(false))
        .err()
        .expect("a resume with another base refused");
    assert!(e.to_string().contains("lora.quantize"), "{e}");

    let mut resumed = load_trainer(&config).unwrap();
    resumed.run(Some(&ckpt), &AtomicBool::new(false)).unwrap();
    let a = std::fs::read(full_dir.path().join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut_dir.path().join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
}

#[test]
fn cli_evaluates_a_qlora_adapter_on_its_quantized_base() {
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
        "lora.quantize=nf4",
        "--set",
        &out_set,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("4-bit NF4"));
    let want = final_eval(&run);
    let eval = |sets: &[&str]| cli_eval(&run, sets);
    // The run's orpo.toml says how its base was quantized; --set overrides it.
    assert!(run.join("orpo.toml").is_file());
    assert_eq!(eval(&[])["eval_loss"], want["eval_loss"]);
    assert_eq!(eval(&["lora.quantize=nf4"])["eval_loss"], want["eval_loss"]);
    assert_ne!(
        eval(&["lora.quantize=none"])["eval_loss"],
        want["eval_loss"]
    );
    // A merge folds it into the full-precision base, and says so.
    let merged = tmp.path().join("merged").to_string_lossy().into_owned();
    let run_s = run.to_string_lossy().into_owned();
    let r = orpo(&["merge", "--adapter", &run_s, "--out", &merged]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("full-precision weights"));
    // Quantizing a full fine-tune is refused before training.
    let r = orpo(&[
        "train",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "lora.quantize=nf4",
        "--set",
        &format!("train.output_dir={}", tmp.path().join("full").display()),
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("lora.enabled = true"));
}

/// A quantized base is read tensor by tensor from its mapped files: a pattern target is still
/// checked against every module the files imply, and a tensor of the wrong shape or a
/// missing shard is an error naming it, before any training.
#[test]
fn a_mapped_base_checks_patterns_shapes_and_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = r"model\.layers\.0\..*";
    let config = qlora_config(
        "tiny-llama3",
        &tmp.path().join("p"),
        &[&format!("lora.targets={pattern}")],
    );
    let e = match load_trainer(&config) {
        Ok(_) => panic!("{pattern} loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("`model.layers.0.input_layernorm`"), "{e}");

    // A config that disagrees with the weights' shapes.
    let model = tmp.path().join("wide");
    copy_fixture("tiny-llama3", &model);
    let cfg = model.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["intermediate_size"] = serde_json::json!(200);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let mut config = qlora_config("tiny-llama3", &tmp.path().join("w"), &[]);
    config.model.id = model.display().to_string();
    let e = match load_trainer(&config) {
        Ok(_) => panic!("a wrong shape loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("gate_proj.weight") && e.contains("expected [200, 64]"),
        "{e}"
    );

    // Sharded weights whose index names a shard that is not there.
    let sharded = tmp.path().join("sharded");
    copy_fixture("tiny-llama3", &sharded);
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let mut config = qlora_config("tiny-llama3", &tmp.path().join("s"), &[]);
    config.model.id = sharded.display().to_string();
    let e = match load_trainer(&config) {
        Ok(_) => panic!("a missing shard loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("model-00001-of-00002.safetensors is missing"),
        "{e}"
    );
}

fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}
