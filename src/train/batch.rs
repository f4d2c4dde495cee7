//! Collation: the chosen and rejected sequences of a micro-batch, right-padded to one length,
//! stacked `[chosen_0..chosen_B, rejected_0..rejected_B]` for a single forward pass.

use crate::data::TokenizedPair;
use candle_core::{Device, Result, Tensor};

pub struct Batch {
    pub n_pairs: usize,
    /// Padded length of every sequence.
    pub len: usize,
    /// `[2B, len]` u32 token ids (padding = the tokenizer's pad id).
    pub ids: Tensor,
    /// `[2B, len]` u32, 1 for real tokens.
    pub mask: Tensor,
    /// `[2B * (len-1)]` u32: the next token at each position.
    pub targets: Tensor,
    /// `[2B, len-1]` f32: 1 where the next token is an answer label (not -100).
    pub answer_mask: Tensor,
    /// `[B, len-1]` f32: 1 where the chosen sequence's next token counts for the NLL.
    pub nll_mask: Tensor,
    /// Answer tokens per sequence (the divisor of the mean log-prob), `[2B]`.
    pub answer_counts: Vec<f64>,
    pub nll_count: f64,
    /// Non-padding tokens of all 2B sequences (throughput accounting).
    pub tokens: usize,
}

/// `nll_on_prompt = true` is TRL's choice: the NLL covers every non-padding target of the
/// chosen sequence; `false` restricts it to the answer, as in the paper.
pub fn collate(
    pairs: &[&TokenizedPair],
    pad_id: u32,
    nll_on_prompt: bool,
    device: &Device,
) -> Result<Batch> {
    let b = pairs.len();
    let seqs: Vec<(&[u32], &[i64])> = pairs
        .iter()
        .map(|p| (p.chosen_input_ids.as_slice(), p.chosen_labels.as_slice()))
        .chain(pairs.iter().map(|p| {
            (
                p.rejected_input_ids.as_slice(),
                p.rejected_labels.as_slice(),
            )
        }))
        .collect();
    let len = seqs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    if len < 2 {
        candle_core::bail!("every sequence has fewer than two tokens: nothing to predict");
    }
    let n = seqs.len();
    let t = len - 1;
    let mut ids = vec![pad_id; n * len];
    let mut mask = vec![0u32; n * len];
    let mut targets = vec![pad_id; n * t];
    let mut answer_mask = vec![0f32; n * t];
    let mut nll_mask = vec![0f32; b * t];
    let mut answer_counts = vec![0f64; n];
    let mut nll_count = 0.0;
    let mut tokens = 0;
    for (r, (seq, labels)) in seqs.iter().enumerate() {
        tokens += seq.len();
        ids[r * len..r * len + seq.len()].copy_from_slice(seq);
        mask[r * len..r * len + seq.len()].fill(1);
        for i in 1..seq.len() {
            targets[r * t + i - 1] = seq[i];
            let is_answer = labels[i] != -100;
            if is_answer {
                answer_mask[r * t + i - 1] = 1.0;
                answer_counts[r] += 1.0;
            }
            if r < b && (nll_on_prompt || is_answer) {
                nll_mask[r * t + i - 1] = 1.0;
                nll_count += 1.0;
            }
        }
        if answer_counts[r] == 0.0 {
            candle_core::bail!("a sequence has no answer token to score");
        }
    }
    Ok(Batch {
        n_pairs: b,
        len,
        ids: Tensor::from_vec(ids, (n, len), device)?,
        mask: Tensor::from_vec(mask, (n, len), device)?,
        targets: Tensor::from_vec(targets, n * t, device)?,
        answer_mask: Tensor::from_vec(answer_mask, (n, t), device)?,
        nll_mask: Tensor::from_vec(nll_mask, (b, t), device)?,
        answer_counts,
        nll_count,
        tokens,
    })
}
