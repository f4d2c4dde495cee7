//! `config.json` parsing for the supported architectures, old and new key spellings alike.

use super::error::ModelError;
use super::rope::{shown, Rope};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Opt,
    Llama,
    Mistral,
    Qwen2,
    Gemma,
    Phi3,
    Qwen3,
    Gemma2,
    /// Gemma 3's text model (`Gemma3ForCausalLM`, model_type `gemma3_text`).
    Gemma3,
}

pub const SUPPORTED: &str = "OPTForCausalLM, LlamaForCausalLM, MistralForCausalLM, \
     Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, \
     Phi3ForCausalLM";

/// The MLP's gate activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Silu,
    /// The tanh approximation (`gelu_pytorch_tanh`, `gelu_new`; Gemma's legacy `gelu`).
    GeluTanh,
    /// The exact, erf-based GELU.
    Gelu,
}

/// The hyper-parameters the model code needs, with Hugging Face's defaults filled in.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Architecture,
    /// The parsed `config.json`, kept so a saved model gets the same file back.
    pub raw: Value,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    // OPT
    pub word_embed_proj_dim: usize,
    pub do_layer_norm_before: bool,
    pub remove_final_layer_norm: bool,
    pub enable_bias: bool,
    pub layer_norm_elementwise_affine: bool,
    pub activation: Activation,
    // Llama family
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    /// Gemma multiplies the token embeddings by sqrt(hidden_size).
    pub embed_scale: Option<f64>,
    /// Gemma's RMSNorm scales by `1 + w` (its weights are stored as offsets from 1).
    pub norm_weight_offset: bool,
    /// Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`.
    pub fused_projections: bool,
    /// Qwen3 RMS-normalises each head of q and k (`q_norm`, `k_norm`) before rotary positions.
    pub qk_norm: bool,
    /// The attention scores' scale (Gemma 2: `query_pre_attn_scalar`^-1/2, else head_dim^-1/2).
    pub attention_scale: f64,
    /// Gemma 2: scores become `cap * tanh(scores / cap)` before the mask.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits become `cap * tanh(logits / cap)`.
    pub final_softcap: Option<f64>,
    /// Gemma 2: norms after attention and around the MLP (`pre_`/`post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// Gemma 2/3: which layers use `sliding_window` (`layer_types`); `None`: all of them do.
    pub sliding_layers: Option<Vec<bool>>,
    /// Gemma 3: the sliding layers' own rotary settings (`rope_local_base_freq`).
    pub rope_local: Option<Rope>,
}

/// `key`'s value, with null read as absent (transformers' configs write unset keys as null).
fn present<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// An integer of at least `min` (0 or 1), if present; any other value is an error naming the
/// key and what was found.
fn get_count(v: &Value, key: &str, min: u64) -> Result<Option<usize>, String> {
    let Some(x) = present(v, key) else {
        return Ok(None);
    };
    match x.as_u64().filter(|&n| n >= min) {
        Some(n) => usize::try_from(n)
            .map(Some)
            .map_err(|_| format!("`{key}` is too large, found {n}")),
        None => Err(format!(
            "`{key}` must be a {} integer, found {}",
            if min > 0 { "positive" } else { "non-negative" },
            shown(x)
        )),
    }
}

fn get_bool(v: &Value, key: &str) -> Result<Option<bool>, String> {
    match present(v, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(x) => Err(format!("`{key}` must be true or false, found {}", shown(x))),
    }
}

fn get_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, String> {
    match present(v, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(x) => Err(format!("`{key}` must be a string, found {}", shown(x))),
    }
}

/// A finite number, if present.
fn get_number(v: &Value, key: &str) -> Result<Option<f64>, String> {
    match present(v, key) {
        None => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| format!("`{key}` must be a number, found {}", shown(x))),
    }
}

/// A norm's epsilon: >= 0 (0 is legal, as transformers allows), if present. A negative one
/// makes the normalisation's square root NaN.
fn get_eps(v: &Value, key: &str) -> Result<Option<f64>, String> {
    match get_number(v, key)? {
        Some(e) if e < 0.0 => Err(format!("`{key}` must be a number >= 0, found {e}")),
        e => Ok(e),
    }
}

/// What a JSON value is, for "not a JSON object" messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl ModelConfig {
    /// The longest sequence the model can embed: OPT's learned position table is finite;
    /// rotary models have no hard limit.
    pub fn max_sequence_length(&self) -> Option<usize> {
        match self.arch {
            Architecture::Opt => Some(self.max_position_embeddings),
            _ => None,
        }
    }

    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
            path: path.clone(),
            source: e,
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.clone(),
            msg: format!("invalid JSON: {e}"),
        })?;
        Self::from_value(raw, &path)
    }

    pub fn from_value(raw: Value, path: &Path) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        if !raw.is_object() {
            return Err(err(format!(
                "config.json is not a JSON object (found {})",
                json_kind(&raw)
            )));
        }
        let arch_name = match present(&raw, "architectures") {
            None => None,
            Some(Value::Array(list)) => match list.first() {
                None => None,
                Some(Value::String(name)) => Some(name.clone()),
                Some(other) => {
                    return Err(err(format!(
                        "`architectures` must list class names, found {}",
                        shown(other)
                    )))
                }
            },
            Some(other) => {
                return Err(err(format!(
                    "`architectures` must be a list of class names, found {}",
                    shown(other)
                )))
            }
        };
        let model_type = get_str(&raw, "model_type").map_err(err)?.unwrap_or("");
        let count = |key: &str, min: u64| get_count(&raw, key, min).map_err(err);
        let flag = |key: &str| get_bool(&raw, key).map_err(err);
        let arch = match (arch_name.as_deref(), model_type) {
            (Some("OPTForCausalLM"), _) | (None, "opt") => Architecture::Opt,
            (Some("LlamaForCausalLM"), _) | (None, "llama") => Architecture::Llama,
            (Some("MistralForCausalLM"), _) | (None, "mistral") => Architecture::Mistral,
            (Some("Qwen2ForCausalLM"), _) | (None, "qwen2") => Architecture::Qwen2,
            (Some("GemmaForCausalLM"), _) | (None, "gemma") => Architecture::Gemma,
            (Some("Phi3ForCausalLM"), _) | (None, "phi3") => Architecture::Phi3,
            (Some("Qwen3ForCausalLM"), _) | (None, "qwen3") => Architecture::Qwen3,
            (Some("Gemma2ForCausalLM"), _) | (None, "gemma2") => Architecture::Gemma2,
            (Some("Gemma3ForCausalLM"), _) | (None, "gemma3_text") => Architecture::Gemma3,
            (Some(other), _) => {
                return Err(err(format!(
                    "unsupported architecture `{other}`; supported: {SUPPORTED}"
                )))
            }
            (None, other) => {
                return Err(err(format!(
                    "unsupported model_type `{other}`; supported: {SUPPORTED}"
                )))
            }
        };
        // Sizes: positive integers; a wrong value is named as found, not reported missing.
        let need = |key: &str| count(key, 1)?.ok_or_else(|| err(format!("missing `{key}`")));
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        let head_dim_key = count("head_dim", 1)?;
        if num_heads == 0 || hidden_size % num_heads != 0 && head_dim_key.is_none() {
            return Err(err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
            )));
        }
        let num_kv_heads = count("num_key_value_heads", 1)?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let is_opt = arch == Architecture::Opt;
        let intermediate_size = if is_opt {
            need("ffn_dim")?
        } else {
            need("intermediate_size")?
        };
        let use_sliding = flag("use_sliding_window")?.unwrap_or(matches!(
            arch,
            Architecture::Mistral
                | Architecture::Phi3
                | Architecture::Gemma2
                | Architecture::Gemma3
        ));
        // Gemma 2 and 3: layer types, sandwich norms, query_pre_attn_scalar.
        let gemma23 = matches!(arch, Architecture::Gemma2 | Architecture::Gemma3);
        // A window is a positive integer or null (none). Any value but a non-negative integer
        // is refused even where sliding is off (a negative one used to read as no window); 0
        // where the window is used, as it would leave every query without keys.
        let bad_window = |v: &Value| {
            err(format!(
                "`sliding_window` must be a positive integer or null, found {}",
                shown(v)
            ))
        };
        let window =
            get_count(&raw, "sliding_window", 0).map_err(|_| bad_window(&raw["sliding_window"]))?;
        let sliding_window = match (use_sliding, raw.get("sliding_window")) {
            (false, _) => None,
            (true, None) if gemma23 => Some(4096),
            (true, _) if window == Some(0) => return Err(bad_window(&raw["sliding_window"])),
            (true, _) => window,
        };
        let act_key = match arch {
            Architecture::Opt => "activation_function",
            // Gemma 2's and 3's MLPs read `hidden_activation`; `hidden_act` is unused.
            Architecture::Gemma2 | Architecture::Gemma3 => "hidden_activation",
            _ => "hidden_act",
        };
        let act_name = get_str(&raw, act_key).map_err(err)?.unwrap_or(match arch {
            Architecture::Opt => "relu",
            Architecture::Gemma | Architecture::Gemma2 | Architecture::Gemma3 => {
                "gelu_pytorch_tanh"
            }
            _ => "silu",
        });
        let activation = match (act_name, arch) {
            ("relu", Architecture::Opt) => Activation::Relu,
            ("silu", a) if a != Architecture::Opt => Activation::Silu,
            // transformers reads Gemma's legacy `gelu` as the tanh approximation.
            ("gelu", Architecture::Gemma) => Activation::GeluTanh,
            ("gelu", a) if a != Architecture::Opt => Activation::Gelu,
            ("gelu_pytorch_tanh" | "gelu_new", a) if a != Architecture::Opt => Activation::GeluTanh,
            (other, _) => return Err(err(format!("activation `{other}` is not supported"))),
        };
        let head_dim = head_dim_key.unwrap_or(match arch {
            // The configs' own defaults, not hidden / heads.
            Architecture::Qwen3 => 128,
            Architecture::Gemma2 | Architecture::Gemma3 => 256,
            _ => hidden_size / num_heads,
        });
        let (rope, rope_local) = if arch == Architecture::Gemma3 {
            let (global, local) = Rope::gemma3(&raw, head_dim).map_err(err)?;
            (global, Some(local))
        } else {
            (Rope::from_config(&raw, head_dim).map_err(err)?, None)
        };
        let gemma = arch == Architecture::Gemma || gemma23;
        // A key present as null switches a feature off; an absent one takes the default. A
        // value must be a positive number: 0 or less would divide by zero or flip signs.
        let optional_f64 = |key: &str, default: Option<f64>| -> Result<Option<f64>, ModelError> {
            match raw.get(key) {
                Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64().filter(|x| x.is_finite() && *x > 0.0) {
                    Some(x) => Ok(Some(x)),
                    None => Err(err(format!(
                        "`{key}` must be a positive number or null, found {}",
                        shown(v)
                    ))),
                },
                None => Ok(default),
            }
        };
        let attention_scale = if gemma23 {
            1.0 / optional_f64("query_pre_attn_scalar", Some(256.0))?
                .unwrap_or(head_dim as f64)
                .sqrt()
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        let (attn_softcap, final_softcap) = match arch {
            // Gemma 2 caps by default, Gemma 3 only where its config sets a cap.
            Architecture::Gemma2 => (
                optional_f64("attn_logit_softcapping", Some(50.0))?,
                optional_f64("final_logit_softcapping", Some(30.0))?,
            ),
            Architecture::Gemma3 => (
                optional_f64("attn_logit_softcapping", None)?,
                optional_f64("final_logit_softcapping", None)?,
            ),
            _ => (None, None),
        };
        // transformers' default, 1e-6, where absent; OPT's layer norms use a fixed 1e-5 and
        // read no key, but a negative `layer_norm_eps` still marks a broken file.
        let rms_norm_eps = get_eps(&raw, "rms_norm_eps").map_err(err)?.unwrap_or(1e-6);
        get_eps(&raw, "layer_norm_eps").map_err(err)?;
        let num_layers = need("num_hidden_layers")?;
        // Qwen2/Qwen3 with `use_sliding_window` slide only some layers too.
        let qwen = matches!(arch, Architecture::Qwen2 | Architecture::Qwen3);
        let sliding_layers = if gemma23 || (qwen && sliding_window.is_some()) {
            let types: Vec<bool> = match present(&raw, "layer_types") {
                Some(Value::Array(list)) => list
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(err(format!("layer_types: unknown entry {t}"))),
                    })
                    .collect::<Result<_, _>>()?,
                Some(other) => {
                    return Err(err(format!(
                        "`layer_types` must be a list, found {}",
                        shown(other)
                    )))
                }
                // transformers' defaults: Gemma 2 alternates from sliding; Gemma 3 makes every
                // `sliding_window_pattern`-th layer (6th by default) full; Qwen slides the
                // layers from `max_window_layers` (28) on.
                None if qwen => {
                    let first = count("max_window_layers", 0)?.unwrap_or(28);
                    (0..num_layers).map(|i| i >= first).collect()
                }
                None => {
                    let pattern = match arch {
                        Architecture::Gemma2 => 2,
                        _ => count("sliding_window_pattern", 1)?.unwrap_or(6),
                    };
                    (0..num_layers).map(|i| (i + 1) % pattern != 0).collect()
                }
            };
            if types.len() != num_layers {
                return Err(err(format!(
                    "layer_types has {} entries for {num_layers} layers",
                    types.len()
                )));
            }
            Some(types)
        } else {
            None
        };
        Ok(ModelConfig {
            arch,
            vocab_size: need("vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            max_position_embeddings: count("max_position_embeddings", 1)?.unwrap_or(2048),
            tie_word_embeddings: flag("tie_word_embeddings")?.unwrap_or(is_opt || gemma),
            word_embed_proj_dim: count("word_embed_proj_dim", 1)?.unwrap_or(hidden_size),
            do_layer_norm_before: flag("do_layer_norm_before")?.unwrap_or(true),
            remove_final_layer_norm: flag("_remove_final_layer_norm")?.unwrap_or(false),
            enable_bias: flag("enable_bias")?.unwrap_or(true),
            layer_norm_elementwise_affine: flag("layer_norm_elementwise_affine")?.unwrap_or(true),
            activation,
            rms_norm_eps,
            rope,
            attention_bias: flag("attention_bias")?.unwrap_or(arch == Architecture::Qwen2),
            mlp_bias: flag("mlp_bias")?.unwrap_or(false),
            sliding_window,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            norm_weight_offset: gemma,
            fused_projections: arch == Architecture::Phi3,
            qk_norm: matches!(arch, Architecture::Qwen3 | Architecture::Gemma3),
            attention_scale,
            attn_softcap,
            final_softcap,
            sandwich_norms: gemma23,
            sliding_layers,
            rope_local,
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_value(v, Path::new("config.json"))
    }

    fn llama_like(arch: &str) -> Value {
        json!({"architectures": [arch], "vocab_size": 10, "hidden_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 8})
    }

    #[test]
    fn gemma_defaults_follow_transformers() {
        let c = parse(llama_like("GemmaForCausalLM")).unwrap();
        assert_eq!(c.arch, Architecture::Gemma);
        assert!(c.tie_word_embeddings && c.norm_weight_offset && !c.fused_projections);
        assert_eq!(c.embed_scale, Some(8.0));
        assert_eq!(c.activation, Activation::GeluTanh);
        // Gemma's released configs say `gelu` and mean the tanh approximation.
        let mut v = llama_like("GemmaForCausalLM");
        v["hidden_act"] = json!("gelu");
        assert_eq!(parse(v).unwrap().activation, Activation::GeluTanh);
        let mut v = llama_like("LlamaForCausalLM");
        v["hidden_act"] = json!("gelu");
        assert_eq!(parse(v).unwrap().activation, Activation::Gelu);
    }

    #[test]
    fn gemma2_defaults_follow_transformers() {
        let mut v = llama_like("Gemma2ForCausalLM");
        v["num_hidden_layers"] = json!(3);
        v["hidden_act"] = json!("silu"); // unused by Gemma 2, whose MLP reads hidden_activation
        let c = parse(v).unwrap();
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!((c.head_dim, c.attention_scale), (256, 1.0 / 16.0));
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.sliding_layers, Some(vec![true, false, true]));
        assert!(c.sandwich_norms && c.norm_weight_offset && c.tie_word_embeddings);
        let mut v = llama_like("Gemma2ForCausalLM");
        v["final_logit_softcapping"] = Value::Null;
        v["query_pre_attn_scalar"] = json!(64);
        let c = parse(v).unwrap();
        assert_eq!((c.final_softcap, c.attention_scale), (None, 0.125));
    }

    #[test]
    fn gemma3_reads_both_rope_spellings_and_its_layer_pattern() {
        use crate::model::rope::RopeScaling;
        let mut v = llama_like("Gemma3ForCausalLM");
        v["num_hidden_layers"] = json!(7);
        v["rope_theta"] = json!(1e6);
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        v["rope_local_base_freq"] = json!(1e4);
        v["final_logit_softcapping"] = Value::Null;
        let c = parse(v).unwrap();
        let full = [true, true, true, true, true, false, true];
        assert_eq!(c.sliding_layers.as_deref(), Some(&full[..]));
        assert_eq!(
            (c.rope.theta, &c.rope.scaling),
            (1e6, &RopeScaling::Linear { factor: 8.0 })
        );
        let local = c.rope_local.unwrap();
        assert_eq!((local.theta, local.scaling), (1e4, RopeScaling::None));
        assert!(c.qk_norm && c.sandwich_norms && c.norm_weight_offset);
        assert_eq!((c.attn_softcap, c.final_softcap), (None, None));
        let mut v = llama_like("Gemma3ForCausalLM");
        v["rope_parameters"] = json!({"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}});
        v["sliding_window_pattern"] = json!(2);
        let c = parse(v).unwrap();
        assert_eq!((c.rope.theta, c.rope_local.unwrap().theta), (5e5, 2e4));
        assert_eq!(c.sliding_layers, Some(vec![true]));
    }

    #[test]
    fn qwen_slides_the_layers_from_max_window_layers_when_asked() {
        let mut v = llama_like("Qwen2ForCausalLM");
        v["num_hidden_layers"] = json!(4);
        v["sliding_window"] = json!(16);
        v["max_window_layers"] = json!(2);
        let c = parse(v.clone()).unwrap();
        assert_eq!((c.sliding_window, c.sliding_layers), (None, None));
        v["use_sliding_window"] = json!(true);
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.sliding_window, Some(16));
        assert_eq!(c.sliding_layers, Some(vec![false, false, true, true]));
        v["layer_types"] = json!([
            "sliding_attention",
            "full_attention",
            "full_attention",
            "full_attention"
        ]);
        assert_eq!(
            parse(v).unwrap().sliding_layers,
            Some(vec![true, false, false, false])
        );
    }

    #[test]
    fn phi3_fuses_projections_rotates_part_of_each_head_and_slides() {
        let mut v = llama_like("Phi3ForCausalLM");
        v["sliding_window"] = json!(2047);
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e4,
                                      "partial_rotary_factor": 0.75});
        let c = parse(v).unwrap();
        assert!(c.fused_projections && !c.tie_word_embeddings && !c.norm_weight_offset);
        assert_eq!((c.head_dim, c.rope.dim), (16, 12));
        assert_eq!(c.sliding_window, Some(2047));
        assert_eq!(c.embed_scale, None);
    }

    #[test]
    fn unsupported_settings_are_named() {
        let mut v = llama_like("Phi3ForCausalLM");
        v["rope_scaling"] = json!({"type": "longrope"});
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("rope_type `longrope`"),
            "{e}"
        );
        let mut v = llama_like("GemmaForCausalLM");
        v["hidden_act"] = json!("relu");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("activation `relu`"), "{e}");
        let e = parse(llama_like("Gemma3ForConditionalGeneration"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unsupported architecture `Gemma3ForConditionalGeneration`"),
            "{e}"
        );
        let mut v = llama_like("Gemma2ForCausalLM");
        v["layer_types"] = json!(["sliding_attention", "full_attention"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("layer_types has 2 entries for 1 layers"), "{e}");
    }
}
