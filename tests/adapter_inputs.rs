//! Adapter inputs that must be refused as input errors (exit code 2, naming the file and key)
//! before anything is trained or written: adapter_config.json keys of the wrong type or with
//! settings orpo does not implement, ranks no layer can hold, and files where folders belong.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use orpo::config::SaveDtype;
use orpo::model::lora::{read_adapter, AdapterInit, LoraSpec, Targets};
use orpo::model::{CausalLm, LoadOptions};
use orpo::train::load_trainer;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const ADAPTER: &str = "adapters/tiny-opt-orpo3";

/// A copy of the fixture adapter in `dir` with its adapter_config.json edited.
fn adapter_copy(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    edited_copy(ADAPTER, dir, "adapter_config.json", |v| {
        edit(v.as_object_mut().unwrap())
    });
    dir.to_path_buf()
}

/// The error merging `adapter` gives: an input error, its message.
fn merge_error(adapter: &Path, out: &Path) -> String {
    match orpo::merge::merge(None, adapter, out, false, SaveDtype::F32) {
        Ok(_) => panic!("{} merged", adapter.display()),
        Err(e) => {
            assert!(e.is_user_error(), "not an input error: {e}");
            e.to_string()
        }
    }
}

fn stderr(r: &std::process::Output) -> String {
    String::from_utf8_lossy(&r.stderr).into_owned()
}

#[test]
fn adapter_config_values_of_the_wrong_type_are_refused_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, Value)] = &[
        ("lora_alpha", json!("x")),
        ("lora_alpha", json!(true)),
        ("r", json!("4")),
        ("r", json!(4.5)),
        ("r", json!(-4)),
        ("lora_dropout", json!("0.1")),
        ("use_rslora", json!("true")),
        ("use_dora", json!(1)),
        ("target_modules", json!(["q_proj", 3])),
        ("target_modules", json!(7)),
        (
            "base_model_name_or_path",
            json!(["tests/fixtures/tiny-opt"]),
        ),
        ("peft_type", json!(5)),
        ("task_type", json!(false)),
        ("bias", json!(false)),
        ("fan_in_fan_out", json!("no")),
        ("rank_pattern", json!([])),
        ("alpha_pattern", json!("q_proj")),
        ("modules_to_save", json!("lm_head")),
        ("inference_mode", json!("yes")),
        ("init_lora_weights", json!(1)),
        ("revision", json!(3)),
        // Values of the right type that orpo does not implement.
        ("peft_type", json!("IA3")),
        ("task_type", json!("SEQ_CLS")),
        ("bias", json!("all")),
        ("fan_in_fan_out", json!(true)),
        ("modules_to_save", json!(["lm_head"])),
        ("rank_pattern", json!({"q_proj": 8})),
        ("alpha_pattern", json!({"q_proj": 8})),
        ("exclude_modules", json!(["fc2"])),
        ("lora_bias", json!(true)),
        ("layer_replication", json!([[0, 1]])),
        ("trainable_token_indices", json!([5])),
    ];
    for (i, (key, value)) in cases.iter().enumerate() {
        let dir = adapter_copy(&tmp.path().join(format!("a{i}")), |m| {
            m.insert(key.to_string(), value.clone());
        });
        let e = merge_error(&dir, &tmp.path().join(format!("out{i}")));
        assert!(
            e.contains("adapter_config.json")
                && (e.contains(&format!("`{key}`")) || e.contains(&format!("{key} `"))),
            "{key} = {value}: {e}"
        );
        assert!(
            !tmp.path().join(format!("out{i}")).exists(),
            "{key}: out written"
        );
    }
}

#[test]
fn absent_or_null_keys_take_peft_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_copy(tmp.path(), |m| {
        m.remove("lora_alpha");
        m.remove("peft_type");
        m.insert("use_rslora".into(), Value::Null);
        m.insert("modules_to_save".into(), json!([]));
    });
    let saved = read_adapter(&dir, &Device::Cpu).unwrap();
    assert_eq!(saved.spec.alpha, 8.0);
    assert!(!saved.spec.use_rslora);
}

/// The CLI paths that read an adapter (merge, eval, lora.init_from) refuse a bad value with
/// exit code 2, naming the key, rather than running with a default.
#[test]
fn every_command_refuses_a_bad_lora_alpha() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_copy(&tmp.path().join("a"), |m| {
        m.insert("lora_alpha".into(), json!("x"));
    });
    let a = dir.to_string_lossy().into_owned();
    let out = tmp.path().join("out");
    let runs = [
        orpo(&["merge", "--adapter", &a, "--out", &out.to_string_lossy()]),
        orpo(&[
            "eval",
            "--model",
            &a,
            "--data",
            "examples/data/explicit-10.jsonl",
        ]),
        orpo(&[
            "train",
            "--config",
            "configs/tiny-opt.toml",
            "--set",
            "lora.enabled=true",
            "--set",
            &format!("lora.init_from={a}"),
            "--set",
            &format!("train.output_dir={}", out.display()),
        ]),
    ];
    for r in &runs {
        let e = stderr(r);
        assert_eq!(r.status.code(), Some(2), "{e}");
        assert!(
            e.contains("adapter_config.json") && e.contains("`lora_alpha`"),
            "{e}"
        );
    }
    assert!(!out.exists());
    // lora.init_from through the library too.
    let config = lora_config("tiny-opt", &out, &[&format!("lora.init_from={a}")]);
    let e = load_trainer(&config)
        .err()
        .expect("a bad lora_alpha loaded");
    assert!(
        e.is_user_error() && e.to_string().contains("`lora_alpha`"),
        "{e}"
    );
}

/// layers_to_transform / layers_pattern (PEFT adapts only the named layers) are refused with a
/// target_modules pattern that selects the same layers, which then merges layer 0 only.
#[test]
fn layers_to_transform_is_refused_with_a_pattern_that_does_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_copy(&tmp.path().join("a"), |m| {
        m.insert("layers_to_transform".into(), json!([0]));
    });
    // PEFT's adapter of layer 0 holds layer 0's tensors only.
    let weights = dir.join("adapter_model.safetensors");
    let all = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let layer0: HashMap<String, Tensor> = all
        .into_iter()
        .filter(|(n, _)| n.contains(".layers.0."))
        .collect();
    candle_core::safetensors::save(&layer0, &weights).unwrap();
    let e = merge_error(&dir, &tmp.path().join("out"));
    let pattern = r".*\.(layers|h|block|blocks|layer)\.(0)\.(.*\.)?(fc2|q_proj|v_proj)";
    assert!(
        e.contains("`layers_to_transform` = [0]") && e.contains(&Value::from(pattern).to_string()),
        "{e}"
    );
    let only_pattern = adapter_copy(&tmp.path().join("b"), |m| {
        m.insert("layers_pattern".into(), json!("layers"));
    });
    let e = merge_error(&only_pattern, &tmp.path().join("out"));
    assert!(e.contains("`layers_pattern`"), "{e}");

    // The hint's pattern loads the same adapter: layer 0 merged, layer 1 untouched.
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["target_modules"] = json!(pattern);
    v["layers_to_transform"] = Value::Null;
    std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
    let out = tmp.path().join("merged");
    orpo::merge::merge(None, &dir, &out, false, SaveDtype::F32).unwrap();
    let merged =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let base = candle_core::safetensors::load(
        model_dir("tiny-opt").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let w = |m: &HashMap<String, Tensor>, l: usize| {
        m[&format!("model.decoder.layers.{l}.self_attn.q_proj.weight")]
            .to_dtype(candle_core::DType::F32)
            .unwrap()
    };
    assert_eq!(max_diff(&w(&merged, 1), &w(&base, 1)), 0.0);
    assert!(max_diff(&w(&merged, 0), &w(&base, 0)) > 0.0);
}

fn spec(r: usize) -> LoraSpec {
    LoraSpec {
        r,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        use_dora: false,
        targets: Targets::AllLinear,
    }
}

fn load_fresh(r: usize) -> Result<CausalLm, orpo::model::ModelError> {
    let opts = LoadOptions {
        lora: Some((spec(r), AdapterInit::Fresh { seed: 0 })),
        ..LoadOptions::default()
    };
    CausalLm::load_with(&model_dir("tiny-opt"), &Device::Cpu, opts)
}

/// A rank above a layer's larger side is refused before anything is sized by it, naming
/// lora.r and the layer; tiny-opt's layers are 64 wide, so r = 64 (the goldens' largest) loads.
#[test]
fn a_rank_larger_than_every_side_of_a_layer_is_refused_before_allocating() {
    assert!(load_fresh(64).is_ok());
    for r in [65, 8_589_934_592, usize::MAX / 2, usize::MAX] {
        let e = match load_fresh(r) {
            Ok(_) => panic!("r = {r} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&format!("lora.r = {r}")) && e.contains("`model.decoder.layers.0."),
            "{e}"
        );
    }
    // Through the CLI: exit code 2, nothing written.
    let tmp = tempfile::tempdir().unwrap();
    for r in ["9223372036854775807", "8589934592"] {
        let out = tmp.path().join(r);
        let res = orpo(&[
            "train",
            "--config",
            "configs/tiny-opt.toml",
            "--set",
            "lora.enabled=true",
            "--set",
            &format!("lora.r={r}"),
            "--set",
            &format!("train.output_dir={}", out.display()),
        ]);
        let e = stderr(&res);
        assert_eq!(res.status.code(), Some(2), "{e}");
        assert!(e.contains(&format!("lora.r = {r}")), "{e}");
        assert!(!out.exists());
    }
}

/// A saved adapter's `r` must be its tensors' rank and fit its layers: named as the adapter's.
#[test]
fn an_absurd_r_in_adapter_config_is_refused_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, r) in [json!(9223372036854775807u64), json!(8), json!(u64::MAX)]
        .into_iter()
        .enumerate()
    {
        let dir = adapter_copy(&tmp.path().join(format!("a{i}")), |m| {
            m.insert("r".into(), r.clone());
        });
        let e = merge_error(&dir, &tmp.path().join("out"));
        assert!(
            e.contains("adapter_config.json") && e.contains(&format!("`r` = {r}")),
            "{e}"
        );
    }
    // Tensors of rank 65 on 64-wide layers: consistent, but larger than any side.
    let dir = adapter_copy(&tmp.path().join("wide"), |m| {
        m.insert("r".into(), json!(65));
        m.insert("target_modules".into(), json!(["q_proj"]));
    });
    let p = "base_model.model.model.decoder.layers.0.self_attn.q_proj";
    let tensors = HashMap::from([
        (
            format!("{p}.lora_A.weight"),
            Tensor::zeros((65, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            format!("{p}.lora_B.weight"),
            Tensor::zeros((64, 65), candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let e = match read_adapter(&dir, &Device::Cpu) {
        Ok(_) => panic!("a rank-65 adapter of 64-wide layers was read"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("adapter_config.json")
            && e.contains("`r` = 65")
            && e.contains("model.decoder.layers.0.self_attn.q_proj"),
        "{e}"
    );
}

/// A file where a folder belongs is an input error that says so.
#[test]
fn files_given_for_folders_are_named_as_files() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("afile");
    std::fs::write(&file, "keep").unwrap();
    let adapter = fixtures().join(ADAPTER).to_string_lossy().into_owned();
    for out in [file.clone(), file.join("sub")] {
        let r = orpo(&[
            "merge",
            "--adapter",
            &adapter,
            "--out",
            &out.to_string_lossy(),
        ]);
        let e = stderr(&r);
        assert_eq!(r.status.code(), Some(2), "{e}");
        assert!(e.contains("is a file, not a folder"), "{e}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    let r = orpo(&[
        "eval",
        "--model",
        "tests/fixtures/tiny-opt/config.json",
        "--data",
        "examples/data/explicit-10.jsonl",
    ]);
    let e = stderr(&r);
    assert_eq!(r.status.code(), Some(2), "{e}");
    assert!(e.contains("is a file, not a model"), "{e}");
    let config = fixtures().join(ADAPTER).join("adapter_config.json");
    let r = orpo(&[
        "merge",
        "--adapter",
        &config.to_string_lossy(),
        "--out",
        &tmp.path().join("o").to_string_lossy(),
    ]);
    let e = stderr(&r);
    assert_eq!(r.status.code(), Some(2), "{e}");
    assert!(e.contains("is a file, not an adapter folder"), "{e}");
}
