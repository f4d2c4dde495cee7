//! The Llama family (Llama, Mistral, Qwen2): RMSNorm, rotary positions, SwiGLU MLP,
//! grouped-query attention, optional q/k/v biases, tied or untied head.

use super::arch::{Architecture, ModelConfig};
use super::layers::{
    apply_rope, attention, attention_bias, mask_rows, rms_norm, rope_tables, split_heads,
};
use super::linear::Linear;
use super::load::{AdapterInfo, ModelError, WeightSource};
use super::opt::trainable;
use super::params::Params;
use super::recompute::{checkpoint, Block, SideGrads};
use candle_core::{DType, Result, Tensor, Var};
use std::sync::Arc;
type LoadResult<T> = std::result::Result<T, ModelError>;

#[derive(Clone)]
struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Per-batch inputs every layer shares (owned, so a checkpointed layer can rerun in backward).
struct Ctx {
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
    scale: f64,
    eps: f64,
    heads: usize,
    kv_heads: usize,
    compute: DType,
}

impl Layer {
    fn forward(&self, x: &Tensor, c: &Ctx) -> Result<Tensor> {
        let hs = rms_norm(x, &self.input_norm, c.eps)?;
        let q = split_heads(&self.q.forward(&hs)?, c.heads)?;
        let k = split_heads(&self.k.forward(&hs)?, c.kv_heads)?;
        let v = split_heads(&self.v.forward(&hs)?, c.kv_heads)?;
        let q = apply_rope(&q, &c.cos, &c.sin)?;
        let k = apply_rope(&k, &c.cos, &c.sin)?;
        let a = attention(&q, &k, &v, &c.bias, c.scale, c.compute)?;
        let x = (x + self.o.forward(&a)?)?;
        let hs = rms_norm(&x, &self.post_norm, c.eps)?;
        let g = self.gate.forward(&hs)?.silu()?;
        let u = self.up.forward(&hs)?;
        x + self.down.forward(&(g * u)?)?
    }

    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn detached(&self) -> Layer {
        Layer {
            input_norm: self.input_norm.detach(),
            q: self.q.detached(),
            k: self.k.detached(),
            v: self.v.detached(),
            o: self.o.detached(),
            post_norm: self.post_norm.detach(),
            gate: self.gate.detached(),
            up: self.up.detached(),
            down: self.down.detached(),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.input_norm, &self.post_norm];
        for l in self.linears() {
            out.extend(l.tensors());
        }
        out
    }
}

/// One decoder layer as a recomputable block (gradient checkpointing).
struct LayerBlock {
    live: Layer,
    frozen: Layer,
    ctx: Arc<Ctx>,
}

impl Block for LayerBlock {
    fn forward(&self, x: &Tensor, live: bool) -> Result<Tensor> {
        let layer = if live { &self.live } else { &self.frozen };
        layer.forward(x, &self.ctx)
    }

    fn vars(&self) -> Vec<Var> {
        trainable(self.live.tensors())
    }
}

pub struct Llama {
    pub config: ModelConfig,
    pub params: Params,
    pub adapter: Option<AdapterInfo>,
    /// Set when gradient checkpointing is on: layers are recomputed in backward.
    pub recompute: Option<SideGrads>,
    /// Dtype of the matrix products (f32, or bf16 with f32 everywhere else).
    pub compute: DType,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
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
                q: src.linear(&format!("{p}.self_attn.q_proj"), qd, h, ab)?,
                k: src.linear(&format!("{p}.self_attn.k_proj"), kvd, h, ab)?,
                v: src.linear(&format!("{p}.self_attn.v_proj"), kvd, h, ab)?,
                // Llama's o_proj follows attention_bias; Mistral and Qwen2 never bias it.
                o: src.linear(
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    qd,
                    ab && cfg.arch == Architecture::Llama,
                )?,
                gate: src.linear(&format!("{p}.mlp.gate_proj"), i, h, cfg.mlp_bias)?,
                up: src.linear(&format!("{p}.mlp.up_proj"), i, h, cfg.mlp_bias)?,
                down: src.linear(&format!("{p}.mlp.down_proj"), h, i, cfg.mlp_bias)?,
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
        let (params, adapter) = src.finish()?;
        Ok(Llama {
            config: cfg.clone(),
            params,
            adapter,
            recompute: None,
            compute: src.compute(),
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
        let ctx = Arc::new(Ctx {
            cos,
            sin,
            bias: attention_bias(&rows, cfg.sliding_window, dev)?,
            scale: 1.0 / (cfg.head_dim as f64).sqrt(),
            eps: cfg.rms_norm_eps,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            compute: self.compute,
        });
        for layer in &self.layers {
            x = match &self.recompute {
                Some(side) => {
                    let block = LayerBlock {
                        live: layer.clone(),
                        frozen: layer.detached(),
                        ctx: ctx.clone(),
                    };
                    checkpoint(&x, Arc::new(block), side)?
                }
                None => layer.forward(&x, &ctx)?,
            };
        }
        rms_norm(&x, &self.norm, ctx.eps)
    }
}
