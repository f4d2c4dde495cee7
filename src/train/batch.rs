//! Collation: the chosen and rejected sequences of a micro-batch, right-padded to one length,
//! stacked `[chosen_0..chosen_B, rejected_0..rejected_B]` for a single forward pass.

use crate::data::TokenizedPair;
use crate::model::{Packed, Padding, Prefix, Segment};
use crate::ops::{RowGather, TableLookup};
use candle_core::{Device, Result, Tensor};

pub struct Batch {
    pub n_pairs: usize,
    /// Padded length of every sequence.
    pub len: usize,
    /// `[2B, len]` u32 token ids (padding = the tokenizer's pad id).
    pub ids: Tensor,
    /// `[2B][len]`, 1 for real tokens (host values: the padded forward's attention biases).
    pub mask: Vec<Vec<u32>>,
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
    /// The same batch without padding, for models that can run it exactly.
    pub packed: PackedBatch,
}

/// The packed layout (see `Packed`): real rows without padding, rejected sequences sharing
/// their chosen sequence's rows for the common prompt, then the padding rows the metrics
/// need; `m` prediction rows (the positions whose next token the loss scores).
pub struct PackedBatch {
    pub layout: Packed,
    /// The packed row each prediction reads its hidden state from (`m` rows; a row the
    /// rejected sequence shares with the chosen one is read by both): a gather whose backward
    /// is one too.
    pub rows: RowGather,
    /// `[m]` u32: the token each prediction scores.
    pub targets: Tensor,
    /// `[2B, m]` f32: 1 where a prediction is an answer token of that sequence.
    pub answer_select: Tensor,
    /// `[m]` f32: 1 where a prediction counts for the NLL.
    pub nll_weight: Tensor,
    /// `[2, total]` f32: how many positions of the padded batch's logits each packed row
    /// stands for, in the chosen (row 0) and rejected (row 1) halves, over positions [0, len-1).
    pub logit_weights: Tensor,
}

/// `nll_on_prompt = true` is TRL's choice: the NLL covers every non-padding target of the
/// chosen sequence; `false` restricts it to the answer, as in the paper. `padding` is how the
/// packed layout represents padding: the model's `CausalLm::packed_padding()`.
pub fn collate(
    pairs: &[&TokenizedPair],
    pad_id: u32,
    nll_on_prompt: bool,
    padding: Padding,
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
    let packed = pack(&seqs, b, len, pad_id, nll_on_prompt, padding, device)?;
    Ok(Batch {
        packed,
        n_pairs: b,
        len,
        ids: Tensor::from_vec(ids, (n, len), device)?,
        mask: mask.chunks_exact(len).map(<[u32]>::to_vec).collect(),
        targets: Tensor::from_vec(targets, n * t, device)?,
        answer_mask: Tensor::from_vec(answer_mask, (n, t), device)?,
        nll_mask: Tensor::from_vec(nll_mask, (b, t), device)?,
        answer_counts,
        nll_count,
        tokens,
    })
}

fn pack(
    seqs: &[(&[u32], &[i64])],
    b: usize,
    len: usize,
    pad_id: u32,
    nll_on_prompt: bool,
    padding: Padding,
    device: &Device,
) -> Result<PackedBatch> {
    let n = seqs.len();
    let mut ids = Vec::new();
    let mut segments: Vec<Segment> = Vec::with_capacity(n);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut owner = Vec::new();
    let mut is_answer = Vec::new();
    let mut nll_weight = Vec::new();
    let mut weights = Vec::new();
    let mut pad_ids = Vec::new();
    let mut pad_weights = Vec::new();
    for (r, (seq, labels)) in seqs.iter().enumerate() {
        let offset = ids.len();
        let real = seq.len();
        // A rejected sequence reads its leading tokens shared with the chosen one from the
        // chosen one's rows, keeping at least one row of its own.
        let prefix = (r >= b)
            .then(|| {
                let chosen = seqs[r - b].0;
                let shared = chosen.iter().zip(seq.iter()).take_while(|(a, b)| a == b);
                let len = shared.count().min(real.saturating_sub(1));
                Prefix {
                    offset: segments[r - b].offset,
                    len,
                }
            })
            .filter(|p| p.len > 0);
        let p = prefix.map_or(0, |p| p.len);
        let row_of = |t: usize| match prefix {
            Some(pre) if t < p => pre.offset + t,
            _ => offset + t - p,
        };
        // Padding rows are needed only when padding positions fall inside [0, len-1): one
        // stand-in weighted by their count, or one row for each. They go after every real
        // row (the stream's padding block), as nothing differentiates through them.
        let pad = padding.rows(real, len);
        let pad_offset = pad_ids.len();
        ids.extend_from_slice(&seq[p..]);
        pad_ids.extend(std::iter::repeat_n(pad_id, pad));
        let half = usize::from(r >= b);
        for t in 0..real {
            weights.push((half, row_of(t), if t + 1 < len { 1.0f32 } else { 0.0 }));
        }
        let pad_weight = match padding {
            Padding::StandIn => (len - 1).saturating_sub(real) as f32,
            Padding::Explicit => 1.0,
        };
        for i in 0..pad {
            pad_weights.push((half, pad_offset + i, pad_weight));
        }
        // The LM head runs only where the loss reads it: answer tokens, and the chosen
        // sequence's NLL targets.
        for t in 0..real.saturating_sub(1) {
            let answer = labels[t + 1] != -100;
            let nll = r < b && (nll_on_prompt || answer);
            if !answer && !nll {
                continue;
            }
            rows.push(row_of(t) as u32);
            targets.push(seq[t + 1]);
            owner.push(r);
            is_answer.push(answer);
            nll_weight.push(if nll { 1f32 } else { 0.0 });
        }
        segments.push(Segment {
            offset,
            real: real - p,
            pad,
            pad_offset,
            prefix,
        });
    }
    let real_rows = ids.len();
    ids.extend(pad_ids);
    weights.extend(
        pad_weights
            .into_iter()
            .map(|(half, i, w)| (half, real_rows + i, w)),
    );
    let total = ids.len();
    let m = rows.len();
    let mut select = vec![0f32; n * m];
    for (i, (&r, &a)) in owner.iter().zip(&is_answer).enumerate() {
        if a {
            select[r * m + i] = 1.0;
        }
    }
    let mut logit_weights = vec![0f32; 2 * total];
    for (half, row, w) in weights {
        logit_weights[half * total + row] += w;
    }
    let tokens = TableLookup::new(&ids, |j| j < real_rows, device)?;
    Ok(PackedBatch {
        layout: Packed {
            tokens,
            segments,
            total,
            real_rows,
            padding,
        },
        rows: RowGather::new(rows, |_| true, total, device)?,
        targets: Tensor::from_vec(targets, m, device)?,
        answer_select: Tensor::from_vec(select, (n, m), device)?,
        nll_weight: Tensor::from_vec(nll_weight, m, device)?,
        logit_weights: Tensor::from_vec(logit_weights, (2, total), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::PairText;

    fn pair(prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> TokenizedPair {
        let seq = |answer: &[u32]| [prompt, answer].concat();
        let labels = |answer: &[u32]| {
            let mut l = vec![-100i64; prompt.len()];
            l.extend(answer.iter().map(|&t| t as i64));
            l
        };
        TokenizedPair {
            prompt_input_ids: prompt.to_vec(),
            chosen_input_ids: seq(chosen),
            chosen_labels: labels(chosen),
            rejected_input_ids: seq(rejected),
            rejected_labels: labels(rejected),
            truncated: false,
            text: PairText {
                prompt: String::new(),
                chosen: String::new(),
                rejected: String::new(),
            },
        }
    }

    #[test]
    fn padding_rows_follow_every_real_row() {
        // Lengths 5, 3 (chosen) and 4, 8 (rejected): padded to 8.
        let a = pair(&[1, 2, 3], &[4, 5], &[6]);
        let b = pair(&[7], &[8, 9], &[10, 11, 12, 13, 14, 15, 16]);
        let pad = 99;
        for padding in [Padding::StandIn, Padding::Explicit] {
            let batch = collate(&[&a, &b], pad, true, padding, &Device::Cpu).unwrap();
            let p = &batch.packed;
            let l = &p.layout;
            let pads: Vec<usize> = l.segments.iter().map(|s| s.pad).collect();
            let want = match padding {
                Padding::StandIn => vec![1, 1, 1, 0],
                Padding::Explicit => vec![2, 4, 3, 0],
            };
            assert_eq!(pads, want, "{padding:?}");
            // Real rows: 5 + 3 + (4 - 3 shared) + (8 - 1 shared).
            assert_eq!(l.real_rows, 5 + 3 + 1 + 7);
            assert_eq!(l.total, l.real_rows + want.iter().sum::<usize>());
            let ids: Vec<u32> = l.tokens.ids().to_vec1().unwrap();
            assert!(ids[l.real_rows..].iter().all(|&t| t == pad));
            assert!(ids[..l.real_rows].iter().all(|&t| t != pad));
            let offsets: Vec<usize> = l.segments.iter().map(|s| s.pad_offset).collect();
            assert_eq!(offsets[..3], [0, want[0], want[0] + want[1]]);
            // Each half's weights count all of its padded positions [0, len-1).
            let w: Vec<Vec<f32>> = p.logit_weights.to_vec2().unwrap();
            for half in &w {
                assert_eq!(half.iter().sum::<f32>(), (2 * 7) as f32);
            }
        }
    }
}
