//! The Llama family (Llama, Mistral, Qwen2): RMSNorm, rotary positions, SwiGLU MLP,
//! grouped-query attention, optional q/k/v biases, tied or untied head.

use super::arch::{Architecture, ModelConfig};
use super::layers::{
    apply_rope, attention, attention_bias, linear, mask_rows, rms_norm, rope_tables, split_heads,
};
use super::load::{ModelError, WeightSource};
use super::params::Params;
use candle_core::{Result, Tensor};
type LoadResult<T> = std::result::Result<T, ModelError>;

struct Layer {
    input_norm: Tensor,
    q: (Tensor, Option<Tensor>),
    k: (Tensor, Option<Tensor>),
    v: (Tensor, Option<Tensor>),
    o: (Tensor, Option<Tensor>),
    post_norm: Tensor,
    gate: (Tensor, Option<Tensor>),
    up: (Tensor, Option<Tensor>),
    down: (Tensor, Option<Tensor>),
}

pub struct Llama {
    pub config: ModelConfig,
    pub params: Params,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
}

fn lin(
    src: &mut WeightSource,
    prefix: &str,
    out_f: usize,
    in_f: usize,
    bias: bool,
) -> LoadResult<(Tensor, Option<Tensor>)> {
    Ok((
        src.param(&format!("{prefix}.weight"), &[out_f, in_f])?,
        src.optional_param(&format!("{prefix}.bias"), &[out_f], bias)?,
    ))
}

fn apply(x: &Tensor, l: &(Tensor, Option<Tensor>)) -> Result<Tensor> {
    linear(x, &l.0, l.1.as_ref())
}

impl Llama {
    pub fn new(cfg: &ModelConfig, src: &mut WeightSource) -> LoadResult<Self> {
        let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let qd = cfg.num_heads * cfg.head_dim;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let embed_tokens = src.param("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let ab = cfg.attention_bias;
            layers.push(Layer {
                q: lin(src, &format!("{p}.self_attn.q_proj"), qd, h, ab)?,
                k: lin(src, &format!("{p}.self_attn.k_proj"), kvd, h, ab)?,
                v: lin(src, &format!("{p}.self_attn.v_proj"), kvd, h, ab)?,
                // Llama's o_proj follows attention_bias; Mistral and Qwen2 never bias it.
                o: lin(
                    src,
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    qd,
                    ab && cfg.arch == Architecture::Llama,
                )?,
                gate: lin(src, &format!("{p}.mlp.gate_proj"), i, h, cfg.mlp_bias)?,
                up: lin(src, &format!("{p}.mlp.up_proj"), i, h, cfg.mlp_bias)?,
                down: lin(src, &format!("{p}.mlp.down_proj"), h, i, cfg.mlp_bias)?,
                input_norm: src.param(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: src.param(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            });
        }
        let norm = src.param("model.norm.weight", &[h])?;
        // Some tied checkpoints still ship an lm_head copy; the tie wins, as in transformers.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(src.param("lm_head.weight", &[v, h])?)
        };
        Ok(Llama {
            config: cfg.clone(),
            params: src.take_params(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn lm_head(&self) -> Tensor {
        self.lm_head
            .clone()
            .unwrap_or_else(|| self.embed_tokens.clone())
    }

    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (n, l) = ids.dims2()?;
        let rows = mask_rows(mask)?;
        let dev = ids.device();
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((n, l, cfg.hidden_size))?;
        // transformers uses positions 0..len for every row, padding or not.
        let (cos, sin) = rope_tables(l, cfg.head_dim, cfg.rope_theta, dev)?;
        let bias = attention_bias(&rows, cfg.sliding_window, dev)?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let eps = cfg.rms_norm_eps;
        for layer in &self.layers {
            let hs = rms_norm(&x, &layer.input_norm, eps)?;
            let q = split_heads(&apply(&hs, &layer.q)?, cfg.num_heads)?;
            let k = split_heads(&apply(&hs, &layer.k)?, cfg.num_kv_heads)?;
            let v = split_heads(&apply(&hs, &layer.v)?, cfg.num_kv_heads)?;
            let q = apply_rope(&q, &cos, &sin)?;
            let k = apply_rope(&k, &cos, &sin)?;
            let a = attention(&q, &k, &v, &bias, scale)?;
            x = (x + apply(&a, &layer.o)?)?;
            let hs = rms_norm(&x, &layer.post_norm, eps)?;
            let g = apply(&hs, &layer.gate)?.silu()?;
            let u = apply(&hs, &layer.up)?;
            x = (x + apply(&(g * u)?, &layer.down)?)?;
        }
        rms_norm(&x, &self.norm, eps)
    }
}
