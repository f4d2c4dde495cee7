//! The LM head with its log-softmax: logits `[m, vocab]` are the largest tensors of a step, so
//! under gradient checkpointing the head runs in row chunks that keep only their outputs and
//! recompute their logits in backward. The log-softmax is one op with a written backward: the
//! CPU kernel (`ops::token_logprobs`), or on CUDA `ops::logprob_and_sum` on the product's own
//! (bf16) logits.

use super::layers::linear;
use super::recompute::{checkpoint, Block, SideGrads};
use candle_core::{DType, Result, Tensor, Var};
use std::sync::Arc;

/// Rows per recomputed chunk: bounds a chunk's logits at ~`HEAD_CHUNK × vocab` floats.
const HEAD_CHUNK: usize = 1024;

/// `h @ w^T` (f32 result), the product in `compute` (bf16 rounds its inputs, as autocast).
pub fn head_product(h: &Tensor, w: &Tensor, compute: DType) -> Result<Tensor> {
    // The linear op hands the (tied) weight its gradient contiguous, in [vocab, e].
    match compute {
        DType::F32 => linear(h, w, None),
        dt => linear(&h.to_dtype(dt)?, &w.to_dtype(dt)?, None)?.to_dtype(DType::F32),
    }
}

/// `cap * tanh(logits / cap)` (Gemma 2's final soft-capping), or the logits unchanged.
pub fn soft_cap(logits: Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(cap) => (logits / cap)?.tanh()? * cap,
        None => Ok(logits),
    }
}

/// `[m, 2]`: each row's log-prob of its target, and (for metrics, no gradient) the sum of its
/// logits.
fn scores(h: &Tensor, w: &Tensor, head: HeadOptions, targets: &Tensor) -> Result<Tensor> {
    if head.softcap.is_none() && crate::ops::logprob_sum_serves(h.device()) {
        // One op on the product's own output (bf16 under bf16 products): no f32 copies.
        let logits = match head.compute {
            DType::F32 => linear(h, w, None)?,
            dt => linear(&h.to_dtype(dt)?, &w.to_dtype(dt)?, None)?,
        };
        return crate::ops::logprob_and_sum(&logits, targets);
    }
    let logits = soft_cap(head_product(h, w, head.compute)?, head.softcap)?;
    let logp = crate::ops::token_logprobs(&logits, targets)?;
    let sums = logits.detach().sum(1)?;
    Tensor::stack(&[&logp, &sums], 1)
}

/// How the head computes: the products' dtype and the logits' soft cap.
#[derive(Debug, Clone, Copy)]
pub struct HeadOptions {
    pub compute: DType,
    pub softcap: Option<f64>,
}

struct HeadChunk {
    w: Tensor,
    targets: Tensor,
    head: HeadOptions,
}

impl Block for HeadChunk {
    fn forward(&self, h: &Tensor, live: bool) -> Result<Tensor> {
        let w = if live {
            self.w.clone()
        } else {
            self.w.detach()
        };
        scores(h, &w, self.head, &self.targets)
    }

    fn vars(&self) -> Vec<Var> {
        if self.w.is_variable() {
            Var::from_tensor(&self.w).into_iter().collect()
        } else {
            Vec::new()
        }
    }
}

/// Per-row target log-probs `[m]` and logit sums `[m]` (detached) of hidden states `[m, e]`.
/// With `side`, the head runs in recomputed chunks (peak: one chunk's logits, not all of them).
pub fn head_scores(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    head: HeadOptions,
    side: Option<&SideGrads>,
) -> Result<(Tensor, Tensor)> {
    chunked_scores(h, w, targets, head, side, HEAD_CHUNK)
}

fn chunked_scores(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    head: HeadOptions,
    side: Option<&SideGrads>,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let out = match side {
        None => scores(h, w, head, targets)?,
        Some(side) => {
            let m = h.dim(0)?;
            let mut parts = Vec::with_capacity(m.div_ceil(chunk));
            for start in (0..m).step_by(chunk) {
                let len = chunk.min(m - start);
                let block = HeadChunk {
                    w: w.clone(),
                    targets: targets.narrow(0, start, len)?.contiguous()?,
                    head,
                };
                parts.push(checkpoint(
                    &h.narrow(0, start, len)?,
                    Arc::new(block),
                    side,
                )?);
            }
            Tensor::cat(&parts, 0)?
        }
    };
    // Contiguous columns: downstream products then see the layout a plain [m] tensor has.
    let logp = out.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
    let sums = out.narrow(1, 1, 1)?.squeeze(1)?.detach().contiguous()?;
    Ok((logp, sums))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Chunks of 7 rows, recomputed in backward, give the unchunked values and gradients, with
    /// and without a soft cap.
    #[test]
    fn chunked_recomputed_head_matches_the_plain_head() -> Result<()> {
        let dev = Device::Cpu;
        let (m, e, v) = (30, 8, 50);
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, e), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (v, e), &dev)?)?;
        let targets =
            Tensor::from_vec((0..m as u32).map(|i| (i * 7) % v as u32).collect(), m, &dev)?;
        let weights = Tensor::randn(0f32, 1.0, m, &dev)?;
        for softcap in [None, Some(1.5)] {
            let head = HeadOptions {
                compute: DType::F32,
                softcap,
            };
            let run = |side: Option<&SideGrads>, chunk| -> Result<(Vec<f32>, Tensor, Tensor)> {
                let (lp, sums) =
                    chunked_scores(h.as_tensor(), w.as_tensor(), &targets, head, side, chunk)?;
                let mut g = (&lp * &weights)?.sum_all()?.backward()?;
                if let Some(side) = side {
                    side.merge_into(&mut g)?;
                }
                let mut vals = lp.to_vec1::<f32>()?;
                vals.extend(sums.to_vec1::<f32>()?);
                Ok((
                    vals,
                    g.get(h.as_tensor()).unwrap().clone(),
                    g.get(w.as_tensor()).unwrap().clone(),
                ))
            };
            let (a, ha, wa) = run(None, 0)?;
            let side = SideGrads::default();
            let (b, hb, wb) = run(Some(&side), 7)?;
            // Equal up to the rounding of differently blocked products.
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
            }
            for (x, y) in [(ha, hb), (wa, wb)] {
                let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "gradient differs by {diff}");
            }
            // The capped log-probs are those of the capped logits.
            let logits = soft_cap(h.as_tensor().matmul(&w.as_tensor().t()?)?, softcap)?;
            let want = crate::ops::token_logprobs_chain(&logits, &targets)?.to_vec1::<f32>()?;
            for (x, y) in a.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
            }
            if softcap.is_some() {
                assert!(logits.abs()?.max_all()?.to_scalar::<f32>()? < 1.5);
            }
        }
        Ok(())
    }
}
