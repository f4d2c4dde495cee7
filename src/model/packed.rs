//! A micro-batch without padding: every sequence's real tokens back to back (a rejected
//! sequence's leading tokens shared with its chosen sequence stored once), then the rows that
//! stand for the padding (see [`Padding`]), and the attention that runs such a stream (see
//! `Opt::forward_packed`, `Llama::forward_packed`).

use super::gathered::Gathered;
use super::layers::{apply_rope, attention, split_heads, AttnBias};
use super::rope::Rope;
use crate::ops::TableLookup;
use candle_core::{DType, Device, Result, Tensor};
use std::cell::RefCell;
use std::ops::Range;

/// How a packed sequence represents the padding positions of the padded batch that the
/// metrics count (positions `real..len-1`; the last position is never counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// One row stands for all of them (exact when every padding position of a row has the
    /// same input, position id and keys, as in OPT); its `logit_weights` entry counts them.
    StandIn,
    /// One row per padding position, at that position (rotary models: transformers gives
    /// padding the positions `real..len`, so each padding position has its own hidden state).
    Explicit,
}

impl Padding {
    /// Padding rows for a sequence of `real` tokens in a batch padded to `len`.
    pub fn rows(self, real: usize, len: usize) -> usize {
        let counted = (len - 1).saturating_sub(real);
        match self {
            Padding::StandIn => counted.min(1),
            Padding::Explicit => counted,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Segment {
    /// First row of this sequence's own real rows in the packed stream.
    pub offset: usize,
    /// Real (non-padding) tokens in this segment's own rows.
    pub real: usize,
    /// Padding rows (see [`Padding`]), at positions right after the real tokens.
    pub pad: usize,
    /// First padding row, counted from the start of the stream's padding block (stream row
    /// `Packed::real_rows + pad_offset`).
    pub pad_offset: usize,
    /// Rows of an earlier segment that hold this sequence's first tokens (the prompt a
    /// rejected answer shares with its chosen one); the own rows continue after them.
    pub prefix: Option<Prefix>,
}

/// `len` rows from `offset` on, read as the first `len` positions of a sequence.
#[derive(Debug, Clone, Copy)]
pub struct Prefix {
    pub offset: usize,
    pub len: usize,
}

impl Segment {
    /// Own rows: real tokens plus padding rows.
    pub fn len(&self) -> usize {
        self.real + self.pad
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions before the first own row.
    pub fn prefix_len(&self) -> usize {
        self.prefix.map_or(0, |p| p.len)
    }

    /// The sequence's real tokens: the attention keys of every one of its rows.
    pub fn keys(&self) -> usize {
        self.prefix_len() + self.real
    }

    /// The rows `[keys, ...]` of the real rows `[real_rows, ...]` of a packed stream that
    /// hold this sequence's real tokens in order: the shared prefix's, then its own.
    pub fn key_rows(&self, t: &Tensor) -> Result<Tensor> {
        let own = t.narrow(0, self.offset, self.real)?;
        match self.prefix {
            Some(p) => Tensor::cat(&[&t.narrow(0, p.offset, p.len)?, &own], 0),
            None => Ok(own),
        }
    }

    /// The row numbers `key_rows` reads, in order.
    pub fn key_row_indices(&self) -> impl Iterator<Item = usize> {
        let prefix = self.prefix.map_or(0..0, |p| p.offset..p.offset + p.len);
        prefix.chain(self.offset..self.offset + self.real)
    }

    /// Additive attention bias `[1, 1, rows, keys]` of own rows `rows` (real rows first, then
    /// padding rows): own row `i` sits at position `prefix_len + i` and sees the real tokens
    /// at positions `k <= i` (and `k > i - window` with a sliding window); padding is never a
    /// key. A padding row thus sees the real tokens its padded-batch position sees, and a
    /// stand-in (the first padding position) sees all of them.
    pub fn attention_bias(
        &self,
        rows: Range<usize>,
        window: Option<usize>,
        device: &Device,
    ) -> Result<AttnBias> {
        let (n, cols) = (rows.len(), self.keys());
        AttnBias::new(self.bias_data(rows, window), (1, n, cols), true, 1, device)
    }

    /// `attention_bias`'s values, row-major `[rows, keys]`.
    pub fn bias_data(&self, rows: Range<usize>, window: Option<usize>) -> Vec<f32> {
        let (n, cols) = (rows.len(), self.keys());
        let mut data = vec![f32::NEG_INFINITY; n * cols];
        for (r, i) in rows.enumerate() {
            let pos = self.prefix_len() + i;
            let hi = (pos + 1).min(cols);
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w)).min(hi);
            data[r * cols + lo..r * cols + hi].fill(0.0);
        }
        data
    }

    /// Position of every own row (real rows, then padding rows) in the sequence.
    pub fn positions(&self) -> Range<usize> {
        self.prefix_len()..self.prefix_len() + self.len()
    }
}

/// A micro-batch without padding: the real rows of every segment back to back (a rejected
/// sequence's shared prefix stored once, in its chosen sequence's rows), then the padding block,
/// every segment's padding rows. Nothing differentiates through padding rows (the loss reads
/// real rows only; the logit metrics are detached), so the models run them without a graph.
pub struct Packed {
    /// The `[total]` u32 token ids (`tokens.ids()`), as a lookup of the embedding table whose
    /// backward leaves out the padding block.
    pub tokens: TableLookup,
    pub segments: Vec<Segment>,
    pub total: usize,
    /// Rows before the padding block.
    pub real_rows: usize,
    /// How the padding rows were laid out (a model runs only the layout it is exact for).
    pub padding: Padding,
}

/// Maps a layer's q/k/v projections of some rows (heads not yet split) to their attention
/// output.
pub type AttendFn<'a> = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'a;

/// How a packed stream's segments attend.
enum Plan {
    /// One attention call per segment, each on exactly its rows (the CPU: no padding work,
    /// and a call costs nothing extra): the biases of the real rows and of the padding rows.
    PerSegment {
        real_bias: Vec<AttnBias>,
        pad_bias: Vec<Option<AttnBias>>,
    },
    /// A few calls for all segments, by groups of similar lengths (see [`Gathered`]): where
    /// each op is a kernel launch.
    Gathered {
        real: Option<Box<Gathered>>,
        pad: Option<Box<Gathered>>,
    },
}

/// Per-batch attention state of a packed stream, shared by every layer: segment masks, and
/// rotary tables by row for rotary models.
pub struct PackedAttention {
    segments: Vec<Segment>,
    real_rows: usize,
    pad_rows: usize,
    plan: Plan,
    /// Half cos/sin tables `[rows, r/2]` of the real rows and of the padding rows.
    rope: Option<[Tensor; 4]>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// Gemma's attention soft cap (see `layers::attention`).
    softcap: Option<f64>,
    compute: DType,
}

impl PackedAttention {
    /// `rope`: rotary positions (each row's position in its sequence); `None` where the model
    /// embeds positions itself.
    pub fn new(
        packed: &Packed,
        (heads, kv_heads, head_dim): (usize, usize, usize),
        window: Option<usize>,
        rope: Option<&Rope>,
        compute: DType,
    ) -> Result<Self> {
        let dev = packed.tokens.ids().device();
        let plan = if crate::ops::fused_kernels() && dev.is_cpu() {
            let mut real_bias = Vec::with_capacity(packed.segments.len());
            let mut pad_bias = Vec::with_capacity(packed.segments.len());
            for seg in &packed.segments {
                real_bias.push(seg.attention_bias(0..seg.real, window, dev)?);
                pad_bias.push(
                    (seg.pad > 0)
                        .then(|| seg.attention_bias(seg.real..seg.len(), window, dev))
                        .transpose()?,
                );
            }
            Plan::PerSegment {
                real_bias,
                pad_bias,
            }
        } else {
            let (real, padding) = (packed.real_rows, packed.total - packed.real_rows);
            Plan::Gathered {
                real: Gathered::new(
                    &packed.segments,
                    false,
                    window,
                    (real, real),
                    (heads, kv_heads),
                    dev,
                )?
                .map(Box::new),
                pad: Gathered::new(
                    &packed.segments,
                    true,
                    window,
                    (padding, real),
                    (heads, kv_heads),
                    dev,
                )?
                .map(Box::new),
            }
        };
        let (mut real_pos, mut pad_pos) = (Vec::new(), Vec::new());
        for seg in &packed.segments {
            let mut pos = seg.positions().map(|p| p as u32);
            real_pos.extend(pos.by_ref().take(seg.real));
            pad_pos.extend(pos);
        }
        let real_rows = packed.real_rows;
        let pad_rows = packed.total - real_rows;
        let rope = match rope {
            Some(rope) => {
                let longest = real_pos.iter().chain(&pad_pos).max().map_or(0, |&p| p + 1);
                let (cos, sin) = rope.tables(longest as usize, dev)?;
                let pick = |t: &Tensor, pos: Vec<u32>| -> Result<Tensor> {
                    let n = pos.len();
                    t.index_select(&Tensor::from_vec(pos, n, dev)?, 0)
                };
                Some([
                    pick(&cos, real_pos.clone())?,
                    pick(&sin, real_pos)?,
                    pick(&cos, pad_pos.clone())?,
                    pick(&sin, pad_pos)?,
                ])
            }
            None => None,
        };
        Ok(PackedAttention {
            segments: packed.segments.clone(),
            real_rows,
            pad_rows,
            plan,
            rope,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            softcap: None,
            compute,
        })
    }

    /// The scores' scale (head_dim^-1/2 unless set) and soft cap.
    pub fn with_scores(mut self, scale: f64, softcap: Option<f64>) -> Self {
        self.scale = scale;
        self.softcap = softcap;
        self
    }

    /// Rotary positions of q or k `[rows, h*d]` (the real rows, or the padding rows).
    fn rope(&self, t: &Tensor, pad: bool) -> Result<Tensor> {
        let Some(tables) = &self.rope else {
            return Ok(t.clone());
        };
        let (cos, sin) = if pad {
            (&tables[2], &tables[3])
        } else {
            (&tables[0], &tables[1])
        };
        let (rows, hd) = t.dims2()?;
        let d = self.head_dim;
        apply_rope(&t.reshape((1, rows, hd / d, d))?, cos, sin)?.reshape((rows, hd))
    }

    /// Each segment's queries (its real rows of `q`, or with `pad` its padding rows) against
    /// its keys (real rows of `k`/`v`), stacked in stream order.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, pad: bool) -> Result<Tensor> {
        let (real_bias, pad_bias) = match &self.plan {
            Plan::PerSegment {
                real_bias,
                pad_bias,
            } => (real_bias, pad_bias),
            Plan::Gathered { real, pad: padding } => {
                let Some(g) = (if pad { padding } else { real }) else {
                    candle_core::bail!("packed attention: no rows to attend");
                };
                let heads = (self.heads, self.kv_heads);
                return g.attend(q, k, v, heads, (self.scale, self.softcap), self.compute);
            }
        };
        let split = |t: Tensor, h: usize| split_heads(&t.unsqueeze(0)?, h);
        let mut outs = Vec::with_capacity(self.segments.len());
        for (i, seg) in self.segments.iter().enumerate() {
            let (start, n, bias) = match pad {
                false => (seg.offset, seg.real, &real_bias[i]),
                true => match &pad_bias[i] {
                    Some(b) => (seg.pad_offset, seg.pad, b),
                    None => continue,
                },
            };
            outs.push(
                attention(
                    &split(q.narrow(0, start, n)?, self.heads)?,
                    &split(seg.key_rows(k)?, self.kv_heads)?,
                    &split(seg.key_rows(v)?, self.kv_heads)?,
                    bias,
                    self.scale,
                    self.softcap,
                    self.compute,
                )?
                .squeeze(0)?,
            );
        }
        Tensor::cat(&outs, 0)
    }

    /// One decoder layer over a packed stream `x` `[total, e]`: `live` maps the real rows
    /// (recording the graph), then `frozen` (detached parameters) the padding rows, detached,
    /// whose attention reads this layer's keys and values of the real rows, detached. Each
    /// gets its rows and the attention of its q/k/v projections; `frozen`'s k/v are unused,
    /// as no row attends to padding (the Llama family's padding layer projects no k/v).
    pub fn layer(
        &self,
        x: &Tensor,
        live: impl FnOnce(&Tensor, &AttendFn) -> Result<Tensor>,
        frozen: impl FnOnce(&Tensor, &AttendFn) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (real, pad) = self.split_rows(x)?;
        let (real, pad) = self.layer_rows(&real, pad.as_ref(), live, frozen)?;
        self.join_rows(real, pad)
    }

    /// A stream `[total, ..]` as its real rows and (detached) padding rows, if any.
    pub fn split_rows(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let real = x.narrow(0, 0, self.real_rows)?;
        let pad = (self.pad_rows > 0)
            .then(|| {
                Ok::<_, candle_core::Error>(x.narrow(0, self.real_rows, self.pad_rows)?.detach())
            })
            .transpose()?;
        Ok((real, pad))
    }

    /// The inverse of `split_rows`.
    pub fn join_rows(&self, real: Tensor, pad: Option<Tensor>) -> Result<Tensor> {
        match pad {
            Some(pad) => Tensor::cat(&[&real, &pad], 0),
            None => Ok(real),
        }
    }

    /// `layer` on a stream held as its real rows and its padding rows: `pad` `None` runs the
    /// real rows alone (what a recomputation in backward needs: padding rows are never keys).
    pub fn layer_rows(
        &self,
        real: &Tensor,
        pad: Option<&Tensor>,
        live: impl FnOnce(&Tensor, &AttendFn) -> Result<Tensor>,
        frozen: impl FnOnce(&Tensor, &AttendFn) -> Result<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let kv = RefCell::new(None);
        let real = live(real, &|q, k, v| {
            let k = self.rope(k, false)?;
            if pad.is_some() {
                *kv.borrow_mut() = Some((k.detach(), v.detach()));
            }
            self.attend(&self.rope(q, false)?, &k, v, false)
        })?;
        let Some(pad) = pad else {
            return Ok((real, None));
        };
        let pad = frozen(&pad.detach(), &|q, _, _| {
            let kv = kv.borrow();
            let Some((k, v)) = kv.as_ref() else {
                candle_core::bail!("packed layer: padding attended before the real rows");
            };
            self.attend(&self.rope(q, true)?, k, v, true)
        })?;
        Ok((real, Some(pad.detach())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bias(seg: &Segment, window: Option<usize>) -> Vec<Vec<bool>> {
        let t = seg
            .attention_bias(0..seg.len(), window, &Device::Cpu)
            .unwrap()
            .bias;
        t.squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| x == 0.0).collect())
            .collect()
    }

    /// The padded batch's rule, row by row: query position i sees key j when j <= i, j is a
    /// real token, and i - j < window.
    fn padded_rule(real: usize, len: usize, window: Option<usize>) -> Vec<Vec<bool>> {
        (0..len)
            .map(|i| {
                (0..real)
                    .map(|j| j <= i && window.is_none_or(|w| i - j < w))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn segment_bias_matches_the_padded_rule() {
        for window in [None, Some(1), Some(3), Some(6)] {
            for (prefix, real, pad) in [(0, 5, 0), (0, 4, 5), (3, 2, 4), (2, 1, 1), (4, 3, 0)] {
                let seg = Segment {
                    offset: 7,
                    real,
                    pad,
                    pad_offset: 0,
                    prefix: (prefix > 0).then_some(Prefix {
                        offset: 0,
                        len: prefix,
                    }),
                };
                let all = padded_rule(prefix + real, prefix + real + pad, window);
                assert_eq!(
                    bias(&seg, window),
                    all[prefix..],
                    "{window:?} {prefix} {real} {pad}"
                );
            }
        }
    }

    #[test]
    fn a_padding_row_beyond_the_window_sees_nothing() {
        let seg = Segment {
            offset: 0,
            real: 2,
            pad: 4,
            pad_offset: 0,
            prefix: None,
        };
        let b = bias(&seg, Some(2));
        assert_eq!(b[3], vec![false, false]);
        assert_eq!(b[2], vec![false, true]);
    }

    #[test]
    fn padding_rows_per_layout() {
        assert_eq!(Padding::StandIn.rows(3, 8), 1);
        assert_eq!(Padding::Explicit.rows(3, 8), 4);
        assert_eq!(Padding::StandIn.rows(7, 8), 0);
        assert_eq!(Padding::Explicit.rows(7, 8), 0);
        assert_eq!(Padding::Explicit.rows(8, 8), 0);
    }
}
