//! One micro-batch through the model: per-token log-probs of the next token, the pooled NLL of
//! the chosen sequences, the odds-ratio term, and a scalar whose gradient is the loss's.

use super::batch::Batch;
use super::loss::Metrics;
use crate::model::CausalLm;
use candle_core::{DType, Result, Tensor};

pub struct ForwardOutput {
    /// Differentiable scalar with the gradient of the ORPO loss (its value is not the loss:
    /// the odds-ratio term enters linearised around the current log-probs).
    pub objective: Tensor,
    pub metrics: Metrics,
    /// Mean answer log-prob of each chosen and each rejected sequence.
    pub lp_chosen: Vec<f64>,
    pub lp_rejected: Vec<f64>,
}

/// What the loss needs from the model: per-sequence sums of answer log-probs `[2B]`, the sum
/// of NLL-target log-probs (a scalar), and the mean logit of each half (metrics only).
struct Scores {
    answer_sums: Tensor,
    nll_sum: Tensor,
    logits_chosen: f64,
    logits_rejected: f64,
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// The padded batch as TRL runs it: `[2B, len]` through the model, positions [0, len-1).
fn scores_padded(model: &CausalLm, batch: &Batch) -> Result<Scores> {
    let hidden = model.hidden_states(&batch.ids, &batch.mask)?;
    let (n, l, e) = hidden.dims3()?;
    let t = l - 1;
    // Only positions [0, len-1) predict a token; the last one is never needed.
    let h = hidden.narrow(1, 0, t)?.reshape((n * t, e))?;
    // Log-softmax + gather without more than one [rows, vocab] buffer (fused, or chunked and
    // recomputed under gradient checkpointing).
    let (logp, row_sums) = model.head_scores(&h, &batch.targets.flatten_all()?)?;
    let half = (n / 2) * t;
    let count = (half * model.lm_head().dim(0)?) as f64;
    let logits_chosen = scalar(&row_sums.narrow(0, 0, half)?.sum_all()?)? / count;
    let logits_rejected = scalar(&row_sums.narrow(0, half, half)?.sum_all()?)? / count;
    let logp = logp.reshape((n, t))?;
    Ok(Scores {
        answer_sums: (&logp * &batch.answer_mask)?.sum(1)?,
        nll_sum: (logp.narrow(0, 0, n / 2)? * &batch.nll_mask)?.sum_all()?,
        logits_chosen,
        logits_rejected,
    })
}

/// The same numbers without a rejected sequence's copy of the prompt, and with padding only
/// as the forward-only rows the metrics need: the LM head runs on the positions the loss
/// scores only, and the padded batch's logits enter the metrics through `h . sum_v W_v` (the
/// logits' sum over the vocabulary, as the head has no bias) of each packed row, weighted by
/// the padded positions it stands for.
fn scores_packed(model: &CausalLm, batch: &Batch) -> Result<Scores> {
    let p = &batch.packed;
    let hidden = model.hidden_packed(&p.layout)?; // [total, e]
    let w = model.lm_head();
    let h = hidden.index_select(&p.rows, 0)?;
    let (logp, _) = model.head_scores(&h, &p.targets)?; // [m]
    let n = batch.n_pairs * 2;
    let vocab = w.dim(0)?;
    let w_sum = model.head_column_sums()?.unsqueeze(1)?; // [e, 1]
    let halves = p.logit_weights.matmul(&hidden.detach())?.matmul(&w_sum)?; // [2, 1]
    let halves: Vec<f64> = halves.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let count = ((n / 2) * (batch.len - 1) * vocab) as f64;
    Ok(Scores {
        answer_sums: p.answer_select.matmul(&logp.unsqueeze(1)?)?.squeeze(1)?,
        nll_sum: (&logp * &p.nll_weight)?.sum_all()?,
        logits_chosen: halves[0] / count,
        logits_rejected: halves[1] / count,
    })
}

/// The ORPO objective and metrics of one micro-batch: packed where the model allows it exactly
/// (every architecture but Gemma 2), else on the padded batch.
pub fn forward(model: &CausalLm, batch: &Batch, beta: f64) -> Result<ForwardOutput> {
    forward_with(model, batch, beta, model.supports_packing())
}

/// `forward` on the padded batch, as TRL computes it (the reference for the packed path).
pub fn forward_padded(model: &CausalLm, batch: &Batch, beta: f64) -> Result<ForwardOutput> {
    forward_with(model, batch, beta, false)
}

fn forward_with(model: &CausalLm, batch: &Batch, beta: f64, packed: bool) -> Result<ForwardOutput> {
    let b = batch.n_pairs;
    let sc = if packed {
        scores_packed(model, batch)?
    } else {
        scores_padded(model, batch)?
    };
    let (logits_chosen, logits_rejected) = (sc.logits_chosen, sc.logits_rejected);
    let dev = &sc.answer_sums.device().clone();
    let counts = Tensor::from_vec(
        batch
            .answer_counts
            .iter()
            .map(|&c| c as f32)
            .collect::<Vec<_>>(),
        2 * b,
        dev,
    )?;
    let mean_lp = (sc.answer_sums / counts)?;
    let nll = (sc.nll_sum / (-batch.nll_count))?;

    let lp_host: Vec<f64> = mean_lp.detach().to_dtype(DType::F64)?.to_vec1()?;
    let nll_host = nll.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let (lp_w, lp_l) = lp_host.split_at(b);
    let (metrics, odds) =
        Metrics::from_parts(lp_w, lp_l, beta, nll_host, logits_chosen, logits_rejected);
    // Linearise the odds term: sum_i d_i * lp_i has exactly the odds term's gradient.
    let coeffs: Vec<f32> = odds
        .d_chosen
        .iter()
        .chain(&odds.d_rejected)
        .map(|&d| d as f32)
        .collect();
    let coeffs = Tensor::from_vec(coeffs, 2 * b, dev)?;
    let surrogate = (mean_lp * coeffs)?.sum_all()?;
    Ok(ForwardOutput {
        objective: (nll + surrogate)?,
        metrics,
        lp_chosen: lp_w.to_vec(),
        lp_rejected: lp_l.to_vec(),
    })
}
