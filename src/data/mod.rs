//! Preference data: finding the files (local files, folders and globs of shards, hub datasets),
//! reading rows (JSON Lines, JSON array, gzip, Parquet), TRL's prompt extraction and chat
//! templating, tokenizer loading, and TRL's ORPO `tokenize_row` with truncation.
//!
//! Self-contained: nothing here depends on other modules of the crate.

mod error;
mod parquet;
mod prompt;
mod rows;
pub mod show;
mod source;
mod stats;
mod template;
mod tokenize;
mod tokenizer;

use std::path::Path;

pub use error::{DataError, RowLoc, RowPos, SkipReason};
pub use prompt::{extract_prompt_list, extract_prompt_str, RawPair, RowFormat, ALLOWED_ROLES};
pub use rows::{parse_rows, read_rows, read_rows_named, RawRow};
pub use source::{resolve, select_split, ColumnMap, DataSource, ResolvedSource, SourceFile};
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
    /// Where it came from: the file, or a description of the folder, glob or hub dataset.
    pub source: String,
    /// "explicit" | "implicit" | "conversational" | "mixed".
    pub format: String,
    pub pairs: Vec<TokenizedPair>,
    pub stats: DataStats,
    /// The files read, in order (hub files by their path in the repository).
    pub files: Vec<String>,
    /// Where each kept pair came from (`file:line`, `file[i]`, `file row i`), parallel to
    /// `pairs`.
    pub locations: Vec<String>,
}

impl Dataset {
    /// The data set's description without its pairs, for the parts of a split.
    fn clone_empty(&self) -> Dataset {
        Dataset {
            source: self.source.clone(),
            format: self.format.clone(),
            pairs: Vec::new(),
            stats: DataStats::default(),
            files: self.files.clone(),
            locations: Vec::new(),
        }
    }
}

/// A row's texts and where it came from.
struct LocatedText {
    loc: RowLoc,
    format: RowFormat,
    text: PairText,
}

/// Renames the user's columns to `prompt` / `chosen` / `rejected`.
fn map_columns(value: serde_json::Value, cols: &ColumnMap) -> serde_json::Value {
    if cols.is_default() {
        return value;
    }
    let serde_json::Value::Object(mut obj) = value else {
        return value;
    };
    let mut out = serde_json::Map::new();
    for (canonical, column) in cols.pairs() {
        if let Some(v) = obj.remove(column) {
            out.insert(canonical.to_string(), v);
        }
    }
    serde_json::Value::Object(out)
}

/// Adds the row's columns (as read, before any renaming) to a "missing" error, so a data set
/// with other column names gets told how to map them.
fn explain_missing(e: DataError, columns: &[String], cols: &ColumnMap) -> DataError {
    let DataError::Field { loc, field, msg } = e else {
        return e;
    };
    let canonical = cols
        .pairs()
        .into_iter()
        .find(|(_, c)| *c == field)
        .map(|(k, _)| k);
    match canonical {
        Some(k) if msg == "missing" && !columns.is_empty() => {
            let names: Vec<&str> = columns.iter().map(String::as_str).collect();
            DataError::Field {
                loc,
                field,
                msg: format!(
                    "missing (the row has columns: {}; name yours with data.{k}_column)",
                    names.join(", ")
                ),
            }
        }
        _ => DataError::Field { loc, field, msg },
    }
}

fn row_to_text(row: RawRow, tok: &Tokenizer, cols: &ColumnMap) -> Result<LocatedText, DataError> {
    let columns: Vec<String> = row
        .value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    // A prompt column named in the config must be there: without it the row would silently
    // become an implicit-prompt pair.
    if cols.prompt != "prompt" && !columns.is_empty() && !columns.contains(&cols.prompt) {
        let e = DataError::field(&row.loc, &cols.prompt, "missing");
        return Err(explain_missing(e, &columns, cols));
    }
    let value = map_columns(row.value, cols);
    let rename = |e: DataError| {
        let e = cols.pairs().into_iter().fold(e, |e, (canonical, column)| {
            e.rename_field(canonical, column)
        });
        explain_missing(e, &columns, cols)
    };
    let (format, raw) = prompt::parse_row(&row.loc, &value).map_err(rename)?;
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
                    msg: "conversational row (message lists) but the model's tokenizer has no chat template (chat_template.jinja or tokenizer_config.json `chat_template`); give one with data.chat_template".into(),
                });
            };
            // It would render every answer as nothing: "identical answers" would hide why.
            if tok.chat_template().is_some_and(|s| s.trim().is_empty()) {
                return Err(DataError::Row {
                    loc: row.loc,
                    msg:
                        "conversational row (message lists) but the model's chat template is empty"
                            .into(),
                });
            }
            let t = tpl
                .apply_to_pair(&prompt, &chosen, &rejected)
                .map_err(|e| {
                    rename(DataError::Template {
                        loc: row.loc.clone(),
                        field: e.field.to_string(),
                        msg: e.msg,
                    })
                })?;
            PairText {
                prompt: t.prompt,
                chosen: t.chosen,
                rejected: t.rejected,
            }
        }
    };
    Ok(LocatedText {
        loc: row.loc,
        format,
        text,
    })
}

/// Reads and validates every row of every file of `src`; returns the texts, the number of rows
/// and the resolved source.
fn source_texts(
    src: &DataSource,
    tok: &Tokenizer,
) -> Result<(Vec<LocatedText>, usize, ResolvedSource), DataError> {
    let resolved = source::resolve(src)?;
    let mut out = Vec::new();
    let mut n = 0;
    for f in &resolved.files {
        let rows = read_rows_named(&f.path, &f.name)?;
        n += rows.len();
        out.reserve(rows.len());
        for row in rows {
            out.push(row_to_text(row, tok, &src.columns)?);
        }
    }
    if n == 0 {
        return Err(DataError::Empty {
            file: resolved.description,
        });
    }
    Ok((out, n, resolved))
}

/// Splits `eval_size` pairs (below 1, that fraction of them rounded up, as datasets'
/// `train_test_split(test_size)`) off `data` for evaluation, chosen by a permutation seeded
/// with `seed`; both parts keep file order. At least one pair must remain for training.
pub fn split_eval(
    data: Dataset,
    eval_size: f64,
    seed: u64,
) -> Result<(Dataset, Dataset), DataError> {
    let n = data.pairs.len();
    let n_eval = if eval_size < 1.0 {
        (n as f64 * eval_size).ceil() as usize
    } else {
        eval_size as usize
    };
    if n_eval == 0 || n_eval >= n {
        return Err(DataError::Options(format!(
            "data.eval_size = {eval_size} holds out {n_eval} of the {n} training pairs of {}; \
             at least one must be held out and one left to train on",
            data.source
        )));
    }
    let mut held = vec![false; n];
    for i in crate::train::randperm::torch_randperm(n, seed)
        .into_iter()
        .take(n_eval)
    {
        held[i] = true;
    }
    let mut train = Dataset {
        pairs: Vec::with_capacity(n - n_eval),
        locations: Vec::with_capacity(n - n_eval),
        ..data.clone_empty()
    };
    let mut eval = Dataset {
        source: format!(
            "{} ({n_eval} pairs held out by data.eval_size)",
            data.source
        ),
        pairs: Vec::with_capacity(n_eval),
        locations: Vec::with_capacity(n_eval),
        ..data.clone_empty()
    };
    for ((pair, loc), is_held) in data.pairs.into_iter().zip(data.locations).zip(held) {
        let part = if is_held { &mut eval } else { &mut train };
        part.pairs.push(pair);
        part.locations.push(loc);
    }
    let skipped = data.stats.skipped_examples.clone();
    train.stats = DataStats {
        rows: data.stats.rows - n_eval,
        skipped: data.stats.skipped.clone(),
        skipped_examples: skipped,
        ..DataStats::new(0, &train.pairs, &[])
    };
    eval.stats = DataStats::new(n_eval, &eval.pairs, &[]);
    Ok((train, eval))
}

/// Gives `tok` the template of `data.chat_template` when the config sets one: the text of the
/// file it names, or the template itself.
pub fn apply_chat_template_setting(
    tok: &mut Tokenizer,
    setting: Option<&str>,
) -> Result<(), DataError> {
    let Some(value) = setting else {
        return Ok(());
    };
    let path = Path::new(value);
    if path.is_file() {
        let source = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        tok.set_chat_template(&source, &format!("data.chat_template {}", path.display()))
    } else if value.contains("{{") || value.contains("{%") {
        tok.set_chat_template(value, "data.chat_template")
    } else {
        // Checked here, when the template is used, not when a config is read: a checkpoint's
        // saved config may name a file since moved (the pairs' fingerprint decides then).
        Err(DataError::Options(format!(
            "data.chat_template: `{value}` is neither a file nor a Jinja template"
        )))
    }
}

/// Reads and validates every row of `path` and returns the texts TRL would tokenize
/// (prompt extracted, chat template applied), in file order.
pub fn load_pairs_text(path: &Path, tok: &Tokenizer) -> Result<Vec<PairText>, DataError> {
    load_source_text(&DataSource::new(path.display().to_string()), tok)
}

/// [`load_pairs_text`] for any source (folder, glob, Parquet, hub dataset, column mapping).
pub fn load_source_text(src: &DataSource, tok: &Tokenizer) -> Result<Vec<PairText>, DataError> {
    Ok(source_texts(src, tok)?
        .0
        .into_iter()
        .map(|t| t.text)
        .collect())
}

/// Loads, validates and tokenizes a preference data set from a file, folder, glob or hub
/// dataset id (split `train`, usual column names); see [`load_source`].
pub fn load_dataset(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<Dataset, DataError> {
    load_source(&DataSource::new(path.display().to_string()), tok, opts)
}

/// Tokenizes texts on every core; results stay in input order.
fn tokenize_all(
    texts: &[LocatedText],
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Vec<Result<TokenizedPair, SkipReason>> {
    let one = |t: &LocatedText| {
        if t.text.chosen == t.text.rejected {
            return Err(SkipReason::IdenticalAnswers);
        }
        tokenize_pair(&t.text, tok, opts)
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(16);
    if threads <= 1 || texts.len() < 64 {
        return texts.iter().map(one).collect();
    }
    let chunk = texts.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}

/// Loads, validates and tokenizes a preference data set. Every row is validated before any is
/// tokenized; pairs that cannot fit `max_length`, or whose answers are identical, are skipped
/// and counted in the stats. A data set with no rows, or whose every pair is skipped, is an
/// error.
pub fn load_source(
    src: &DataSource,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<Dataset, DataError> {
    if opts.max_length == 0 {
        return Err(DataError::Options("max_length must be at least 1".into()));
    }
    let (texts, rows, resolved) = source_texts(src, tok)?;
    let format = match texts.first() {
        Some(first) if texts.iter().all(|t| t.format == first.format) => first.format.as_str(),
        _ => "mixed",
    }
    .to_string();
    let results = tokenize_all(&texts, tok, opts);
    let mut pairs = Vec::with_capacity(texts.len());
    let mut locations = Vec::with_capacity(texts.len());
    let mut skips = Vec::new();
    for (t, r) in texts.into_iter().zip(results) {
        match r {
            Ok(p) => {
                pairs.push(p);
                locations.push(t.loc.to_string());
            }
            Err(reason) => {
                tracing::debug!(row = %t.loc, %reason, "skipping pair");
                skips.push((t.loc.to_string(), reason));
            }
        }
    }
    let source = resolved.description;
    if pairs.is_empty() {
        if skips
            .iter()
            .all(|(_, r)| *r == SkipReason::IdenticalAnswers)
        {
            return Err(DataError::BadFile {
                file: source,
                msg: format!(
                    "every pair ({}) has identical chosen and rejected answers; nothing to learn",
                    skips.len()
                ),
            });
        }
        return Err(DataError::NothingKept {
            file: source,
            max_length: opts.max_length,
            skipped: skips.len(),
        });
    }
    let stats = DataStats::new(rows, &pairs, &skips);
    if !skips.is_empty() {
        let why: Vec<String> = stats
            .skipped
            .iter()
            .map(|(r, n)| format!("{n} {}", r.as_str()))
            .collect();
        tracing::warn!(
            source = %source,
            skipped = skips.len(),
            "some pairs were skipped ({}; max_length {})",
            why.join(", "),
            opts.max_length
        );
    }
    Ok(Dataset {
        source,
        format,
        pairs,
        stats,
        files: resolved.files.into_iter().map(|f| f.name).collect(),
        locations,
    })
}
