//! Packed attention as one batched call, for devices where each call is a kernel launch (a
//! GPU): every segment's query rows and key rows are gathered into a padded batch
//! `[segments, rows, ..]`, attended at once under one bias, and the outputs gathered back into
//! stream order. Same arithmetic per segment as the per-segment loop (the extra key columns
//! are masked to probability 0, so they add exact zeros); the gathers' backward sums the
//! gradients of rows read twice (a shared prompt's keys).

use super::layers::{attention, split_heads};
use super::packed::Segment;
use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;

pub struct Gathered {
    /// `[segs * lq]` u32: the row of `q` at each padded query slot.
    q_index: Tensor,
    /// `[segs * lk]` u32: the row of `k`/`v` at each padded key slot.
    kv_index: Tensor,
    /// `[rows]` u32: the padded slot of each output row, in stream order.
    out_index: Tensor,
    /// `[segs, 1, lq, lk]`: each segment's bias, -inf in the padded slots.
    bias: Tensor,
    segs: usize,
    lq: usize,
    lk: usize,
}

impl Gathered {
    /// The real rows of every segment (`pad` false), or the padding rows of those that have
    /// some; `None` when no segment has such rows. Query rows are numbered as the tensor the
    /// attention gets (real rows from `offset`, padding rows from `pad_offset`); keys are
    /// always real rows.
    pub fn new(
        segments: &[Segment],
        pad: bool,
        window: Option<usize>,
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
        let mut bias = vec![f32::NEG_INFINITY; segs * lq * lk];
        for (i, (seg, first, rows)) in picked.into_iter().enumerate() {
            let (n, keys) = (rows.len(), seg.keys());
            // Padded slots repeat a valid row; their bias rows are fully masked and their
            // outputs are never gathered back, so they carry no gradient.
            q_index.extend((0..lq).map(|t| (first + t.min(n - 1)) as u32));
            let key_rows: Vec<u32> = seg.key_row_indices().map(|r| r as u32).collect();
            kv_index.extend((0..lk).map(|j| key_rows[j.min(keys - 1)]));
            out_index.extend((0..n).map(|t| (i * lq + t) as u32));
            let b = seg.bias_data(rows, window);
            for t in 0..n {
                let at = (i * lq + t) * lk;
                bias[at..at + keys].copy_from_slice(&b[t * keys..(t + 1) * keys]);
            }
        }
        let rows = out_index.len();
        Ok(Some(Gathered {
            q_index: Tensor::from_vec(q_index, segs * lq, device)?,
            kv_index: Tensor::from_vec(kv_index, segs * lk, device)?,
            out_index: Tensor::from_vec(out_index, rows, device)?,
            bias: Tensor::from_vec(bias, (segs, 1, lq, lk), device)?,
            segs,
            lq,
            lk,
        }))
    }

    /// Attention output `[rows, heads*d]` of q `[.., heads*d]` against k/v `[.., kv_heads*d]`.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (heads, kv_heads): (usize, usize),
        (scale, softcap): (f64, Option<f64>),
        compute: DType,
    ) -> Result<Tensor> {
        let gather = |t: &Tensor, index: &Tensor, len: usize, h: usize| {
            let width = t.dim(1)?;
            split_heads(
                &t.index_select(index, 0)?.reshape((self.segs, len, width))?,
                h,
            )
        };
        let out = attention(
            &gather(q, &self.q_index, self.lq, heads)?,
            &gather(k, &self.kv_index, self.lk, kv_heads)?,
            &gather(v, &self.kv_index, self.lk, kv_heads)?,
            &self.bias,
            scale,
            softcap,
            compute,
        )?; // [segs, lq, heads*d]
        let width = out.dim(2)?;
        out.reshape((self.segs * self.lq, width))?
            .index_select(&self.out_index, 0)
    }
}
