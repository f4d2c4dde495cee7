//! Differentiable building blocks. Each is composed of candle primitives that record a
//! backward pass; none uses candle-nn's fused kernels, which would drop gradients silently.

use super::packed::{AttendFn, PackedAttention};
use super::recompute::{checkpoint, checkpoint_rows, Block, RowsBlock, SideGrads};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Maps a layer's q/k/v projections of a padded batch (shaped like the layer input, heads not
/// yet split) to the attention output; owns what it needs (masks, rotary tables) so that a
/// checkpointed layer can rerun it during backward.
pub type Attend = Arc<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// How the decoder layers of one forward pass attend, so that padded and packed batches share
/// every other line of a layer.
#[derive(Clone)]
pub enum Attention {
    Padded(Attend),
    Packed(Arc<PackedAttention>),
}

impl Attention {
    /// The decoder `layers` in order over `x`, each checkpointed when `recompute` is given. A
    /// packed stream runs as (real rows, padding rows) throughout: under checkpointing the
    /// padding rows pass forward beside the checkpoints (see `checkpoint_rows`).
    pub fn stack<B: Block + RowsBlock + 'static>(
        &self,
        mut x: Tensor,
        layers: impl Iterator<Item = Result<B>>,
        recompute: Option<&SideGrads>,
    ) -> Result<Tensor> {
        match (recompute, self) {
            (Some(side), Attention::Packed(p)) => {
                let (mut real, mut pad) = p.split_rows(&x)?;
                for layer in layers {
                    let layer = layer?;
                    (real, pad) = checkpoint_rows(&real, pad, layer, side)?;
                }
                p.join_rows(real, pad)
            }
            (Some(side), Attention::Padded(_)) => {
                for layer in layers {
                    let layer = layer?;
                    x = checkpoint(&x, Arc::new(layer), side)?;
                }
                Ok(x)
            }
            // Real and padding rows apart until the end: no per-layer concatenation.
            (None, Attention::Packed(p)) => {
                let (mut real, mut pad) = p.split_rows(&x)?;
                for layer in layers {
                    let layer = layer?;
                    (real, pad) = layer.forward_rows(&real, pad.as_ref(), true)?;
                }
                p.join_rows(real, pad)
            }
            (None, Attention::Padded(_)) => {
                for layer in layers {
                    let layer = layer?;
                    x = Block::forward(&layer, &x, true)?;
                }
                Ok(x)
            }
        }
    }

    /// `layer` on a packed stream held as real rows `x` and padding rows `pad` (see
    /// `PackedAttention::layer_rows`); an error for a padded batch.
    pub fn layer_rows<L>(
        &self,
        x: &Tensor,
        pad: Option<&Tensor>,
        live: &L,
        frozen: &L,
        run: impl Fn(&L, &Tensor, &AttendFn) -> Result<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let Attention::Packed(p) = self else {
            candle_core::bail!("layer_rows: not a packed batch");
        };
        p.layer_rows(x, pad, |x, a| run(live, x, a), |x, a| run(frozen, x, a))
    }

    /// One decoder layer over `x`: `run(layer, rows, attend)` runs a layer on some rows. A
    /// padded batch runs `live` on every row; a packed one runs `live` on the real rows and
    /// `frozen` (the same layer with detached parameters) on the padding rows, which need no
    /// gradient (see `PackedAttention::layer`).
    pub fn layer<L>(
        &self,
        x: &Tensor,
        live: &L,
        frozen: &L,
        run: impl Fn(&L, &Tensor, &AttendFn) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Attention::Padded(attend) => run(live, x, &**attend),
            Attention::Packed(p) => p.layer(x, |x, a| run(live, x, a), |x, a| run(frozen, x, a)),
        }
    }
}

/// `x @ w^T + b` for `x` of any rank (the last dim is the input features).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // One fused node with a written backward on CPU f32; the plain op chain elsewhere.
    crate::ops::linear(x, w, b)
}

/// LayerNorm over the last dim (fused op with a written backward on CPU f32).
pub fn layer_norm(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    crate::ops::layer_norm(x, w, b, eps)
}

/// RMSNorm over the last dim (fused op with a written backward on CPU f32).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    crate::ops::rms_norm(x, w, eps)
}

/// An additive attention bias, finite, and the query rows it leaves without a key.
pub struct AttnBias {
    /// `[n, 1 or heads, rows, keys]`: 0 where a query may see a key, `f32::MIN` elsewhere.
    /// Finite, as eager attention's mask: a row with no visible key then gets uniform weights
    /// on every device (all `-inf` would give NaN in candle's CUDA softmax kernel).
    pub bias: Tensor,
    /// `[n, 1, rows, 1]`, 0 on rows that see no key (1 elsewhere), where torch's sdpa gives
    /// such a row a zero output; `None` when every row sees a key, for eager semantics, or
    /// when the only such rows are padded slots whose outputs are never read.
    pub keep: Option<Tensor>,
}

impl AttnBias {
    /// From row-major values `[n, rows, keys]` with masked entries `-inf` or `f32::MIN`.
    /// `zero_empty`: a row with no visible key outputs zeros (sdpa), else its uniform weights
    /// stand (eager). `heads`: off the CPU the bias is laid out for every head once, so each
    /// layer's addition is a contiguous one (candle's broadcasting kernels are several times
    /// slower on a GPU); not for the fused attention, whose kernel reads a shared bias row.
    pub fn new(
        mut data: Vec<f32>,
        (n, rows, keys): (usize, usize, usize),
        zero_empty: bool,
        heads: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut keep = vec![1f32; n * rows];
        let mut any_empty = false;
        for (r, row) in data.chunks_exact_mut(keys.max(1)).enumerate() {
            let mut empty = true;
            for v in row.iter_mut() {
                if *v == f32::NEG_INFINITY || *v == f32::MIN {
                    *v = f32::MIN;
                } else {
                    empty = false;
                }
            }
            if empty {
                keep[r] = 0.0;
                any_empty = true;
            }
        }
        let mut bias = Tensor::from_vec(data, (n, 1, rows, keys), device)?;
        if heads > 1 && !device.is_cpu() && !crate::ops::fused_attention() {
            bias = bias.broadcast_as((n, heads, rows, keys))?.contiguous()?;
        }
        let keep = (zero_empty && any_empty)
            .then(|| Tensor::from_vec(keep, (n, 1, rows, 1), device))
            .transpose()?;
        Ok(AttnBias { bias, keep })
    }
}

/// Attention bias of a padded batch `[n, len]` (mask rows): query i may see key j when j is
/// causal, not padding and within the sliding window. A query with no visible key (a padding
/// position past a sliding window) attends to nothing, as torch's sdpa treats it, or with
/// `eager` to every key equally, as eager attention's finite mask does.
pub fn attention_bias(
    mask: &[Vec<u32>],
    window: Option<usize>,
    eager: bool,
    heads: usize,
    device: &Device,
) -> Result<AttnBias> {
    let n = mask.len();
    let l = mask.first().map_or(0, Vec::len);
    let mut data = vec![f32::MIN; n * l * l];
    for (b, row) in mask.iter().enumerate() {
        for i in 0..l {
            let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
            for j in lo..=i {
                if row[j] != 0 {
                    data[(b * l + i) * l + j] = 0.0;
                }
            }
        }
    }
    AttnBias::new(data, (n, l, l), !eager, heads, device)
}

/// Scaled dot-product attention with an additive bias. q: `[n, h, lq, d]`, k/v:
/// `[n, kvh, lk, d]`, in f32 or already in `compute`. With `compute` BF16 both products take
/// bf16 inputs (as under torch autocast) while the scores, bias and softmax stay f32 (inside
/// `ops::attn_softmax`, or as f32 tensors). `softcap` (Gemma 2) maps the scaled scores to
/// `cap * tanh(scores / cap)` before the bias. The output `[n, lq, h * d]` is in `compute`:
/// the product's own dtype, which the output projection takes (a cast to f32 and back would
/// change no value).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &AttnBias,
    scale: f64,
    softcap: Option<f64>,
    compute: DType,
) -> Result<Tensor> {
    let (n, h, lq, d) = q.dims4()?;
    attention_heads(q, k, v, bias, scale, softcap, compute)?
        .transpose(1, 2)?
        .reshape((n, lq, h * d))
}

/// [`attention`]'s output by heads, `[n, h, lq, d]`, for a caller that lays it out itself.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &AttnBias,
    scale: f64,
    softcap: Option<f64>,
    compute: DType,
) -> Result<Tensor> {
    let (n, h, lq, d) = q.dims4()?;
    let (kvh, lk) = (k.dim(1)?, k.dim(2)?);
    if kvh == 0 || h % kvh != 0 {
        candle_core::bail!("attention: {h} query heads for {kvh} key/value heads");
    }
    // Grouped-query attention without repeating k and v: the query heads of one k/v head are
    // consecutive (transformers' `repeat_kv` order), so q viewed as `[n, kvh, rep * lq, d]`
    // multiplies each k/v head once, and the products' backward sums the group's gradients.
    let grouped = |t: &Tensor, cols: usize| t.reshape((n, kvh, h / kvh * lq, cols));
    let low = |t: &Tensor| t.to_dtype(compute);
    let scores = low(&grouped(q, d)?)?
        .matmul(&low(k)?.t()?)?
        .reshape((n, h, lq, lk))?;
    let probs = if crate::ops::fused_attention() && (q.device().is_cpu() || q.device().is_cuda()) {
        // One op from the raw product to the probabilities (see `ops::attn_softmax`).
        crate::ops::attn_softmax(&scores, &bias.bias, scale, softcap)?
    } else if recompute_probs(&scores) {
        let block = ProbsBlock {
            bias: bias.bias.clone(),
            scale,
            softcap,
            compute,
        };
        checkpoint(&scores, Arc::new(block), &SideGrads::default())?
    } else {
        probs_chain(&scores, &bias.bias, scale, softcap, compute)?
    };
    let mut out = grouped(&probs, lk)?
        .matmul(&low(v)?)?
        .reshape((n, h, lq, d))?;
    if let Some(keep) = &bias.keep {
        out = out.broadcast_mul(&keep.to_dtype(out.dtype())?)?;
    }
    Ok(out)
}

/// Attention's probabilities from the raw product `q k^T` as candle ops: to f32, scaled,
/// soft-capped (Gemma 2), biased, softmax, back to the products' dtype.
fn probs_chain(
    scores: &Tensor,
    bias: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    compute: DType,
) -> Result<Tensor> {
    let mut s = (scores.to_dtype(DType::F32)? * scale)?;
    if let Some(cap) = softcap {
        s = ((s / cap)?.tanh()? * cap)?;
    }
    crate::ops::softmax_last(&s.broadcast_add(bias)?)?.to_dtype(compute)
}

static RECOMPUTE_PROBS: AtomicBool = AtomicBool::new(true);

/// Whether attention's probabilities are checkpointed (see `ProbsBlock`); on unless turned off
/// (the binary reads `ORPO_RECOMPUTE_ATTENTION=0`, to measure what it costs and saves).
pub fn set_recompute_attention_probs(on: bool) {
    RECOMPUTE_PROBS.store(on, Ordering::Relaxed);
}

/// Whether [`ProbsBlock`] runs for these scores: they carry a graph, the switch is on, this is
/// not a checkpointed layer's recomputation, and the chain is the device path's (CUDA, or the
/// CPU with its kernels off, which stands in for it in tests). The CPU kernels' chain costs
/// little memory and its rerun does not: 9% of the CPU benchmark's throughput for 3% of its
/// peak RSS.
fn recompute_probs(scores: &Tensor) -> bool {
    scores.track_op()
        && RECOMPUTE_PROBS.load(Ordering::Relaxed)
        && !super::recompute::recomputing()
        && !(scores.device().is_cpu() && crate::ops::fused_kernels())
}

/// [`probs_chain`] as a checkpointed block. The chain's graph keeps every intermediate for
/// backward, ~20 bytes a score element under bf16 products (the scores, their f32 copy, the
/// scaled and biased copies, f32 and bf16 probabilities: ~1.4 GB a layer for Llama-1B at 8
/// pairs of ~370 tokens); checkpointed it keeps the scores and the probabilities (the next
/// product holds those anyway), and backward reruns the chain: the same ops, so the same
/// gradients bit for bit, for one more pass of the chain. Not inside a checkpointed layer's
/// recomputation, where one layer's intermediates live at a time anyway.
struct ProbsBlock {
    bias: Tensor,
    scale: f64,
    softcap: Option<f64>,
    compute: DType,
}

impl Block for ProbsBlock {
    fn forward(&self, scores: &Tensor, _live: bool) -> Result<Tensor> {
        probs_chain(scores, &self.bias, self.scale, self.softcap, self.compute)
    }

    fn vars(&self) -> Vec<candle_core::Var> {
        Vec::new()
    }
}

/// `[n, len, h*d]` -> `[n, h, len, d]`, contiguous for the batched matmuls.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, l, hd) = x.dims3()?;
    x.reshape((n, l, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Rotary positions for `x: [n, len, h, d]` from half tables `[len, r/2]` (see
/// `Rope::tables`): `x * cos + rotate_half(x) * sin` in transformers' layout. Tables narrower
/// than `d` rotate only the leading `r` dimensions (partial rotary, Phi-3/4).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // One op with a written backward (the inverse rotation), on every device.
    crate::ops::rotary(x, cos, sin)
}

/// Host copy of a `[n, len]` u32 mask.
pub fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    mask.to_dtype(DType::U32)?.to_vec2::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpointed_probabilities_match_the_chain_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let cases = [
            (DType::F32, None),
            (DType::BF16, None),
            (DType::F32, Some(1.5)),
        ];
        for (compute, softcap) in cases {
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 5, 7), &dev)?)?;
            let scores = x.as_tensor().to_dtype(compute)?;
            // Finite masks, as `AttnBias` builds them: the last two keys hidden from row 0.
            let mut b = vec![0f32; 2 * 5 * 7];
            b[5] = f32::MIN;
            b[6] = f32::MIN;
            let bias = Tensor::from_vec(b, (2, 1, 5, 7), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &dev)?;
            let chain = probs_chain(&scores, &bias, 0.3, softcap, compute)?;
            let block = ProbsBlock {
                bias: bias.clone(),
                scale: 0.3,
                softcap,
                compute,
            };
            let kept = checkpoint(&scores, Arc::new(block), &SideGrads::default())?;
            let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            assert_eq!(flat(&chain)?, flat(&kept)?, "{compute:?} {softcap:?}");
            let grad = |p: &Tensor| -> Result<Vec<f32>> {
                let g = (p.to_dtype(DType::F32)? * &w)?.sum_all()?.backward()?;
                flat(g.get(x.as_tensor()).expect("a gradient for the scores"))
            };
            assert_eq!(grad(&chain)?, grad(&kept)?, "{compute:?} {softcap:?}");
        }
        Ok(())
    }

    /// A padding position past a sliding window sees no key: finite bias, and a zero output
    /// under sdpa semantics (none for eager); every other row's bias is the plain mask.
    #[test]
    fn attention_bias_marks_rows_without_keys() -> Result<()> {
        let mask = vec![vec![1u32, 1, 0, 0, 0]];
        let dev = Device::Cpu;
        let sdpa = attention_bias(&mask, Some(2), false, 4, &dev)?;
        let bias = sdpa.bias.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        assert!(bias.iter().flatten().all(|v| v.is_finite()));
        assert_eq!(bias[1], vec![0.0, 0.0, f32::MIN, f32::MIN, f32::MIN]);
        assert_eq!(bias[2], vec![f32::MIN, 0.0, f32::MIN, f32::MIN, f32::MIN]);
        assert!(bias[3].iter().all(|&v| v == f32::MIN)); // sees positions 2..=3: padding
        let keep = sdpa.keep.expect("rows without keys").flatten_all()?;
        assert_eq!(keep.to_vec1::<f32>()?, vec![1.0, 1.0, 1.0, 0.0, 0.0]);
        assert!(attention_bias(&mask, Some(2), true, 4, &dev)?
            .keep
            .is_none());
        assert!(attention_bias(&mask, None, false, 4, &dev)?.keep.is_none());
        Ok(())
    }
}
