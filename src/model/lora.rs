//! LoRA (arXiv 2106.09685) as PEFT implements it: `y = W x + b + s · B (A x)` with A `[r, in]`
//! Kaiming-uniform, B `[out, r]` zeros and s = alpha / r (alpha / √r with rsLoRA). Tensor names
//! and the two files follow PEFT, so `PeftModel.from_pretrained(base, dir)` loads our adapters.

use super::load::ModelError;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Which linear layers get adapters.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Every linear layer except the output head (PEFT's `"all-linear"`).
    AllLinear,
    /// Module names or dotted suffixes (`q_proj`, `self_attn.v_proj`), matched as PEFT does.
    Modules(Vec<String>),
    /// PEFT's string `target_modules`: a regular expression the whole module name must match.
    Pattern(TargetPattern),
}

/// A `target_modules` regular expression, matched as PEFT's `re.fullmatch(pattern, name)`
/// against names such as `model.layers.0.self_attn.q_proj` (fancy-regex, which reads Python's
/// syntax, look-around included).
#[derive(Debug, Clone)]
pub struct TargetPattern {
    pub text: String,
    re: fancy_regex::Regex,
}

impl TargetPattern {
    pub fn new(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("the pattern is empty".into());
        }
        let invalid =
            |e: fancy_regex::Error| format!("{text:?} is not a valid regular expression: {e}");
        // On its own first: inside the anchoring group an unbalanced `)` would close it early
        // (`a)|(b` would become a prefix-or-suffix match that Python refuses).
        fancy_regex::Regex::new(text).map_err(invalid)?;
        // A verbose flag's `#` comment would swallow the closing anchor.
        let verbose = fancy_regex::Regex::new(r"\(\?[a-zA-Z]*x[a-zA-Z-]*[:)]").map_err(invalid)?;
        if verbose.is_match(text).unwrap_or(false) {
            return Err(format!(
                "{text:?}: the verbose flag (?x) is not supported; write the pattern without it"
            ));
        }
        fancy_regex::Regex::new(&format!("^(?:{text})$"))
            .map(|re| TargetPattern {
                text: text.to_string(),
                re,
            })
            .map_err(invalid)
    }

    pub fn is_match(&self, name: &str) -> bool {
        self.re.is_match(name).unwrap_or(false)
    }
}

impl PartialEq for TargetPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// Recorded in adapter_config.json; ORPO training disables dropout, as TRL does.
    pub dropout: f64,
    pub use_rslora: bool,
    /// DoRA: each adapted layer's output rows rescaled by a trainable magnitude over the row
    /// norms of `W + s·B·A` (PEFT's `use_dora`).
    pub use_dora: bool,
    pub targets: Targets,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether the linear layer at `prefix` (e.g. `model.layers.0.self_attn.q_proj`) is a target.
    pub fn matches(&self, prefix: &str) -> bool {
        match &self.targets {
            Targets::AllLinear => true,
            Targets::Modules(names) => names
                .iter()
                .any(|t| prefix == t || prefix.ends_with(&format!(".{t}"))),
            Targets::Pattern(p) => p.is_match(prefix),
        }
    }
}

/// Where adapter weights come from.
pub enum AdapterInit {
    /// A fresh adapter: A from a seeded Kaiming-uniform, B zeros.
    Fresh { seed: u64 },
    /// Saved tensors under PEFT names.
    Saved(HashMap<String, Tensor>),
}

/// PEFT's saved name of a LoRA matrix (`which` is `A` or `B`).
pub fn peft_name(prefix: &str, which: char) -> String {
    format!("base_model.model.{prefix}.lora_{which}.weight")
}

/// PEFT's saved name of a DoRA layer's magnitude vector `[out]`.
pub fn magnitude_name(prefix: &str) -> String {
    format!("base_model.model.{prefix}.lora_magnitude_vector")
}

/// The module name PEFT records in `target_modules` (the last path component).
pub fn module_name(prefix: &str) -> &str {
    prefix.rsplit('.').next().unwrap_or(prefix)
}

/// A fresh A `[r, in]`: Kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in) as in PEFT, drawn
/// from a stream seeded by the run seed and the module's name (independent of load order).
pub fn init_a(
    prefix: &str,
    r: usize,
    in_f: usize,
    seed: u64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prefix.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ h);
    let bound = 1.0 / (in_f as f32).sqrt();
    let data: Vec<f32> = (0..r * in_f)
        .map(|_| rng.gen_range(-bound..bound))
        .collect();
    Tensor::from_vec(data, (r, in_f), device)
}

/// `adapter_config.json` as PEFT writes it for a causal-LM LoRA adapter.
pub fn adapter_config(spec: &LoraSpec, base: &str, modules: &BTreeSet<String>) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        // A pattern may pick some layers' modules only: PEFT gets it as it is.
        "target_modules": match &spec.targets {
            Targets::Pattern(p) => json!(p.text),
            _ => json!(modules.iter().collect::<Vec<_>>()),
        },
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": spec.use_dora,
        "revision": null,
    })
}

/// A saved adapter folder: its settings, base model and tensors.
pub struct SavedAdapter {
    pub dir: PathBuf,
    pub spec: LoraSpec,
    pub base: Option<String>,
    pub tensors: HashMap<String, Tensor>,
}

/// True when `dir` holds an adapter rather than a full model.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

fn bad(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads `adapter_config.json` and `adapter_model.safetensors` (ours or PEFT's), refusing the
/// PEFT options this trainer does not implement rather than loading them wrongly.
pub fn read_adapter(dir: &Path, device: &Device) -> Result<SavedAdapter, ModelError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
        path: path.clone(),
        source: e,
    })?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| bad(&path, format!("invalid JSON: {e}")))?;
    let peft_type = v["peft_type"].as_str().unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad(&path, format!("peft_type `{peft_type}` is not LORA")));
    }
    let r = v["r"]
        .as_u64()
        .filter(|&r| r > 0)
        .ok_or_else(|| bad(&path, "`r` must be a positive integer"))? as usize;
    let alpha = v["lora_alpha"].as_f64().unwrap_or(8.0);
    for (key, ok) in [
        ("bias", v["bias"].is_null() || v["bias"] == "none"),
        (
            "fan_in_fan_out",
            !v["fan_in_fan_out"].as_bool().unwrap_or(false),
        ),
        ("modules_to_save", v["modules_to_save"].is_null()),
        (
            "rank_pattern",
            v["rank_pattern"].as_object().is_none_or(|m| m.is_empty()),
        ),
        (
            "alpha_pattern",
            v["alpha_pattern"].as_object().is_none_or(|m| m.is_empty()),
        ),
    ] {
        if !ok {
            return Err(bad(&path, format!("`{key}` = {} is not supported", v[key])));
        }
    }
    let targets = match &v["target_modules"] {
        Value::Array(a) => Targets::Modules(
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
        ),
        Value::String(s) if s.eq_ignore_ascii_case("all-linear") => Targets::AllLinear,
        Value::String(s) => {
            Targets::Pattern(TargetPattern::new(s).map_err(|e| bad(&path, e.to_string()))?)
        }
        other => {
            return Err(bad(
                &path,
                format!(
                    "target_modules {other} is not supported (a list of names, a pattern or \
                     \"all-linear\")"
                ),
            ))
        }
    };
    let weights = dir.join(ADAPTER_WEIGHTS);
    let raw =
        candle_core::safetensors::load(&weights, device).map_err(|e| ModelError::Weights {
            path: weights.clone(),
            msg: e.to_string(),
        })?;
    let mut tensors = HashMap::new();
    for (name, t) in raw {
        // PEFT drops the adapter name when saving; tolerate files that kept it.
        let name = name
            .replace(".lora_A.default.", ".lora_A.")
            .replace(".lora_B.default.", ".lora_B.")
            .replace(
                ".lora_magnitude_vector.default.weight",
                ".lora_magnitude_vector",
            );
        let t = if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32)?
        };
        tensors.insert(name, t);
    }
    Ok(SavedAdapter {
        dir: dir.to_path_buf(),
        spec: LoraSpec {
            r,
            alpha,
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
            use_rslora: v["use_rslora"].as_bool().unwrap_or(false),
            use_dora: v["use_dora"].as_bool().unwrap_or(false),
            targets,
        },
        base: v["base_model_name_or_path"].as_str().map(str::to_string),
        tensors,
    })
}
