//! Data set statistics for `orpo data` and for logging.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::error::SkipReason;
use super::TokenizedPair;

/// Summary of a token-length distribution (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LengthStats {
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
}

impl LengthStats {
    /// Stats of `values`; all zero when empty.
    pub fn from_values(values: &[usize]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let rank = |p: f64| {
            let k = (p / 100.0 * v.len() as f64).ceil() as usize;
            v[k.clamp(1, v.len()) - 1]
        };
        LengthStats {
            min: v[0],
            median: rank(50.0),
            p95: rank(95.0),
            max: v[v.len() - 1],
        }
    }

    fn to_json(self) -> Value {
        json!({"min": self.min, "median": self.median, "p95": self.p95, "max": self.max})
    }
}

/// What loading a data set found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    /// Rows read from the file.
    pub rows: usize,
    /// Pairs kept after tokenisation.
    pub kept: usize,
    /// Kept pairs that were truncated.
    pub truncated: usize,
    /// Skipped pairs by reason.
    pub skipped: BTreeMap<SkipReason, usize>,
    /// The first few skipped rows: (location, reason).
    pub skipped_examples: Vec<(String, SkipReason)>,
    /// Prompt tokens (BOS included) of kept pairs.
    pub prompt: LengthStats,
    /// Chosen answer tokens (EOS included).
    pub chosen: LengthStats,
    /// Rejected answer tokens (EOS included).
    pub rejected: LengthStats,
    /// Longer of the chosen and rejected sequences (prompt + answer) of each pair.
    pub total: LengthStats,
}

/// How many skipped rows [`DataStats`] names individually.
pub const MAX_SKIPPED_EXAMPLES: usize = 5;

fn answer_len(labels: &[i64]) -> usize {
    labels
        .iter()
        .filter(|&&l| l != super::tokenize::IGNORE_INDEX)
        .count()
}

impl DataStats {
    /// Builds the stats from the kept pairs and the skip records.
    pub fn new(rows: usize, pairs: &[TokenizedPair], skips: &[(String, SkipReason)]) -> Self {
        let mut skipped = BTreeMap::new();
        for (_, r) in skips {
            *skipped.entry(*r).or_insert(0) += 1;
        }
        let lens =
            |f: &dyn Fn(&TokenizedPair) -> usize| -> Vec<usize> { pairs.iter().map(f).collect() };
        DataStats {
            rows,
            kept: pairs.len(),
            truncated: pairs.iter().filter(|p| p.truncated).count(),
            skipped,
            skipped_examples: skips.iter().take(MAX_SKIPPED_EXAMPLES).cloned().collect(),
            prompt: LengthStats::from_values(&lens(&|p| p.prompt_input_ids.len())),
            chosen: LengthStats::from_values(&lens(&|p| answer_len(&p.chosen_labels))),
            rejected: LengthStats::from_values(&lens(&|p| answer_len(&p.rejected_labels))),
            total: LengthStats::from_values(&lens(&|p| {
                p.chosen_input_ids.len().max(p.rejected_input_ids.len())
            })),
        }
    }

    /// Total number of skipped pairs.
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    pub fn to_json(&self) -> Value {
        let skipped: serde_json::Map<String, Value> = self
            .skipped
            .iter()
            .map(|(r, n)| (r.as_str().to_string(), json!(n)))
            .collect();
        let examples: Vec<Value> = self
            .skipped_examples
            .iter()
            .map(|(loc, r)| json!({"row": loc, "reason": r.as_str()}))
            .collect();
        json!({
            "rows": self.rows,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped": self.skipped_total(),
            "skipped_by_reason": skipped,
            "skipped_examples": examples,
            "tokens": {
                "prompt": self.prompt.to_json(),
                "chosen": self.chosen.to_json(),
                "rejected": self.rejected.to_json(),
                "total": self.total.to_json(),
            }
        })
    }

    /// Human-readable summary.
    pub fn render(&self) -> String {
        let mut s = format!(
            "rows read:      {}\npairs kept:     {}\ntruncated:      {}\nskipped:        {}\n",
            self.rows,
            self.kept,
            self.truncated,
            self.skipped_total()
        );
        for (r, n) in &self.skipped {
            s.push_str(&format!("  {n:>6}  {r}\n"));
        }
        for (loc, r) in &self.skipped_examples {
            s.push_str(&format!("  e.g. {loc}: {r}\n"));
        }
        s.push_str("tokens per pair     min  median     p95     max\n");
        for (name, l) in [
            ("prompt", self.prompt),
            ("chosen answer", self.chosen),
            ("rejected answer", self.rejected),
            ("total (longer)", self.total),
        ] {
            s.push_str(&format!(
                "  {name:<16}{:>6}  {:>6}  {:>6}  {:>6}\n",
                l.min, l.median, l.p95, l.max
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<usize> = (1..=20).collect();
        let s = LengthStats::from_values(&v);
        assert_eq!((s.min, s.median, s.p95, s.max), (1, 10, 19, 20));
        let s = LengthStats::from_values(&[7]);
        assert_eq!((s.min, s.median, s.p95, s.max), (7, 7, 7, 7));
        assert_eq!(LengthStats::from_values(&[]), LengthStats::default());
    }
}
