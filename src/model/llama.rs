//! The Llama family (Llama, Mistral, Qwen2): RMSNorm, rotary positions, SwiGLU MLP,
//! grouped-query attention, optional q/k/v biases, tied or untied head.

use super::arch::{Architecture, ModelConfig};
use super::layers::{
    apply_rope, attention, attention_bias, mask_rows, rms_norm, rope_tables, split_heads, Attention,
};
use super::linear::Linear;
use super::load::{AdapterInfo, ModelError, WeightSource};
use super::opt::trainable;
use super::packed::{AttendFn, Packed, PackedAttention};
use super::params::Params;
use super::recompute::{Block, RowsBlock, SideGrads};
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
    /// Rotary positions, masks and attention of a padded or a packed batch.
    attention: Attention,
    eps: f64,
}

impl Layer {
    fn forward(&self, x: &Tensor, eps: f64, attend: &AttendFn) -> Result<Tensor> {
        let hs = rms_norm(x, &self.input_norm, eps)?;
        let a = attend(
            &self.q.forward(&hs)?,
            &self.k.forward(&hs)?,
            &self.v.forward(&hs)?,
        )?;
        let x = (x + self.o.forward(&a)?)?;
        let hs = rms_norm(&x, &self.post_norm, eps)?;
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

impl LayerBlock {
    fn run(&self, x: &Tensor, live: bool) -> Result<Tensor> {
        let layer = if live { &self.live } else { &self.frozen };
        let eps = self.ctx.eps;
        self.ctx
            .attention
            .layer(x, layer, &self.frozen, |l, x, a| l.forward(x, eps, a))
    }
}

impl Block for LayerBlock {
    fn forward(&self, x: &Tensor, live: bool) -> Result<Tensor> {
        self.run(x, live)
    }

    fn vars(&self) -> Vec<Var> {
        trainable(self.live.tensors())
    }
}

impl RowsBlock for LayerBlock {
    fn forward_rows(
        &self,
        x: &Tensor,
        pad: Option<&Tensor>,
        live: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let layer = if live { &self.live } else { &self.frozen };
        let eps = self.ctx.eps;
        self.ctx
            .attention
            .layer_rows(x, pad, layer, &self.frozen, |l, x, a| l.forward(x, eps, a))
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
    /// A frozen head's column sums (see `CausalLm::head_column_sums`).
    pub(super) head_sums: std::sync::OnceLock<Tensor>,
}

impl Llama {
    pub fn new(cfg: &ModelConfig, src: &mut WeightSource) -> LoadResult<Self> {
        let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let qd = cfg.num_heads * cfg.head_dim;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let embed_tokens = src.embedding("model.embed_tokens.weight", &[v, h])?;
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
            Some(src.head("lm_head.weight", &[v, h])?)
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
            head_sums: Default::default(),
        })
    }

    pub fn lm_head(&self) -> Tensor {
        self.lm_head
            .clone()
            .unwrap_or_else(|| self.embed_tokens.clone())
    }

    /// The same weights as constants (no parameters): see `CausalLm::detached`.
    pub fn detached(&self) -> Llama {
        Llama {
            config: self.config.clone(),
            params: Params::default(),
            adapter: self.adapter.clone(),
            recompute: self.recompute.as_ref().map(|_| SideGrads::default()),
            compute: self.compute,
            embed_tokens: self.embed_tokens.detach(),
            layers: self.layers.iter().map(Layer::detached).collect(),
            norm: self.norm.detach(),
            lm_head: self.lm_head.as_ref().map(Tensor::detach),
            head_sums: self.head_sums.clone(),
        }
    }

    /// The decoder stack and final norm on embeddings `x` (`[n, len, h]` or `[total, h]`).
    fn decode(&self, x: Tensor, attention: Attention) -> Result<Tensor> {
        let ctx = Arc::new(Ctx {
            attention,
            eps: self.config.rms_norm_eps,
        });
        let layers = self.layers.iter().map(|layer| LayerBlock {
            live: layer.clone(),
            frozen: layer.detached(),
            ctx: ctx.clone(),
        });
        let x = ctx.attention.stack(x, layers, self.recompute.as_ref())?;
        rms_norm(&x, &self.norm, ctx.eps)
    }

    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (n, l) = ids.dims2()?;
        let rows = mask_rows(mask)?;
        let dev = ids.device();
        let x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(DType::F32)?
            .reshape((n, l, cfg.hidden_size))?;
        // transformers uses positions 0..len for every row, padding or not.
        let (cos, sin) = rope_tables(l, cfg.head_dim, cfg.rope_theta, dev)?;
        let bias = attention_bias(&rows, cfg.sliding_window, dev)?;
        let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let compute = self.compute;
        self.decode(
            x,
            Attention::Padded(Arc::new(move |q, k, v| {
                let q = apply_rope(&split_heads(q, heads)?, &cos, &sin)?;
                let k = apply_rope(&split_heads(k, kv_heads)?, &cos, &sin)?;
                let v = split_heads(v, kv_heads)?;
                attention(&q, &k, &v, &bias, scale, compute)
            })),
        )
    }

    /// Hidden states `[total, h]` of a packed batch laid out with `Padding::Explicit`: each
    /// sequence's real tokens (a sequence with a shared prefix stores only the tokens after
    /// it), then the padding block: one row per padding position the metrics count
    /// (computed without a graph).
    ///
    /// Exact: transformers gives every row the positions 0..len, padding included, and masks
    /// padding keys, so real tokens never see padding and padding position p (its own rotary
    /// position p) sees the row's real tokens up to p (within the sliding window): here own
    /// row i sits at position `prefix_len + i`, with those keys. A causal model gives two
    /// sequences with the same first tokens the same hidden states there, so the rejected
    /// sequence's copy of the prompt is read from the chosen one's rows (its gradient then
    /// arrives there too, summed as the two copies' would be).
    pub fn forward_packed(&self, packed: &Packed) -> Result<Tensor> {
        let cfg = &self.config;
        let x = self
            .embed_tokens
            .index_select(&packed.ids, 0)?
            .to_dtype(DType::F32)?;
        let attention = PackedAttention::new(
            packed,
            (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
            cfg.sliding_window,
            Some(cfg.rope_theta),
            self.compute,
        )?;
        self.decode(x, Attention::Packed(Arc::new(attention)))
    }
}
