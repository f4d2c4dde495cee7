//! Preference data: reading rows (JSON Lines / JSON array), TRL's prompt extraction and chat
//! templating, tokenizer loading, and TRL's ORPO `tokenize_row` with truncation.
//!
//! Self-contained: nothing here depends on other modules of the crate.

mod error;
mod prompt;
mod rows;
mod stats;
mod template;
mod tokenize;
mod tokenizer;

use std::path::Path;

pub use error::{DataError, RowLoc, RowPos, SkipReason};
pub use prompt::{extract_prompt_list, extract_prompt_str, RawPair, RowFormat, ALLOWED_ROLES};
pub use rows::{parse_rows, read_rows, RawRow};
pub use stats::{DataStats, LengthStats};
pub use template::ChatTemplate;
pub use tokenize::{tokenize_pair, IGNORE_INDEX};
pub use tokenizer::Tokenizer;

/// A pair's texts after prompt extraction and chat templating (what TRL tokenizes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairText {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// One tokenized pair, as TRL's `tokenize_row` produces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub prompt_input_ids: Vec<u32>,
    pub chosen_input_ids: Vec<u32>,
    /// `chosen_input_ids` with the prompt positions set to -100.
    pub chosen_labels: Vec<i64>,
    pub rejected_input_ids: Vec<u32>,
    pub rejected_labels: Vec<i64>,
    /// Whether the prompt or an answer was cut to fit `max_length`.
    pub truncated: bool,
    pub text: PairText,
}

/// Length limits, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOptions {
    pub max_length: usize,
    pub max_prompt_length: usize,
}

/// A loaded, validated and tokenized data set.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it came from.
    pub source: String,
    /// "explicit" | "implicit" | "conversational" | "mixed".
    pub format: String,
    pub pairs: Vec<TokenizedPair>,
    pub stats: DataStats,
}

/// A row's texts and where it came from.
struct LocatedText {
    loc: RowLoc,
    format: RowFormat,
    text: PairText,
}

fn rows_to_texts(path: &Path, tok: &Tokenizer) -> Result<(Vec<LocatedText>, usize), DataError> {
    let rows = read_rows(path)?;
    if rows.is_empty() {
        return Err(DataError::Empty {
            file: path.display().to_string(),
        });
    }
    let n = rows.len();
    let mut out = Vec::with_capacity(n);
    for row in rows {
        let (format, raw) = prompt::parse_row(&row.loc, &row.value)?;
        let text = match raw {
            RawPair::Text {
                prompt,
                chosen,
                rejected,
            } => PairText {
                prompt,
                chosen,
                rejected,
            },
            RawPair::Chat {
                prompt,
                chosen,
                rejected,
            } => {
                let Some(tpl) = tok.template() else {
                    return Err(DataError::Row {
                        loc: row.loc,
                        msg: "conversational row (message lists) but the model's tokenizer has no chat template (chat_template.jinja or tokenizer_config.json `chat_template`)".into(),
                    });
                };
                let t = tpl
                    .apply_to_pair(&prompt, &chosen, &rejected)
                    .map_err(|e| DataError::Template {
                        loc: row.loc.clone(),
                        field: e.field.to_string(),
                        msg: e.msg,
                    })?;
                PairText {
                    prompt: t.prompt,
                    chosen: t.chosen,
                    rejected: t.rejected,
                }
            }
        };
        out.push(LocatedText {
            loc: row.loc,
            format,
            text,
        });
    }
    Ok((out, n))
}

/// Reads and validates every row of `path` and returns the texts TRL would tokenize
/// (prompt extracted, chat template applied), in file order.
pub fn load_pairs_text(path: &Path, tok: &Tokenizer) -> Result<Vec<PairText>, DataError> {
    Ok(rows_to_texts(path, tok)?
        .0
        .into_iter()
        .map(|t| t.text)
        .collect())
}

/// Loads, validates and tokenizes a preference data set. Every row is validated before any is
/// tokenized; pairs that cannot fit `max_length` are skipped and counted in the stats. A data
/// set with no rows, or whose every pair is skipped, is an error.
pub fn load_dataset(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<Dataset, DataError> {
    if opts.max_length == 0 {
        return Err(DataError::Options("max_length must be at least 1".into()));
    }
    let (texts, rows) = rows_to_texts(path, tok)?;
    let format = match texts.first() {
        Some(first) if texts.iter().all(|t| t.format == first.format) => first.format.as_str(),
        _ => "mixed",
    }
    .to_string();
    let mut pairs = Vec::with_capacity(texts.len());
    let mut skips = Vec::new();
    for t in texts {
        match tokenize_pair(&t.text, tok, opts) {
            Ok(p) => pairs.push(p),
            Err(reason) => {
                tracing::debug!(row = %t.loc, %reason, "skipping pair");
                skips.push((t.loc.to_string(), reason));
            }
        }
    }
    let source = path.display().to_string();
    if pairs.is_empty() {
        return Err(DataError::NothingKept {
            file: source,
            max_length: opts.max_length,
            skipped: skips.len(),
        });
    }
    if !skips.is_empty() {
        tracing::warn!(
            file = %source,
            skipped = skips.len(),
            "some pairs do not fit max_length {} and were skipped",
            opts.max_length
        );
    }
    let stats = DataStats::new(rows, &pairs, &skips);
    Ok(Dataset {
        source,
        format,
        pairs,
        stats,
    })
}
