//! Bad checkpoints: config.json values that would make training NaN or that have the wrong
//! type, and weight tensors that are not floating point or hold NaN/inf, are refused when the
//! model loads (before any training step), with the file and the key or tensor named.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use orpo::config::Config;
use orpo::model::{CausalLm, ModelConfig};
use orpo::train::load_trainer;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The error `ModelConfig::from_dir` gives for fixture `model` with config.json edited, and
/// the config file's path.
fn config_error(model: &str, edit: impl FnOnce(&mut Value)) -> (String, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    edited_copy(model, tmp.path(), "config.json", edit);
    let msg = match ModelConfig::from_dir(tmp.path()) {
        Ok(c) => panic!("{model}: the edited config loaded: {c:?}"),
        Err(e) => e.to_string(),
    };
    // The whole model load stops at the same place.
    let full = match CausalLm::load(tmp.path(), &Device::Cpu) {
        Ok(_) => panic!("{model}: the edited model loaded"),
        Err(e) => e.to_string(),
    };
    assert_eq!(msg, full);
    (msg, tmp.path().join("config.json"))
}

/// Asserts the error names config.json's path and contains every fragment.
fn assert_config_refused(model: &str, edit: impl FnOnce(&mut Value), fragments: &[&str]) {
    let (msg, path) = config_error(model, edit);
    assert!(
        msg.contains(&path.display().to_string()),
        "{model}: the message does not name {}: {msg}",
        path.display()
    );
    for f in fragments {
        assert!(msg.contains(f), "{model}: `{f}` not in: {msg}");
    }
}

/// `ModelConfig` of fixture `model` with config.json edited (for edits that must still load).
fn config_ok(model: &str, edit: impl FnOnce(&mut Value)) -> ModelConfig {
    let tmp = tempfile::tempdir().unwrap();
    edited_copy(model, tmp.path(), "config.json", edit);
    ModelConfig::from_dir(tmp.path()).unwrap()
}

#[test]
fn negative_norm_epsilons_are_refused_and_zero_is_allowed() {
    for model in ["tiny-llama3", "tiny-mistral", "tiny-gemma2"] {
        assert_config_refused(
            model,
            |c| c["rms_norm_eps"] = json!(-0.5),
            &["`rms_norm_eps`", "-0.5"],
        );
        assert_config_refused(
            model,
            |c| c["rms_norm_eps"] = json!("1e-6"),
            &["`rms_norm_eps` must be a number", "\"1e-6\""],
        );
    }
    assert_config_refused(
        "tiny-opt",
        |c| c["layer_norm_eps"] = json!(-1e-5),
        &["`layer_norm_eps`", "-0.00001"],
    );
    // transformers accepts 0.
    let c = config_ok("tiny-llama3", |c| c["rms_norm_eps"] = json!(0.0));
    assert_eq!(c.rms_norm_eps, 0.0);
}

#[test]
fn rope_theta_must_be_positive() {
    for theta in [json!(0), json!(-10000.5)] {
        let shown = theta.to_string();
        let t = theta.clone();
        assert_config_refused(
            "tiny-llama3",
            move |c| c["rope_theta"] = t,
            &["`rope_theta` must be a positive number", &shown],
        );
        let t = theta.clone();
        assert_config_refused(
            "tiny-mistral",
            move |c| c["rope_theta"] = t,
            &["`rope_theta`"],
        );
        // transformers 5's spelling.
        let t = theta.clone();
        assert_config_refused(
            "tiny-gemma2",
            move |c| c["rope_parameters"]["rope_theta"] = t,
            &["`rope_parameters.rope_theta`"],
        );
        // Gemma 3's two thetas, under the keys the file uses.
        let t = theta.clone();
        assert_config_refused(
            "tiny-gemma3",
            move |c| c["rope_local_base_freq"] = t,
            &["`rope_local_base_freq` must be a positive number"],
        );
        let t = theta.clone();
        assert_config_refused(
            "tiny-gemma3",
            move |c| c["rope_theta"] = t,
            &["`rope_theta` must be a positive number"],
        );
    }
    assert_config_refused(
        "tiny-llama3",
        |c| c["rope_theta"] = json!("big"),
        &["`rope_theta` must be a number", "\"big\""],
    );
}

#[test]
fn rope_scaling_factors_must_be_positive() {
    for factor in [0.0, -2.0] {
        assert_config_refused(
            "tiny-llama3",
            |c| c["rope_scaling"]["factor"] = json!(factor),
            &["`rope_scaling.factor` must be a positive number", "llama3"],
        );
        assert_config_refused(
            "tiny-llama3",
            |c| c["rope_scaling"]["low_freq_factor"] = json!(factor),
            &["`rope_scaling.low_freq_factor`"],
        );
        assert_config_refused(
            "tiny-gemma3",
            |c| c["rope_scaling"]["factor"] = json!(factor),
            &["`rope_scaling.factor`", "linear"],
        );
        assert_config_refused(
            "tiny-gemma2",
            |c| {
                c["rope_parameters"] =
                    json!({"rope_type": "linear", "rope_theta": 1e4, "factor": factor})
            },
            &["`rope_parameters.factor`"],
        );
        assert_config_refused(
            "tiny-phi3",
            |c| c["rope_scaling"]["short_factor"][1] = json!(factor),
            &["`rope_scaling.short_factor` must hold positive numbers"],
        );
    }
    assert_config_refused(
        "tiny-llama3",
        |c| c["rope_scaling"]["factor"] = json!("8"),
        &["`rope_scaling.factor` must be a number", "\"8\""],
    );
    assert_config_refused(
        "tiny-llama3",
        |c| c["rope_scaling"] = json!("llama3"),
        &["`rope_scaling` must be an object or null"],
    );
}

#[test]
fn gemma2_soft_caps_and_query_scalar_must_be_positive_or_null() {
    for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
        for bad in [json!(0.0), json!(-30.0), json!("30")] {
            let shown = bad.to_string();
            assert_config_refused(
                "tiny-gemma2",
                |c| c[key] = bad,
                &[
                    &format!("`{key}` must be a positive number or null"),
                    &shown,
                ],
            );
        }
        assert_config_refused("tiny-gemma3", |c| c[key] = json!(0), &[&format!("`{key}`")]);
    }
    for bad in [json!(0), json!(-24)] {
        let shown = bad.to_string();
        assert_config_refused(
            "tiny-gemma2",
            |c| c["query_pre_attn_scalar"] = bad,
            &["`query_pre_attn_scalar` must be a positive number", &shown],
        );
    }
    // null means no cap.
    let c = config_ok("tiny-gemma2", |c| {
        c["attn_logit_softcapping"] = Value::Null;
        c["final_logit_softcapping"] = Value::Null;
    });
    assert_eq!((c.attn_softcap, c.final_softcap), (None, None));
}

#[test]
fn sliding_windows_must_be_positive_integers_or_null() {
    for bad in [json!(-5), json!(0), json!(2.5), json!("24")] {
        let shown = bad.to_string();
        let b = bad.clone();
        assert_config_refused(
            "tiny-mistral",
            move |c| c["sliding_window"] = b,
            &[
                "`sliding_window` must be a positive integer or null",
                &shown,
            ],
        );
        let b = bad.clone();
        assert_config_refused(
            "tiny-gemma2",
            move |c| c["sliding_window"] = b,
            &["`sliding_window`"],
        );
    }
    // A negative window is refused even where sliding is off.
    assert_config_refused(
        "tiny-qwen2",
        |c| c["sliding_window"] = json!(-5),
        &["`sliding_window`", "-5"],
    );
    assert_eq!(
        config_ok("tiny-mistral", |c| c["sliding_window"] = json!(7)).sliding_window,
        Some(7)
    );
    assert_eq!(
        config_ok("tiny-mistral", |_| {}).sliding_window,
        None,
        "null: no window"
    );
}

#[test]
fn wrong_types_and_values_are_named_not_reported_missing() {
    assert_config_refused(
        "tiny-llama3",
        |c| c["hidden_size"] = json!("abc"),
        &["`hidden_size` must be a positive integer, found \"abc\""],
    );
    assert_config_refused(
        "tiny-opt",
        |c| c["hidden_size"] = json!(-3),
        &["`hidden_size` must be a positive integer, found -3"],
    );
    assert_config_refused(
        "tiny-mistral",
        |c| c["num_hidden_layers"] = json!(2.5),
        &["`num_hidden_layers` must be a positive integer, found 2.5"],
    );
    assert_config_refused(
        "tiny-qwen2",
        |c| c["num_hidden_layers"] = json!(0),
        &["`num_hidden_layers` must be a positive integer, found 0"],
    );
    assert_config_refused(
        "tiny-opt",
        |c| c["ffn_dim"] = json!([256]),
        &["`ffn_dim` must be a positive integer, found [256]"],
    );
    assert_config_refused(
        "tiny-llama3",
        |c| c["tie_word_embeddings"] = json!("yes"),
        &["`tie_word_embeddings` must be true or false, found \"yes\""],
    );
    assert_config_refused(
        "tiny-gemma2",
        |c| c["layer_types"] = json!("sliding_attention"),
        &["`layer_types` must be a list"],
    );
    assert_config_refused(
        "tiny-llama3",
        |c| c["hidden_act"] = json!(1),
        &["`hidden_act` must be a string, found 1"],
    );
    // Used to divide by zero (a panic) choosing Gemma 3's full-attention layers.
    assert_config_refused(
        "tiny-gemma3",
        |c| {
            c.as_object_mut().unwrap().remove("layer_types");
            c["sliding_window_pattern"] = json!(0);
        },
        &["`sliding_window_pattern` must be a positive integer, found 0"],
    );
    // An absent key is still reported missing.
    assert_config_refused(
        "tiny-llama3",
        |c| {
            c.as_object_mut().unwrap().remove("hidden_size");
        },
        &["missing `hidden_size`"],
    );
}

#[test]
fn a_config_that_is_not_an_object_is_named_as_such() {
    for (bad, kind) in [(json!([1, 2]), "an array"), (json!("llama"), "a string")] {
        let (msg, path) = config_error("tiny-llama3", |c| *c = bad);
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("config.json is not a JSON object (found {kind})")),
            "{msg}"
        );
        assert!(!msg.contains("model_type"), "{msg}");
    }
    assert_config_refused(
        "tiny-llama3",
        |c| c["architectures"] = json!("LlamaForCausalLM"),
        &["`architectures` must be a list of class names"],
    );
}

/// The trainer refuses the config before any step, with exit code 2.
#[test]
fn the_trainer_refuses_a_bad_config_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    edited_copy("tiny-mistral", &model, "config.json", |c| {
        c["sliding_window"] = json!(-5)
    });
    let out = tmp.path().join("out");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/explicit-10.jsonl");
    let sets = [
        format!("model.id={}", model.display()),
        format!("train.output_dir={}", out.display()),
        "train.max_steps=1".to_string(),
        "train.batch_size=2".to_string(),
        format!("data.train={}", data.display()),
    ];
    let config = Config::from_toml_str("", "test.toml", &sets).unwrap();
    let err = match load_trainer(&config) {
        Ok(_) => panic!("the trainer loaded a config with sliding_window = -5"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.contains(&model.join("config.json").display().to_string())
            && msg.contains("`sliding_window`")
            && msg.contains("-5"),
        "{msg}"
    );
    assert_eq!(err.exit_code(), 2, "{msg}");
    assert!(!out.join("metrics.jsonl").exists());
}

/// A copy of fixture `model` in `dir` with the tensors of `file` edited.
fn weights_copy(
    model: &str,
    dir: &Path,
    file: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    edited_copy(model, dir, "config.json", |_| {});
    let path = dir.join(file);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// `t` with element `at` (flat index) replaced by `value`, in `t`'s dtype.
fn with_value(t: &Tensor, at: usize, value: f32) -> Tensor {
    let mut v: Vec<f32> = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v[at] = value;
    Tensor::from_vec(v, t.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(t.dtype())
        .unwrap()
}

fn load_error(dir: &Path) -> String {
    match CausalLm::load(dir, &Device::Cpu) {
        Ok(_) => panic!("the edited model loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn integer_weight_tensors_are_refused() {
    let name = "model.decoder.layers.1.fc1.weight";
    let tmp = tempfile::tempdir().unwrap();
    let file = weights_copy("tiny-opt", tmp.path(), "model.safetensors", |w| {
        let dims = w[name].dims().to_vec();
        let n = w[name].elem_count();
        let ints = Tensor::from_vec(vec![1i32; n], dims, &Device::Cpu).unwrap();
        w.insert(name.to_string(), ints);
    });
    let msg = load_error(tmp.path());
    assert!(
        msg.contains(&file.display().to_string())
            && msg.contains(&format!("`{name}`"))
            && msg.contains("I32")
            && msg.contains("floating point"),
        "{msg}"
    );
    // In a shard: the shard is named.
    let name = "model.layers.0.mlp.down_proj.weight";
    let tmp = tempfile::tempdir().unwrap();
    let shard = "model-00002-of-00003.safetensors";
    let file = weights_copy("tiny-mistral", tmp.path(), shard, |w| {
        let t = w[name].to_dtype(DType::I64).unwrap();
        w.insert(name.to_string(), t);
    });
    let msg = load_error(tmp.path());
    assert!(
        msg.contains(&file.display().to_string())
            && msg.contains(&format!("`{name}`"))
            && msg.contains("I64"),
        "{msg}"
    );
}

#[test]
fn weights_holding_nan_or_inf_are_refused() {
    // tiny-opt's weights are f16, tiny-llama3's and tiny-mistral's bf16.
    let cases = [
        (
            "tiny-opt",
            "model.safetensors",
            "model.decoder.embed_tokens.weight",
            f32::NAN,
        ),
        (
            "tiny-opt",
            "model.safetensors",
            "model.decoder.layers.0.self_attn_layer_norm.bias",
            f32::INFINITY,
        ),
        (
            "tiny-llama3",
            "model.safetensors",
            "model.layers.1.self_attn.q_proj.weight",
            f32::NEG_INFINITY,
        ),
        (
            "tiny-mistral",
            "model-00002-of-00003.safetensors",
            "model.layers.0.post_attention_layernorm.weight",
            f32::NAN,
        ),
    ];
    for (model, file, name, value) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let path = weights_copy(model, tmp.path(), file, |w| {
            let t = with_value(&w[name], 5, value);
            w.insert(name.to_string(), t);
        });
        let msg = load_error(tmp.path());
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains(&format!("`{name}`"))
                && msg.contains("NaN or infinite"),
            "{model} {name} {value}: {msg}"
        );
    }
}

#[test]
fn large_finite_and_unused_integer_tensors_still_load() {
    // f16 values near its maximum: a plain f16 sum would overflow to inf; the check must not.
    let name = "model.decoder.layers.0.fc2.weight";
    let tmp = tempfile::tempdir().unwrap();
    weights_copy("tiny-opt", tmp.path(), "model.safetensors", |w| {
        let t = w[name].ones_like().unwrap().affine(60000.0, 0.0).unwrap();
        assert_eq!(t.dtype(), DType::F16);
        w.insert(name.to_string(), t);
        // A buffer the model never reads (as some checkpoints carry) is ignored.
        let ids = Tensor::arange(0i64, 8, &Device::Cpu).unwrap();
        w.insert("model.decoder.position_ids".to_string(), ids);
    });
    let model = CausalLm::load(tmp.path(), &Device::Cpu).unwrap();
    let w = model.params().get(name).unwrap().as_tensor().clone();
    assert_eq!(w.max_all().unwrap().to_scalar::<f32>().unwrap(), 60000.0);
}

/// The unedited fixtures load as before.
#[test]
fn every_fixture_still_loads() {
    for model in MODELS {
        CausalLm::load(&model_dir(model), &Device::Cpu).unwrap_or_else(|e| panic!("{model}: {e}"));
    }
}

/// A header entry whose shape does not fit its bytes (safetensors itself says only "invalid
/// shape, data type, or offset for tensor"): the message names the file and the tensor.
#[test]
fn a_header_entry_that_does_not_fit_its_bytes_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = weights_copy("tiny-opt", tmp.path(), "model.safetensors", |_| {});
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = "decoder.final_layer_norm.bias";
    let entry = header
        .as_object_mut()
        .unwrap()
        .iter_mut()
        .find(|(k, _)| k.ends_with(name))
        .map(|(_, v)| v)
        .unwrap();
    let len = entry["shape"][0].as_u64().unwrap();
    entry["shape"] = serde_json::json!([len + 1]);
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut edited = (text.len() as u64).to_le_bytes().to_vec();
    edited.extend(&text);
    edited.extend(&bytes[8 + n..]);
    std::fs::write(&file, edited).unwrap();
    let msg = load_error(tmp.path());
    assert!(
        msg.contains(&file.display().to_string()) && msg.contains(&format!("`model.{name}`")),
        "{msg}"
    );
}

/// Weights read a tensor at a time (a QLoRA base, `orpo merge`'s base): a file cut short or
/// not safetensors at all is an error naming the file, before anything is built on it.
#[test]
fn broken_weight_files_read_a_tensor_at_a_time_are_named() {
    use orpo::model::lora::{AdapterInit, LoraSpec, Targets};
    use orpo::model::{LoadOptions, Quantize};
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        use_dora: false,
        targets: Targets::AllLinear,
    };
    let qlora = || LoadOptions {
        lora: Some((spec.clone(), AdapterInit::Fresh { seed: 42 })),
        quantize: Some(Quantize {
            double_quant: false,
        }),
        ..LoadOptions::default()
    };
    for (case, bytes, says) in [
        ("cut short", None, "cut short"),
        (
            "not safetensors",
            Some(b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage".to_vec()),
            "not a safetensors file",
        ),
        (
            "a header that is not JSON",
            Some(b"\x04\0\0\0\0\0\0\0{{{{".to_vec()),
            "its header",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let file = weights_copy("tiny-opt", tmp.path(), "model.safetensors", |_| {});
        let full = std::fs::read(&file).unwrap();
        let bytes = bytes.unwrap_or_else(|| full[..full.len() - 1000].to_vec());
        std::fs::write(&file, bytes).unwrap();
        let msg = match CausalLm::load_with(tmp.path(), &Device::Cpu, qlora()) {
            Ok(_) => panic!("{case}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains(&file.display().to_string()) && msg.contains(says),
            "{case}: {msg}"
        );
    }
}
