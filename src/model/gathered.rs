//! Packed attention as one batched call, for devices where each call is a kernel launch (a
//! GPU): every segment's query rows and key rows are gathered into a padded batch
//! `[segments, rows, ..]`, attended at once under one bias, and the outputs gathered back into
//! stream order. Same arithmetic per segment as the per-segment loop (the extra key columns
//! are masked to probability 0, so they add exact zeros); the gathers' backward sums the
//! gradients of rows read twice (a shared prompt's keys).

use super::layers::{attention, split_heads, AttnBias};
use super::packed::Segment;
use crate::ops::RowGather;
use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;

pub struct Gathered {
    /// The row of `q` at each padded query slot (`segs * lq`).
    q_gather: RowGather,
    /// The row of `k`/`v` at each padded key slot (`segs * lk`).
    kv_gather: RowGather,
    /// The padded slot of each output row, in stream order.
    out_gather: RowGather,
    /// `[segs, 1 or heads, lq, lk]`: each segment's bias, masked in the padded slots.
    bias: AttnBias,
    segs: usize,
    lq: usize,
    lk: usize,
}

impl Gathered {
    /// The real rows of every segment (`pad` false), or the padding rows of those that have
    /// some; `None` when no segment has such rows. Query rows are numbered as the tensor the
    /// attention gets (real rows from `offset`, padding rows from `pad_offset`); keys are
    /// always real rows.
    /// `rows`: the rows of the query tensor and of the key/value tensor the attention gets.
    pub fn new(
        segments: &[Segment],
        pad: bool,
        window: Option<usize>,
        (q_rows, kv_rows): (usize, usize),
        heads: usize,
        device: &Device,
    ) -> Result<Option<Self>> {
        let picked: Vec<(&Segment, usize, Range<usize>)> = segments
            .iter()
            .filter_map(|s| match pad {
                false => (s.real > 0).then_some((s, s.offset, 0..s.real)),
                true => (s.pad > 0).then_some((s, s.pad_offset, s.real..s.len())),
            })
            .collect();
        let segs = picked.len();
        let lq = picked.iter().map(|(_, _, r)| r.len()).max().unwrap_or(0);
        let lk = picked.iter().map(|(s, _, _)| s.keys()).max().unwrap_or(0);
        if segs == 0 || lk == 0 {
            return Ok(None);
        }
        let mut q_index = Vec::with_capacity(segs * lq);
        let mut kv_index = Vec::with_capacity(segs * lk);
        let mut out_index = Vec::new();
        let mut q_live = vec![false; segs * lq];
        let mut k_live = vec![false; segs * lk];
        let mut bias = vec![f32::MIN; segs * lq * lk];
        let masked = |v: &f32| *v == f32::MIN || *v == f32::NEG_INFINITY;
        let mut live_row_sees_nothing = false;
        for (i, (seg, first, rows)) in picked.into_iter().enumerate() {
            let (n, keys) = (rows.len(), seg.keys());
            // Padded slots repeat a valid row; their bias rows are fully masked and their
            // outputs are never gathered back, so they carry no gradient.
            q_index.extend((0..lq).map(|t| (first + t.min(n - 1)) as u32));
            let key_rows: Vec<u32> = seg.key_row_indices().map(|r| r as u32).collect();
            kv_index.extend((0..lk).map(|j| key_rows[j.min(keys - 1)]));
            out_index.extend((0..n).map(|t| (i * lq + t) as u32));
            q_live[i * lq..i * lq + n].fill(true);
            k_live[i * lk..i * lk + keys].fill(true);
            let b = seg.bias_data(rows, window);
            for t in 0..n {
                let (at, row) = ((i * lq + t) * lk, &b[t * keys..(t + 1) * keys]);
                bias[at..at + keys].copy_from_slice(row);
                live_row_sees_nothing |= row.iter().all(masked);
            }
        }
        // Padded slots get no gradient (masked keys, outputs never gathered back): the
        // backward passes leave them out.
        let out_slots = segs * lq;
        Ok(Some(Gathered {
            q_gather: RowGather::new(q_index, |j| q_live[j], q_rows, device)?,
            kv_gather: RowGather::new(kv_index, |j| k_live[j], kv_rows, device)?,
            out_gather: RowGather::new(out_index, |_| true, out_slots, device)?,
            // sdpa zeroes the output of a row that sees no key (a padding row past a sliding
            // window). Padded slots see none either, but their outputs are never gathered back,
            // so the zeroing (a broadcast product each way, on every slot) runs only when a
            // live row needs it.
            bias: AttnBias::new(bias, (segs, lq, lk), live_row_sees_nothing, heads, device)?,
            segs,
            lq,
            lk,
        }))
    }

    /// Attention output `[rows, heads*d]` (in `compute`) of q `[.., heads*d]` against k/v
    /// `[.., kv_heads*d]`.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (heads, kv_heads): (usize, usize),
        (scale, softcap): (f64, Option<f64>),
        compute: DType,
    ) -> Result<Tensor> {
        // Gathered in the products' dtype: half the bytes to copy under bf16.
        let gather = |t: &Tensor, g: &RowGather, len: usize, h: usize| {
            let width = t.dim(1)?;
            let t = g.apply(&t.to_dtype(compute)?)?;
            split_heads(&t.reshape((self.segs, len, width))?, h)
        };
        let out = attention(
            &gather(q, &self.q_gather, self.lq, heads)?,
            &gather(k, &self.kv_gather, self.lk, kv_heads)?,
            &gather(v, &self.kv_gather, self.lk, kv_heads)?,
            &self.bias,
            scale,
            softcap,
            compute,
        )?; // [segs, lq, heads*d]
        let width = out.dim(2)?;
        self.out_gather
            .apply(&out.reshape((self.segs * self.lq, width))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::packed::Prefix;

    /// A chosen sequence of 5 real rows (2 padding) and a rejected one sharing its first 3 rows
    /// as a prompt, with 1 own real row (6 padding): the padded slots see no key either way.
    fn segments() -> Vec<Segment> {
        vec![
            Segment {
                offset: 0,
                real: 5,
                pad: 2,
                pad_offset: 0,
                prefix: None,
            },
            Segment {
                offset: 5,
                real: 1,
                pad: 6,
                pad_offset: 2,
                prefix: Some(Prefix { offset: 0, len: 3 }),
            },
        ]
    }

    /// sdpa's zeroing of rows without keys runs only where a live row has none: never for
    /// causal rows (each sees itself), for padding rows once a window hides all their keys.
    #[test]
    fn rows_are_zeroed_only_when_a_live_row_sees_no_key() -> Result<()> {
        let (segs, dev) = (segments(), Device::Cpu);
        let zeroes = |pad, window| -> Result<bool> {
            let g = Gathered::new(&segs, pad, window, (8, 6), 2, &dev)?.expect("rows");
            Ok(g.bias.keep.is_some())
        };
        assert!(!zeroes(false, None)?, "real rows, causal");
        assert!(!zeroes(true, None)?, "padding rows, causal");
        assert!(
            !zeroes(false, Some(2))?,
            "real rows see themselves under any window"
        );
        assert!(zeroes(true, Some(2))?, "padding rows past a window of 2");
        Ok(())
    }
}
