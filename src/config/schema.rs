//! Every valid `section.key` and its value type, and suggestions for a misspelt key.

/// The type a key's value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Str,
    Float,
    UInt,
    Bool,
    Dtype,
    Scheduler,
    Targets,
    /// A string, or a list of strings (data locations).
    Paths,
    /// Where to report the curves besides metrics.jsonl: a string or a list of strings.
    ReportTo,
    /// A number of optimizer steps, a fraction of the run's steps, or `"epoch"`.
    Interval,
    SaveDtype,
    /// `"nf4"` or `"none"`.
    Quant,
    /// transformers' `optim` names.
    Optimizer,
}

/// Every valid `section.key`, with its value type.
pub const SCHEMA: &[(&str, &[(&str, KeyKind)])] = {
    use KeyKind::*;
    &[
        (
            "model",
            &[
                ("id", Str),
                ("revision", Str),
                ("device", Str),
                ("dtype", Dtype),
            ],
        ),
        (
            "data",
            &[
                ("train", Paths),
                ("eval", Paths),
                ("eval_size", Float),
                ("max_length", UInt),
                ("max_prompt_length", UInt),
                ("train_split", Str),
                ("eval_split", Str),
                ("subset", Str),
                ("revision", Str),
                ("prompt_column", Str),
                ("chosen_column", Str),
                ("rejected_column", Str),
                ("chat_template", Str),
            ],
        ),
        ("orpo", &[("beta", Float), ("nll_on_prompt", Bool)]),
        (
            "optim",
            &[
                ("optimizer", Optimizer),
                ("lr", Float),
                ("scheduler", Scheduler),
                ("warmup_steps", UInt),
                ("warmup_ratio", Float),
                ("weight_decay", Float),
                ("max_grad_norm", Float),
                ("adam_beta1", Float),
                ("adam_beta2", Float),
                ("adam_epsilon", Float),
                ("num_cycles", Float),
                ("min_lr_rate", Float),
                ("min_lr", Float),
                ("lr_end", Float),
                ("power", Float),
            ],
        ),
        (
            "train",
            &[
                ("batch_size", UInt),
                ("eval_batch_size", UInt),
                ("grad_accum", UInt),
                ("epochs", Float),
                ("max_steps", UInt),
                ("shuffle", Bool),
                ("seed", UInt),
                ("log_every", Interval),
                ("save_every", Interval),
                ("save_total_limit", UInt),
                ("eval_every", Interval),
                ("output_dir", Str),
                ("gradient_checkpointing", Bool),
                ("report_to", ReportTo),
                ("save_dtype", SaveDtype),
                ("load_best_model_at_end", Bool),
                ("metric_for_best_model", Str),
                ("greater_is_better", Bool),
                ("early_stopping_patience", UInt),
                ("early_stopping_threshold", Float),
                ("eval_on_start", Bool),
                ("logging_first_step", Bool),
                ("save_only_model", Bool),
                ("dataloader_drop_last", Bool),
                ("eval_delay", Float),
            ],
        ),
        (
            "lora",
            &[
                ("enabled", Bool),
                ("r", UInt),
                ("alpha", Float),
                ("dropout", Float),
                ("targets", Targets),
                ("use_rslora", Bool),
                ("use_dora", Bool),
                ("init_from", Str),
                ("quantize", Quant),
                ("double_quant", Bool),
            ],
        ),
    ]
};

pub(super) fn section_keys(section: &str) -> Option<&'static [(&'static str, KeyKind)]> {
    SCHEMA
        .iter()
        .find(|(s, _)| *s == section)
        .map(|(_, keys)| *keys)
}

pub(super) fn key_kind(section: &str, key: &str) -> Option<KeyKind> {
    section_keys(section)?
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
}

fn all_keys() -> impl Iterator<Item = (&'static str, &'static str)> {
    SCHEMA
        .iter()
        .flat_map(|(s, keys)| keys.iter().map(move |(k, _)| (*s, *k)))
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Edit distance, counting a prefix relation (`warmup` / `warmup_steps`) as one edit.
fn key_distance(given: &str, valid: &str) -> usize {
    let d = levenshtein(given, valid);
    let prefix = given.len() >= 3 && (valid.starts_with(given) || given.starts_with(valid));
    if prefix {
        d.min(1)
    } else {
        d
    }
}

fn close_enough(dist: usize, len: usize) -> bool {
    dist <= 2.max(len / 3)
}

/// The closest valid `section.key` to an unknown one, if any is close.
pub(super) fn suggest_key(section: Option<&str>, key: &str) -> Option<String> {
    let given = match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    };
    // Same key name in another section (`train.lr` -> `optim.lr`) is a strong signal.
    let elsewhere = all_keys()
        .find(|(s, k)| *k == key && Some(*s) != section)
        .map(|(s, k)| format!("{s}.{k}"));
    let same_section = section.and_then(|s| {
        section_keys(s)?
            .iter()
            .map(|(k, _)| (key_distance(key, k), *k))
            // Ties go to the key listed first (`warmup`: `warmup_steps`, not `warmup_ratio`).
            .min_by_key(|(d, _)| *d)
            .filter(|(d, _)| close_enough(*d, key.len()))
            .map(|(d, k)| (d, format!("{s}.{k}")))
    });
    match (same_section, elsewhere) {
        (Some((1, k)), _) => Some(k),
        (_, Some(e)) => Some(e),
        (Some((_, k)), None) => Some(k),
        (None, None) => all_keys()
            .map(|(s, k)| {
                let full = format!("{s}.{k}");
                (levenshtein(&given, &full), full)
            })
            .min()
            .filter(|(d, _)| close_enough(*d, given.len()))
            .map(|(_, k)| k),
    }
}

pub(super) fn suggest_section(section: &str) -> String {
    let best = SCHEMA
        .iter()
        .map(|(s, _)| (levenshtein(section, s), *s))
        .min()
        .filter(|(d, _)| close_enough(*d, section.len()));
    match best {
        Some((_, s)) => format!("; did you mean `[{s}]`?"),
        None => format!(
            "; valid sections: {}",
            SCHEMA
                .iter()
                .map(|(s, _)| format!("[{s}]"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub(super) fn key_hint(section: Option<&str>, key: &str) -> String {
    match suggest_key(section, key) {
        Some(k) => format!("; did you mean `{k}`?"),
        None => String::new(),
    }
}

pub(super) fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("string {s:?}"),
        toml::Value::Integer(i) => format!("integer {i}"),
        toml::Value::Float(f) => format!("float {f}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        toml::Value::Datetime(d) => format!("datetime {d}"),
        toml::Value::Array(_) => "array".into(),
        toml::Value::Table(_) => "table".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest_key(Some("optim"), "lrr").as_deref(),
            Some("optim.lr")
        );
        assert_eq!(
            suggest_key(Some("optim"), "batch_size").as_deref(),
            Some("train.batch_size")
        );
        assert_eq!(
            suggest_key(Some("train"), "epoch").as_deref(),
            Some("train.epochs")
        );
        assert_eq!(
            suggest_key(Some("optim"), "warmup").as_deref(),
            Some("optim.warmup_steps")
        );
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }
}
