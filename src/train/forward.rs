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

/// `log p(target)` at every position `[n, len-1]` and the logits' sums for the two halves.
fn token_logprobs(model: &CausalLm, batch: &Batch) -> Result<(Tensor, f64, f64)> {
    let hidden = model.hidden_states(&batch.ids, &batch.mask)?;
    let (n, l, e) = hidden.dims3()?;
    let t = l - 1;
    // Only positions [0, len-1) predict a token; the last one is never needed.
    let h = hidden.narrow(1, 0, t)?.reshape((n * t, e))?;
    let w = model.lm_head();
    let logits = h.matmul(&w.t()?)?; // [n*t, vocab]
    let v = logits.dim(1)?;
    let half = (n / 2) * t * v;
    let detached = logits.detach();
    let chosen_sum = detached
        .narrow(0, 0, (n / 2) * t)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let rejected_sum = detached
        .narrow(0, (n / 2) * t, (n / 2) * t)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    // Fused log-softmax + gather with a written backward: one [m, vocab] buffer, not four.
    let logp = crate::ops::token_logprobs(&logits, &batch.targets)?.reshape((n, t))?;
    Ok((logp, chosen_sum / half as f64, rejected_sum / half as f64))
}

pub fn forward(model: &CausalLm, batch: &Batch, beta: f64) -> Result<ForwardOutput> {
    let b = batch.n_pairs;
    let (logp, logits_chosen, logits_rejected) = token_logprobs(model, batch)?;
    let dev = logp.device();
    let answer_sums = (&logp * &batch.answer_mask)?.sum(1)?; // [2B]
    let counts = Tensor::from_vec(
        batch
            .answer_counts
            .iter()
            .map(|&c| c as f32)
            .collect::<Vec<_>>(),
        2 * b,
        dev,
    )?;
    let mean_lp = (answer_sums / counts)?;
    let nll = ((logp.narrow(0, 0, b)? * &batch.nll_mask)?.sum_all()? / (-batch.nll_count))?;

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
