//! orpo: ORPO (Odds Ratio Preference Optimization) fine-tuning for causal language models,
//! reproducing Hugging Face TRL's `ORPOTrainer` numbers.
//!
//! Layout: `config` (TOML + overrides), `data` (formats, templates, tokenisation), `model`
//! (trainable architectures), `train` (loss, optimizer, schedule, loop, checkpoints), `eval`.

pub mod config;
pub mod data;
pub mod device;
pub mod dynamic_map;
pub mod eval;
pub mod hub;
pub mod kernel_check;
pub mod memory;
pub mod merge;
pub mod model;
pub mod ops;
pub mod train;

mod error;
pub use error::Error;
