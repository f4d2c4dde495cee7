//! Turning a config into a ready trainer: every input is loaded and checked here, before any
//! training starts, so mistakes surface in seconds rather than hours.

use super::checkpoint::BaseModel;
use super::trainer::Trainer;
use crate::config::{BaseQuant, Config, Dtype, LoraTargets};
use crate::data::{load_source, DataOptions, Dataset, Tokenizer};
use crate::device::select_device;
use crate::model::lora::{self, AdapterInit, LoraSpec, TargetPattern, Targets};
use crate::model::{resolve_model_dir, CausalLm, LoadOptions, ModelConfig, Quantize};
use crate::Error;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

pub struct LoadedModel {
    /// The model folder, or for an adapter the base model's folder.
    pub dir: PathBuf,
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
}

/// How `load_model` sets a model up: the products' dtype, and for an adapter its base's
/// quantization (a QLoRA adapter evaluated on the base it was trained against).
#[derive(Debug, Clone, Copy)]
pub struct EvalSetup {
    pub compute: DType,
    pub quantize: Option<Quantize>,
}

impl Default for EvalSetup {
    fn default() -> Self {
        EvalSetup {
            compute: DType::F32,
            quantize: None,
        }
    }
}

/// Loads a full model, or a LoRA adapter folder on top of its base: `base` when given, else
/// `base_model_name_or_path` from adapter_config.json; set up as `setup` says.
pub fn load_model(
    id: &str,
    revision: Option<&str>,
    base: Option<&str>,
    setup: EvalSetup,
    device: &Device,
) -> Result<LoadedModel, Error> {
    let EvalSetup { compute, quantize } = setup;
    let dir = resolve_model_dir(id, revision)?;
    if !lora::is_adapter_dir(&dir) {
        if let Some(b) = base {
            tracing::warn!(
                "--base {b} ignored: {} is a full model, not an adapter",
                dir.display()
            );
        }
        if quantize.is_some() {
            tracing::warn!(
                "lora.quantize ignored: {} is a full model, not an adapter on a frozen base",
                dir.display()
            );
        }
        let tokenizer = Tokenizer::from_dir(&dir)?;
        // Constants for evaluation: a bf16 run's model in bf16 (half an f32 copy's memory),
        // the products' operands as its training's bf16 copies were.
        let opts = LoadOptions {
            compute,
            frozen: true,
            ..LoadOptions::default()
        };
        let model = CausalLm::load_with(&dir, device, opts)?;
        return Ok(LoadedModel {
            dir,
            model,
            tokenizer,
        });
    }
    let saved = lora::read_adapter(&dir, device)?;
    let base_id = base.map(str::to_string).or(saved.base).ok_or_else(|| {
        Error::Input(format!(
            "{}: adapter_config.json names no base model (base_model_name_or_path); pass --base",
            dir.display()
        ))
    })?;
    // PEFT loads the base at the adapter's `revision`; a --base given is taken as it is.
    let base_revision = saved.base_revision.as_deref().filter(|_| base.is_none());
    let base_dir = resolve_model_dir(&base_id, base_revision)?;
    let tok_dir = if dir.join("tokenizer.json").is_file() || dir.join("vocab.json").is_file() {
        &dir
    } else {
        &base_dir
    };
    let tokenizer = Tokenizer::from_dir(tok_dir)?;
    let opts = LoadOptions {
        lora: Some((saved.spec, AdapterInit::Saved(saved.tensors))),
        quantize,
        compute,
        ..LoadOptions::default()
    };
    let model = CausalLm::load_with(&base_dir, device, opts)?;
    Ok(LoadedModel {
        dir: base_dir,
        model,
        tokenizer,
    })
}

/// The `[lora]` section as the model loader takes it (an invalid pattern, which reading a
/// config file refuses, is an error naming `lora.targets`).
pub fn lora_spec(l: &crate::config::LoraConfig) -> Result<LoraSpec, Error> {
    Ok(LoraSpec {
        r: l.r,
        alpha: l.alpha,
        dropout: l.dropout,
        use_rslora: l.use_rslora,
        use_dora: l.use_dora,
        targets: match &l.targets {
            LoraTargets::AllLinear => Targets::AllLinear,
            LoraTargets::Modules(m) => Targets::Modules(m.clone()),
            LoraTargets::Pattern(p) => Targets::Pattern(
                TargetPattern::new(p).map_err(|e| Error::Input(format!("lora.targets: {e}")))?,
            ),
        },
    })
}

/// How the config wants the model set up for training (an adapter to go on training read
/// onto `device`).
pub fn load_options(config: &Config, device: &Device) -> Result<LoadOptions, Error> {
    let lora = match (&config.lora.init_from, config.lora.enabled) {
        (_, false) => None,
        (Some(dir), true) => Some(adapter_to_continue(config, dir, device)?),
        (None, true) => Some((
            lora_spec(&config.lora)?,
            AdapterInit::Fresh {
                seed: config.train.seed,
            },
        )),
    };
    Ok(LoadOptions {
        lora,
        merge: false,
        compute: match config.model.dtype {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
        },
        quantize: match config.lora.quantize {
            BaseQuant::Nf4 if config.lora.enabled => Some(Quantize {
                double_quant: config.lora.double_quant,
            }),
            _ => None,
        },
        frozen: false,
        merged_dtype: None,
    })
}

/// The `[lora]` settings an adapter carries, by key, as values to compare and show.
fn lora_settings(spec: &LoraSpec) -> [(&'static str, String); 5] {
    let targets = match &spec.targets {
        Targets::AllLinear => "\"all-linear\"".to_string(),
        Targets::Modules(m) => format!("{m:?}"),
        Targets::Pattern(p) => format!("{:?}", p.text),
    };
    [
        ("r", spec.r.to_string()),
        ("alpha", spec.alpha.to_string()),
        ("targets", targets),
        ("use_rslora", spec.use_rslora.to_string()),
        ("use_dora", spec.use_dora.to_string()),
    ]
}

/// `lora.init_from`'s adapter: its own settings (the `[lora]` ones the config sets otherwise
/// are named in a warning) and weights, trained on from where they are.
fn adapter_to_continue(
    config: &Config,
    id: &str,
    device: &Device,
) -> Result<(LoraSpec, AdapterInit), Error> {
    // A local folder, or an adapter repository on the hub.
    let dir = &match Path::new(id).is_dir() {
        true => PathBuf::from(id),
        false => resolve_model_dir(id, None)
            .map_err(|e| Error::Input(format!("lora.init_from = {id:?}: {e}")))?,
    };
    if !lora::is_adapter_dir(dir) {
        return Err(Error::Input(format!(
            "lora.init_from = {:?}: no {} there; it must be a LoRA adapter folder (written by \
             orpo or PEFT)",
            dir.display().to_string(),
            lora::ADAPTER_CONFIG
        )));
    }
    let saved = lora::read_adapter(dir, device)?;
    let defaults = lora_spec(&crate::config::LoraConfig::default())?;
    let ignored: Vec<String> = lora_settings(&lora_spec(&config.lora)?)
        .into_iter()
        .zip(lora_settings(&defaults))
        .zip(lora_settings(&saved.spec))
        .filter(|(((_, set), (_, default)), (_, theirs))| set != default && set != theirs)
        .map(|(((key, set), _), (_, theirs))| {
            format!("lora.{key} = {set} (the adapter's: {theirs})")
        })
        .collect();
    if !ignored.is_empty() {
        tracing::warn!(
            "lora.init_from: the adapter's own settings apply; ignored: {}",
            ignored.join(", ")
        );
    }
    if let Some(base) = &saved.base {
        let same = Path::new(base).is_dir()
            && std::fs::canonicalize(base).ok() == std::fs::canonicalize(&config.model.id).ok();
        if !same && base != &config.model.id {
            tracing::warn!(
                "lora.init_from: the adapter was trained on {base}, this run's model.id is {}",
                config.model.id
            );
        }
    }
    Ok((saved.spec, AdapterInit::Saved(saved.tensors)))
}

pub fn data_options(config: &Config) -> DataOptions {
    DataOptions {
        max_length: config.data.max_length,
        max_prompt_length: config.data.max_prompt_length,
    }
}

/// Every pair must fit the model: its token ids within the vocabulary (a tokenizer from
/// another model would otherwise fail inside the first step), its sequences within the
/// position table (OPT's is learned and finite; a `data.max_length` above it is fine while no
/// pair is that long, as in TRL).
pub fn check_data_fits(
    config: &Config,
    model: &ModelConfig,
    datasets: &[&Dataset],
) -> Result<(), Error> {
    let limit = model.max_sequence_length();
    for ds in datasets {
        for (p, loc) in ds.pairs.iter().zip(&ds.locations) {
            let seqs = [&p.chosen_input_ids, &p.rejected_input_ids];
            if let Some(&id) = seqs
                .iter()
                .flat_map(|s| s.iter())
                .find(|&&id| id as usize >= model.vocab_size)
            {
                return Err(Error::Input(format!(
                    "{loc}: token id {id} is outside the model's vocabulary ({} ids, config.json's \
                     vocab_size): the tokenizer does not belong to this model",
                    model.vocab_size
                )));
            }
            let len = p.chosen_input_ids.len().max(p.rejected_input_ids.len());
            if let Some(limit) = limit.filter(|&l| len > l) {
                return Err(Error::Input(format!(
                    "{loc}: a sequence of {len} tokens exceeds the model's max_position_embeddings \
                     ({limit}); set data.max_length <= {limit} (it is {})",
                    config.data.max_length
                )));
            }
        }
    }
    Ok(())
}

pub fn load_trainer(config: &Config) -> Result<Trainer, Error> {
    config.validate_for_train()?;
    let device = select_device(&config.model.device)?;
    let dir = resolve_model_dir(&config.model.id, config.model.revision.as_deref())?;
    let model_config = ModelConfig::from_dir(&dir)?;
    let mut tokenizer = Tokenizer::from_dir(&dir)?;
    crate::data::apply_chat_template_setting(&mut tokenizer, config.data.chat_template.as_deref())?;
    let (train, eval) = load_splits(config, &tokenizer)?;
    if train.pairs.is_empty() {
        return Err(Error::Input(format!(
            "{}: no usable pairs (all were skipped)",
            train.source
        )));
    }
    log_dataset("train", &train);
    if let Some(ds) = &eval {
        log_dataset("eval", ds);
    }
    if config.train.dataloader_drop_last {
        let batches = std::iter::once((&train, config.train.batch_size, "train.batch_size")).chain(
            eval.as_ref()
                .map(|ds| (ds, config.train.eval_batch_size(), "train.eval_batch_size")),
        );
        for (ds, batch, key) in batches {
            if ds.pairs.len() < batch {
                return Err(Error::Input(format!(
                    "{}: {} pairs, fewer than {key} = {batch}; with train.dataloader_drop_last \
                     that short batch is dropped and nothing is left",
                    ds.source,
                    ds.pairs.len()
                )));
            }
        }
    }
    check_data_fits(
        config,
        &model_config,
        &[&train].into_iter().chain(&eval).collect::<Vec<_>>(),
    )?;
    let mut model = CausalLm::load_with(&dir, &device, load_options(config, &device)?)?;
    if config.train.gradient_checkpointing {
        model.enable_recompute();
    }
    if let Some(info) = model.adapter() {
        tracing::info!(
            r = info.spec.r,
            alpha = info.spec.alpha,
            modules = ?info.modules,
            trainable = model.params().num_elements(),
            "LoRA adapters on a frozen base"
        );
        if config.lora.quantize == BaseQuant::Nf4 {
            tracing::info!(
                double_quant = config.lora.double_quant,
                products = ?config.model.dtype,
                "QLoRA: the frozen base's linear layers are held as 4-bit NF4, as bitsandbytes quantizes them"
            );
        }
        if info.spec.dropout > 0.0 {
            tracing::info!(
                "lora.dropout = {} is recorded in adapter_config.json; ORPO training runs without dropout, as TRL does",
                info.spec.dropout
            );
        }
    }
    Ok(Trainer {
        config: config.clone(),
        model,
        base: BaseModel::new(&config.model.id, config.model.revision.as_deref(), &dir),
        tokenizer,
        train,
        eval,
        memory: crate::memory::MemoryMeter::new(&device),
        device,
    })
}

/// The training and evaluation pairs as a run reads them: `data.train`, and `data.eval` or the
/// pairs `data.eval_size` holds out of the training ones.
pub fn load_splits(
    config: &Config,
    tokenizer: &Tokenizer,
) -> Result<(crate::data::Dataset, Option<crate::data::Dataset>), Error> {
    let opts = data_options(config);
    let train_src = config
        .data
        .source(false)
        .ok_or_else(|| Error::Input("data.train is not set".into()))?;
    let train = load_source(&train_src, tokenizer, &opts)?;
    if let Some(size) = config.data.eval_size {
        let (train, eval) = crate::data::split_eval(train, size, config.train.seed)?;
        return Ok((train, Some(eval)));
    }
    let eval = match config.data.source(true) {
        Some(src) => Some(load_source(&src, tokenizer, &opts)?),
        None => None,
    };
    Ok((train, eval))
}

fn log_dataset(split: &str, ds: &crate::data::Dataset) {
    tracing::info!(split, source = %ds.source, format = %ds.format, pairs = ds.pairs.len(), "data loaded");
}
