//! Turning a config into a ready trainer: every input is loaded and checked here, before any
//! training starts, so mistakes surface in seconds rather than hours.

use super::trainer::Trainer;
use crate::config::Config;
use crate::data::{load_source, DataOptions, Tokenizer};
use crate::device::select_device;
use crate::model::{resolve_model_dir, CausalLm, ModelConfig};
use crate::Error;
use candle_core::Device;
use std::path::PathBuf;

pub struct LoadedModel {
    pub dir: PathBuf,
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
}

pub fn load_model(id: &str, revision: Option<&str>, device: &Device) -> Result<LoadedModel, Error> {
    let dir = resolve_model_dir(id, revision)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let model = CausalLm::load(&dir, device)?;
    Ok(LoadedModel {
        dir,
        model,
        tokenizer,
    })
}

pub fn data_options(config: &Config) -> DataOptions {
    DataOptions {
        max_length: config.data.max_length,
        max_prompt_length: config.data.max_prompt_length,
    }
}

/// Settings this version cannot honour are refused rather than silently ignored.
fn check_supported(config: &Config) -> Result<(), Error> {
    let refuse = |key: &str, why: &str| {
        Err(Error::Input(format!(
            "{key}: {why} is not supported by this version of orpo"
        )))
    };
    if config.lora.enabled {
        return refuse("lora.enabled", "LoRA training");
    }
    if config.model.dtype != crate::config::Dtype::F32 {
        return refuse("model.dtype", "bf16 compute");
    }
    if config.train.gradient_checkpointing {
        return refuse("train.gradient_checkpointing", "gradient checkpointing");
    }
    Ok(())
}

/// `data.max_length` must fit the model's position table (OPT's is learned and finite).
pub fn check_length(config: &Config, model: &ModelConfig) -> Result<(), Error> {
    match model.max_sequence_length() {
        Some(limit) if config.data.max_length > limit => Err(Error::Input(format!(
            "data.max_length = {} exceeds the model's max_position_embeddings ({limit}); set data.max_length <= {limit}",
            config.data.max_length
        ))),
        _ => Ok(()),
    }
}

pub fn load_trainer(config: &Config) -> Result<Trainer, Error> {
    config.validate_for_train()?;
    check_supported(config)?;
    let device = select_device(&config.model.device)?;
    let dir = resolve_model_dir(&config.model.id, config.model.revision.as_deref())?;
    check_length(config, &ModelConfig::from_dir(&dir)?)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let opts = data_options(config);
    let train_src = config
        .data
        .source(false)
        .ok_or_else(|| Error::Input("data.train is not set".into()))?;
    let train = load_source(&train_src, &tokenizer, &opts)?;
    if train.pairs.is_empty() {
        return Err(Error::Input(format!(
            "{}: no usable pairs (all were skipped)",
            train.source
        )));
    }
    log_dataset("train", &train);
    let eval = match config.data.source(true) {
        Some(src) => {
            let ds = load_source(&src, &tokenizer, &opts)?;
            log_dataset("eval", &ds);
            Some(ds)
        }
        None => None,
    };
    let model = CausalLm::load(&dir, &device)?;
    Ok(Trainer {
        config: config.clone(),
        model,
        model_dir: dir,
        tokenizer,
        train,
        eval,
        device,
    })
}

fn log_dataset(split: &str, ds: &crate::data::Dataset) {
    tracing::info!(split, source = %ds.source, format = %ds.format, pairs = ds.pairs.len(), "data loaded");
}
