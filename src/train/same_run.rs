//! Whether a checkpoint belongs to the run a config describes. A resumed run must train the
//! same steps on the same pairs with the same settings, or its result is neither the old run's
//! nor a new one's; so every setting that shapes training is compared with the checkpoint's
//! `orpo.toml`, and the training pairs themselves with a fingerprint, before anything loads.

use crate::config::{Config, LoraTargets};
use crate::data::TokenizedPair;
use crate::Error;
use std::collections::BTreeMap;
use std::path::Path;

/// Settings a resumed run may change: where and how often it writes, logs and evaluates, and
/// where and how it computes; none changes what the steps train.
const MAY_CHANGE: [&str; 16] = [
    "model.device",
    "data.eval",
    "data.eval_split",
    "train.output_dir",
    "train.save_every",
    "train.save_total_limit",
    "train.log_every",
    "train.eval_every",
    "train.eval_delay",
    "train.eval_on_start",
    "train.logging_first_step",
    "train.save_only_model",
    "train.save_dtype",
    "train.eval_batch_size",
    "train.report_to",
    "train.gradient_checkpointing",
];

/// The evaluations' settings: with early stopping they decide where training ends, so then
/// they may not change.
const EVALUATIONS: [&str; 5] = [
    "data.eval",
    "data.eval_split",
    "train.eval_every",
    "train.eval_delay",
    "train.eval_batch_size",
];

/// Where the training pairs come from. Moving or renaming the data is fine when the pairs are
/// the same, which the fingerprint decides (checkpoints without one compare these keys).
const DATA_SOURCE: [&str; 8] = [
    "data.train",
    "data.train_split",
    "data.subset",
    "data.revision",
    "data.prompt_column",
    "data.chosen_column",
    "data.rejected_column",
    // Its text reaches training only through the pairs' tokens.
    "data.chat_template",
];

/// A fingerprint of the tokenised training pairs, in order: FNV-1a over every id and label.
pub fn data_fingerprint(pairs: &[TokenizedPair]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(pairs.len() as u64);
    for p in pairs {
        for ids in [
            &p.prompt_input_ids,
            &p.chosen_input_ids,
            &p.rejected_input_ids,
        ] {
            eat(ids.len() as u64);
            ids.iter().for_each(|&t| eat(u64::from(t)));
        }
        for labels in [&p.chosen_labels, &p.rejected_labels] {
            eat(labels.len() as u64);
            labels.iter().for_each(|&t| eat(t as u64));
        }
    }
    format!("{h:016x}")
}

/// Checks `config` and the pairs' fingerprint against checkpoint `dir` (its `orpo.toml` and
/// trainer_state.json's `data_fingerprint`; checkpoints of older versions may lack either).
/// The error lists every setting that differs.
pub fn check(
    dir: &Path,
    config: &Config,
    fingerprint: &str,
    saved_fingerprint: Option<&str>,
) -> Result<(), Error> {
    let bad = |msg: String| Error::Input(format!("cannot resume from {}: {msg}", dir.display()));
    let pairs_checked = saved_fingerprint.is_some();
    if let Some(saved) = saved_fingerprint {
        if saved != fingerprint {
            return Err(bad(format!(
                "the training pairs differ from the run's (read from data.train = {:?} with the \
                 data.* split, subset and columns, tokenised with data.max_length = {}, \
                 data.max_prompt_length = {}); resume with the data the run started with",
                config
                    .data
                    .train
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                config.data.max_length,
                config.data.max_prompt_length,
            )));
        }
    }
    let saved_path = dir.join("orpo.toml");
    let Ok(text) = std::fs::read_to_string(&saved_path) else {
        return Ok(());
    };
    let saved = Config::from_toml_str(&text, &saved_path.display().to_string(), &[])
        .map_err(|e| bad(e.to_string()))?;
    let (was, now) = (flat(&normalized(&saved)), flat(&normalized(config)));
    // LoRA's settings matter only where it is on on both sides (on one side only, its
    // `enabled` says all).
    let lora_off = !saved.lora.enabled || !config.lora.enabled;
    let stops_early =
        saved.train.early_stopping_patience > 0 || config.train.early_stopping_patience > 0;
    let mut keys: Vec<&String> = was.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| {
            let k = k.as_str();
            let free = (MAY_CHANGE.contains(&k) && !(stops_early && EVALUATIONS.contains(&k)))
                || (pairs_checked && DATA_SOURCE.contains(&k))
                || (lora_off && k.starts_with("lora.") && k != "lora.enabled");
            !free
        })
        .filter_map(|k| {
            let (a, b) = (was.get(k), now.get(k));
            (a != b).then(|| format!("{k} = {} (the run: {})", shown(b), shown(a)))
        })
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(bad(format!(
        "this config changes what the run trains: {}; resume with the config the run started \
         with (saved as {}); only where and how often it saves, logs and evaluates (not how it \
         evaluates under early stopping, which ends the run by the evaluations), the device \
         and gradient checkpointing may change",
        changed.join(", "),
        saved_path.display()
    )))
}

fn shown(v: Option<&String>) -> &str {
    v.map_or("unset", String::as_str)
}

/// The config with equivalent spellings made equal: a local model folder by its canonical path
/// (`./m`, `m/` and `/abs/m` are one model), an unset model revision as `main`, LoRA's target
/// list as a set.
fn normalized(config: &Config) -> Config {
    let mut c = config.clone();
    if let Ok(path) = std::fs::canonicalize(&c.model.id) {
        if path.is_dir() {
            c.model.id = path.display().to_string();
        }
    }
    if c.model.revision.is_none() {
        c.model.revision = Some("main".into());
    }
    if let LoraTargets::Modules(m) = &mut c.lora.targets {
        m.sort();
        m.dedup();
    }
    c
}

/// `section.key` → the value as TOML writes it.
fn flat(config: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(config) {
        for (section, keys) in sections {
            if let toml::Value::Table(keys) = keys {
                for (key, value) in keys {
                    out.insert(format!("{section}.{key}"), value.to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::PairText;

    fn config(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml_str("[model]\nid = 'm'\n", "c.toml", &sets).unwrap()
    }

    fn checkpoint(c: &Config) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("orpo.toml"), c.to_toml_string()).unwrap();
        dir
    }

    #[test]
    fn names_every_changed_setting_and_allows_the_rest() {
        let run = config(&["optim.lr=1e-3", "data.train=a.jsonl"]);
        let dir = checkpoint(&run);
        let same = config(&[
            "optim.lr=1e-3",
            "data.train=a.jsonl",
            "model.device=cuda",
            "train.output_dir=elsewhere",
            "train.save_every=7",
            "train.log_every=3",
            "train.gradient_checkpointing=true",
            "lora.r=4",
        ]);
        check(dir.path(), &same, "f", None).unwrap();
        let e = check(
            dir.path(),
            &config(&["optim.lr=5e-4", "orpo.beta=0.5", "data.train=a.jsonl"]),
            "f",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("optim.lr = 0.0005 (the run: 0.001)")
                && e.contains("orpo.beta = 0.5 (the run: 0.1)")
                && e.contains("orpo.toml"),
            "{e}"
        );
        // LoRA settings count once LoRA is on.
        let lora = config(&["lora.enabled=true", "data.train=a.jsonl", "optim.lr=1e-3"]);
        let dir = checkpoint(&lora);
        let e = check(
            dir.path(),
            &config(&[
                "lora.enabled=true",
                "lora.targets=[\"q_proj\"]",
                "data.train=a.jsonl",
                "optim.lr=1e-3",
            ]),
            "f",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lora.targets"), "{e}");
    }

    /// Under early stopping the evaluations decide where the run ends: they may not change.
    #[test]
    fn early_stopping_fixes_the_evaluations() {
        let sets = |extra: &[&'static str]| {
            let mut all = vec![
                "data.train=a.jsonl",
                "data.eval=b.jsonl",
                "train.eval_every=4",
                "train.metric_for_best_model=loss",
            ];
            all.extend_from_slice(extra);
            config(&all)
        };
        let plain = checkpoint(&sets(&[]));
        let stopping = checkpoint(&sets(&["train.early_stopping_patience=2"]));
        let moved = [
            "train.eval_every=2",
            "data.eval=c.jsonl",
            "train.eval_batch_size=3",
        ];
        check(plain.path(), &sets(&moved), "f", None).unwrap();
        let mut with_patience = moved.to_vec();
        with_patience.push("train.early_stopping_patience=2");
        let e = check(stopping.path(), &sets(&with_patience), "f", None)
            .unwrap_err()
            .to_string();
        for key in ["train.eval_every", "data.eval", "train.eval_batch_size"] {
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    /// The optimizer's state is kept differently (8-bit codes or f32 moments): a run cannot
    /// go on with the other one; an alias of the same optimizer is the same setting.
    #[test]
    fn the_optimizer_cannot_change() {
        let dir = checkpoint(&config(&["optim.optimizer=adamw_bnb_8bit"]));
        check(
            dir.path(),
            &config(&["optim.optimizer=paged_adamw_8bit"]),
            "f",
            None,
        )
        .unwrap();
        let e = check(dir.path(), &config(&[]), "f", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("optim.optimizer = \"adamw_torch\" (the run: \"adamw_8bit\")"),
            "{e}"
        );
    }

    #[test]
    fn equivalent_spellings_are_the_same_setting() {
        let here = env!("CARGO_MANIFEST_DIR");
        let model = |id: &str| format!("model.id={id}");
        let run = config(&[
            &model(&format!("{here}/tests/fixtures/tiny-opt")),
            "lora.enabled=true",
            "lora.targets=[\"q_proj\", \"v_proj\"]",
        ]);
        let dir = checkpoint(&run);
        let same = config(&[
            &model(&format!("{here}/tests/../tests/fixtures/tiny-opt/")),
            "model.revision=main",
            "lora.enabled=true",
            "lora.targets=[\"v_proj\", \"q_proj\"]",
        ]);
        check(dir.path(), &same, "f", Some("f")).unwrap();
        let other = config(&[
            &model(&format!("{here}/tests/fixtures/tiny-llama3")),
            "lora.enabled=true",
            "lora.targets=[\"q_proj\", \"v_proj\"]",
        ]);
        let e = check(dir.path(), &other, "f", Some("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.id"), "{e}");
    }

    #[test]
    fn moved_data_resumes_when_the_pairs_are_the_same() {
        let dir = checkpoint(&config(&["data.train=a.jsonl"]));
        let moved = config(&["data.train=elsewhere/a.jsonl"]);
        check(dir.path(), &moved, "abc", Some("abc")).unwrap();
        let e = check(dir.path(), &moved, "abc", Some("abd"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("training pairs differ"), "{e}");
        // Without a saved fingerprint the data keys are compared.
        let e = check(dir.path(), &moved, "abc", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.train"), "{e}");
    }

    #[test]
    fn the_fingerprint_sees_order_and_labels() {
        let pair = |t: u32, label: i64| TokenizedPair {
            prompt_input_ids: vec![1, t],
            chosen_input_ids: vec![1, t, 5],
            chosen_labels: vec![-100, -100, label],
            rejected_input_ids: vec![1, t, 6],
            rejected_labels: vec![-100, -100, 6],
            truncated: false,
            text: PairText {
                prompt: String::new(),
                chosen: String::new(),
                rejected: String::new(),
            },
        };
        let a = data_fingerprint(&[pair(2, 5), pair(3, 5)]);
        assert_eq!(a, data_fingerprint(&[pair(2, 5), pair(3, 5)]));
        assert_ne!(a, data_fingerprint(&[pair(3, 5), pair(2, 5)]));
        assert_ne!(a, data_fingerprint(&[pair(2, 5), pair(3, 4)]));
        assert_ne!(a, data_fingerprint(&[pair(2, 5)]));
    }
}
