//! A micro-batch without padding: every sequence's real tokens back to back, each optionally
//! followed by one stand-in for its padding (see `Opt::forward_packed`).

use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Segment {
    /// First row of this sequence in the packed stream.
    pub offset: usize,
    /// Real (non-padding) tokens.
    pub real: usize,
    /// Whether a padding stand-in follows the real tokens.
    pub pad_rep: bool,
}

impl Segment {
    pub fn len(&self) -> usize {
        self.real + usize::from(self.pad_rep)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Packed {
    /// `[total]` u32 token ids.
    pub ids: Tensor,
    pub segments: Vec<Segment>,
    pub total: usize,
}
