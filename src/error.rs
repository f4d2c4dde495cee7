//! The library's error type. User mistakes (config, data, model files) are distinguished from
//! failures during a run so the binary can exit with 2 or 1.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Save(#[from] crate::train::checkpoint::SaveError),
    #[error("{0}")]
    Input(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("non-finite {what} at step {step}; stopping (the last checkpoint, if any, is intact)")]
    NonFinite { step: usize, what: &'static str },
    #[error("interrupted after step {step}; checkpoint written to {}; continue with `orpo train --config CONFIG --resume`", checkpoint.display())]
    Interrupted { step: usize, checkpoint: PathBuf },
    /// A self-check found results off (`orpo check-kernels`).
    #[error("{0}")]
    Check(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// 2 for input mistakes, 130 after an interruption, 1 for other failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Interrupted { .. } => 130,
            e if e.is_user_error() => 2,
            _ => 1,
        }
    }

    /// True when the input (config, data, model files, flags) is at fault: exit code 2.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Config(_) | Error::Data(_) | Error::Input(_) => true,
            Error::Model(e) => !matches!(e, crate::model::ModelError::Candle(_)),
            _ => false,
        }
    }
}
