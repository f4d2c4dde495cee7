//! What can go wrong while loading or validating a configuration.

/// Everything that can go wrong while loading or validating a configuration.
///
/// `file` is the configuration's origin name (usually its path); when the offending value came
/// from a `--set` override it reads `"<file> (--set)"`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the configuration: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: invalid TOML: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: unknown section `[{section}]`{hint}")]
    UnknownSection {
        file: String,
        section: String,
        /// `"; did you mean ...?"` or a list of the valid sections; may be empty.
        hint: String,
    },
    #[error("{file}: unknown key `{key}`{hint}")]
    UnknownKey {
        file: String,
        key: String,
        /// `"; did you mean `optim.lr`?"` or empty.
        hint: String,
    },
    #[error("{file}: {key}: expected {expected}, found {found}")]
    WrongType {
        file: String,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{file}: {key}: {message}")]
    InvalidValue {
        file: String,
        key: String,
        message: String,
    },
    #[error("{file}: missing required key `{key}`")]
    MissingKey { file: String, key: String },
    #[error("{file}: malformed override `--set {arg}`: {message}")]
    BadOverride {
        file: String,
        arg: String,
        message: String,
    },
    #[error(
        "data.train is required by `orpo train`: set `train = \"pairs.jsonl\"` in the [data] \
         section of the config or pass --set data.train=FILE"
    )]
    MissingTrainData,
    #[error(
        "{key} = {value} evaluates held-out pairs during training, but data.eval is not set: \
         set `eval = \"held.jsonl\"` in the [data] section or pass --set data.eval=FILE (or \
         hold out training pairs with data.eval_size)"
    )]
    EvalWithoutData { key: &'static str, value: String },
    #[error(
        "lora.quantize quantizes the frozen base of a LoRA run, which needs lora.enabled = true \
         (a full fine-tune trains the base weights themselves)"
    )]
    QuantizeWithoutLora,
}

impl ConfigError {
    /// The `section.key` (or section, or override argument) the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownSection { section, .. } => Some(section),
            ConfigError::UnknownKey { key, .. }
            | ConfigError::WrongType { key, .. }
            | ConfigError::InvalidValue { key, .. }
            | ConfigError::MissingKey { key, .. } => Some(key),
            ConfigError::BadOverride { arg, .. } => Some(arg),
            ConfigError::MissingTrainData => Some("data.train"),
            ConfigError::EvalWithoutData { key, .. } => Some(key),
            ConfigError::QuantizeWithoutLora => Some("lora.quantize"),
            ConfigError::Io { .. } | ConfigError::Parse { .. } => None,
        }
    }
}
