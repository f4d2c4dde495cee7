//! Errors reading and building a model: the file or hub id they concern and what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    #[error("model `{id}`: {msg}")]
    Hub { id: String, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
