//! Shared helpers for the golden tests: fixture paths, golden files, tolerances.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use orpo::config::Config;
use orpo::data::{PairText, TokenizedPair};
use serde_json::Value;
use std::path::Path;
use std::path::PathBuf;

/// The project's root (the tests' working directory for the binary).
pub fn repo() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the `orpo` binary from the project's root.
pub fn orpo(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

/// The objects of a JSON Lines file (blank lines skipped).
pub fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// JSON Lines text with the given top-level number keys cut out (timings), the rest kept
/// character for character.
pub fn without_keys(text: &str, keys: &[&str]) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut line = line.to_string();
        for key in keys {
            let tag = format!("\"{key}\":");
            if let Some(at) = line.find(&tag) {
                let rest = &line[at + tag.len()..];
                let end = rest.find([',', '}']).unwrap_or(rest.len());
                line.replace_range(at..at + tag.len() + end, "");
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// A copy of fixture `model` in `dir` with one of its JSON files (`config.json`,
/// `tokenizer_config.json`) edited, for tests of settings no fixture carries.
pub fn edited_copy(model: &str, dir: &std::path::Path, file: &str, edit: impl FnOnce(&mut Value)) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(model_dir(model)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let path = dir.join(file);
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
}

/// The golden file for a fixture model (tiny-opt-legacy shares tiny-opt's).
pub fn golden(model: &str) -> Value {
    let name = if model == "tiny-opt-legacy" {
        "tiny-opt"
    } else {
        model
    };
    let path = fixtures().join(format!("golden/{name}.trl.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

pub const MODELS: [&str; 11] = [
    "tiny-opt",
    "tiny-opt-legacy",
    "tiny-opt-350m-layout",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-gemma",
    "tiny-phi3",
    "tiny-llama3",
    "tiny-qwen3",
    "tiny-gemma2",
    "tiny-gemma3",
];

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn labels(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Golden tokenized rows as the trainer's pairs (independent of our tokeniser).
pub fn golden_pairs(g: &Value, key: &str) -> Vec<TokenizedPair> {
    g[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| TokenizedPair {
            prompt_input_ids: ids(&t["prompt_input_ids"]),
            chosen_input_ids: ids(&t["chosen_input_ids"]),
            chosen_labels: labels(&t["chosen_labels"]),
            rejected_input_ids: ids(&t["rejected_input_ids"]),
            rejected_labels: labels(&t["rejected_labels"]),
            truncated: false,
            text: PairText {
                prompt: t["prompt"].as_str().unwrap().to_string(),
                chosen: t["chosen"].as_str().unwrap().to_string(),
                rejected: t["rejected"].as_str().unwrap().to_string(),
            },
        })
        .collect()
}

/// |a - b| <= rel * |b| + abs, with a readable failure message.
pub fn assert_close(what: &str, got: f64, want: f64, rel: f64, abs: f64) {
    let tol = rel * want.abs() + abs;
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (diff {:.3e}, tol {tol:.3e})",
        (got - want).abs()
    );
}

/// `max |t|` over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |a - b|` over all elements.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// A LoRA run of fixture `model` into `out` (r 4, alpha 8, 2 steps of 2 pairs at lr 5e-3 on
/// examples/data/explicit-10.jsonl), with `extra` overrides.
pub fn lora_config(model: &str, out: &Path, extra: &[&str]) -> Config {
    let mut sets = vec![
        format!("model.id={}", model_dir(model).display()),
        format!("train.output_dir={}", out.display()),
        "train.max_steps=2".to_string(),
        "train.batch_size=2".to_string(),
        "optim.lr=5e-3".to_string(),
        "data.max_length=256".to_string(),
        "data.max_prompt_length=192".to_string(),
        "lora.enabled=true".to_string(),
        "lora.r=4".to_string(),
        "lora.alpha=8".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let data = repo().join("examples/data/explicit-10.jsonl");
    sets.push(format!("data.train={}", data.display()));
    Config::from_toml_str("", "test.toml", &sets).unwrap()
}

/// Two sequences, the second padded: the logits they give compare models.
pub fn probe() -> (Tensor, Tensor) {
    let ids = Tensor::new(&[[5u32, 17, 300, 42, 9], [7, 8, 9, 100, 100]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    (ids, mask)
}

/// `orpo eval --model MODEL` on examples/data/hh-rlhf-eval-16.jsonl with configs/tiny-opt.toml
/// and `--set`s, as its JSON line (`eval_*` keys).
pub fn cli_eval(model: &Path, sets: &[&str]) -> serde_json::Value {
    let model = model.to_string_lossy().into_owned();
    let mut args = vec![
        "eval",
        "--model",
        &model,
        "--data",
        "examples/data/hh-rlhf-eval-16.jsonl",
        "--config",
        "configs/tiny-opt.toml",
        "--json",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let r = orpo(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8_lossy(&r.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// A run folder's `eval_metrics.json` (its end-of-training evaluation).
pub fn final_eval(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("eval_metrics.json")).unwrap()).unwrap()
}

/// The steps of the `checkpoint-STEP` folders in `dir`, ascending.
#[allow(dead_code)]
pub fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("checkpoint-")?.parse().ok()
        })
        .collect();
    steps.sort();
    steps
}

/// A JSON array of numbers as f32 values (goldens written from f32 tensors).
#[allow(dead_code)]
pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of bytes (bitsandbytes' 8-bit codes).
#[allow(dead_code)]
pub fn json_u8s(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u8::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// A copy of folder `from` (and its subfolders) at `to`, created as needed.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `orpo train` on configs/tiny-opt.toml with `flags` and each of `sets` as `--set`.
pub fn train_tiny_opt(sets: &[&str], flags: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--config", "configs/tiny-opt.toml"];
    args.extend_from_slice(flags);
    for s in sets {
        args.extend(["--set", s]);
    }
    orpo(&args)
}
