//! `config.json` parsing for the supported architectures, old and new key spellings alike.

use super::load::ModelError;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Opt,
    Llama,
    Mistral,
    Qwen2,
}

pub const SUPPORTED: &str =
    "OPTForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

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
    pub activation: String,
    // Llama family
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn get_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
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
        let arch_name = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .map(str::to_string);
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match (arch_name.as_deref(), model_type) {
            (Some("OPTForCausalLM"), _) | (None, "opt") => Architecture::Opt,
            (Some("LlamaForCausalLM"), _) | (None, "llama") => Architecture::Llama,
            (Some("MistralForCausalLM"), _) | (None, "mistral") => Architecture::Mistral,
            (Some("Qwen2ForCausalLM"), _) | (None, "qwen2") => Architecture::Qwen2,
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
        let need = |key: &str| get_usize(&raw, key).ok_or_else(|| err(format!("missing `{key}`")));
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        if num_heads == 0 || hidden_size % num_heads != 0 && get_usize(&raw, "head_dim").is_none() {
            return Err(err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
            )));
        }
        let num_kv_heads = get_usize(&raw, "num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let rope_theta = raw
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                raw.get("rope_parameters")
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        if let Some(rope_type) = raw
            .get("rope_parameters")
            .or_else(|| raw.get("rope_scaling"))
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
        {
            if rope_type != "default" {
                return Err(err(format!(
                    "rope_type `{rope_type}` is not supported yet (only `default`)"
                )));
            }
        }
        let is_opt = arch == Architecture::Opt;
        let intermediate_size = if is_opt {
            need("ffn_dim")?
        } else {
            need("intermediate_size")?
        };
        let use_sliding =
            get_bool(&raw, "use_sliding_window").unwrap_or(arch == Architecture::Mistral);
        let sliding_window = if use_sliding {
            get_usize(&raw, "sliding_window")
        } else {
            None
        };
        let activation = raw
            .get(if is_opt {
                "activation_function"
            } else {
                "hidden_act"
            })
            .and_then(Value::as_str)
            .unwrap_or(if is_opt { "relu" } else { "silu" })
            .to_string();
        let supported_act = if is_opt {
            activation == "relu"
        } else {
            activation == "silu"
        };
        if !supported_act {
            return Err(err(format!("activation `{activation}` is not supported")));
        }
        Ok(ModelConfig {
            arch,
            vocab_size: need("vocab_size")?,
            hidden_size,
            num_layers: need("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim: get_usize(&raw, "head_dim").unwrap_or(hidden_size / num_heads),
            intermediate_size,
            max_position_embeddings: get_usize(&raw, "max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: get_bool(&raw, "tie_word_embeddings").unwrap_or(is_opt),
            word_embed_proj_dim: get_usize(&raw, "word_embed_proj_dim").unwrap_or(hidden_size),
            do_layer_norm_before: get_bool(&raw, "do_layer_norm_before").unwrap_or(true),
            remove_final_layer_norm: get_bool(&raw, "_remove_final_layer_norm").unwrap_or(false),
            enable_bias: get_bool(&raw, "enable_bias").unwrap_or(true),
            layer_norm_elementwise_affine: get_bool(&raw, "layer_norm_elementwise_affine")
                .unwrap_or(true),
            activation,
            rms_norm_eps: raw
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            attention_bias: get_bool(&raw, "attention_bias").unwrap_or(arch == Architecture::Qwen2),
            mlp_bias: get_bool(&raw, "mlp_bias").unwrap_or(false),
            sliding_window,
            raw,
        })
    }
}
