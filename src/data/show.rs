//! `orpo data --show N`: examples rendered exactly as the model sees them, with the prompt /
//! answer boundary and the label mask visible.
//!
//! Text form: the masked part of a sequence (label -100: prompt, BOS) is written between
//! `⟦` and `⟧`, the trained part (answer, EOS) between `«` and `»`. With token ids, every
//! token is written `id:"piece"`, masked ones prefixed by `-`.

use serde_json::{json, Value};

use super::tokenize::IGNORE_INDEX;
use super::tokenizer::Tokenizer;
use super::{Dataset, TokenizedPair};

/// Opening and closing marks of the masked (prompt) and trained (answer) parts.
pub const MASKED: (&str, &str) = ("⟦", "⟧");
pub const TRAINED: (&str, &str) = ("«", "»");

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.inner()
        .decode(ids, false)
        .unwrap_or_else(|e| format!("<cannot decode: {e}>"))
}

/// Number of leading masked positions of a sequence.
fn masked_len(labels: &[i64]) -> usize {
    labels.iter().take_while(|&&l| l == IGNORE_INDEX).count()
}

fn split_seq<'a>(ids: &'a [u32], labels: &[i64]) -> (&'a [u32], &'a [u32]) {
    ids.split_at(masked_len(labels).min(ids.len()))
}

fn token_list(tok: &Tokenizer, ids: &[u32], labels: &[i64]) -> String {
    ids.iter()
        .zip(labels)
        .map(|(&id, &l)| {
            let piece = decode(tok, &[id]);
            let mark = if l == IGNORE_INDEX { "-" } else { "" };
            format!("{mark}{id}:{piece:?}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn render_seq(
    out: &mut String,
    name: &str,
    tok: &Tokenizer,
    ids: &[u32],
    labels: &[i64],
    with_ids: bool,
) {
    let (p, a) = split_seq(ids, labels);
    out.push_str(&format!(
        "{name}: {} tokens = {} masked (prompt, label -100) + {} trained (answer)\n",
        ids.len(),
        p.len(),
        a.len()
    ));
    out.push_str(&format!(
        "{}{}{}{}{}{}\n",
        MASKED.0,
        decode(tok, p),
        MASKED.1,
        TRAINED.0,
        decode(tok, a),
        TRAINED.1
    ));
    if with_ids {
        out.push_str(&format!("  ids: {}\n", token_list(tok, ids, labels)));
    }
}

/// Renders kept pair `i` of `ds` as text.
pub fn render_example(ds: &Dataset, i: usize, tok: &Tokenizer, with_ids: bool) -> String {
    let Some(p) = ds.pairs.get(i) else {
        return String::new();
    };
    let loc = ds.locations.get(i).map(String::as_str).unwrap_or("?");
    let mut out = format!(
        "--- example {} of {} ({loc}){} ---\n",
        i + 1,
        ds.pairs.len(),
        if p.truncated { ", truncated" } else { "" }
    );
    render_seq(
        &mut out,
        "chosen",
        tok,
        &p.chosen_input_ids,
        &p.chosen_labels,
        with_ids,
    );
    render_seq(
        &mut out,
        "rejected",
        tok,
        &p.rejected_input_ids,
        &p.rejected_labels,
        with_ids,
    );
    out
}

fn seq_json(tok: &Tokenizer, ids: &[u32], labels: &[i64]) -> Value {
    let (p, a) = split_seq(ids, labels);
    json!({
        "input_ids": ids,
        "labels": labels,
        "masked_tokens": p.len(),
        "trained_tokens": a.len(),
        "decoded_masked": decode(tok, p),
        "decoded_trained": decode(tok, a),
    })
}

/// Kept pair `i` of `ds` as JSON: the texts after templating, ids, labels and decoded parts.
pub fn example_json(ds: &Dataset, i: usize, tok: &Tokenizer) -> Value {
    let Some(p): Option<&TokenizedPair> = ds.pairs.get(i) else {
        return Value::Null;
    };
    json!({
        "location": ds.locations.get(i),
        "truncated": p.truncated,
        "prompt": p.text.prompt,
        "chosen_text": p.text.chosen,
        "rejected_text": p.text.rejected,
        "prompt_input_ids": p.prompt_input_ids,
        "chosen": seq_json(tok, &p.chosen_input_ids, &p.chosen_labels),
        "rejected": seq_json(tok, &p.rejected_input_ids, &p.rejected_labels),
    })
}
