//! The Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, Phi-3): RMSNorm, rotary positions,
//! gated MLP, grouped-query attention, optional q/k/v biases, tied or untied head. The
//! members' differences are `ModelConfig` switches: Gemma's embedding scale, `1 + w` norms and
//! GeGLU; Gemma 2's and 3's sandwich norms, soft caps and per-layer windows (with Gemma 3's
//! local rotary settings); Phi-3's fused projections and partial rotary; Qwen3's and Gemma 3's
//! per-head q/k norms; Mistral's and Phi-3's sliding windows.

use super::arch::{Activation, Architecture, ModelConfig};
use super::error::ModelError;
use super::layers::{apply_rope, attention, attention_bias, rms_norm, split_heads, Attention};
use super::linear::Linear;
use super::load::{AdapterInfo, WeightSource};
use super::opt::trainable;
use super::packed::{AttendFn, Packed, PackedAttention};
use super::params::Params;
use super::recompute::{Block, RowsBlock, SideGrads};
use super::rope::Rope;
use candle_core::{DType, Result, Tensor, Var, D};
use std::sync::Arc;
type LoadResult<T> = std::result::Result<T, ModelError>;

const PREFIX: &str = "model";

/// Projections of one input: separate linear layers, or one fused layer whose output columns
/// are split in order (Phi-3's `qkv_proj` and `gate_up_proj`).
#[derive(Clone)]
enum Projections {
    Separate(Vec<Linear>),
    Fused(Linear, Vec<usize>),
}

impl Projections {
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.run(x, Linear::forward)
    }

    /// As `forward`, in the compute dtype where that is free (see `Linear::forward_compute`).
    fn forward_compute(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.run(x, Linear::forward_compute)
    }

    fn run(
        &self,
        x: &Tensor,
        f: impl Fn(&Linear, &Tensor) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(linears) => linears.iter().map(|l| f(l, x)).collect(),
            Projections::Fused(linear, widths) => {
                let y = f(linear, x)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        start += w;
                        // Row gathers (packed attention off the CPU kernels) need contiguous.
                        y.narrow(D::Minus1, start - w, w)?.contiguous()
                    })
                    .collect()
            }
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        match self {
            Projections::Separate(linears) => linears.iter().collect(),
            Projections::Fused(linear, _) => vec![linear],
        }
    }

    fn detached(&self) -> Projections {
        match self {
            Projections::Separate(linears) => {
                Projections::Separate(linears.iter().map(Linear::detached).collect())
            }
            Projections::Fused(linear, widths) => {
                Projections::Fused(linear.detached(), widths.clone())
            }
        }
    }

    /// Each linear layer with its bf16 weight copy made (see `Linear::with_bf16_copy`).
    fn with_bf16_copies(&self) -> Result<Projections> {
        self.try_map(Linear::with_bf16_copy)
    }

    fn try_map(&self, f: impl Fn(&Linear) -> Result<Linear>) -> Result<Projections> {
        Ok(match self {
            Projections::Separate(linears) => {
                Projections::Separate(linears.iter().map(f).collect::<Result<_>>()?)
            }
            Projections::Fused(linear, widths) => Projections::Fused(f(linear)?, widths.clone()),
        })
    }

    /// Only the first projection (q of q, k, v).
    fn first(&self) -> Result<Projections> {
        Ok(match self {
            Projections::Separate(linears) => Projections::Separate(vec![linears[0].clone()]),
            Projections::Fused(linear, widths) => {
                Projections::Fused(linear.output_rows(0, widths[0])?, vec![widths[0]])
            }
        })
    }
}

/// The layer-level switches of the family members.
#[derive(Clone, Copy)]
struct Style {
    eps: f64,
    head_dim: usize,
    norm_weight_offset: bool,
    activation: Activation,
}

impl Style {
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.norm_weight_offset {
            rms_norm(x, &(w + 1.0)?, self.eps)
        } else {
            rms_norm(x, w, self.eps)
        }
    }

    /// RMSNorm of each head of `x` (`[.., heads * head_dim]`): Qwen3's and Gemma 3's q/k norms.
    fn head_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let d = self.head_dim;
        let heads = x.flatten_all()?.reshape(((), d))?;
        self.norm(&heads, w)?.reshape(x.shape())
    }

    fn activate(&self, x: &Tensor) -> Result<Tensor> {
        match self.activation {
            Activation::Silu => x.silu(),
            Activation::GeluTanh => x.gelu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::Relu => x.relu(),
        }
    }
}

#[derive(Clone)]
struct Layer {
    input_norm: Tensor,
    /// q, k, v.
    qkv: Projections,
    /// Qwen3's and Gemma 3's per-head norms of q and k.
    qk_norm: Option<[Tensor; 2]>,
    o: Linear,
    post_norm: Tensor,
    /// Gemma 2's and 3's norms before and after the MLP (`post_norm` then follows attention).
    sandwich: Option<[Tensor; 2]>,
    /// gate, up.
    gate_up: Projections,
    down: Linear,
}

/// Per-batch inputs every layer shares (owned, so a checkpointed layer can rerun in backward).
struct Ctx {
    /// Rotary positions, masks and attention of a padded or a packed batch.
    attention: Attention,
    style: Style,
}

impl Layer {
    fn forward(&self, x: &Tensor, style: Style, attend: &AttendFn) -> Result<Tensor> {
        let hs = style.norm(x, &self.input_norm)?;
        let mut qkv = self.qkv.forward(&hs)?;
        if let Some([qn, kn]) = &self.qk_norm {
            qkv[0] = style.head_norm(&qkv[0], qn)?;
            if let Some(k) = qkv.get_mut(1) {
                *k = style.head_norm(k, kn)?;
            }
        }
        let (q, k, v) = match &qkv[..] {
            [q, k, v] => (q, k, v),
            // A padding layer (`for_padding`): its attention reads the real rows' keys and values.
            [q] => (q, q, q),
            _ => candle_core::bail!("llama layer: {} projections of q, k, v", qkv.len()),
        };
        let a = self.o.forward(&attend(q, k, v)?)?;
        let mlp = |hs: &Tensor| -> Result<Tensor> {
            let product = match style.activation {
                // One op, on the bf16 projections under bf16 products (see `ops::swiglu`).
                Activation::Silu => {
                    let gate_up = self.gate_up.forward_compute(hs)?;
                    crate::ops::swiglu(&gate_up[0], &gate_up[1])?
                }
                _ => {
                    let gate_up = self.gate_up.forward(hs)?;
                    (style.activate(&gate_up[0])? * &gate_up[1])?
                }
            };
            self.down.forward(&product)
        };
        match &self.sandwich {
            None => {
                let x = (x + a)?;
                let hs = style.norm(&x, &self.post_norm)?;
                x + mlp(&hs)?
            }
            Some([pre, post]) => {
                let x = (x + style.norm(&a, &self.post_norm)?)?;
                let out = mlp(&style.norm(&x, pre)?)?;
                x + style.norm(&out, post)?
            }
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = self.qkv.linears();
        out.push(&self.o);
        out.extend(self.gate_up.linears());
        out.push(&self.down);
        out
    }

    /// The layer for a packed batch's padding rows: detached, and projecting queries only (no
    /// row attends to padding, so padding rows' keys and values would never be read).
    fn for_padding(&self) -> Result<Layer> {
        let layer = self.detached();
        Ok(Layer {
            qkv: layer.qkv.first()?,
            ..layer
        })
    }

    /// The layer with each linear layer's bf16 weight copy made once, for the real rows and
    /// the padding rows to share (see `Linear::with_bf16_copy`).
    fn with_bf16_copies(&self) -> Result<Layer> {
        Ok(Layer {
            qkv: self.qkv.with_bf16_copies()?,
            o: self.o.with_bf16_copy()?,
            gate_up: self.gate_up.with_bf16_copies()?,
            down: self.down.with_bf16_copy()?,
            ..self.clone()
        })
    }

    fn detached(&self) -> Layer {
        Layer {
            input_norm: self.input_norm.detach(),
            qkv: self.qkv.detached(),
            qk_norm: self
                .qk_norm
                .as_ref()
                .map(|ns| ns.each_ref().map(Tensor::detach)),
            o: self.o.detached(),
            post_norm: self.post_norm.detach(),
            sandwich: self
                .sandwich
                .as_ref()
                .map(|ns| ns.each_ref().map(Tensor::detach)),
            gate_up: self.gate_up.detached(),
            down: self.down.detached(),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.input_norm, &self.post_norm];
        out.extend(self.qk_norm.iter().flatten());
        out.extend(self.sandwich.iter().flatten());
        for l in self.linears() {
            out.extend(l.tensors());
        }
        out
    }
}

/// One decoder layer as a recomputable block (gradient checkpointing).
struct LayerBlock {
    live: Layer,
    /// `live` detached: the no-graph forward of a checkpointed layer.
    frozen: Layer,
    /// `live` for a packed batch's padding rows (`Layer::for_padding`).
    pad: Layer,
    ctx: Arc<Ctx>,
}

impl LayerBlock {
    fn run(&self, x: &Tensor, live: bool) -> Result<Tensor> {
        let layer = if live { &self.live } else { &self.frozen };
        let style = self.ctx.style;
        self.ctx
            .attention
            .layer(x, layer, &self.pad, |l, x, a| l.forward(x, style, a))
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
        let style = self.ctx.style;
        self.ctx
            .attention
            .layer_rows(x, pad, layer, &self.pad, |l, x, a| l.forward(x, style, a))
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
        let embed_tokens = src.embedding(&format!("{PREFIX}.embed_tokens.weight"), &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("{PREFIX}.layers.{l}");
            let ab = cfg.attention_bias;
            let (attn, mlp) = (format!("{p}.self_attn"), format!("{p}.mlp"));
            let (qkv, gate_up) = if cfg.fused_projections {
                (
                    Projections::Fused(
                        src.linear(&format!("{attn}.qkv_proj"), qd + 2 * kvd, h, ab)?,
                        vec![qd, kvd, kvd],
                    ),
                    Projections::Fused(
                        src.linear(&format!("{mlp}.gate_up_proj"), 2 * i, h, cfg.mlp_bias)?,
                        vec![i, i],
                    ),
                )
            } else {
                (
                    Projections::Separate(vec![
                        src.linear(&format!("{attn}.q_proj"), qd, h, ab)?,
                        src.linear(&format!("{attn}.k_proj"), kvd, h, ab)?,
                        src.linear(&format!("{attn}.v_proj"), kvd, h, ab)?,
                    ]),
                    Projections::Separate(vec![
                        src.linear(&format!("{mlp}.gate_proj"), i, h, cfg.mlp_bias)?,
                        src.linear(&format!("{mlp}.up_proj"), i, h, cfg.mlp_bias)?,
                    ]),
                )
            };
            // Llama's, the Gemmas' and Qwen3's o_proj follow attention_bias; others never bias it.
            let o_bias = ab
                && matches!(
                    cfg.arch,
                    Architecture::Llama
                        | Architecture::Gemma
                        | Architecture::Gemma2
                        | Architecture::Gemma3
                        | Architecture::Qwen3
                );
            let sandwich = if cfg.sandwich_norms {
                Some([
                    src.param(&format!("{p}.pre_feedforward_layernorm.weight"), &[h])?,
                    src.param(&format!("{p}.post_feedforward_layernorm.weight"), &[h])?,
                ])
            } else {
                None
            };
            let qk_norm = if cfg.qk_norm {
                let d = cfg.head_dim;
                Some([
                    src.param(&format!("{attn}.q_norm.weight"), &[d])?,
                    src.param(&format!("{attn}.k_norm.weight"), &[d])?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                qkv,
                qk_norm,
                sandwich,
                o: src.linear(&format!("{attn}.o_proj"), h, qd, o_bias)?,
                gate_up,
                down: src.linear(&format!("{mlp}.down_proj"), h, i, cfg.mlp_bias)?,
                input_norm: src.param(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: src.param(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            });
        }
        let norm = src.param(&format!("{PREFIX}.norm.weight"), &[h])?;
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
    /// `attend(window, rope)` builds one way of attending; with per-layer windows (Gemma 2/3,
    /// Qwen's `use_sliding_window`) the marked layers get the window and the sliding rotary
    /// settings (Gemma 3's local ones), the others full attention.
    fn decode(
        &self,
        x: Tensor,
        attend: impl Fn(Option<usize>, &Rope) -> Result<Attention>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let style = Style {
            eps: cfg.rms_norm_eps,
            head_dim: cfg.head_dim,
            norm_weight_offset: cfg.norm_weight_offset,
            activation: cfg.activation,
        };
        let ctx = |attention| Arc::new(Ctx { attention, style });
        let (full, sliding) = match &cfg.sliding_layers {
            Some(_) => {
                let local = cfg.rope_local.as_ref().unwrap_or(&cfg.rope);
                let sliding = attend(cfg.sliding_window, local)?;
                (ctx(attend(None, &cfg.rope)?), Some(ctx(sliding)))
            }
            None => (ctx(attend(cfg.sliding_window, &cfg.rope)?), None),
        };
        let layers = self.layers.iter().enumerate().map(|(i, layer)| {
            // Without checkpointing the real rows keep their bf16 weight copies for backward
            // anyway, so the padding rows reuse them instead of casting again; a checkpointed
            // layer casts in each pass (copies made here would live for the whole step).
            let live = match self.recompute {
                None => layer.with_bf16_copies()?,
                Some(_) => layer.clone(),
            };
            Ok(LayerBlock {
                frozen: live.detached(),
                pad: live.for_padding()?,
                live,
                ctx: match (&sliding, &cfg.sliding_layers) {
                    (Some(s), Some(marks)) if marks[i] => s.clone(),
                    _ => full.clone(),
                },
            })
        });
        let x = full.attention.stack(x, layers, self.recompute.as_ref())?;
        style.norm(&x, &self.norm)
    }

    /// Whether `forward_packed` computes this model exactly: not with soft-capped logits (the
    /// packed metrics take the logits' vocabulary sums from the head's column sums, which a
    /// cap breaks), nor for Gemma 2, whose eager attention gives a padding position with no
    /// visible key uniform weights (the packed plans give it none).
    pub fn supports_packing(&self) -> bool {
        self.config.final_softcap.is_none() && self.config.arch != Architecture::Gemma2
    }

    /// Token embeddings as f32 rows (`ids` flat), with Gemma's scale.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_from(&self.embed_tokens, ids)
    }

    /// A packed stream's embeddings (the lookup's backward leaves out the padding block's
    /// rows, which nothing differentiates through).
    fn embed_packed(&self, packed: &Packed) -> Result<Tensor> {
        self.scaled(packed.tokens.apply(&self.embed_tokens)?)
    }

    fn embed_from(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        self.scaled(table.index_select(ids, 0)?)
    }

    /// Table rows as f32, with Gemma's scale.
    fn scaled(&self, rows: Tensor) -> Result<Tensor> {
        let x = rows.to_dtype(DType::F32)?;
        match self.config.embed_scale {
            // transformers multiplies by the scale rounded to the weights' dtype (f32 here).
            Some(scale) => x * (scale as f32) as f64,
            None => Ok(x),
        }
    }

    /// `rows`: each sequence's 0/1 attention mask, right-padded (host values: reading a
    /// device mask here would wait for the GPU at every micro-batch).
    pub fn forward(&self, ids: &Tensor, rows: &[Vec<u32>]) -> Result<Tensor> {
        let cfg = &self.config;
        let (n, l) = ids.dims2()?;
        let dev = ids.device();
        let x = self
            .embed(&ids.flatten_all()?)?
            .reshape((n, l, cfg.hidden_size))?;
        let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
        let (scale, softcap, compute) = (cfg.attention_scale, cfg.attn_softcap, self.compute);
        // transformers runs Gemma 2 with eager attention (sdpa cannot soft-cap), the others sdpa.
        let eager = cfg.arch == Architecture::Gemma2;
        let attend = |window: Option<usize>, rope: &Rope| -> Result<Attention> {
            let bias = attention_bias(rows, window, eager, heads, dev)?;
            // transformers uses positions 0..len for every row, padding or not.
            let (cos, sin) = rope.tables(l, dev)?;
            Ok(Attention::Padded(Arc::new(move |q, k, v| {
                // Rotated as [n, len, heads, d] (a free view) in f32, then split into heads
                // in the products' dtype (half the bytes to copy under bf16).
                let turn = |x: &Tensor, h: usize| -> Result<Tensor> {
                    let (n, l, hd) = x.dims3()?;
                    let x = apply_rope(&x.reshape((n, l, h, hd / h))?, &cos, &sin)?;
                    split_heads(&x.reshape((n, l, hd))?.to_dtype(compute)?, h)
                };
                let q = turn(q, heads)?;
                let k = turn(k, kv_heads)?;
                let v = split_heads(&v.to_dtype(compute)?, kv_heads)?;
                attention(&q, &k, &v, &bias, scale, softcap, compute)
            })))
        };
        self.decode(x, attend)
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
        if !self.supports_packing() {
            candle_core::bail!("{:?} runs padded batches only", cfg.arch);
        }
        let x = self.embed_packed(packed)?;
        let attend = |window: Option<usize>, rope: &Rope| -> Result<Attention> {
            let attention = PackedAttention::new(
                packed,
                (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
                window,
                Some(rope),
                self.compute,
            )?
            .with_scores(cfg.attention_scale, cfg.attn_softcap);
            Ok(Attention::Packed(Arc::new(attention)))
        };
        self.decode(x, attend)
    }
}
