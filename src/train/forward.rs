//! One micro-batch through the model: per-token log-probs of the next token, the pooled NLL of
//! the chosen sequences, the odds-ratio term, and a scalar whose gradient is the loss's.
//!
//! Nothing here reads the device: the objective's coefficients come from an op on the
//! log-probs' device, and what the metrics need stays there in one small tensor
//! ([`Readout`]) until the caller has queued the backward pass.

use super::batch::Batch;
use super::loss::Metrics;
use super::odds_coefs::odds_coefficients;
use crate::model::CausalLm;
use candle_core::{DType, Result, Tensor};

pub struct ForwardOutput {
    /// Differentiable scalar with the gradient of the ORPO loss (its value is not the loss:
    /// the odds-ratio term enters linearised around the current log-probs).
    pub objective: Tensor,
    /// The loss and metrics, still on the device.
    pub readout: Readout,
}

/// What the metrics need, on the device: `[2B]` mean answer log-probs (chosen, then
/// rejected), the NLL, and the chosen and rejected halves' logit sums, in one f32 tensor (one
/// transfer).
pub struct Readout {
    values: Tensor,
    n_pairs: usize,
    beta: f64,
    /// Logits per half (sequences x positions x vocabulary): the logit means' denominator.
    logit_count: f64,
}

impl Readout {
    /// Copies the values to the host and computes the metrics (in f64, as TRL logs them); with
    /// `first_pairs`, the per-pair metrics count only that many pairs (see
    /// `Metrics::restrict_pair_metrics`). On a GPU this waits for the kernels queued so far.
    pub fn metrics(&self, first_pairs: Option<usize>) -> Result<Metrics> {
        let b = self.n_pairs;
        let v: Vec<f32> = self.values.to_vec1()?;
        let v: Vec<f64> = v.into_iter().map(f64::from).collect();
        let (lp_w, rest) = v.split_at(b);
        let (lp_l, rest) = rest.split_at(b);
        let [nll, sum_chosen, sum_rejected] = rest else {
            candle_core::bail!("readout: {} values for {b} pairs", v.len());
        };
        let (mut metrics, _) = Metrics::from_parts(
            lp_w,
            lp_l,
            self.beta,
            *nll,
            sum_chosen / self.logit_count,
            sum_rejected / self.logit_count,
        );
        if let Some(k) = first_pairs {
            let k = k.min(b);
            metrics.restrict_pair_metrics(&lp_w[..k], &lp_l[..k], self.beta);
        }
        Ok(metrics)
    }
}

/// What the loss needs from the model: per-sequence sums of answer log-probs `[2B]`, the sum
/// of NLL-target log-probs (a scalar), and the logit sums of the chosen and the rejected half
/// (`[2]`, metrics only).
struct Scores {
    answer_sums: Tensor,
    nll_sum: Tensor,
    logit_sums: Tensor,
}

/// The padded batch as TRL runs it: `[2B, len]` through the model, positions [0, len-1).
fn scores_padded(model: &CausalLm, batch: &Batch) -> Result<Scores> {
    let hidden = model.hidden_states_rows(&batch.ids, &batch.mask)?;
    let (n, l, e) = hidden.dims3()?;
    let t = l - 1;
    // Only positions [0, len-1) predict a token; the last one is never needed.
    let h = hidden.narrow(1, 0, t)?.reshape((n * t, e))?;
    // Log-softmax + gather without more than one [rows, vocab] buffer (fused, or chunked and
    // recomputed under gradient checkpointing).
    let (logp, row_sums) = model.head_scores(&h, &batch.targets.flatten_all()?)?;
    let logp = logp.reshape((n, t))?;
    Ok(Scores {
        answer_sums: (&logp * &batch.answer_mask)?.sum(1)?,
        nll_sum: (logp.narrow(0, 0, n / 2)? * &batch.nll_mask)?.sum_all()?,
        logit_sums: row_sums
            .to_dtype(DType::F32)?
            .reshape((2, (n / 2) * t))?
            .sum(1)?,
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
    let h = p.rows.apply(&hidden)?;
    let (logp, _) = model.head_scores(&h, &p.targets)?; // [m]
    let w_sum = model.head_column_sums()?.unsqueeze(1)?; // [e, 1]
    let halves = p.logit_weights.matmul(&hidden.detach())?.matmul(&w_sum)?; // [2, 1]
    Ok(Scores {
        answer_sums: p.answer_select.matmul(&logp.unsqueeze(1)?)?.squeeze(1)?,
        nll_sum: (&logp * &p.nll_weight)?.sum_all()?,
        logit_sums: halves.flatten_all()?.to_dtype(DType::F32)?,
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
    // Linearise the odds term: sum_i d_i * lp_i has exactly the odds term's gradient.
    let surrogate = (&mean_lp * odds_coefficients(&mean_lp, beta)?)?.sum_all()?;
    let values = Tensor::cat(
        &[
            &mean_lp.detach(),
            &nll.detach().reshape(1)?,
            &sc.logit_sums.detach(),
        ],
        0,
    )?;
    let vocab = model.lm_head().dim(0)?;
    Ok(ForwardOutput {
        objective: (nll + surrogate)?,
        readout: Readout {
            values,
            n_pairs: b,
            beta,
            logit_count: (b * (batch.len - 1) * vocab) as f64,
        },
    })
}
