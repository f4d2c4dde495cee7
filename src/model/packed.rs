//! A micro-batch without padding: every sequence's real tokens back to back, each optionally
//! followed by one stand-in for its padding, and a rejected sequence's leading tokens shared
//! with its chosen sequence stored once (see `Opt::forward_packed`).

use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Segment {
    /// First row of this sequence's own rows in the packed stream.
    pub offset: usize,
    /// Real (non-padding) tokens in this segment's own rows.
    pub real: usize,
    /// Whether a padding stand-in follows the real tokens.
    pub pad_rep: bool,
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
    /// Own rows: real tokens plus the padding stand-in.
    pub fn len(&self) -> usize {
        self.real + usize::from(self.pad_rep)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions before the first own row.
    pub fn prefix_len(&self) -> usize {
        self.prefix.map_or(0, |p| p.len)
    }
}

pub struct Packed {
    /// `[total]` u32 token ids.
    pub ids: Tensor,
    pub segments: Vec<Segment>,
    pub total: usize,
}
