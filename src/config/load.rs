//! From TOML text to a checked table: `--set` overrides applied, sections, keys and value
//! types checked against the schema, integers made floats where floats are expected.

use std::collections::HashSet;

use super::schema::{
    describe, key_hint, key_kind, section_keys, suggest_key, suggest_section, KeyKind,
};
use super::{BaseQuant, ConfigError, Dtype, Interval, Optimizer, SaveDtype, Scheduler};

/// The values of `train.report_to` (transformers' `report_to`) orpo knows.
pub const REPORT_TO: [&str; 2] = ["tensorboard", "none"];

/// Tracks where values came from, so that errors can say "(--set)".
pub(super) struct Origin<'a> {
    pub(super) file: &'a str,
    pub(super) overridden: HashSet<String>,
}

impl Origin<'_> {
    pub(super) fn of(&self, key: &str) -> String {
        if self.overridden.contains(key) {
            format!("{} (--set)", self.file)
        } else {
            self.file.to_string()
        }
    }

    pub(super) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            file: self.of(key),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Parse the value of a `--set` override: a TOML value where possible, else the raw text.
fn parse_override_value(raw: &str, kind: KeyKind) -> toml::Value {
    let text = raw.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"));
    match (kind, parsed) {
        // Strings stay strings even when they look like numbers (`model.revision=2024`).
        (
            KeyKind::Str
            | KeyKind::Dtype
            | KeyKind::Scheduler
            | KeyKind::SaveDtype
            | KeyKind::Quant
            | KeyKind::Optimizer,
            Some(v @ toml::Value::String(_)),
        ) => v,
        (
            KeyKind::Str
            | KeyKind::Dtype
            | KeyKind::Scheduler
            | KeyKind::SaveDtype
            | KeyKind::Quant
            | KeyKind::Optimizer,
            _,
        ) => toml::Value::String(text.to_string()),
        (
            KeyKind::Targets | KeyKind::Paths,
            Some(v @ (toml::Value::String(_) | toml::Value::Array(_))),
        ) => v,
        // Paths are not split at commas: a file name may hold one.
        (KeyKind::Paths, _) => toml::Value::String(text.to_string()),
        // Nor is a pattern (`[0-9]{1,2}`): module names hold no regex syntax.
        (KeyKind::Targets, _) if text.contains(',') && !looks_like_pattern(text) => {
            toml::Value::Array(
                text.split(',')
                    .map(|s| toml::Value::String(s.trim().to_string()))
                    .collect(),
            )
        }
        (_, Some(v)) => v,
        (_, None) => toml::Value::String(text.to_string()),
    }
}

const TOO_LARGE: &str = "TOML integers stop at 9223372036854775807";

/// A whole number that TOML cannot hold (a `--set` value too large for an integer is kept
/// as text).
fn too_large(s: &str) -> bool {
    let digits = s.trim().trim_start_matches('+');
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<i64>().is_err()
}

/// Whether a `--set` value holds regular-expression syntax (a LoRA target pattern).
fn looks_like_pattern(text: &str) -> bool {
    text.contains(['\\', '*', '(', '[', '{', '|', '^', '$', '+', '?'])
}

pub(super) fn apply_overrides(
    table: &mut toml::Table,
    file: &str,
    overrides: &[String],
    overridden: &mut HashSet<String>,
) -> Result<(), ConfigError> {
    for arg in overrides {
        let bad = |message: &str| ConfigError::BadOverride {
            file: file.to_string(),
            arg: arg.clone(),
            message: message.to_string(),
        };
        let Some((path, raw)) = arg.split_once('=') else {
            return Err(bad("expected `section.key=value` (no `=` found)"));
        };
        let path = path.trim();
        let Some((section, key)) = path.split_once('.') else {
            return Err(bad(
                "expected `section.key=value` (the key needs a section, e.g. `optim.lr`)",
            ));
        };
        if section.is_empty() || key.is_empty() || key.contains('.') {
            return Err(bad("expected `section.key=value` with exactly one dot"));
        }
        let set_file = format!("{file} (--set)");
        if section_keys(section).is_none() {
            return Err(ConfigError::UnknownSection {
                file: set_file,
                section: section.to_string(),
                hint: suggest_section(section),
            });
        }
        let Some(kind) = key_kind(section, key) else {
            return Err(ConfigError::UnknownKey {
                file: set_file,
                key: path.to_string(),
                hint: key_hint(Some(section), key),
            });
        };
        let quoted =
            raw.trim().starts_with('"') && raw.trim().ends_with('"') && raw.trim().len() > 1;
        let value = parse_override_value(raw, kind);
        if quoted && !matches!(&value, toml::Value::String(s) if !s.starts_with('"')) {
            return Err(bad(
                "the value in double quotes is not a valid TOML string (a backslash there starts \
                 an escape); write it in single quotes, e.g. lora.targets='model\\.layers\\..*'",
            ));
        }
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), value);
            }
            other => {
                return Err(ConfigError::WrongType {
                    file: file.to_string(),
                    key: section.to_string(),
                    expected: "a table (section)".into(),
                    found: describe(other),
                })
            }
        }
        overridden.insert(path.to_string());
    }
    Ok(())
}

/// Check sections, keys and value types; convert integers to floats where floats are expected.
pub(super) fn check_and_normalise(
    table: &mut toml::Table,
    origin: &Origin,
) -> Result<(), ConfigError> {
    for (section, value) in table.iter_mut() {
        let Some(keys) = section_keys(section) else {
            if let toml::Value::Table(_) = value {
                return Err(ConfigError::UnknownSection {
                    file: origin.file.to_string(),
                    section: section.clone(),
                    hint: suggest_section(section),
                });
            }
            return Err(ConfigError::UnknownKey {
                file: origin.file.to_string(),
                key: section.clone(),
                hint: match suggest_key(None, section) {
                    Some(k) => {
                        format!(" at the top level (keys belong in a section); did you mean `{k}`?")
                    }
                    None => " at the top level (keys belong in a section)".into(),
                },
            });
        };
        let toml::Value::Table(t) = value else {
            return Err(ConfigError::WrongType {
                file: origin.file.to_string(),
                key: section.clone(),
                expected: format!("a table (`[{section}]` section)"),
                found: describe(value),
            });
        };
        for (key, v) in t.iter_mut() {
            let full = format!("{section}.{key}");
            let Some(kind) = keys.iter().find(|(k, _)| k == key).map(|(_, k)| *k) else {
                return Err(ConfigError::UnknownKey {
                    file: origin.of(&full),
                    key: full.clone(),
                    hint: key_hint(Some(section), key),
                });
            };
            let wrong = |expected: &str, v: &toml::Value| ConfigError::WrongType {
                file: origin.of(&full),
                key: full.clone(),
                expected: expected.to_string(),
                found: describe(v),
            };
            match kind {
                KeyKind::Str => {
                    if !v.is_str() {
                        return Err(wrong("a string", v));
                    }
                }
                KeyKind::Bool => {
                    if !v.is_bool() {
                        return Err(wrong("a boolean (true or false)", v));
                    }
                }
                KeyKind::Float => match v {
                    // datasets' train_test_split reads a float as a fraction, below 1 only.
                    toml::Value::Float(f) if full == "data.eval_size" && *f >= 1.0 => {
                        return Err(origin.invalid(
                            &full,
                            format!(
                                "a fraction must be below 1, found {f}; for a number of pairs \
                                 write an integer ({})",
                                f.trunc()
                            ),
                        ))
                    }
                    toml::Value::Float(_) => {}
                    toml::Value::Integer(i) => *v = toml::Value::Float(*i as f64),
                    _ => return Err(wrong("a float", v)),
                },
                KeyKind::UInt => match v {
                    toml::Value::Integer(i) if *i >= 0 => {}
                    toml::Value::Integer(_) => {
                        return Err(wrong("a non-negative integer", v));
                    }
                    // transformers 5 (TRL 1.16) reads a warmup_steps below 1 as a ratio.
                    toml::Value::Float(f)
                        if full == "optim.warmup_steps" && *f > 0.0 && *f < 1.0 =>
                    {
                        return Err(origin.invalid(
                            &full,
                            format!(
                                "is a whole number of steps, found {f}; for a fraction of the run \
                                 (transformers 5's warmup_steps below 1) set optim.warmup_ratio = {f}"
                            ),
                        ));
                    }
                    toml::Value::String(s) if too_large(s) => {
                        return Err(origin.invalid(&full, format!("{s} is too large ({TOO_LARGE})")))
                    }
                    _ => return Err(wrong("an integer", v)),
                },
                KeyKind::Dtype => {
                    let Some(s) = v.as_str() else {
                        return Err(wrong("a string", v));
                    };
                    if let Err(m) = s.parse::<Dtype>() {
                        return Err(origin.invalid(&full, m));
                    }
                }
                KeyKind::SaveDtype => {
                    let Some(s) = v.as_str() else {
                        return Err(wrong("a string", v));
                    };
                    if let Err(m) = s.parse::<SaveDtype>() {
                        return Err(origin.invalid(&full, m));
                    }
                }
                KeyKind::Quant => {
                    let Some(s) = v.as_str() else {
                        return Err(wrong("a string", v));
                    };
                    if let Err(m) = s.parse::<BaseQuant>() {
                        return Err(origin.invalid(&full, m));
                    }
                }
                KeyKind::Optimizer => {
                    let Some(s) = v.as_str() else {
                        return Err(wrong("a string", v));
                    };
                    if let Err(m) = s.parse::<Optimizer>() {
                        return Err(origin.invalid(&full, m));
                    }
                }
                KeyKind::Scheduler => {
                    let Some(s) = v.as_str() else {
                        return Err(wrong("a string", v));
                    };
                    if let Err(m) = s.parse::<Scheduler>() {
                        return Err(origin.invalid(&full, m));
                    }
                }
                KeyKind::Targets => match v {
                    toml::Value::String(s) if s.eq_ignore_ascii_case("all-linear") => {}
                    // Any other string is PEFT's regular expression over module names (checked
                    // with the ranges).
                    toml::Value::String(_) => {}
                    toml::Value::Array(items) => {
                        if items.is_empty() {
                            return Err(origin.invalid(&full, "the list of modules is empty"));
                        }
                        for item in items {
                            match item.as_str() {
                                Some(s) if !s.trim().is_empty() => {}
                                Some(_) => {
                                    return Err(origin.invalid(&full, "empty module name"));
                                }
                                None => {
                                    return Err(wrong("a list of strings (module names)", item));
                                }
                            }
                        }
                    }
                    _ => {
                        return Err(wrong(
                            "\"all-linear\", a list of module names or a pattern",
                            v,
                        ))
                    }
                },
                KeyKind::Paths => match v {
                    toml::Value::String(_) => {}
                    toml::Value::Array(items) => {
                        if items.is_empty() {
                            return Err(origin.invalid(&full, "the list of locations is empty"));
                        }
                        if let Some(item) = items.iter().find(|i| !i.is_str()) {
                            return Err(wrong("a list of strings (files, folders, globs)", item));
                        }
                    }
                    _ => return Err(wrong("a string or a list of strings", v)),
                },
                KeyKind::Interval => match v {
                    toml::Value::Integer(i) if *i >= 0 => {}
                    toml::Value::Float(f) if *f > 0.0 && *f < 1.0 => {}
                    // transformers takes 1.0 as one step and refuses 1.5.
                    toml::Value::Float(f) if *f >= 1.0 && f.fract() == 0.0 => {}
                    toml::Value::Float(f) => {
                        return Err(origin.invalid(
                            &full,
                            format!(
                                "expected a number of steps, a fraction below 1 of the run's \
                                 steps or \"epoch\", found {f}"
                            ),
                        ))
                    }
                    toml::Value::String(s) if too_large(s) => {
                        return Err(origin.invalid(&full, format!("{s} is too large ({TOO_LARGE})")))
                    }
                    // "best" anywhere: check_ranges says where it belongs.
                    toml::Value::String(s) if s == Interval::EPOCH || s == Interval::BEST => {}
                    toml::Value::String(s) => {
                        let words = match full == "train.save_every" {
                            true => "\"epoch\" or \"best\"",
                            false => "\"epoch\"",
                        };
                        return Err(origin.invalid(
                            &full,
                            format!(
                                "expected a number of steps (0: never) or {words}, found \
                                 {s:?}{}",
                                strategy_hint(&full, s)
                            ),
                        ));
                    }
                    _ => {
                        return Err(wrong(
                            "a non-negative integer, a fraction below 1 or \"epoch\"",
                            v,
                        ))
                    }
                },
                KeyKind::ReportTo => {
                    let items: Vec<&toml::Value> = match v {
                        toml::Value::Array(items) => items.iter().collect(),
                        other => vec![other],
                    };
                    for item in items {
                        let Some(name) = item.as_str() else {
                            return Err(wrong("a string or a list of strings", item));
                        };
                        if !REPORT_TO.contains(&name) {
                            return Err(origin.invalid(
                                &full,
                                format!(
                                    "cannot report to `{name}`; valid: {} (metrics.jsonl and \
                                     training_curves.svg are always written)",
                                    REPORT_TO.join(", ")
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// For transformers' strategy names given where orpo takes the interval itself.
fn strategy_hint(key: &str, value: &str) -> String {
    let steps_key = if key == "train.save_every" {
        "save_steps"
    } else {
        "eval_steps"
    };
    match value {
        "steps" => {
            format!(" (transformers' \"steps\" strategy: give {steps_key}'s number of steps here)")
        }
        "no" => " (transformers' \"no\" strategy: 0 here)".to_string(),
        "epochs" => " (\"epoch\", singular)".to_string(),
        _ => String::new(),
    }
}
