//! The enumerated values: compute dtype, learning-rate schedule, LoRA target modules, data
//! locations.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

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
    CosineWithMinLr,
    CosineWithRestarts,
    Polynomial,
}

impl Scheduler {
    pub const ALL: [Scheduler; 8] = [
        Scheduler::Constant,
        Scheduler::ConstantWithWarmup,
        Scheduler::Linear,
        Scheduler::Cosine,
        Scheduler::InverseSqrt,
        Scheduler::CosineWithMinLr,
        Scheduler::CosineWithRestarts,
        Scheduler::Polynomial,
    ];
    /// Every accepted name, in [`Scheduler::ALL`] order.
    pub const NAMES: &'static [&'static str] = &[
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "cosine_with_restarts",
        "polynomial",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Constant => "constant",
            Scheduler::ConstantWithWarmup => "constant_with_warmup",
            Scheduler::Linear => "linear",
            Scheduler::Cosine => "cosine",
            Scheduler::InverseSqrt => "inverse_sqrt",
            Scheduler::CosineWithMinLr => "cosine_with_min_lr",
            Scheduler::CosineWithRestarts => "cosine_with_restarts",
            Scheduler::Polynomial => "polynomial",
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

/// The optimizer, by transformers' `optim` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Optimizer {
    /// torch's AdamW (transformers' default `adamw_torch_fused`; `adamw_torch` is the same
    /// update).
    #[default]
    #[serde(rename = "adamw_torch", alias = "adamw_torch_fused")]
    AdamWTorch,
    /// bitsandbytes' 8-bit AdamW (`adamw_bnb_8bit`; `paged_adamw_8bit` is the same update with
    /// the state in pageable memory, which orpo does not need).
    #[serde(
        rename = "adamw_8bit",
        alias = "adamw_bnb_8bit",
        alias = "paged_adamw_8bit"
    )]
    AdamW8bit,
}

impl Optimizer {
    pub fn as_str(self) -> &'static str {
        match self {
            Optimizer::AdamWTorch => "adamw_torch",
            Optimizer::AdamW8bit => "adamw_8bit",
        }
    }
}

impl fmt::Display for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Optimizer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adamw_torch" | "adamw_torch_fused" => Ok(Optimizer::AdamWTorch),
            "adamw_8bit" | "adamw_bnb_8bit" | "paged_adamw_8bit" => Ok(Optimizer::AdamW8bit),
            "adamw_hf" | "adamw_torch_foreach" | "adamw_apex_fused" | "paged_adamw_32bit" => {
                Err(format!(
                    "optimizer `{s}` is not offered; \"adamw_torch\" is torch's AdamW (the \
                     same update up to rounding)"
                ))
            }
            _ => Err(format!(
                "unknown optimizer `{s}`; valid: \"adamw_torch\" (transformers' default \
                 adamw_torch_fused) or \"adamw_8bit\" (bitsandbytes' 8-bit AdamW, also \
                 spelled adamw_bnb_8bit or paged_adamw_8bit)"
            )),
        }
    }
}

/// Which modules get LoRA adapters: `"all-linear"`, an explicit list of module names, or (any
/// other string) a regular expression over full module names, as PEFT reads `target_modules`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LoraTargets {
    /// PEFT's `"all-linear"`: every linear layer except the output head.
    #[default]
    AllLinear,
    /// Module-name suffixes, e.g. `["q_proj", "v_proj"]`.
    Modules(Vec<String>),
    /// A pattern the whole module name must match (`re.fullmatch`), e.g.
    /// `'.*layers\.(0|1)\..*(q|v)_proj'`.
    Pattern(String),
}

impl Serialize for LoraTargets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LoraTargets::AllLinear => s.serialize_str("all-linear"),
            LoraTargets::Modules(m) => m.serialize(s),
            LoraTargets::Pattern(p) => s.serialize_str(p),
        }
    }
}

impl<'de> Deserialize<'de> for LoraTargets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LoraTargets;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"all-linear\", a list of module names or a pattern")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LoraTargets, E> {
                if v.eq_ignore_ascii_case("all-linear") {
                    Ok(LoraTargets::AllLinear)
                } else {
                    Ok(LoraTargets::Pattern(v.to_string()))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<LoraTargets, A::Error> {
                Ok(LoraTargets::Modules(strings(seq)?))
            }
        }
        d.deserialize_any(V)
    }
}

/// `data.train` / `data.eval`: a file, folder, glob or hub dataset id, or a list of them whose
/// pairs are read one after the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFiles(pub Vec<String>);

impl From<&str> for DataFiles {
    fn from(s: &str) -> Self {
        DataFiles(vec![s.to_string()])
    }
}

impl fmt::Display for DataFiles {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl Serialize for DataFiles {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DataFiles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DataFiles;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a file, folder, glob or hub dataset id, or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DataFiles, E> {
                Ok(DataFiles::from(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<DataFiles, A::Error> {
                Ok(DataFiles(strings(seq)?))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string or a list of strings, as a list.
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a list of strings")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<String>, A::Error> {
            strings(seq)
        }
    }
    d.deserialize_any(V)
}

/// `data.eval_size` as it was written: a count of pairs as an integer, a fraction as a float
/// (a saved `orpo.toml` must read back, and a float of 1 or more is refused).
pub fn count_or_fraction<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(x) if *x >= 1.0 && x.fract() == 0.0 && *x <= i64::MAX as f64 => {
            s.serialize_i64(*x as i64)
        }
        Some(x) => s.serialize_f64(*x),
        None => s.serialize_none(),
    }
}

/// A TOML list of strings.
fn strings<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<String>, A::Error> {
    let mut out = Vec::new();
    while let Some(x) = seq.next_element::<String>()? {
        out.push(x);
    }
    Ok(out)
}

/// How often something happens during training (`train.log_every`, `train.save_every`,
/// `train.eval_every`): every N optimizer steps (0: never), every fraction of the run's steps
/// (a number below 1, as transformers' `logging_steps`/`eval_steps`/`save_steps` below 1:
/// `ceil(total steps × fraction)`), or at the end of every epoch, as transformers'
/// `"steps"` and `"epoch"` strategies; checkpoints also at each evaluation that is a new best
/// (`"best"`, transformers' `save_strategy = "best"`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Interval {
    Steps(usize),
    /// In (0, 1): a share of the run's optimizer steps.
    Fraction(f64),
    #[default]
    Never,
    Epoch,
    /// `train.save_every` only: after each evaluation better than every one before it.
    Best,
}

impl Interval {
    /// What the key accepts besides a number.
    pub const EPOCH: &'static str = "epoch";
    pub const BEST: &'static str = "best";

    pub fn steps(n: usize) -> Self {
        if n == 0 {
            Interval::Never
        } else {
            Interval::Steps(n)
        }
    }

    pub fn is_set(self) -> bool {
        self != Interval::Never
    }

    /// A fraction as its number of steps in a run of `total` (transformers'
    /// `TrainerState.compute_steps`: `math.ceil(max_steps * fraction)`); the rest as they are.
    pub fn resolve(self, total: usize) -> Self {
        match self {
            Interval::Fraction(f) => Interval::steps(((total as f64) * f).ceil() as usize),
            other => other,
        }
    }

    /// Whether it falls after optimizer step `done` (from 1), `steps_per_epoch` steps making
    /// an epoch (a fraction: resolve it first; `Best` is the evaluations' to decide).
    pub fn due(self, done: usize, steps_per_epoch: usize) -> bool {
        match self {
            Interval::Never | Interval::Fraction(_) | Interval::Best => false,
            Interval::Steps(n) => done.is_multiple_of(n),
            Interval::Epoch => done.is_multiple_of(steps_per_epoch.max(1)),
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interval::Steps(n) => write!(f, "{n}"),
            Interval::Fraction(x) => write!(f, "{x}"),
            Interval::Never => f.write_str("0"),
            Interval::Epoch => write!(f, "\"{}\"", Interval::EPOCH),
            Interval::Best => write!(f, "\"{}\"", Interval::BEST),
        }
    }
}

impl Serialize for Interval {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Interval::Steps(n) => s.serialize_u64(*n as u64),
            Interval::Fraction(x) => s.serialize_f64(*x),
            Interval::Never => s.serialize_u64(0),
            Interval::Epoch => s.serialize_str(Interval::EPOCH),
            Interval::Best => s.serialize_str(Interval::BEST),
        }
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Interval;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a number of steps, a fraction of the run's steps, \"epoch\" or (save_every) \
                     \"best\"",
                )
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Interval, E> {
                if v > 0.0 && v < 1.0 {
                    Ok(Interval::Fraction(v))
                } else if v >= 1.0 && v.fract() == 0.0 && v <= usize::MAX as f64 {
                    Ok(Interval::steps(v as usize))
                } else {
                    Err(E::invalid_value(de::Unexpected::Float(v), &self))
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Interval, E> {
                usize::try_from(v)
                    .map(Interval::steps)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Interval, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                    .and_then(|u| self.visit_u64(u))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Interval, E> {
                if v == Interval::EPOCH {
                    Ok(Interval::Epoch)
                } else if v == Interval::BEST {
                    Ok(Interval::Best)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The dtype the trained full model's weights are saved in (`train.save_dtype`). Training
/// keeps f32 master weights whatever this says, and checkpoints keep them (exact resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum SaveDtype {
    #[default]
    #[serde(rename = "float32", alias = "f32")]
    F32,
    #[serde(rename = "bfloat16", alias = "bf16")]
    Bf16,
    #[serde(rename = "float16", alias = "f16")]
    F16,
    /// The base model's: config.json's `dtype` (or `torch_dtype`), else its stored weights'.
    #[serde(rename = "auto")]
    Auto,
}

impl SaveDtype {
    /// Every accepted spelling.
    pub const NAMES: &'static [&'static str] = &[
        "float32", "f32", "bfloat16", "bf16", "float16", "f16", "auto",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
            SaveDtype::Auto => "auto",
        }
    }
}

impl fmt::Display for SaveDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SaveDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "float32" | "f32" => Ok(SaveDtype::F32),
            "bfloat16" | "bf16" => Ok(SaveDtype::Bf16),
            "float16" | "f16" => Ok(SaveDtype::F16),
            "auto" => Ok(SaveDtype::Auto),
            _ => Err(format!(
                "unknown save dtype `{s}`; valid: {}",
                SaveDtype::NAMES.join(", ")
            )),
        }
    }
}

/// How a LoRA run holds its frozen base (`lora.quantize`): as read, or quantized to 4-bit NF4
/// as bitsandbytes does for QLoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum BaseQuant {
    #[default]
    #[serde(rename = "none")]
    None,
    #[serde(rename = "nf4")]
    Nf4,
}

impl BaseQuant {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseQuant::None => "none",
            BaseQuant::Nf4 => "nf4",
        }
    }
}

impl fmt::Display for BaseQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BaseQuant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(BaseQuant::None),
            "nf4" => Ok(BaseQuant::Nf4),
            "fp4" => Err("`fp4` is not supported; \"nf4\" is QLoRA's 4-bit type \
                          (bitsandbytes' bnb_4bit_quant_type = \"nf4\")"
                .into()),
            "int8" | "8bit" | "4bit" | "int4" => Err(format!(
                "unknown quantization `{s}`; valid: \"nf4\" (bitsandbytes' load_in_4bit with \
                 bnb_4bit_quant_type = \"nf4\") or \"none\""
            )),
            _ => Err(format!(
                "unknown quantization `{s}`; valid: \"nf4\", \"none\""
            )),
        }
    }
}
