//! OPT (facebook/opt-*): learned positions with offset 2, ReLU MLP, LayerNorm, tied head; both
//! the pre-norm layout (125M, 1.3B, ...) and 350M's post-norm layout with project_in/out.

use super::arch::ModelConfig;
use super::error::ModelError;
use super::layers::{attention, attention_bias, layer_norm, split_heads, Attention};
use super::linear::Linear;
use super::load::{AdapterInfo, WeightSource};
use super::packed::{AttendFn, Packed, PackedAttention};
use super::params::Params;
use super::recompute::{Block, RowsBlock, SideGrads};
use crate::ops::TableLookup;
use candle_core::{DType, Result, Tensor, Var};
use std::sync::Arc;
type LoadResult<T> = std::result::Result<T, ModelError>;

const POSITION_OFFSET: usize = 2;
const LN_EPS: f64 = 1e-5;

#[derive(Clone)]
struct Norm {
    w: Option<Tensor>,
    b: Option<Tensor>,
}

impl Norm {
    fn load(
        src: &mut WeightSource,
        prefix: &str,
        dim: usize,
        cfg: &ModelConfig,
    ) -> LoadResult<Self> {
        let affine = cfg.layer_norm_elementwise_affine;
        Ok(Norm {
            w: src.optional_param(&format!("{prefix}.weight"), &[dim], affine)?,
            b: src.optional_param(&format!("{prefix}.bias"), &[dim], affine)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.w.as_ref(), self.b.as_ref(), LN_EPS)
    }

    fn detached(&self) -> Norm {
        Norm {
            w: self.w.as_ref().map(Tensor::detach),
            b: self.b.as_ref().map(Tensor::detach),
        }
    }
}

#[derive(Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: Norm,
    fc1: Linear,
    fc2: Linear,
    ffn_norm: Norm,
}

impl Layer {
    fn forward(&self, x: &Tensor, pre: bool, attend: &AttendFn) -> Result<Tensor> {
        let residual = x.clone();
        let hs = if pre {
            self.attn_norm.forward(x)?
        } else {
            x.clone()
        };
        let a = attend(
            &self.q.forward(&hs)?,
            &self.k.forward(&hs)?,
            &self.v.forward(&hs)?,
        )?;
        let mut x = (residual + self.o.forward(&a)?)?;
        if !pre {
            x = self.attn_norm.forward(&x)?;
        }
        let residual = x.clone();
        let hs = if pre {
            self.ffn_norm.forward(&x)?
        } else {
            x.clone()
        };
        let hs = self
            .fc2
            .forward(&crate::ops::relu(&self.fc1.forward(&hs)?)?)?;
        x = (residual + hs)?;
        if !pre {
            x = self.ffn_norm.forward(&x)?;
        }
        Ok(x)
    }

    fn detached(&self) -> Layer {
        Layer {
            q: self.q.detached(),
            k: self.k.detached(),
            v: self.v.detached(),
            o: self.o.detached(),
            attn_norm: self.attn_norm.detached(),
            fc1: self.fc1.detached(),
            fc2: self.fc2.detached(),
            ffn_norm: self.ffn_norm.detached(),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        let mut out = Vec::new();
        for l in [&self.q, &self.k, &self.v, &self.o, &self.fc1, &self.fc2] {
            out.extend(l.tensors());
        }
        for n in [&self.attn_norm, &self.ffn_norm] {
            out.extend(n.w.iter().chain(n.b.iter()));
        }
        out
    }
}

/// One decoder layer as a recomputable block (gradient checkpointing).
struct LayerBlock {
    live: Layer,
    frozen: Layer,
    pre: bool,
    attention: Attention,
}

impl LayerBlock {
    fn run(&self, x: &Tensor, live: bool) -> Result<Tensor> {
        let layer = if live { &self.live } else { &self.frozen };
        let pre = self.pre;
        self.attention
            .layer(x, layer, &self.frozen, |l, x, a| l.forward(x, pre, a))
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
        let pre = self.pre;
        self.attention
            .layer_rows(x, pad, layer, &self.frozen, |l, x, a| l.forward(x, pre, a))
    }

    fn vars(&self) -> Vec<Var> {
        trainable(self.live.tensors())
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

pub struct Opt {
    pub config: ModelConfig,
    pub params: Params,
    pub adapter: Option<AdapterInfo>,
    /// Set when gradient checkpointing is on: layers are recomputed in backward.
    pub recompute: Option<SideGrads>,
    /// Dtype of the matrix products (f32, or bf16 with f32 everywhere else).
    pub compute: DType,
    embed_tokens: Tensor,
    embed_positions: Tensor,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    final_norm: Option<Norm>,
    lm_head: Option<Tensor>,
    layers: Vec<Layer>,
    /// A frozen head's column sums (see `CausalLm::head_column_sums`).
    pub(super) head_sums: std::sync::OnceLock<Tensor>,
}

impl Opt {
    pub fn new(cfg: &ModelConfig, src: &mut WeightSource) -> LoadResult<Self> {
        let (h, e, v) = (cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size);
        let p = "model.decoder";
        let embed_tokens = src.embedding(&format!("{p}.embed_tokens.weight"), &[v, e])?;
        let embed_positions = src.embedding(
            &format!("{p}.embed_positions.weight"),
            &[cfg.max_position_embeddings + POSITION_OFFSET, h],
        )?;
        let project_out = (e != h)
            .then(|| src.linear(&format!("{p}.project_out"), e, h, false))
            .transpose()?;
        let project_in = (e != h)
            .then(|| src.linear(&format!("{p}.project_in"), h, e, false))
            .transpose()?;
        let bias = cfg.enable_bias;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let lp = format!("{p}.layers.{i}");
            layers.push(Layer {
                k: src.linear(&format!("{lp}.self_attn.k_proj"), h, h, bias)?,
                v: src.linear(&format!("{lp}.self_attn.v_proj"), h, h, bias)?,
                q: src.linear(&format!("{lp}.self_attn.q_proj"), h, h, bias)?,
                o: src.linear(&format!("{lp}.self_attn.out_proj"), h, h, bias)?,
                attn_norm: Norm::load(src, &format!("{lp}.self_attn_layer_norm"), h, cfg)?,
                fc1: src.linear(&format!("{lp}.fc1"), cfg.intermediate_size, h, bias)?,
                fc2: src.linear(&format!("{lp}.fc2"), h, cfg.intermediate_size, bias)?,
                ffn_norm: Norm::load(src, &format!("{lp}.final_layer_norm"), h, cfg)?,
            });
        }
        let final_norm = if cfg.do_layer_norm_before && !cfg.remove_final_layer_norm {
            Some(Norm::load(src, &format!("{p}.final_layer_norm"), h, cfg)?)
        } else {
            None
        };
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(src.head("lm_head.weight", &[v, e])?)
        };
        let (params, adapter) = src.finish()?;
        Ok(Opt {
            config: cfg.clone(),
            params,
            adapter,
            recompute: None,
            compute: src.compute(),
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            final_norm,
            lm_head,
            layers,
            head_sums: Default::default(),
        })
    }

    pub fn lm_head(&self) -> Tensor {
        self.lm_head
            .clone()
            .unwrap_or_else(|| self.embed_tokens.clone())
    }

    /// The same weights as constants (no parameters): see `CausalLm::detached`.
    pub fn detached(&self) -> Opt {
        Opt {
            config: self.config.clone(),
            params: Params::default(),
            adapter: self.adapter.clone(),
            recompute: self.recompute.as_ref().map(|_| SideGrads::default()),
            compute: self.compute,
            embed_tokens: self.embed_tokens.detach(),
            embed_positions: self.embed_positions.detach(),
            project_in: self.project_in.as_ref().map(Linear::detached),
            project_out: self.project_out.as_ref().map(Linear::detached),
            final_norm: self.final_norm.as_ref().map(Norm::detached),
            lm_head: self.lm_head.as_ref().map(Tensor::detach),
            layers: self.layers.iter().map(Layer::detached).collect(),
            head_sums: self.head_sums.clone(),
        }
    }

    /// Token plus position embeddings (and project_in) from the tokens' table rows and the
    /// position ids (flat); `shape` is the leading shape of the result (`[n, len]` padded,
    /// `[total]` packed). `live(j)`: whether row `j` gets a gradient (see `TableLookup`).
    fn embed(
        &self,
        tok: Tensor,
        pos: &[u32],
        live: impl Fn(usize) -> bool,
        shape: &[usize],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let tok = tok.to_dtype(DType::F32)?;
        let mut dims = shape.to_vec();
        dims.push(cfg.word_embed_proj_dim);
        let mut x = tok.reshape(dims.clone())?;
        if let Some(p) = &self.project_in {
            x = p.forward(&x)?;
        }
        let last = dims.len() - 1;
        dims[last] = cfg.hidden_size;
        // Position ids repeat across sequences (every padding row has 1): candle's backward
        // would walk them all in one thread per column.
        let positions = TableLookup::new(pos, live, tok.device())?.apply(&self.embed_positions)?;
        x + positions.to_dtype(DType::F32)?.reshape(dims)?
    }

    /// The decoder stack; `attention` says how a padded or packed batch attends, so both
    /// share every other line.
    fn decode(&self, mut x: Tensor, attention: Attention) -> Result<Tensor> {
        let pre = self.config.do_layer_norm_before;
        let layers = self.layers.iter().map(|layer| {
            Ok(LayerBlock {
                live: layer.clone(),
                frozen: layer.detached(),
                pre,
                attention: attention.clone(),
            })
        });
        x = attention.stack(x, layers, self.recompute.as_ref())?;
        if let Some(norm) = &self.final_norm {
            x = norm.forward(&x)?;
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x)?;
        }
        Ok(x)
    }

    /// `rows`: each sequence's 0/1 attention mask, right-padded (host values: reading a
    /// device mask here would wait for the GPU at every micro-batch).
    pub fn forward(&self, ids: &Tensor, rows: &[Vec<u32>]) -> Result<Tensor> {
        let (n, l) = ids.dims2()?;
        // transformers: position = cumsum(mask) * mask - 1, plus the offset of 2.
        let mut pos = Vec::with_capacity(n * l);
        for row in rows {
            let mut c = 0i64;
            for &m in row {
                c += m as i64;
                pos.push((c * m as i64 - 1 + POSITION_OFFSET as i64) as u32);
            }
        }
        let tok = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        let x = self.embed(tok, &pos, |_| true, &[n, l])?;
        let heads = self.config.num_heads;
        let bias = attention_bias(rows, None, false, heads, ids.device())?;
        let scale = 1.0 / (self.config.head_dim as f64).sqrt();
        let compute = self.compute;
        self.decode(
            x,
            Attention::Padded(Arc::new(move |q, k, v| {
                // Split in the products' dtype: half the bytes to copy under bf16.
                let split = |t: &Tensor| split_heads(&t.to_dtype(compute)?, heads);
                attention(
                    &split(q)?,
                    &split(k)?,
                    &split(v)?,
                    &bias,
                    scale,
                    None,
                    compute,
                )
            })),
        )
    }

    /// Hidden states `[total, e]` of a packed batch laid out with `Padding::StandIn`: each
    /// sequence's real tokens (a sequence with a shared prefix stores only the tokens after
    /// it), then the padding block: for each sequence the padded batch pads, one padding token
    /// standing for all of its padding (computed without a graph).
    ///
    /// Exact for OPT: every padding position of a row has the same input (pad id, position 1)
    /// and sees the same keys (the row's real tokens; padding keys are masked), so all of them
    /// carry one hidden state; real tokens never see padding; and a causal model gives two
    /// sequences with the same first tokens the same hidden states there, so the rejected
    /// sequence's copy of the prompt is read from the chosen one's rows (its gradient then
    /// arrives there too, summed as the two copies' would be).
    pub fn forward_packed(&self, packed: &Packed) -> Result<Tensor> {
        let mut pos = vec![(POSITION_OFFSET - 1) as u32; packed.total];
        for seg in &packed.segments {
            let first = seg.prefix_len() + POSITION_OFFSET;
            for t in 0..seg.real {
                pos[seg.offset + t] = (first + t) as u32;
            }
        }
        // The padding block keeps position id 1 (= 0 - 1 + offset), as transformers gives
        // every padding position.
        let tok = packed.tokens.apply(&self.embed_tokens)?;
        let real = packed.real_rows;
        let x = self.embed(tok, &pos, |j| j < real, &[packed.total])?;
        let cfg = &self.config;
        let heads = (cfg.num_heads, cfg.num_heads, cfg.head_dim);
        let attention = PackedAttention::new(packed, heads, None, None, self.compute)?;
        self.decode(x, Attention::Packed(Arc::new(attention)))
    }
}

/// The `Var`s among a layer's tensors (all of them when fine-tuning; the adapters under LoRA).
pub(super) fn trainable(tensors: Vec<&Tensor>) -> Vec<Var> {
    tensors
        .into_iter()
        .filter(|t| t.is_variable())
        .filter_map(|t| Var::from_tensor(t).ok())
        .collect()
}
