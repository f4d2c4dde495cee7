//! LoRA (arXiv 2106.09685) as PEFT implements it: `y = W x + b + s · B (A x)` with A `[r, in]`
//! Kaiming-uniform, B `[out, r]` zeros and s = alpha / r (alpha / √r with rsLoRA). Tensor names
//! and the two files follow PEFT, so `PeftModel.from_pretrained(base, dir)` loads our adapters.

use super::error::ModelError;
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
    let n = r.checked_mul(in_f).ok_or_else(|| {
        candle_core::Error::Msg(format!("LoRA A of `{prefix}`: {r} x {in_f} overflows"))
    })?;
    let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
    Tensor::from_vec(data, (r, in_f), device)
}

/// `adapter_config.json` as PEFT writes it for a causal-LM LoRA adapter.
/// `revision` is the base's hub revision, which PEFT loads it at.
pub fn adapter_config(
    spec: &LoraSpec,
    base: &str,
    revision: Option<&str>,
    modules: &BTreeSet<String>,
) -> Value {
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
        "revision": revision,
    })
}

/// A saved adapter folder: its settings, base model and tensors.
pub struct SavedAdapter {
    pub dir: PathBuf,
    pub spec: LoraSpec,
    pub base: Option<String>,
    /// The hub revision of `base` (PEFT's `revision`).
    pub base_revision: Option<String>,
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

/// `adapter_config.json`'s keys, read strictly: a key present with the wrong JSON type is an
/// error naming it; an absent or null key takes PEFT's default.
struct Keys<'a> {
    path: &'a Path,
    map: &'a serde_json::Map<String, Value>,
}

impl<'a> Keys<'a> {
    /// The key's value; None when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, what: &str, found: &Value) -> ModelError {
        bad(self.path, format!("`{key}` must be {what}, found {found}"))
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string or null", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "true, false or null", v)),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    /// Whether a key that orpo does not implement holds a setting (not absent, null, or an
    /// empty list, object or string), after checking its JSON type is one of `types`
    /// (`"array"`, `"object"`, `"string"`, `"integer"`).
    fn set(&self, key: &str, types: &[&str]) -> Result<bool, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(false);
        };
        let ok = types.iter().any(|t| match *t {
            "array" => v.is_array(),
            "object" => v.is_object(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            _ => false,
        });
        if !ok {
            let what = types
                .iter()
                .map(|t| match *t {
                    "array" => "a list",
                    "object" => "an object",
                    "string" => "a string",
                    _ => "an integer",
                })
                .collect::<Vec<_>>()
                .join(", ");
            return Err(self.wrong(key, &format!("{what} or null"), v));
        }
        Ok(match v {
            Value::Array(a) => !a.is_empty(),
            Value::Object(m) => !m.is_empty(),
            Value::String(s) => !s.is_empty(),
            _ => true,
        })
    }

    fn unsupported(&self, key: &str, why: &str) -> ModelError {
        let v = &self.map[key];
        bad(self.path, format!("`{key}` = {v} is not supported: {why}"))
    }
}

/// A `target_modules` pattern that picks `modules` in the layers `layers_to_transform` names
/// (the layer-index match PEFT makes under `layers_pattern`, by default any of its common
/// layer-list names), for a hint; None where the adapter's settings do not allow one.
fn layers_hint(k: &Keys) -> Option<String> {
    let modules: Vec<String> = k
        .get("target_modules")?
        .as_array()?
        .iter()
        .map(|m| m.as_str().map(|m| fancy_regex::escape(m).into_owned()))
        .collect::<Option<_>>()?;
    let layers: Vec<String> = match k.get("layers_to_transform")? {
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x.to_string()))
            .collect::<Option<_>>()?,
        v => vec![v.as_u64()?.to_string()],
    };
    let list = match k.get("layers_pattern") {
        None => "(layers|h|block|blocks|layer)".to_string(),
        Some(Value::String(s)) => fancy_regex::escape(s).into_owned(),
        Some(_) => return None,
    };
    if modules.is_empty() || layers.is_empty() {
        return None;
    }
    Some(format!(
        r".*\.{list}\.({})\.(.*\.)?({})",
        layers.join("|"),
        modules.join("|")
    ))
}

/// Reads `adapter_config.json` and `adapter_model.safetensors` (ours or PEFT's), refusing the
/// PEFT options this trainer does not implement rather than loading them wrongly. Every key
/// orpo reads is checked for its JSON type (an absent or null key takes PEFT's default), and
/// `r` against the saved tensors.
pub fn read_adapter(dir: &Path, device: &Device) -> Result<SavedAdapter, ModelError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
        path: path.clone(),
        source: e,
    })?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| bad(&path, format!("invalid JSON: {e}")))?;
    let Value::Object(map) = &v else {
        return Err(bad(&path, format!("must hold a JSON object, found {v}")));
    };
    let k = Keys { path: &path, map };
    if let Some(peft_type) = k.str("peft_type")? {
        if peft_type != "LORA" {
            return Err(bad(
                &path,
                format!("peft_type `{peft_type}` is not LORA (orpo reads LoRA adapters only)"),
            ));
        }
    }
    if let Some(task) = k.str("task_type")? {
        if task != "CAUSAL_LM" {
            return Err(bad(
                &path,
                format!(
                    "task_type `{task}` is not supported: orpo trains and loads causal-LM \
                     adapters (CAUSAL_LM)"
                ),
            ));
        }
    }
    let r = match k.get("r") {
        // PEFT's default.
        None => 8,
        Some(x) => x
            .as_u64()
            .filter(|&r| r > 0)
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| k.wrong("r", "a positive integer", x))?,
    };
    let alpha = k.number("lora_alpha")?.unwrap_or(8.0);
    let dropout = k.number("lora_dropout")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&dropout) {
        return Err(bad(
            &path,
            format!("`lora_dropout` must be between 0 and 1, found {dropout}"),
        ));
    }
    let use_rslora = k.bool("use_rslora")?.unwrap_or(false);
    let use_dora = k.bool("use_dora")?.unwrap_or(false);
    let base =
        match k.str("base_model_name_or_path")? {
            Some("") => return Err(bad(
                &path,
                "`base_model_name_or_path` is empty (name the base model, or set it to null and \
                 pass --base)",
            )),
            b => b.map(str::to_string),
        };
    let base_revision = k.str("revision")?.map(str::to_string);
    // Read for their types only.
    k.bool("inference_mode")?;
    if let Some(init) = k.get("init_lora_weights") {
        if !init.is_boolean() && !init.is_string() {
            return Err(k.wrong("init_lora_weights", "true, false or a method's name", init));
        }
    }
    match k.str("bias")? {
        None | Some("none") => {}
        Some(_) => {
            return Err(k.unsupported(
                "bias",
                "orpo trains and merges no bias terms (PEFT's \"none\" only)",
            ))
        }
    }
    for (key, why) in [
        (
            "fan_in_fan_out",
            "orpo's base weights are stored [out, in] (transformers' nn.Linear)",
        ),
        (
            "lora_bias",
            "orpo's adapters have no bias on lora_B (PEFT's lora_bias = false)",
        ),
    ] {
        if k.bool(key)? == Some(true) {
            return Err(k.unsupported(key, why));
        }
    }
    // Options that change which weights are adapted or trained, refused by name rather than
    // ignored (which would adapt or merge other layers than PEFT does).
    let layer_hint = || match layers_hint(&k) {
        Some(p) => format!(
            "PEFT adapts only the layers it names and orpo would adapt every layer; the same \
             selection as a pattern, which PEFT loads alike: set \"target_modules\": {} and \
             \"layers_to_transform\": null, \"layers_pattern\": null",
            Value::String(p)
        ),
        None => "PEFT adapts only the layers it names and orpo would adapt every layer; select \
                 layers with a target_modules pattern instead (a regular expression over whole \
                 module names, e.g. \".*\\\\.layers\\\\.(0|1)\\\\..*(q_proj|v_proj)\") and set \
                 layers_to_transform and layers_pattern to null"
            .to_string(),
    };
    if k.set("layers_to_transform", &["integer", "array"])? {
        return Err(k.unsupported("layers_to_transform", &layer_hint()));
    }
    if k.set("layers_pattern", &["string", "array"])? {
        return Err(k.unsupported("layers_pattern", &layer_hint()));
    }
    for (key, types, why) in [
        (
            "modules_to_save",
            &["array"][..],
            "orpo trains and saves adapters only, no full copies of modules",
        ),
        (
            "rank_pattern",
            &["object"][..],
            "orpo gives every adapted layer the same r",
        ),
        (
            "alpha_pattern",
            &["object"][..],
            "orpo gives every adapted layer the same lora_alpha",
        ),
        (
            "exclude_modules",
            &["array", "string"][..],
            "write the selection as a target_modules pattern instead",
        ),
        (
            "layer_replication",
            &["array"][..],
            "orpo does not replicate layers",
        ),
        (
            "trainable_token_indices",
            &["array", "object"][..],
            "orpo trains no embedding rows",
        ),
        (
            "target_parameters",
            &["array"][..],
            "orpo adapts linear modules only",
        ),
        (
            "alora_invocation_tokens",
            &["array"][..],
            "orpo does not implement activated LoRA",
        ),
    ] {
        if k.set(key, types)? {
            return Err(k.unsupported(key, why));
        }
    }
    let targets = match k.get("target_modules") {
        Some(Value::Array(a)) => Targets::Modules(
            a.iter()
                .map(|x| match x {
                    Value::String(s) if !s.is_empty() => Ok(s.to_string()),
                    _ => Err(k.wrong(
                        "target_modules",
                        "a list of module names, a pattern or \"all-linear\"",
                        &v["target_modules"],
                    )),
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => Targets::AllLinear,
        Some(Value::String(s)) => Targets::Pattern(
            TargetPattern::new(s).map_err(|e| bad(&path, format!("target_modules: {e}")))?,
        ),
        other => {
            return Err(bad(
                &path,
                format!(
                    "`target_modules` = {} is not supported (a list of names, a pattern or \
                     \"all-linear\")",
                    other.unwrap_or(&Value::Null)
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
    check_rank(&path, r, &tensors)?;
    Ok(SavedAdapter {
        dir: dir.to_path_buf(),
        spec: LoraSpec {
            r,
            alpha,
            dropout,
            use_rslora,
            use_dora,
            targets,
        },
        base,
        base_revision,
        tensors,
    })
}

/// `r` as the saved tensors hold it (A `[r, in]`, B `[out, r]`), and within each layer's
/// larger side (see [`check_rank_fits`]), so a wrong or absurd `r` is refused before anything
/// is sized by it.
fn check_rank(path: &Path, r: usize, tensors: &HashMap<String, Tensor>) -> Result<(), ModelError> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let Some(prefix) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let a = tensors[name].dims();
        let b_name = format!("{prefix}.lora_B.weight");
        let b = tensors.get(&b_name).map(|t| t.dims());
        let (rank_a, in_f) = match a {
            [ra, i] => (*ra, *i),
            _ => {
                return Err(bad(
                    path,
                    format!("adapter tensor `{name}` has shape {a:?}, not 2-D"),
                ))
            }
        };
        if rank_a != r {
            return Err(bad(
                path,
                format!("`r` = {r}, but adapter tensor `{name}` has rank {rank_a} (shape {a:?})"),
            ));
        }
        let out_f = match b {
            Some([o, rb]) if *rb == r => *o,
            Some(b) => {
                return Err(bad(
                    path,
                    format!("`r` = {r}, but adapter tensor `{b_name}` has shape {b:?}"),
                ))
            }
            // Missing: the model loader names it.
            None => continue,
        };
        let layer = prefix.strip_prefix("base_model.model.").unwrap_or(prefix);
        check_rank_fits("`r`", r, layer, out_f, in_f).map_err(|m| bad(path, m))?;
    }
    Ok(())
}

/// A rank above a layer's larger side (max(in_features, out_features)) is certainly a
/// mistake (PEFT allows r above the smaller one): refused, naming `key` and the layer.
pub fn check_rank_fits(
    key: &str,
    r: usize,
    layer: &str,
    out_f: usize,
    in_f: usize,
) -> Result<(), String> {
    let side = out_f.max(in_f);
    if r > side {
        return Err(format!(
            "{key} = {r} exceeds the larger side of `{layer}` ([{out_f}, {in_f}]): B·A's rank is \
             at most {}, and a rank above max(in_features, out_features) = {side} is surely a \
             mistake (typical ranks: 8 to 64)",
            out_f.min(in_f)
        ));
    }
    Ok(())
}
