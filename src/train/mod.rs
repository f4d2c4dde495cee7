//! Training: batching plan, collation, forward + ORPO loss, AdamW, schedules, checkpoints.

pub mod adamw8bit;
#[cfg(feature = "cuda")]
mod adamw8bit_cuda;
#[cfg(feature = "cuda")]
mod adamw_cuda;
pub mod batch;
pub mod best;
pub mod checkpoint;
pub mod forward;
pub mod grad_norm;
pub mod log;
pub mod loss;
pub(crate) mod odds_coefs;
pub mod optim;
pub mod optim_state;
pub mod plan;
pub mod plot;
pub mod randperm;
mod report;
pub mod resume;
mod run;
pub mod run_dir;
mod run_evals;
mod run_state;
pub mod same_run;
pub mod save_dtype;
pub mod schedule;
mod setup;
pub mod shard;
#[cfg(feature = "cuda")]
mod sum_sq_cuda;
pub mod tensorboard;
mod trainer;

pub use log::{EvalEntry, LogEntry};
pub use setup::{check_data_fits, load_model, load_splits, load_trainer, EvalSetup, LoadedModel};
pub use trainer::{TrainSummary, Trainer};
