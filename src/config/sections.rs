//! The configuration's sections, their keys and defaults (SPEC.md's config keys).

use serde::{Deserialize, Serialize};

use super::{BaseQuant, DataFiles, Dtype, Interval, LoraTargets, Optimizer, SaveDtype, Scheduler};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Local folder or hub id `org/name` (required).
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    pub dtype: Dtype,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            id: String::new(),
            revision: None,
            device: "cpu".into(),
            dtype: Dtype::F32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training data (required by `orpo train`, see [`Config::validate_for_train`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<DataFiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<DataFiles>,
    /// Without `eval`: hold out this many training pairs (below 1, this fraction of them,
    /// rounded up), as datasets' `train_test_split(test_size)`, drawn with `train.seed`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::values::count_or_fraction"
    )]
    pub eval_size: Option<f64>,
    pub max_length: usize,
    pub max_prompt_length: usize,
    /// Split read from folders and hub datasets for `train`.
    pub train_split: String,
    /// Split read from folders and hub datasets for `eval`.
    pub eval_split: String,
    /// Dataset config name (a folder of that name in the repo: `harmless-base`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Hub revision of the dataset (branch, tag or commit); `main` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Column holding the prompt / chosen / rejected field.
    pub prompt_column: String,
    pub chosen_column: String,
    pub rejected_column: String,
    /// A chat template for conversational rows in place of the model's: a Jinja file, or the
    /// template itself (TRL recipes' `chat_template`). Saved with the trained model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: None,
            eval: None,
            eval_size: None,
            max_length: 1024,
            max_prompt_length: 512,
            train_split: "train".into(),
            eval_split: "test".into(),
            subset: None,
            revision: None,
            prompt_column: "prompt".into(),
            chosen_column: "chosen".into(),
            rejected_column: "rejected".into(),
            chat_template: None,
        }
    }
}

impl DataConfig {
    /// How to read `data.train` (`eval = false`) or `data.eval`: location, split, subset,
    /// revision and column names. None when that key is not set.
    pub fn source(&self, eval: bool) -> Option<crate::data::DataSource> {
        let (files, split) = if eval {
            (self.eval.as_ref()?, &self.eval_split)
        } else {
            (self.train.as_ref()?, &self.train_split)
        };
        let (first, more) = files.0.split_first()?;
        let mut src = self.source_at(first, split);
        src.more = more.to_vec();
        Some(src)
    }

    /// A source at `location` read with this section's subset, revision and columns.
    pub fn source_at(&self, location: &str, split: &str) -> crate::data::DataSource {
        crate::data::DataSource {
            location: location.to_string(),
            more: Vec::new(),
            split: split.to_string(),
            subset: self.subset.clone(),
            revision: self.revision.clone(),
            columns: crate::data::ColumnMap {
                prompt: self.prompt_column.clone(),
                chosen: self.chosen_column.clone(),
                rejected: self.rejected_column.clone(),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrpoConfig {
    pub beta: f64,
    /// true (TRL): the NLL covers prompt and answer of the chosen sequence; false: answer only.
    pub nll_on_prompt: bool,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        OrpoConfig {
            beta: 0.1,
            nll_on_prompt: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// transformers' `optim`: torch's AdamW or bitsandbytes' 8-bit AdamW.
    pub optimizer: Optimizer,
    pub lr: f64,
    pub scheduler: Scheduler,
    pub warmup_steps: usize,
    /// With `warmup_steps = 0`: warm up over `ceil(total steps * ratio)` steps, as
    /// transformers' `warmup_ratio` does.
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// The schedules' arguments, by transformers' `lr_scheduler_kwargs` names; unset, their
    /// defaults there. Cosine waves (`cosine`, `cosine_with_min_lr`: 0.5; `cosine_with_restarts`: 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_cycles: Option<f64>,
    /// `cosine_with_min_lr`'s floor, as a fraction of `lr` or as a rate (one of the two).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// `polynomial`'s final rate (1e-7) and power (1.0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_end: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            optimizer: Optimizer::AdamWTorch,
            lr: 8e-6,
            scheduler: Scheduler::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            num_cycles: None,
            min_lr_rate: None,
            min_lr: None,
            lr_end: None,
            power: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Pairs per evaluation micro-batch (None: `batch_size`), TRL's
    /// `per_device_eval_batch_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_batch_size: Option<usize>,
    pub grad_accum: usize,
    /// Passes over the data; a fraction trains the first steps of the last pass, as
    /// transformers' `num_train_epochs` (steps rounded up).
    pub epochs: f64,
    /// > 0 overrides `epochs`.
    pub max_steps: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Steps per logged line (a fraction: of the run's steps; `"epoch"`: each epoch's end).
    pub log_every: Interval,
    /// A checkpoint every N steps or at every epoch's end (never: only the final model).
    pub save_every: Interval,
    /// Keep at most this many `checkpoint-*` folders (None: keep all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<usize>,
    /// Evaluate on `data.eval` every N optimizer steps or at every epoch's end (never: only
    /// at the end).
    pub eval_every: Interval,
    pub output_dir: String,
    pub gradient_checkpointing: bool,
    /// transformers' `report_to`: `"tensorboard"` also writes the curves as a TensorBoard
    /// event file in `output_dir`; `"none"` (or nothing) only metrics.jsonl and the plot.
    #[serde(
        deserialize_with = "super::values::one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub report_to: Vec<String>,
    /// The dtype of the final full model's weights (checkpoints and LoRA adapters stay f32).
    pub save_dtype: SaveDtype,
    /// transformers' `load_best_model_at_end`: the final model is the checkpoint with the best
    /// evaluation (by `metric_for_best_model`), which `save_total_limit` never removes.
    pub load_best_model_at_end: bool,
    /// An evaluation metric by its TRL name, with or without `eval_` (unset: the loss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric_for_best_model: Option<String>,
    /// Unset: true unless the metric's name ends in `loss` (transformers' rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub greater_is_better: Option<bool>,
    /// transformers' `EarlyStoppingCallback(early_stopping_patience)`: training ends after
    /// this many evaluations in a row without an improvement of `metric_for_best_model`
    /// (0: never).
    pub early_stopping_patience: usize,
    /// The improvement over the best so far that counts as one (`early_stopping_threshold`).
    pub early_stopping_threshold: f64,
    /// transformers' `eval_on_start`: evaluate the initial weights (logged at step 0).
    pub eval_on_start: bool,
    /// transformers' `logging_first_step`: a line for step 1 alone too.
    pub logging_first_step: bool,
    /// transformers' `save_only_model`: scheduled checkpoints hold the model without the
    /// optimizer state (less disk; no resuming from them).
    pub save_only_model: bool,
    /// transformers' `dataloader_drop_last`: an epoch's last micro-batch, and an evaluation's
    /// last batch, are dropped when short.
    pub dataloader_drop_last: bool,
    /// transformers' `eval_delay`: no scheduled evaluation before this many steps (epochs
    /// under `eval_every = "epoch"`).
    pub eval_delay: f64,
}

impl TrainConfig {
    /// Whether the run keeps track of its best evaluation: `load_best_model_at_end`, or a
    /// `metric_for_best_model` given (transformers tracks it then too).
    pub fn tracks_best(&self) -> bool {
        self.load_best_model_at_end || self.metric_for_best_model.is_some()
    }

    /// The metric `load_best_model_at_end` compares, as evaluations name it (`eval_loss`).
    pub fn best_metric_key(&self) -> String {
        let m = self.metric_for_best_model.as_deref().unwrap_or("loss");
        match m.starts_with("eval_") {
            true => m.to_string(),
            false => format!("eval_{m}"),
        }
    }

    /// Whether a larger value of [`TrainConfig::best_metric_key`] is better.
    pub fn best_is_greater(&self) -> bool {
        self.greater_is_better.unwrap_or_else(|| {
            let m = self.metric_for_best_model.as_deref().unwrap_or("loss");
            !m.ends_with("loss")
        })
    }

    /// Pairs per evaluation micro-batch.
    pub fn eval_batch_size(&self) -> usize {
        self.eval_batch_size.unwrap_or(self.batch_size)
    }

    /// Whether the curves also go to TensorBoard event files.
    pub fn tensorboard(&self) -> bool {
        self.report_to.iter().any(|r| r == "tensorboard")
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 8,
            eval_batch_size: None,
            grad_accum: 1,
            epochs: 1.0,
            max_steps: 0,
            shuffle: true,
            seed: 42,
            log_every: Interval::Steps(10),
            save_every: Interval::Never,
            save_total_limit: None,
            eval_every: Interval::Never,
            output_dir: "runs/example".into(),
            gradient_checkpointing: false,
            report_to: Vec::new(),
            save_dtype: SaveDtype::F32,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            early_stopping_patience: 0,
            early_stopping_threshold: 0.0,
            eval_on_start: false,
            logging_first_step: false,
            dataloader_drop_last: false,
            eval_delay: 0.0,
            save_only_model: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub enabled: bool,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: LoraTargets,
    /// Scale by alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// DoRA (arXiv 2402.09353) as PEFT's `use_dora`: a trainable magnitude per output row.
    pub use_dora: bool,
    /// An adapter folder to go on training (its settings and weights replace a fresh
    /// adapter's), as TRL given `PeftModel.from_pretrained(base, dir, is_trainable=True)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    /// QLoRA: the frozen base's linear layers held as 4-bit NF4 (bitsandbytes' `load_in_4bit`
    /// with `bnb_4bit_quant_type = "nf4"`), products in `model.dtype`.
    pub quantize: BaseQuant,
    /// bitsandbytes' `bnb_4bit_use_double_quant`: the 4-bit scales quantized to 8 bits.
    pub double_quant: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            enabled: false,
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LoraTargets::AllLinear,
            use_rslora: false,
            use_dora: false,
            init_from: None,
            quantize: BaseQuant::None,
            double_quant: false,
        }
    }
}

/// The whole run configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub orpo: OrpoConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub lora: LoraConfig,
}
