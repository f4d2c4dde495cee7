//! Packed attention as a few batched calls, for devices where each call is a kernel launch (a
//! GPU): the segments' query rows and key rows are gathered into padded batches
//! `[segments, heads, rows, head_dim]`, one per group of segments of similar lengths, each
//! attended at once under one bias, and the outputs gathered back into stream order. Same
//! arithmetic per segment as the per-segment loop (the extra key columns are masked to
//! probability 0, so they add exact zeros); the gathers' backward sums the gradients of rows
//! read twice (a shared prompt's keys).
//!
//! The gathers read a `[rows, heads * d]` tensor as `[rows * heads, d]`, one row per token and
//! head, so each lands in the head-major layout the products take (and the output goes back
//! to stream rows) without a transposed copy: candle's strided copies index every element
//! with 64-bit divisions, several times slower on a GPU than the gathers themselves.

use super::layers::{attention_heads, AttnBias};
use super::packed::Segment;
use crate::ops::RowGather;
use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

static MAX_GROUPS: AtomicUsize = AtomicUsize::new(4);

/// The most groups (batched calls) the gathered attention splits its segments into: 4 unless
/// set (the binary reads `ORPO_ATTENTION_GROUPS`; 1 gives one padded batch for all of them,
/// to measure what the groups save).
pub fn set_max_attention_groups(n: usize) {
    MAX_GROUPS.store(n.max(1), Ordering::Relaxed);
}

pub struct Gathered {
    /// Segments of similar lengths attended together (see [`partition`]).
    groups: Vec<Group>,
    /// The padded slot of each output row, in stream order (`[rows * heads, d]`: a row per
    /// token and head); slots are numbered through the groups in order.
    out_gather: RowGather,
    /// Query rows (the output's rows).
    rows: usize,
}

/// One batched attention call: `segs` segments padded to `lq` query and `lk` key slots.
struct Group {
    /// The row of `q` (`[rows * heads, d]`) at each padded query slot (`[segs, heads, lq]`).
    q_gather: RowGather,
    /// The row of `k`/`v` (`[rows * kv_heads, d]`) at each padded key slot
    /// (`[segs, kv_heads, lk]`).
    kv_gather: RowGather,
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
        (heads, kv_heads): (usize, usize),
        device: &Device,
    ) -> Result<Option<Self>> {
        let picked: Vec<(&Segment, usize, Range<usize>)> = segments
            .iter()
            .filter_map(|s| match pad {
                false => (s.real > 0).then_some((s, s.offset, 0..s.real)),
                true => (s.pad > 0).then_some((s, s.pad_offset, s.real..s.len())),
            })
            .collect();
        if picked.iter().all(|(s, _, _)| s.keys() == 0) {
            return Ok(None);
        }
        if picked.iter().any(|(s, _, _)| s.keys() == 0) {
            candle_core::bail!("packed attention: a sequence without real tokens");
        }
        let sizes: Vec<(usize, usize)> =
            picked.iter().map(|(s, _, r)| (r.len(), s.keys())).collect();
        let mut groups = Vec::new();
        // Each picked segment's first query slot and its group's `lq`, for the output gather.
        let mut first_slot = vec![(0, 0); picked.len()];
        let mut slots = 0;
        // A further group costs some twenty more launches a layer on a GPU (~0.1-0.2 ms, by
        // estimate), so it must save that much of the passes over score elements: ~4M elements
        // (all heads) on the candle-op chain (~160 bytes an element, forward and backward),
        // ~16M with the fused attention (~22 bytes). The padding block runs forward only:
        // about a third of the launches and of the bytes, so about the same floors. None on the
        // CPU, where only the tests of the device path take this one.
        let min_saving = match (device.is_cpu(), crate::ops::fused_attention()) {
            (true, _) => 0,
            (false, false) => (4 << 20) / heads.max(1),
            (false, true) => (16 << 20) / heads.max(1),
        };
        let max_groups = MAX_GROUPS.load(Ordering::Relaxed);
        for members in partition(&sizes, max_groups, min_saving as u64) {
            let segs = members.len();
            let lq = members.iter().map(|&m| sizes[m].0).max().unwrap_or(0);
            let lk = members.iter().map(|&m| sizes[m].1).max().unwrap_or(0);
            let mut q_index = Vec::with_capacity(segs * heads * lq);
            let mut kv_index = Vec::with_capacity(segs * kv_heads * lk);
            let mut q_live = Vec::with_capacity(segs * heads * lq);
            let mut k_live = Vec::with_capacity(segs * kv_heads * lk);
            let mut bias = vec![f32::MIN; segs * lq * lk];
            let masked = |v: &f32| *v == f32::MIN || *v == f32::NEG_INFINITY;
            let mut live_row_sees_nothing = false;
            for (i, &m) in members.iter().enumerate() {
                let (seg, first, rows) = &picked[m];
                let (n, keys) = (rows.len(), seg.keys());
                first_slot[m] = (slots + i * heads * lq, lq);
                // Padded slots repeat a valid row; their bias rows are fully masked and their
                // outputs are never gathered back, so they carry no gradient.
                let key_rows: Vec<usize> = seg.key_row_indices().collect();
                for h in 0..heads {
                    let row = |t: usize| ((first + t.min(n - 1)) * heads + h) as u32;
                    q_index.extend((0..lq).map(row));
                    q_live.extend((0..lq).map(|t| t < n));
                }
                for h in 0..kv_heads {
                    let row = |j: usize| (key_rows[j.min(keys - 1)] * kv_heads + h) as u32;
                    kv_index.extend((0..lk).map(row));
                    k_live.extend((0..lk).map(|j| j < keys));
                }
                let b = seg.bias_data(rows.clone(), window);
                for t in 0..n {
                    let (at, row) = ((i * lq + t) * lk, &b[t * keys..(t + 1) * keys]);
                    bias[at..at + keys].copy_from_slice(row);
                    live_row_sees_nothing |= row.iter().all(masked);
                }
            }
            slots += segs * heads * lq;
            // Padded slots get no gradient (masked keys, outputs never gathered back): the
            // backward passes leave them out.
            groups.push(Group {
                q_gather: RowGather::new(q_index, |j| q_live[j], q_rows * heads, device)?,
                kv_gather: RowGather::new(kv_index, |j| k_live[j], kv_rows * kv_heads, device)?,
                // sdpa zeroes the output of a row that sees no key (a padding row past a
                // sliding window). Padded slots see none either, but their outputs are never
                // gathered back, so the zeroing (a broadcast product each way, on every slot)
                // runs only when a live row needs it.
                bias: AttnBias::new(bias, (segs, lq, lk), live_row_sees_nothing, heads, device)?,
                segs,
                lq,
                lk,
            });
        }
        // Output row (token t of a segment, head h) from slot `at + h * lq + t` of its group.
        let mut out_index = Vec::new();
        for ((_, _, rows), &(at, lq)) in picked.iter().zip(&first_slot) {
            for t in 0..rows.len() {
                out_index.extend((0..heads).map(|h| (at + h * lq + t) as u32));
            }
        }
        let rows = out_index.len() / heads.max(1);
        Ok(Some(Gathered {
            groups,
            out_gather: RowGather::new(out_index, |_| true, slots, device)?,
            rows,
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
        // Gathered in the products' dtype: half the bytes to copy under bf16; read as a row
        // per token and head.
        let by_head = |t: &Tensor, h: usize| {
            let (rows, width) = t.dims2()?;
            t.to_dtype(compute)?.reshape((rows * h, width / h))
        };
        let (q, k, v) = (
            by_head(q, heads)?,
            by_head(k, kv_heads)?,
            by_head(v, kv_heads)?,
        );
        let d = q.dim(1)?;
        let mut outs = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let kv = |t: &Tensor| g.kv_gather.apply(t)?.reshape((g.segs, kv_heads, g.lk, d));
            let out = attention_heads(
                &g.q_gather.apply(&q)?.reshape((g.segs, heads, g.lq, d))?,
                &kv(&k)?,
                &kv(&v)?,
                &g.bias,
                scale,
                softcap,
                compute,
            )?; // [segs, heads, lq, d]
            outs.push(out.reshape((g.segs * heads * g.lq, d))?);
        }
        let out = match outs.as_slice() {
            [one] => one.clone(),
            _ => Tensor::cat(&outs, 0)?,
        };
        self.out_gather.apply(&out)?.reshape((self.rows, heads * d))
    }
}

/// Segments (`(query rows, keys)` each) split into groups of similar lengths, each attended as
/// one padded batch: the segments sorted by query rows (then keys), longest first, cut into
/// consecutive runs that minimise the score elements `Σ segs · lq · lk`. A packed batch's
/// segments differ widely (a chosen sequence owns its prompt and answer, the rejected one only
/// its answer), so one padded batch computes several times the elements its segments need.
/// Each further group (more launches a layer) must save a tenth of the elements and at least
/// `min_saving` of them; at most `max_groups` (at least one).
fn partition(sizes: &[(usize, usize)], max_groups: usize, min_saving: u64) -> Vec<Vec<usize>> {
    let max_groups = max_groups.max(1);
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let n = order.len();
    // best[k][b]: the least elements of sorted segments 0..b in k groups, and where the last
    // group starts.
    let mut best = vec![vec![(u64::MAX, 0usize); n + 1]; max_groups + 1];
    best[0][0] = (0, 0);
    for k in 1..=max_groups.min(n) {
        for b in k..=n {
            let mut lk = 0;
            for a in (k - 1..b).rev() {
                // The group a..b: the first is the longest (sorted), the keys' maximum so far.
                lk = lk.max(sizes[order[a]].1);
                let (prev, _) = best[k - 1][a];
                if prev != u64::MAX {
                    let c = prev + ((b - a) * sizes[order[a]].0 * lk) as u64;
                    if c < best[k][b].0 {
                        best[k][b] = (c, a);
                    }
                }
            }
        }
    }
    let mut k = 1;
    while k < max_groups.min(n) && {
        let (now, next) = (best[k][n].0, best[k + 1][n].0);
        next * 10 <= now * 9 && now - next >= min_saving
    } {
        k += 1;
    }
    let mut groups = Vec::with_capacity(k);
    let mut b = n;
    for kk in (1..=k).rev() {
        let a = best[kk][b].1;
        let mut members = order[a..b].to_vec();
        members.sort_unstable(); // stream order within a group
        groups.push(members);
        b = a;
    }
    groups.reverse();
    groups
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
            let g = Gathered::new(&segs, pad, window, (8, 6), (2, 1), &dev)?.expect("rows");
            Ok(g.groups.iter().any(|g| g.bias.keep.is_some()))
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

    /// Every segment in exactly one group; a batch of equal lengths stays one call; chosen
    /// (prompt + answer) and rejected (answer only) segments of a packed batch are split, each
    /// split saving a tenth of the elements or more, at most four groups.
    #[test]
    fn segments_are_grouped_by_length() {
        let elements = |sizes: &[(usize, usize)], groups: &[Vec<usize>]| -> usize {
            let g = groups.iter().map(|m| {
                let lq = m.iter().map(|&i| sizes[i].0).max().unwrap();
                m.len() * lq * m.iter().map(|&i| sizes[i].1).max().unwrap()
            });
            g.sum()
        };
        let check = |sizes: &[(usize, usize)]| -> Vec<Vec<usize>> {
            let groups = partition(sizes, 4, 0);
            let mut all: Vec<usize> = groups.concat();
            all.sort_unstable();
            assert_eq!(all, (0..sizes.len()).collect::<Vec<_>>(), "{sizes:?}");
            assert!((1..=4).contains(&groups.len()));
            assert!(groups.iter().all(|m| !m.is_empty() && m.is_sorted()));
            groups
        };
        assert_eq!(check(&[(40, 40); 6]).len(), 1);
        assert_eq!(check(&[(7, 9)]).len(), 1);
        // 8 pairs: chosen (prompt + answer) rows 100..310, rejected answers 20..90 after the
        // chosen one's prompt of 80.
        let mut sizes = Vec::new();
        for p in 0..8 {
            let answer = 20 + 10 * p;
            sizes.push((80 + 30 * p, 80 + 30 * p)); // chosen
            sizes.push((answer, 80 + answer)); // rejected
        }
        let groups = check(&sizes);
        let one = elements(&sizes, &[(0..sizes.len()).collect()]);
        let split = elements(&sizes, &groups);
        assert!(groups.len() >= 2, "{groups:?}");
        assert!(split * 10 <= one * 9, "{split} vs {one}");
        // A saving below the floor keeps the groups together.
        let floor = (one - split) as u64 + 1;
        assert_eq!(partition(&sizes, 4, floor).len(), 1);
        assert_eq!(partition(&sizes, 1, 0).len(), 1);
        assert_eq!(partition(&sizes, 2, 0).len(), 2);
        // No two neighbouring groups that merged would compute fewer elements.
        if groups.len() > 1 {
            for w in groups.windows(2) {
                let merged: Vec<usize> = w.concat();
                let apart = elements(&sizes, w);
                assert!(apart < elements(&sizes, &[merged]), "{w:?}");
            }
        }
    }
}
