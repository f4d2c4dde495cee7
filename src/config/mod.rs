//! Run configuration: the TOML file of `orpo train --config`, `--set section.key=value`
//! overrides, defaults and validation.
//!
//! Loading goes: parse the TOML text into a table, apply the overrides to that table
//! (`load.rs`), check every section, key and value type against [`SCHEMA`] (`schema.rs`;
//! integers are accepted where floats are expected), deserialise into [`Config`]
//! (`sections.rs`, `values.rs`), then check value ranges (`ranges.rs`). Every error
//! (`error.rs`) names the file (and whether the value came from `--set`) and the
//! `section.key` concerned.

use std::collections::HashSet;
use std::path::Path;

mod error;
mod load;
mod ranges;
mod schema;
mod sections;
#[cfg(test)]
mod tests;
mod values;

pub use error::ConfigError;
pub use schema::{KeyKind, SCHEMA};
pub use sections::{
    Config, DataConfig, LoraConfig, ModelConfig, OptimConfig, OrpoConfig, TrainConfig,
};
pub use values::{
    BaseQuant, DataFiles, Dtype, Interval, LoraTargets, Optimizer, SaveDtype, Scheduler,
};

use load::{apply_overrides, check_and_normalise, Origin};

impl Config {
    /// Read and validate a TOML file, then apply `--set section.key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Config::from_toml_str(&text, &file, overrides)
    }

    /// Parse and validate TOML text; `origin_name` names it in errors (usually its path).
    pub fn from_toml_str(
        text: &str,
        origin_name: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: origin_name.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let mut overridden = HashSet::new();
        apply_overrides(&mut table, origin_name, overrides, &mut overridden)?;
        let origin = Origin {
            file: origin_name,
            overridden,
        };
        check_and_normalise(&mut table, &origin)?;

        let has_id = table.get("model").and_then(|m| m.get("id")).is_some();
        if !has_id {
            return Err(ConfigError::MissingKey {
                file: origin_name.to_string(),
                key: "model.id".into(),
            });
        }

        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::InvalidValue {
                    file: origin_name.to_string(),
                    key: "config".into(),
                    message: e.to_string().trim_end().to_string(),
                })?;
        config.check_ranges(&origin)?;
        Ok(config)
    }

    /// A configuration with every default and the given model id.
    pub fn with_model(id: impl Into<String>) -> Config {
        Config {
            model: ModelConfig {
                id: id.into(),
                ..ModelConfig::default()
            },
            ..Config::default()
        }
    }

    /// Apply `--set` overrides to an existing configuration (e.g. one built by
    /// [`Config::with_model`]) and validate the result.
    pub fn with_overrides(
        &self,
        origin_name: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        Config::from_toml_str(&self.to_toml_string(), origin_name, overrides)
    }

    /// Check value ranges; `origin_name` names the configuration in errors.
    pub fn validate(&self, origin_name: &str) -> Result<(), ConfigError> {
        self.check_ranges(&Origin {
            file: origin_name,
            overridden: HashSet::new(),
        })
    }

    /// Extra requirements of `orpo train`: `data.train` must be set, and `data.eval` too when
    /// `train.eval_every` or `train.eval_on_start` asks for evaluations.
    pub fn validate_for_train(&self) -> Result<(), ConfigError> {
        if !matches!(&self.data.train, Some(t) if !t.0.is_empty()) {
            return Err(ConfigError::MissingTrainData);
        }
        if self.data.eval.is_none() && self.data.eval_size.is_none() {
            let t = &self.train;
            let asks = [
                (
                    "train.eval_every",
                    t.eval_every.is_set(),
                    t.eval_every.to_string(),
                ),
                ("train.eval_on_start", t.eval_on_start, "true".into()),
            ];
            if let Some((key, _, value)) = asks.into_iter().find(|(_, on, _)| *on) {
                return Err(ConfigError::EvalWithoutData { key, value });
            }
        }
        if self.lora.quantize != BaseQuant::None && !self.lora.enabled {
            return Err(ConfigError::QuantizeWithoutLora);
        }
        Ok(())
    }

    /// The configuration as TOML (all keys, defaults included; `None` options omitted), for
    /// saving next to checkpoints. `from_toml_str` reads it back to an equal `Config`.
    pub fn to_toml_string(&self) -> String {
        match toml::to_string(self) {
            Ok(s) => s,
            // Only reachable for values TOML cannot hold (a seed above i64::MAX).
            Err(e) => format!("# orpo: could not serialise the configuration: {e}\n"),
        }
    }
}
