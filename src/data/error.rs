//! Errors of the data module, and the reasons a pair is skipped.

use std::fmt;
use std::path::PathBuf;

/// Where a row came from: a file and a 1-based line (JSON Lines), a 0-based element index
/// (JSON array) or a 0-based row index (Parquet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLoc {
    pub file: String,
    pub pos: RowPos,
}

/// Position of a row inside its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowPos {
    /// 1-based line number of a JSON Lines file.
    Line(usize),
    /// 0-based element index of a JSON array file.
    Element(usize),
    /// 0-based row index of a Parquet file.
    Row(usize),
}

impl fmt::Display for RowLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            RowPos::Line(n) => write!(f, "{}:{}", self.file, n),
            RowPos::Element(i) => write!(f, "{}[{}]", self.file, i),
            RowPos::Row(i) => write!(f, "{} row {}", self.file, i),
        }
    }
}

/// Every error the data module reports. User-input errors name the file, the line (or array
/// element) and the field.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: invalid JSON: {msg}")]
    InvalidFile { file: String, msg: String },
    #[error("{file}: {msg}")]
    BadFile { file: String, msg: String },
    #[error("{loc}: {msg}")]
    BadRow { loc: RowLoc, msg: String },
    #[error("data source `{location}`: {msg}")]
    Source { location: String, msg: String },
    #[error("{loc}: invalid JSON: {msg}")]
    InvalidJson { loc: RowLoc, msg: String },
    #[error("{loc}: field `{field}`: {msg}")]
    Field {
        loc: RowLoc,
        field: String,
        msg: String,
    },
    #[error("{loc}: {msg}")]
    Row { loc: RowLoc, msg: String },
    #[error("{loc}: chat template failed to render `{field}`: {msg}")]
    Template {
        loc: RowLoc,
        field: String,
        msg: String,
    },
    #[error("{file}: the data set is empty")]
    Empty { file: String },
    #[error("{file}: no pair fits max_length {max_length} (all {skipped} pairs skipped)")]
    NothingKept {
        file: String,
        max_length: usize,
        skipped: usize,
    },
    #[error("tokenizer in {dir}: {msg}")]
    Tokenizer { dir: PathBuf, msg: String },
    #[error("chat template: {0}")]
    TemplateSyntax(String),
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("invalid data options: {0}")]
    Options(String),
}

impl DataError {
    /// Renames a canonical field (`prompt`, `chosen`, `rejected`, and their sub-paths such as
    /// `chosen[1].content`) to the column it was read from, so errors name the user's column.
    pub(crate) fn rename_field(mut self, canonical: &str, column: &str) -> Self {
        if canonical == column {
            return self;
        }
        if let DataError::Field { field, .. } | DataError::Template { field, .. } = &mut self {
            if let Some(rest) = field.strip_prefix(canonical) {
                if rest.is_empty() || rest.starts_with('[') || rest.starts_with('.') {
                    *field = format!("{column}{rest}");
                }
            }
        }
        self
    }

    pub(crate) fn field(loc: &RowLoc, field: &str, msg: impl Into<String>) -> Self {
        DataError::Field {
            loc: loc.clone(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }
}

/// Why a pair was left out of the data set (counted, not an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// The prompt alone fills `max_length` (after prompt truncation), leaving no room for an
    /// answer.
    PromptTooLong,
    /// An answer would be empty after truncation.
    EmptyAnswer,
    /// Chosen and rejected prompt tokens differ by more than a merged boundary token (TRL
    /// raises an error here).
    PromptMismatch,
    /// The tokenizer failed on this text.
    EncodeFailed,
    /// Chosen and rejected answers are the same text: nothing to prefer.
    IdenticalAnswers,
}

impl SkipReason {
    /// Stable snake_case name, used in stats JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            SkipReason::PromptTooLong => "prompt_too_long",
            SkipReason::EmptyAnswer => "empty_answer",
            SkipReason::PromptMismatch => "prompt_mismatch",
            SkipReason::EncodeFailed => "encode_failed",
            SkipReason::IdenticalAnswers => "identical_answers",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            SkipReason::PromptTooLong => "prompt alone fills max_length",
            SkipReason::EmptyAnswer => "answer empty after truncation",
            SkipReason::PromptMismatch => {
                "chosen and rejected prompt tokens differ by more than one merged token"
            }
            SkipReason::EncodeFailed => "tokenizer failed on the text",
            SkipReason::IdenticalAnswers => "chosen and rejected answers are identical",
        };
        f.write_str(s)
    }
}
