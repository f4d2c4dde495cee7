//! Run configuration: the TOML file of `orpo train --config`, `--set section.key=value`
//! overrides, defaults and validation.
//!
//! Loading goes: parse the TOML text into a table, apply the overrides to that table, check
//! every section, key and value type against [`SCHEMA`] (integers are accepted where floats are
//! expected), deserialise into [`Config`], then check value ranges. Every error names the file
//! (and whether the value came from `--set`) and the `section.key` concerned.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Everything that can go wrong while loading or validating a configuration.
///
/// `file` is the configuration's origin name (usually its path); when the offending value came
/// from a `--set` override it reads `"<file> (--set)"`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the configuration: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: invalid TOML: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: unknown section `[{section}]`{hint}")]
    UnknownSection {
        file: String,
        section: String,
        /// `"; did you mean ...?"` or a list of the valid sections; may be empty.
        hint: String,
    },
    #[error("{file}: unknown key `{key}`{hint}")]
    UnknownKey {
        file: String,
        key: String,
        /// `"; did you mean `optim.lr`?"` or empty.
        hint: String,
    },
    #[error("{file}: {key}: expected {expected}, found {found}")]
    WrongType {
        file: String,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{file}: {key}: {message}")]
    InvalidValue {
        file: String,
        key: String,
        message: String,
    },
    #[error("{file}: missing required key `{key}`")]
    MissingKey { file: String, key: String },
    #[error("{file}: malformed override `--set {arg}`: {message}")]
    BadOverride {
        file: String,
        arg: String,
        message: String,
    },
    #[error(
        "data.train is required by `orpo train`: set `train = \"pairs.jsonl\"` in the [data] \
         section of the config or pass --set data.train=FILE"
    )]
    MissingTrainData,
}

impl ConfigError {
    /// The `section.key` (or section, or override argument) the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownSection { section, .. } => Some(section),
            ConfigError::UnknownKey { key, .. }
            | ConfigError::WrongType { key, .. }
            | ConfigError::InvalidValue { key, .. }
            | ConfigError::MissingKey { key, .. } => Some(key),
            ConfigError::BadOverride { arg, .. } => Some(arg),
            ConfigError::MissingTrainData => Some("data.train"),
            ConfigError::Io { .. } | ConfigError::Parse { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------------------

/// Compute dtype (master weights always stay float32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Dtype {
    #[default]
    #[serde(rename = "f32", alias = "float32")]
    F32,
    #[serde(rename = "bf16", alias = "bfloat16")]
    Bf16,
}

impl Dtype {
    /// Every accepted spelling.
    pub const NAMES: &'static [&'static str] = &["f32", "float32", "bf16", "bfloat16"];

    /// Canonical name (`"f32"` or `"bf16"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            _ => Err(format!(
                "unknown dtype `{s}`; valid: {}",
                Dtype::NAMES.join(", ")
            )),
        }
    }
}

/// Learning-rate schedule (transformers' `lr_scheduler_type` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    Constant,
    ConstantWithWarmup,
    #[default]
    Linear,
    Cosine,
    InverseSqrt,
}

impl Scheduler {
    pub const ALL: [Scheduler; 5] = [
        Scheduler::Constant,
        Scheduler::ConstantWithWarmup,
        Scheduler::Linear,
        Scheduler::Cosine,
        Scheduler::InverseSqrt,
    ];
    /// Every accepted name, in [`Scheduler::ALL`] order.
    pub const NAMES: &'static [&'static str] = &[
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "inverse_sqrt",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Constant => "constant",
            Scheduler::ConstantWithWarmup => "constant_with_warmup",
            Scheduler::Linear => "linear",
            Scheduler::Cosine => "cosine",
            Scheduler::InverseSqrt => "inverse_sqrt",
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scheduler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scheduler::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown scheduler `{s}`; valid: {}",
                    Scheduler::NAMES.join(", ")
                )
            })
    }
}

/// Which modules get LoRA adapters: `"all-linear"` or an explicit list of module names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LoraTargets {
    /// PEFT's `"all-linear"`: every linear layer except the output head.
    #[default]
    AllLinear,
    /// Module-name suffixes, e.g. `["q_proj", "v_proj"]`.
    Modules(Vec<String>),
}

impl Serialize for LoraTargets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LoraTargets::AllLinear => s.serialize_str("all-linear"),
            LoraTargets::Modules(m) => m.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for LoraTargets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LoraTargets;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"all-linear\" or a list of module names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LoraTargets, E> {
                if v == "all-linear" {
                    Ok(LoraTargets::AllLinear)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LoraTargets, A::Error> {
                let mut out = Vec::new();
                while let Some(x) = seq.next_element::<String>()? {
                    out.push(x);
                }
                Ok(LoraTargets::Modules(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Local folder or hub id `org/name` (required).
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    pub dtype: Dtype,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            id: String::new(),
            revision: None,
            device: "cpu".into(),
            dtype: Dtype::F32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training data (required by `orpo train`, see [`Config::validate_for_train`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<String>,
    pub max_length: usize,
    pub max_prompt_length: usize,
    /// Split read from folders and hub datasets for `train`.
    pub train_split: String,
    /// Split read from folders and hub datasets for `eval`.
    pub eval_split: String,
    /// Dataset config name (a folder of that name in the repo: `harmless-base`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Hub revision of the dataset (branch, tag or commit); `main` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Column holding the prompt / chosen / rejected field.
    pub prompt_column: String,
    pub chosen_column: String,
    pub rejected_column: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: None,
            eval: None,
            max_length: 1024,
            max_prompt_length: 512,
            train_split: "train".into(),
            eval_split: "test".into(),
            subset: None,
            revision: None,
            prompt_column: "prompt".into(),
            chosen_column: "chosen".into(),
            rejected_column: "rejected".into(),
        }
    }
}

impl DataConfig {
    /// How to read `data.train` (`eval = false`) or `data.eval`: location, split, subset,
    /// revision and column names. None when that key is not set.
    pub fn source(&self, eval: bool) -> Option<crate::data::DataSource> {
        let (location, split) = if eval {
            (self.eval.as_ref()?, &self.eval_split)
        } else {
            (self.train.as_ref()?, &self.train_split)
        };
        Some(crate::data::DataSource {
            location: location.clone(),
            split: split.clone(),
            subset: self.subset.clone(),
            revision: self.revision.clone(),
            columns: crate::data::ColumnMap {
                prompt: self.prompt_column.clone(),
                chosen: self.chosen_column.clone(),
                rejected: self.rejected_column.clone(),
            },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrpoConfig {
    pub beta: f64,
    /// true (TRL): the NLL covers prompt and answer of the chosen sequence; false: answer only.
    pub nll_on_prompt: bool,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        OrpoConfig {
            beta: 0.1,
            nll_on_prompt: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub scheduler: Scheduler,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 8e-6,
            scheduler: Scheduler::Linear,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Pairs per micro-batch.
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: usize,
    /// > 0 overrides `epochs`.
    pub max_steps: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub log_every: usize,
    /// 0: only the final model.
    pub save_every: usize,
    /// Keep at most this many `checkpoint-*` folders (None: keep all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<usize>,
    pub output_dir: String,
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 8,
            grad_accum: 1,
            epochs: 1,
            max_steps: 0,
            shuffle: true,
            seed: 42,
            log_every: 10,
            save_every: 0,
            save_total_limit: None,
            output_dir: "runs/example".into(),
            gradient_checkpointing: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub enabled: bool,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: LoraTargets,
    /// Scale by alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            enabled: false,
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LoraTargets::AllLinear,
            use_rslora: false,
        }
    }
}

/// The whole run configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub orpo: OrpoConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub lora: LoraConfig,
}

// ---------------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------------

/// The type a key's value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Str,
    Float,
    UInt,
    Bool,
    Dtype,
    Scheduler,
    Targets,
}

/// Every valid `section.key`, with its value type.
pub const SCHEMA: &[(&str, &[(&str, KeyKind)])] = {
    use KeyKind::*;
    &[
        (
            "model",
            &[
                ("id", Str),
                ("revision", Str),
                ("device", Str),
                ("dtype", Dtype),
            ],
        ),
        (
            "data",
            &[
                ("train", Str),
                ("eval", Str),
                ("max_length", UInt),
                ("max_prompt_length", UInt),
                ("train_split", Str),
                ("eval_split", Str),
                ("subset", Str),
                ("revision", Str),
                ("prompt_column", Str),
                ("chosen_column", Str),
                ("rejected_column", Str),
            ],
        ),
        ("orpo", &[("beta", Float), ("nll_on_prompt", Bool)]),
        (
            "optim",
            &[
                ("lr", Float),
                ("scheduler", Scheduler),
                ("warmup_steps", UInt),
                ("weight_decay", Float),
                ("max_grad_norm", Float),
                ("adam_beta1", Float),
                ("adam_beta2", Float),
                ("adam_epsilon", Float),
            ],
        ),
        (
            "train",
            &[
                ("batch_size", UInt),
                ("grad_accum", UInt),
                ("epochs", UInt),
                ("max_steps", UInt),
                ("shuffle", Bool),
                ("seed", UInt),
                ("log_every", UInt),
                ("save_every", UInt),
                ("save_total_limit", UInt),
                ("output_dir", Str),
                ("gradient_checkpointing", Bool),
            ],
        ),
        (
            "lora",
            &[
                ("enabled", Bool),
                ("r", UInt),
                ("alpha", Float),
                ("dropout", Float),
                ("targets", Targets),
                ("use_rslora", Bool),
            ],
        ),
    ]
};

fn section_keys(section: &str) -> Option<&'static [(&'static str, KeyKind)]> {
    SCHEMA
        .iter()
        .find(|(s, _)| *s == section)
        .map(|(_, keys)| *keys)
}

fn key_kind(section: &str, key: &str) -> Option<KeyKind> {
    section_keys(section)?
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
}

fn all_keys() -> impl Iterator<Item = (&'static str, &'static str)> {
    SCHEMA
        .iter()
        .flat_map(|(s, keys)| keys.iter().map(move |(k, _)| (*s, *k)))
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Edit distance, counting a prefix relation (`warmup` / `warmup_steps`) as one edit.
fn key_distance(given: &str, valid: &str) -> usize {
    let d = levenshtein(given, valid);
    let prefix = given.len() >= 3 && (valid.starts_with(given) || given.starts_with(valid));
    if prefix {
        d.min(1)
    } else {
        d
    }
}

fn close_enough(dist: usize, len: usize) -> bool {
    dist <= 2.max(len / 3)
}

/// The closest valid `section.key` to an unknown one, if any is close.
fn suggest_key(section: Option<&str>, key: &str) -> Option<String> {
    let given = match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    };
    // Same key name in another section (`train.lr` -> `optim.lr`) is a strong signal.
    let elsewhere = all_keys()
        .find(|(s, k)| *k == key && Some(*s) != section)
        .map(|(s, k)| format!("{s}.{k}"));
    let same_section = section.and_then(|s| {
        section_keys(s)?
            .iter()
            .map(|(k, _)| (key_distance(key, k), *k))
            .min()
            .filter(|(d, _)| close_enough(*d, key.len()))
            .map(|(d, k)| (d, format!("{s}.{k}")))
    });
    match (same_section, elsewhere) {
        (Some((1, k)), _) => Some(k),
        (_, Some(e)) => Some(e),
        (Some((_, k)), None) => Some(k),
        (None, None) => all_keys()
            .map(|(s, k)| {
                let full = format!("{s}.{k}");
                (levenshtein(&given, &full), full)
            })
            .min()
            .filter(|(d, _)| close_enough(*d, given.len()))
            .map(|(_, k)| k),
    }
}

fn suggest_section(section: &str) -> String {
    let best = SCHEMA
        .iter()
        .map(|(s, _)| (levenshtein(section, s), *s))
        .min()
        .filter(|(d, _)| close_enough(*d, section.len()));
    match best {
        Some((_, s)) => format!("; did you mean `[{s}]`?"),
        None => format!(
            "; valid sections: {}",
            SCHEMA
                .iter()
                .map(|(s, _)| format!("[{s}]"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn key_hint(section: Option<&str>, key: &str) -> String {
    match suggest_key(section, key) {
        Some(k) => format!("; did you mean `{k}`?"),
        None => String::new(),
    }
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("string {s:?}"),
        toml::Value::Integer(i) => format!("integer {i}"),
        toml::Value::Float(f) => format!("float {f}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        toml::Value::Datetime(d) => format!("datetime {d}"),
        toml::Value::Array(_) => "array".into(),
        toml::Value::Table(_) => "table".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Tracks where values came from, so that errors can say "(--set)".
struct Origin<'a> {
    file: &'a str,
    overridden: HashSet<String>,
}

impl Origin<'_> {
    fn of(&self, key: &str) -> String {
        if self.overridden.contains(key) {
            format!("{} (--set)", self.file)
        } else {
            self.file.to_string()
        }
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            file: self.of(key),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Parse the value of a `--set` override: a TOML value where possible, else the raw text.
fn parse_override_value(raw: &str, kind: KeyKind) -> toml::Value {
    let text = raw.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"));
    match (kind, parsed) {
        // Strings stay strings even when they look like numbers (`model.revision=2024`).
        (KeyKind::Str | KeyKind::Dtype | KeyKind::Scheduler, Some(v @ toml::Value::String(_))) => v,
        (KeyKind::Str | KeyKind::Dtype | KeyKind::Scheduler, _) => {
            toml::Value::String(text.to_string())
        }
        (KeyKind::Targets, Some(v @ (toml::Value::String(_) | toml::Value::Array(_)))) => v,
        (KeyKind::Targets, _) if text.contains(',') => toml::Value::Array(
            text.split(',')
                .map(|s| toml::Value::String(s.trim().to_string()))
                .collect(),
        ),
        (_, Some(v)) => v,
        (_, None) => toml::Value::String(text.to_string()),
    }
}

fn apply_overrides(
    table: &mut toml::Table,
    file: &str,
    overrides: &[String],
    overridden: &mut HashSet<String>,
) -> Result<(), ConfigError> {
    for arg in overrides {
        let bad = |message: &str| ConfigError::BadOverride {
            file: file.to_string(),
            arg: arg.clone(),
            message: message.to_string(),
        };
        let Some((path, raw)) = arg.split_once('=') else {
            return Err(bad("expected `section.key=value` (no `=` found)"));
        };
        let path = path.trim();
        let Some((section, key)) = path.split_once('.') else {
            return Err(bad(
                "expected `section.key=value` (the key needs a section, e.g. `optim.lr`)",
            ));
        };
        if section.is_empty() || key.is_empty() || key.contains('.') {
            return Err(bad("expected `section.key=value` with exactly one dot"));
        }
        let set_file = format!("{file} (--set)");
        if section_keys(section).is_none() {
            return Err(ConfigError::UnknownSection {
                file: set_file,
                section: section.to_string(),
                hint: suggest_section(section),
            });
        }
        let Some(kind) = key_kind(section, key) else {
            return Err(ConfigError::UnknownKey {
                file: set_file,
                key: path.to_string(),
                hint: key_hint(Some(section), key),
            });
        };
        let value = parse_override_value(raw, kind);
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), value);
            }
            other => {
                return Err(ConfigError::WrongType {
                    file: file.to_string(),
                    key: section.to_string(),
                    expected: "a table (section)".into(),
                    found: describe(other),
                })
            }
        }
        overridden.insert(path.to_string());
    }
    Ok(())
}

/// Check sections, keys and value types; convert integers to floats where floats are expected.
fn check_and_normalise(table: &mut toml::Table, origin: &Origin) -> Result<(), ConfigError> {
    for (section, value) in table.iter_mut() {
        let Some(keys) = section_keys(section) else {
            if let toml::Value::Table(_) = value {
                return Err(ConfigError::UnknownSection {
                    file: origin.file.to_string(),
                    section: section.clone(),
                    hint: suggest_section(section),
                });
            }
            return Err(ConfigError::UnknownKey {
                file: origin.file.to_string(),
                key: section.clone(),
                hint: match suggest_key(None, section) {
                    Some(k) => {
                        format!(" at the top level (keys belong in a section); did you mean `{k}`?")
                    }
                    None => " at the top level (keys belong in a section)".into(),
                },
            });
        };
        let toml::Value::Table(t) = value else {
            return Err(ConfigError::WrongType {
                file: origin.file.to_string(),
                key: section.clone(),
                expected: format!("a table (`[{section}]` section)"),
                found: describe(value),
            });
        };
        for (key, v) in t.iter_mut() {
            let full = format!("{section}.{key}");
            let Some(kind) = keys.iter().find(|(k, _)| k == key).map(|(_, k)| *k) else {
                return Err(ConfigError::UnknownKey {
                    file: origin.of(&full),
                    key: full.clone(),
                    hint: key_hint(Some(section), key),
                });
            };
            let wrong = |expected: &str, v: &toml::Value| ConfigError::WrongType {
                file: origin.of(&full),
                key: full.clone(),
                expected: expected.to_string(),
                found: describe(v),
            };
            match kind {
                KeyKind::Str => {
                    if !v.is_str() {
                        return Err(wrong("a string", v));
                    }
                }
                KeyKind::Bool => {
                    if !v.is_bool() {
                        return Err(wrong("a boolean (true or false)", v));
                    }
                }
                KeyKind::Float => match v {
                    toml::Value::Float(_) => {}
                    toml::Value::Integer(i) => *v = toml::Value::Float(*i as f64),
                    _ => return Err(wrong("a float", v)),
                },
                KeyKind::UInt => match v {
                    toml::Value::Integer(i) if *i >= 0 => {}
                    toml::Value::Integer(_) => {
                        return Err(wrong("a non-negative integer", v));
                    }
                    _ => return Err(wrong("an integer", v)),
                },
                KeyKind::Dtype => {
                    let Some(s) = v.as_str() else {
                        return Err(wrong("a string", v));
                    };
                    if let Err(m) = s.parse::<Dtype>() {
                        return Err(origin.invalid(&full, m));
                    }
                }
                KeyKind::Scheduler => {
                    let Some(s) = v.as_str() else {
                        return Err(wrong("a string", v));
                    };
                    if let Err(m) = s.parse::<Scheduler>() {
                        return Err(origin.invalid(&full, m));
                    }
                }
                KeyKind::Targets => match v {
                    toml::Value::String(s) if s == "all-linear" => {}
                    toml::Value::String(s) => {
                        return Err(origin.invalid(
                            &full,
                            format!(
                                "expected \"all-linear\" or a list of module names, found \
                                 string {s:?} (write a list: targets = [{s:?}])"
                            ),
                        ))
                    }
                    toml::Value::Array(items) => {
                        if items.is_empty() {
                            return Err(origin.invalid(&full, "the list of modules is empty"));
                        }
                        for item in items {
                            match item.as_str() {
                                Some(s) if !s.trim().is_empty() => {}
                                Some(_) => {
                                    return Err(origin.invalid(&full, "empty module name"));
                                }
                                None => {
                                    return Err(wrong("a list of strings (module names)", item));
                                }
                            }
                        }
                    }
                    _ => return Err(wrong("\"all-linear\" or a list of module names", v)),
                },
            }
        }
    }
    Ok(())
}

impl Config {
    /// Read and validate a TOML file, then apply `--set section.key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Config::from_toml_str(&text, &file, overrides)
    }

    /// Parse and validate TOML text; `origin_name` names it in errors (usually its path).
    pub fn from_toml_str(
        text: &str,
        origin_name: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: origin_name.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let mut overridden = HashSet::new();
        apply_overrides(&mut table, origin_name, overrides, &mut overridden)?;
        let origin = Origin {
            file: origin_name,
            overridden,
        };
        check_and_normalise(&mut table, &origin)?;

        let has_id = table.get("model").and_then(|m| m.get("id")).is_some();
        if !has_id {
            return Err(ConfigError::MissingKey {
                file: origin_name.to_string(),
                key: "model.id".into(),
            });
        }

        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::InvalidValue {
                    file: origin_name.to_string(),
                    key: "config".into(),
                    message: e.to_string().trim_end().to_string(),
                })?;
        config.check_ranges(&origin)?;
        Ok(config)
    }

    /// A configuration with every default and the given model id.
    pub fn with_model(id: impl Into<String>) -> Config {
        Config {
            model: ModelConfig {
                id: id.into(),
                ..ModelConfig::default()
            },
            ..Config::default()
        }
    }

    /// Apply `--set` overrides to an existing configuration (e.g. one built by
    /// [`Config::with_model`]) and validate the result.
    pub fn with_overrides(
        &self,
        origin_name: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        Config::from_toml_str(&self.to_toml_string(), origin_name, overrides)
    }

    /// Check value ranges; `origin_name` names the configuration in errors.
    pub fn validate(&self, origin_name: &str) -> Result<(), ConfigError> {
        self.check_ranges(&Origin {
            file: origin_name,
            overridden: HashSet::new(),
        })
    }

    /// Extra requirements of `orpo train`: `data.train` must be set.
    pub fn validate_for_train(&self) -> Result<(), ConfigError> {
        match &self.data.train {
            Some(t) if !t.trim().is_empty() => Ok(()),
            _ => Err(ConfigError::MissingTrainData),
        }
    }

    /// The configuration as TOML (all keys, defaults included; `None` options omitted), for
    /// saving next to checkpoints. `from_toml_str` reads it back to an equal `Config`.
    pub fn to_toml_string(&self) -> String {
        match toml::to_string(self) {
            Ok(s) => s,
            // Only reachable for values TOML cannot hold (a seed above i64::MAX).
            Err(e) => format!("# orpo: could not serialise the configuration: {e}\n"),
        }
    }

    fn check_ranges(&self, o: &Origin) -> Result<(), ConfigError> {
        let m = &self.model;
        if m.id.trim().is_empty() {
            return Err(o.invalid("model.id", "must not be empty"));
        }
        if let Some(r) = &m.revision {
            if r.trim().is_empty() {
                return Err(o.invalid("model.revision", "must not be empty (omit it for main)"));
            }
        }
        if !valid_device(&m.device) {
            return Err(o.invalid(
                "model.device",
                format!(
                    "unknown device `{}`; valid: cpu, cuda, cuda:N, auto",
                    m.device
                ),
            ));
        }

        let d = &self.data;
        for (key, v) in [("data.train", &d.train), ("data.eval", &d.eval)] {
            if matches!(v, Some(s) if s.trim().is_empty()) {
                return Err(o.invalid(key, "must not be empty (omit the key instead)"));
            }
        }
        for (key, v) in [
            ("data.train_split", &d.train_split),
            ("data.eval_split", &d.eval_split),
            ("data.prompt_column", &d.prompt_column),
            ("data.chosen_column", &d.chosen_column),
            ("data.rejected_column", &d.rejected_column),
        ] {
            if v.trim().is_empty() {
                return Err(o.invalid(key, "must not be empty"));
            }
        }
        for (key, v) in [("data.subset", &d.subset), ("data.revision", &d.revision)] {
            if matches!(v, Some(s) if s.trim().is_empty()) {
                return Err(o.invalid(key, "must not be empty (omit the key instead)"));
            }
        }
        let cols = [
            ("data.prompt_column", &d.prompt_column),
            ("data.chosen_column", &d.chosen_column),
            ("data.rejected_column", &d.rejected_column),
        ];
        for (i, (key, v)) in cols.iter().enumerate() {
            if let Some((other, _)) = cols[..i].iter().find(|(_, w)| w == v) {
                return Err(o.invalid(
                    key,
                    format!(
                        "column `{v}` is already used by {other}; each field needs its own column"
                    ),
                ));
            }
        }
        if d.max_length == 0 {
            return Err(o.invalid("data.max_length", "must be at least 1"));
        }
        if d.max_prompt_length == 0 {
            return Err(o.invalid("data.max_prompt_length", "must be at least 1"));
        }
        if d.max_prompt_length > d.max_length {
            return Err(o.invalid(
                "data.max_prompt_length",
                format!(
                    "{} is larger than data.max_length = {}",
                    d.max_prompt_length, d.max_length
                ),
            ));
        }

        let beta = self.orpo.beta;
        if !beta.is_finite() || beta < 0.0 {
            return Err(o.invalid(
                "orpo.beta",
                format!("must be a finite number >= 0, found {beta}"),
            ));
        }

        let p = &self.optim;
        if !p.lr.is_finite() || p.lr <= 0.0 {
            return Err(o.invalid(
                "optim.lr",
                format!("must be a finite number > 0, found {}", p.lr),
            ));
        }
        for (key, v) in [
            ("optim.weight_decay", p.weight_decay),
            ("optim.max_grad_norm", p.max_grad_norm),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(o.invalid(key, format!("must be a finite number >= 0, found {v}")));
            }
        }
        for (key, v) in [
            ("optim.adam_beta1", p.adam_beta1),
            ("optim.adam_beta2", p.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(o.invalid(key, format!("must be in [0, 1), found {v}")));
            }
        }
        if !p.adam_epsilon.is_finite() || p.adam_epsilon < 0.0 {
            return Err(o.invalid(
                "optim.adam_epsilon",
                format!("must be a finite number >= 0, found {}", p.adam_epsilon),
            ));
        }

        let t = &self.train;
        if t.batch_size == 0 {
            return Err(o.invalid("train.batch_size", "must be at least 1"));
        }
        if t.grad_accum == 0 {
            return Err(o.invalid("train.grad_accum", "must be at least 1"));
        }
        if t.epochs == 0 && t.max_steps == 0 {
            let key = if o.overridden.contains("train.max_steps") {
                "train.max_steps"
            } else {
                "train.epochs"
            };
            return Err(o.invalid(
                key,
                "train.epochs = 0 with train.max_steps = 0 would train nothing; set one of them",
            ));
        }
        if t.log_every == 0 {
            return Err(o.invalid("train.log_every", "must be at least 1"));
        }
        if t.save_total_limit == Some(0) {
            return Err(o.invalid(
                "train.save_total_limit",
                "must be at least 1 (omit it to keep every checkpoint)",
            ));
        }
        if t.output_dir.trim().is_empty() {
            return Err(o.invalid("train.output_dir", "must not be empty"));
        }

        let l = &self.lora;
        if l.r == 0 {
            return Err(o.invalid("lora.r", "must be at least 1"));
        }
        if !l.alpha.is_finite() || l.alpha <= 0.0 {
            return Err(o.invalid(
                "lora.alpha",
                format!("must be a finite number > 0, found {}", l.alpha),
            ));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(o.invalid(
                "lora.dropout",
                format!("must be in [0, 1), found {}", l.dropout),
            ));
        }
        if let LoraTargets::Modules(m) = &l.targets {
            if m.is_empty() {
                return Err(o.invalid("lora.targets", "the list of modules is empty"));
            }
            if m.iter().any(|s| s.trim().is_empty()) {
                return Err(o.invalid("lora.targets", "empty module name"));
            }
        }
        Ok(())
    }
}

fn valid_device(d: &str) -> bool {
    match d {
        "cpu" | "cuda" | "auto" => true,
        _ => d
            .strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\nid = \"m\"\n";

    fn load(text: &str, sets: &[&str]) -> Result<Config, ConfigError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml_str(text, "c.toml", &sets)
    }

    fn err(text: &str, sets: &[&str]) -> String {
        match load(text, sets) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c, Config::with_model("m"));
        assert_eq!(c.model.device, "cpu");
        assert_eq!(c.model.dtype, Dtype::F32);
        assert_eq!(c.model.revision, None);
        assert_eq!(c.data.train, None);
        assert_eq!(c.data.max_length, 1024);
        assert_eq!(c.data.max_prompt_length, 512);
        assert_eq!(c.orpo.beta, 0.1);
        assert!(c.orpo.nll_on_prompt);
        assert_eq!(c.optim.lr, 8e-6);
        assert_eq!(c.optim.scheduler, Scheduler::Linear);
        assert_eq!(c.optim.warmup_steps, 0);
        assert_eq!(c.optim.weight_decay, 0.0);
        assert_eq!(c.optim.max_grad_norm, 1.0);
        assert_eq!(
            (c.optim.adam_beta1, c.optim.adam_beta2, c.optim.adam_epsilon),
            (0.9, 0.999, 1e-8)
        );
        let t = &c.train;
        assert_eq!(
            (t.batch_size, t.grad_accum, t.epochs, t.max_steps),
            (8, 1, 1, 0)
        );
        assert!(t.shuffle);
        assert_eq!((t.seed, t.log_every, t.save_every), (42, 10, 0));
        assert_eq!(t.save_total_limit, None);
        assert_eq!(t.output_dir, "runs/example");
        assert!(!t.gradient_checkpointing);
        let l = &c.lora;
        assert!(!l.enabled);
        assert_eq!((l.r, l.alpha, l.dropout), (16, 32.0, 0.0));
        assert_eq!(l.targets, LoraTargets::AllLinear);
        assert!(!l.use_rslora);
        assert!(matches!(
            c.validate_for_train(),
            Err(ConfigError::MissingTrainData)
        ));
    }

    #[test]
    fn spec_example_parses() {
        let text = r#"
[model]
id = "../shared/fixtures/tiny-opt"
revision = "main"
device = "cpu"
dtype = "f32"

[data]
train = "pairs.jsonl"
eval = "heldout.jsonl"
max_length = 1024
max_prompt_length = 512

[orpo]
beta = 0.1

[optim]
lr = 8e-6
scheduler = "linear"
warmup_steps = 0
weight_decay = 0.0
max_grad_norm = 1.0

[train]
batch_size = 8
grad_accum = 1
epochs = 1
max_steps = 0
shuffle = true
seed = 42
log_every = 10
save_every = 0
output_dir = "runs/example"
gradient_checkpointing = false

[lora]
enabled = true
r = 16
alpha = 32
dropout = 0.0
targets = "all-linear"
"#;
        let c = load(text, &[]).unwrap();
        assert_eq!(c.model.revision.as_deref(), Some("main"));
        assert_eq!(c.data.train.as_deref(), Some("pairs.jsonl"));
        assert!(c.lora.enabled);
        assert_eq!(c.lora.alpha, 32.0);
        c.validate_for_train().unwrap();
    }

    #[test]
    fn integers_accepted_as_floats() {
        let c = load(
            "[model]\nid='m'\n[optim]\nlr = 1\nmax_grad_norm = 0\n[orpo]\nbeta = 2",
            &[],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 1.0);
        assert_eq!(c.optim.max_grad_norm, 0.0);
        assert_eq!(c.orpo.beta, 2.0);
        let c = load(MINIMAL, &["optim.lr=2"]).unwrap();
        assert_eq!(c.optim.lr, 2.0);
    }

    #[test]
    fn overrides() {
        let c = load(
            MINIMAL,
            &[
                "train.max_steps=20",
                "optim.lr=1e-5",
                "train.shuffle=false",
                "model.dtype=bf16",
                "optim.scheduler=cosine",
                "data.train=pairs.jsonl",
                "model.id=org/name",
                "model.revision=2024",
                "lora.targets=[\"q_proj\", \"v_proj\"]",
                "train.save_total_limit=3",
                " optim.warmup_steps = 5 ",
            ],
        )
        .unwrap();
        assert_eq!(c.train.max_steps, 20);
        assert_eq!(c.optim.lr, 1e-5);
        assert!(!c.train.shuffle);
        assert_eq!(c.model.dtype, Dtype::Bf16);
        assert_eq!(c.optim.scheduler, Scheduler::Cosine);
        assert_eq!(c.data.train.as_deref(), Some("pairs.jsonl"));
        assert_eq!(c.model.id, "org/name");
        assert_eq!(c.model.revision.as_deref(), Some("2024"));
        assert_eq!(
            c.lora.targets,
            LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(c.train.save_total_limit, Some(3));
        assert_eq!(c.optim.warmup_steps, 5);

        let c = load(MINIMAL, &["lora.targets=q_proj,v_proj"]).unwrap();
        assert_eq!(
            c.lora.targets,
            LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()])
        );
        let c = load(
            MINIMAL,
            &["lora.targets=all-linear", "model.dtype=bfloat16"],
        )
        .unwrap();
        assert_eq!(c.lora.targets, LoraTargets::AllLinear);
        assert_eq!(c.model.dtype, Dtype::Bf16);
        // Override wins over the file; a missing model.id can come from --set.
        let c = load("[optim]\nlr = 1e-3\n", &["optim.lr=5e-4", "model.id=x"]).unwrap();
        assert_eq!(c.optim.lr, 5e-4);
        assert_eq!(c.model.id, "x");
        // Value containing '=' keeps everything after the first '='.
        let c = load(MINIMAL, &["train.output_dir=runs/a=b"]).unwrap();
        assert_eq!(c.train.output_dir, "runs/a=b");
    }

    #[test]
    fn malformed_overrides() {
        let e = err(MINIMAL, &["optim.lr"]);
        assert!(
            e.contains("c.toml") && e.contains("optim.lr") && e.contains('='),
            "{e}"
        );
        let e = err(MINIMAL, &["lr=1"]);
        assert!(e.contains("lr=1") && e.contains("section"), "{e}");
        let e = err(MINIMAL, &["a.b.c=1"]);
        assert!(e.contains("a.b.c=1"), "{e}");
        let e = err(MINIMAL, &[".lr=1"]);
        assert!(e.contains(".lr=1"), "{e}");
        let e = err(MINIMAL, &["optim.lrr=1"]);
        assert!(
            e.contains("(--set)") && e.contains("did you mean `optim.lr`?"),
            "{e}"
        );
        let e = err(MINIMAL, &["optimm.lr=1"]);
        assert!(e.contains("did you mean `[optim]`?"), "{e}");
        let e = err(MINIMAL, &["optim.lr=abc"]);
        assert!(
            e.contains("c.toml (--set): optim.lr: expected a float, found string \"abc\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_sections() {
        let e = err("[model]\nid='m'\n[optim]\nlrr = 1e-5\n", &[]);
        assert!(
            e.contains("c.toml")
                && e.contains("optim.lrr")
                && e.contains("did you mean `optim.lr`?"),
            "{e}"
        );
        let e = err("[model]\nid='m'\n[train]\nlr = 1e-5\n", &[]);
        assert!(e.contains("train.lr") && e.contains("`optim.lr`"), "{e}");
        let e = err("[model]\nid='m'\n[train]\nbatchsize = 4\n", &[]);
        assert!(e.contains("did you mean `train.batch_size`?"), "{e}");
        let e = err("[model]\nid='m'\n[trian]\nseed = 1\n", &[]);
        assert!(
            e.contains("[trian]") && e.contains("did you mean `[train]`?"),
            "{e}"
        );
        let e = err("[model]\nid='m'\n[zzzzzzzz]\n", &[]);
        assert!(e.contains("valid sections"), "{e}");
        let e = err("lr = 1\n[model]\nid='m'\n", &[]);
        assert!(
            e.contains("`lr`") && e.contains("top level") && e.contains("optim.lr"),
            "{e}"
        );
        let e = err("model = 1\n", &[]);
        assert!(e.contains("model") && e.contains("expected a table"), "{e}");
        let e = err("[model]\nid='m'\nqqqqqqqqqqqq = 1\n", &[]);
        assert!(e.contains("unknown key `model.qqqqqqqqqqqq`"), "{e}");
    }

    #[test]
    fn wrong_types() {
        let e = err("[model]\nid='m'\n[optim]\nlr = \"fast\"\n", &[]);
        assert_eq!(
            e,
            "c.toml: optim.lr: expected a float, found string \"fast\""
        );
        let e = err("[model]\nid='m'\n[train]\nbatch_size = 2.5\n", &[]);
        assert!(
            e.contains("train.batch_size: expected an integer, found float 2.5"),
            "{e}"
        );
        let e = err("[model]\nid='m'\n[train]\nbatch_size = -1\n", &[]);
        assert!(
            e.contains("train.batch_size: expected a non-negative integer"),
            "{e}"
        );
        let e = err("[model]\nid='m'\n[train]\nshuffle = 1\n", &[]);
        assert!(e.contains("train.shuffle: expected a boolean"), "{e}");
        let e = err("[model]\nid=3\n", &[]);
        assert!(
            e.contains("model.id: expected a string, found integer 3"),
            "{e}"
        );
        let e = err("[model]\nid='m'\n[lora]\ntargets = [1]\n", &[]);
        assert!(e.contains("lora.targets"), "{e}");
        let e = err("[model]\nid='m'\n[lora]\ntargets = 'q_proj'\n", &[]);
        assert!(
            e.contains("lora.targets") && e.contains("all-linear"),
            "{e}"
        );
        let e = err("[model]\nid='m'\n[lora]\ntargets = []\n", &[]);
        assert!(e.contains("lora.targets") && e.contains("empty"), "{e}");
    }

    #[test]
    fn unknown_enums() {
        let e = err("[model]\nid='m'\n[optim]\nscheduler = 'cosin'\n", &[]);
        assert!(
            e.contains("optim.scheduler")
                && e.contains("constant_with_warmup")
                && e.contains("inverse_sqrt"),
            "{e}"
        );
        let e = err("[model]\nid='m'\ndtype = 'f16'\n", &[]);
        assert!(
            e.contains("model.dtype") && e.contains("bfloat16") && e.contains("f32"),
            "{e}"
        );
        let e = err("[model]\nid='m'\ndevice = 'gpu'\n", &[]);
        assert!(e.contains("model.device") && e.contains("cuda:N"), "{e}");
        for d in ["cpu", "cuda", "cuda:1", "auto"] {
            load(&format!("[model]\nid='m'\ndevice = '{d}'\n"), &[]).unwrap();
        }
        for (s, k) in Scheduler::NAMES.iter().zip(Scheduler::ALL) {
            let c = load(MINIMAL, &[&format!("optim.scheduler={s}")]).unwrap();
            assert_eq!(c.optim.scheduler, k);
        }
        let c = load("[model]\nid='m'\ndtype='float32'", &[]).unwrap();
        assert_eq!(c.model.dtype, Dtype::F32);
    }

    #[test]
    fn ranges() {
        let cases: &[(&str, &str)] = &[
            ("optim.lr=0", "optim.lr"),
            ("optim.lr=-1e-5", "optim.lr"),
            ("optim.lr=inf", "optim.lr"),
            ("optim.lr=nan", "optim.lr"),
            ("train.batch_size=0", "train.batch_size"),
            ("train.grad_accum=0", "train.grad_accum"),
            ("orpo.beta=-0.1", "orpo.beta"),
            ("data.max_length=0", "data.max_length"),
            ("data.max_prompt_length=2000", "data.max_prompt_length"),
            ("optim.weight_decay=-0.01", "optim.weight_decay"),
            ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
            ("optim.warmup_steps=-1", "optim.warmup_steps"),
            ("lora.r=0", "lora.r"),
            ("optim.adam_beta2=1.0", "optim.adam_beta2"),
            ("lora.dropout=1.5", "lora.dropout"),
            ("train.log_every=0", "train.log_every"),
            ("train.save_total_limit=0", "train.save_total_limit"),
        ];
        for (set, key) in cases {
            let e = load(MINIMAL, &[set]).unwrap_err();
            assert_eq!(e.key(), Some(*key), "{set}: {e}");
            let s = e.to_string();
            assert!(s.starts_with("c.toml"), "{s}");
        }
        let e = load("[model]\nid='m'\n[train]\nepochs = 0\n", &[]).unwrap_err();
        assert_eq!(e.key(), Some("train.epochs"));
        assert!(e.to_string().starts_with("c.toml: train.epochs"), "{e}");
        // epochs 0 is fine with max_steps
        load("[model]\nid='m'\n[train]\nepochs = 0\nmax_steps = 3\n", &[]).unwrap();
        // max_grad_norm 0 disables clipping; max_prompt_length == max_length is allowed
        load(
            MINIMAL,
            &["optim.max_grad_norm=0", "data.max_prompt_length=1024"],
        )
        .unwrap();
    }

    #[test]
    fn missing_and_parse_errors() {
        let e = err("", &[]);
        assert_eq!(e, "c.toml: missing required key `model.id`");
        let e = err("[model]\nid = ''\n", &[]);
        assert!(e.contains("model.id"), "{e}");
        let e = err("[model\nid = 'm'", &[]);
        assert!(e.starts_with("c.toml: invalid TOML"), "{e}");
        let e = err("[model]\nid='m'\n[data]\ntrain = ''\n", &[]);
        assert!(e.contains("data.train"), "{e}");
        let e = Config::load(Path::new("/nonexistent/x.toml"), &[]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"), "{e}");
    }

    #[test]
    fn round_trip() {
        let mut c = Config::with_model("org/name");
        c.model.revision = Some("main".into());
        c.model.dtype = Dtype::Bf16;
        c.data.train = Some("a.jsonl".into());
        c.optim.lr = 1.2345678901234567e-5;
        c.optim.scheduler = Scheduler::InverseSqrt;
        c.train.save_total_limit = Some(2);
        c.lora.targets = LoraTargets::Modules(vec!["q_proj".into()]);
        c.lora.alpha = 16.0;
        for cfg in [c, Config::with_model("m")] {
            let text = cfg.to_toml_string();
            let back = Config::from_toml_str(&text, "saved.toml", &[]).unwrap();
            assert_eq!(back, cfg, "{text}");
        }
        let c = Config::with_model("m")
            .with_overrides("<cli>", &["train.batch_size=2".into()])
            .unwrap();
        assert_eq!(c.train.batch_size, 2);
        Config::with_model("m").validate("x").unwrap();
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest_key(Some("optim"), "lrr").as_deref(),
            Some("optim.lr")
        );
        assert_eq!(
            suggest_key(Some("optim"), "batch_size").as_deref(),
            Some("train.batch_size")
        );
        assert_eq!(
            suggest_key(Some("train"), "epoch").as_deref(),
            Some("train.epochs")
        );
        assert_eq!(
            suggest_key(Some("optim"), "warmup").as_deref(),
            Some("optim.warmup_steps")
        );
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }

    #[test]
    fn data_source_keys() {
        let base = "[model]\nid = \"m\"\n[data]\ntrain = \"org/name\"\neval = \"org/name\"\n";
        let c = load(base, &[]).unwrap();
        let t = c.data.source(false).unwrap();
        assert_eq!(
            (t.split.as_str(), t.subset, t.revision),
            ("train", None, None)
        );
        assert!(t.columns.is_default());
        assert_eq!(c.data.source(true).unwrap().split, "test");
        let c = load(
            &format!("{base}subset = \"harmless-base\"\nrevision = \"v1\"\nprompt_column = \"question\"\n"),
            &["data.chosen_column=response_j", "data.rejected_column=response_k", "data.eval_split=validation"],
        )
        .unwrap();
        let e = c.data.source(true).unwrap();
        assert_eq!(e.split, "validation");
        assert_eq!(e.subset.as_deref(), Some("harmless-base"));
        assert_eq!(e.revision.as_deref(), Some("v1"));
        assert_eq!(
            (
                e.columns.prompt.as_str(),
                e.columns.chosen.as_str(),
                e.columns.rejected.as_str()
            ),
            ("question", "response_j", "response_k")
        );
        assert!(Config::with_model("m").data.source(false).is_none());
        let e = err(base, &["data.chosen_column=prompt"]);
        assert!(
            e.contains("data.chosen_column") && e.contains("already used by data.prompt_column"),
            "{e}"
        );
        let e = err(base, &["data.train_split="]);
        assert!(e.contains("data.train_split: must not be empty"), "{e}");
        let e = err(&format!("{base}subset = 3\n"), &[]);
        assert!(e.contains("data.subset: expected a string"), "{e}");
        let e = err(&format!("{base}chosen_col = \"a\"\n"), &[]);
        assert!(e.contains("did you mean `data.chosen_column`"), "{e}");
        let e = err(&format!("{base}split = \"a\"\n"), &[]);
        assert!(e.contains("unknown key `data.split`"), "{e}");
    }
}
