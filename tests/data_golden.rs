//! The data module against TRL 1.16's golden texts, token ids and labels.

use std::path::{Path, PathBuf};

use orpo::data::{
    load_dataset, load_pairs_text, tokenize_pair, DataError, DataOptions, PairText, SkipReason,
    Tokenizer,
};
use serde_json::Value;

mod common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden(name: &str) -> Value {
    let path = fixtures().join(format!("golden/{name}.trl.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn pairs_file(model: &str) -> &'static str {
    match model {
        "tiny-opt" | "tiny-opt-legacy" => "pairs-implicit.jsonl",
        "tiny-opt-350m-layout" => "pairs-explicit.jsonl",
        _ => "pairs-chat.jsonl",
    }
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn as_i64(v: &[u32]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

const OPTS: DataOptions = DataOptions {
    max_length: 192,
    max_prompt_length: 192,
};

/// Writes the train (all but the last `n_eval` lines) or eval part of a pairs file.
fn split_file(model: &str, n_eval: usize, eval: bool, dir: &Path) -> PathBuf {
    let src = fixtures().join("golden").join(pairs_file(model));
    let text = std::fs::read_to_string(src).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let cut = lines.len() - n_eval;
    let part = if eval { &lines[cut..] } else { &lines[..cut] };
    let path = dir.join(format!(
        "{model}-{}.jsonl",
        if eval { "eval" } else { "train" }
    ));
    std::fs::write(&path, part.join("\n") + "\n").unwrap();
    path
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("orpo-data-golden-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn check_model(model: &str, golden_name: &str) {
    let g = golden(golden_name);
    let tok = Tokenizer::from_dir(&fixtures().join(model)).unwrap();
    assert_eq!(
        tok.pad_id() as i64,
        g["pad_token_id"].as_i64().unwrap(),
        "{model}: pad id"
    );
    let n_eval = g["settings"]["eval_pairs"].as_u64().unwrap() as usize;
    let dir = scratch_dir(model);
    for (eval, key) in [(false, "tokenized"), (true, "tokenized_eval")] {
        let path = split_file(model, n_eval, eval, &dir);
        let expected = g[key].as_array().unwrap();

        let texts = load_pairs_text(&path, &tok).unwrap();
        assert_eq!(texts.len(), expected.len(), "{model} {key}: pair count");
        for (i, (t, e)) in texts.iter().zip(expected).enumerate() {
            let want = PairText {
                prompt: e["prompt"].as_str().unwrap().into(),
                chosen: e["chosen"].as_str().unwrap().into(),
                rejected: e["rejected"].as_str().unwrap().into(),
            };
            assert_eq!(t, &want, "{model} {key}[{i}]: texts");
        }

        let ds = load_dataset(&path, &tok, &OPTS).unwrap();
        assert_eq!(ds.pairs.len(), expected.len(), "{model} {key}: kept");
        assert_eq!(ds.stats.truncated, 0);
        assert_eq!(ds.stats.skipped_total(), 0);
        for (i, (p, e)) in ds.pairs.iter().zip(expected).enumerate() {
            let ctx = format!("{model} {key}[{i}]");
            assert_eq!(
                as_i64(&p.prompt_input_ids),
                ids(&e["prompt_input_ids"]),
                "{ctx}: prompt ids"
            );
            assert_eq!(
                as_i64(&p.chosen_input_ids),
                ids(&e["chosen_input_ids"]),
                "{ctx}: chosen ids"
            );
            assert_eq!(
                p.chosen_labels,
                ids(&e["chosen_labels"]),
                "{ctx}: chosen labels"
            );
            assert_eq!(
                as_i64(&p.rejected_input_ids),
                ids(&e["rejected_input_ids"]),
                "{ctx}: rejected ids"
            );
            assert_eq!(
                p.rejected_labels,
                ids(&e["rejected_labels"]),
                "{ctx}: rejected labels"
            );
            assert!(!p.truncated);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn golden_tiny_opt() {
    check_model("tiny-opt", "tiny-opt");
}

#[test]
fn golden_tiny_opt_legacy() {
    check_model("tiny-opt-legacy", "tiny-opt");
}

#[test]
fn golden_tiny_opt_350m_layout() {
    check_model("tiny-opt-350m-layout", "tiny-opt-350m-layout");
}

#[test]
fn golden_tiny_mistral() {
    check_model("tiny-mistral", "tiny-mistral");
}

#[test]
fn golden_tiny_qwen2() {
    check_model("tiny-qwen2", "tiny-qwen2");
}

#[test]
fn golden_tiny_gemma() {
    check_model("tiny-gemma", "tiny-gemma");
}

#[test]
fn golden_tiny_phi3() {
    check_model("tiny-phi3", "tiny-phi3");
}

#[test]
fn golden_tiny_llama3() {
    check_model("tiny-llama3", "tiny-llama3");
}

#[test]
fn golden_tiny_qwen3() {
    check_model("tiny-qwen3", "tiny-qwen3");
}

#[test]
fn golden_tiny_gemma2() {
    check_model("tiny-gemma2", "tiny-gemma2");
}

#[test]
fn golden_tiny_gemma3() {
    check_model("tiny-gemma3", "tiny-gemma3");
}

/// transformers 5.24 (checked with AutoTokenizer): qwen2 folders always get `Qwen2Tokenizer`'s
/// pre-tokenizer (digits one by one); qwen3 folders only when they declare that class, as the
/// hub's do, not when they declare a generic one (the tiny-qwen3 fixture, whose golden pins it).
#[test]
fn qwen_pretokenizer_follows_the_declared_tokenizer_class() {
    let tmp = tempfile::tempdir().unwrap();
    let digits = |dir: &Path| Tokenizer::from_dir(dir).unwrap().encode(" 400").unwrap();
    let (split, merged) = (vec![220, 19, 15, 15], vec![220, 19, 843]);
    assert_eq!(digits(&fixtures().join("tiny-qwen2")), split);
    assert_eq!(digits(&fixtures().join("tiny-qwen3")), merged);
    for (model, class, want) in [
        ("tiny-qwen3", "Qwen2Tokenizer", &split),
        ("tiny-qwen3", "Qwen2TokenizerFast", &split),
        ("tiny-qwen2", "PreTrainedTokenizerFast", &split),
    ] {
        let dir = tmp.path().join(format!("{model}-{class}"));
        common::edited_copy(model, &dir, "tokenizer_config.json", |c| {
            c["tokenizer_class"] = Value::from(class)
        });
        assert_eq!(&digits(&dir), want, "{model} declaring {class}");
    }
}

#[test]
fn special_tokens() {
    let opt = Tokenizer::from_dir(&fixtures().join("tiny-opt")).unwrap();
    assert_eq!(
        (opt.bos_id(), opt.eos_id(), opt.pad_id()),
        (Some(1002), 1002, 1001)
    );
    let legacy = Tokenizer::from_dir(&fixtures().join("tiny-opt-legacy")).unwrap();
    assert_eq!(
        (legacy.bos_id(), legacy.eos_id(), legacy.pad_id()),
        (Some(1002), 1002, 1001)
    );
    let mistral = Tokenizer::from_dir(&fixtures().join("tiny-mistral")).unwrap();
    assert_eq!(
        (mistral.bos_id(), mistral.eos_id(), mistral.pad_id()),
        (Some(1001), 1002, 1002)
    );
    assert!(mistral.chat_template().unwrap().contains("[INST]"));
    let qwen = Tokenizer::from_dir(&fixtures().join("tiny-qwen2")).unwrap();
    assert_eq!(
        (qwen.bos_id(), qwen.eos_id(), qwen.pad_id()),
        (None, 1002, 1000)
    );
    assert!(qwen.chat_template().unwrap().contains("im_start"));
    assert!(opt.chat_template().is_none());
}

#[test]
fn legacy_tokenizer_matches_tokenizer_json() {
    let fast = Tokenizer::from_dir(&fixtures().join("tiny-opt")).unwrap();
    let legacy = Tokenizer::from_dir(&fixtures().join("tiny-opt-legacy")).unwrap();
    let mut texts: Vec<String> = Vec::new();
    for f in [
        "pairs-implicit.jsonl",
        "pairs-explicit.jsonl",
        "pairs-chat.jsonl",
    ] {
        let text = std::fs::read_to_string(fixtures().join("golden").join(f)).unwrap();
        texts.push(text);
    }
    texts.push("</s>hello<pad> world</s>  \n\n é \u{2019}".into());
    for t in &texts {
        assert_eq!(fast.encode(t).unwrap(), legacy.encode(t).unwrap());
        let a = fast.inner().encode(t.as_str(), true).unwrap();
        let b = legacy.inner().encode(t.as_str(), true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "with special tokens");
    }
}

#[test]
fn save_and_reload() {
    for model in [
        "tiny-opt-legacy",
        "tiny-qwen2",
        "tiny-mistral",
        "tiny-qwen3",
    ] {
        let tok = Tokenizer::from_dir(&fixtures().join(model)).unwrap();
        let dir = scratch_dir(&format!("save-{model}"));
        tok.save_to(&dir).unwrap();
        let back = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(back.bos_id(), tok.bos_id());
        assert_eq!(back.eos_id(), tok.eos_id());
        assert_eq!(back.pad_id(), tok.pad_id());
        assert_eq!(back.chat_template(), tok.chat_template());
        let t = "\n\nHuman: hello there</s>\n\nAssistant: hi";
        assert_eq!(back.encode(t).unwrap(), tok.encode(t).unwrap());
        assert!(dir.join("tokenizer.json").is_file());
        assert!(dir.join("special_tokens_map.json").is_file());
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["eos_token"].as_str(), Some(tok.eos_token()));
        // transformers 4.x has no `TokenizersBackend` (transformers 5's name for it).
        let class = cfg["tokenizer_class"].as_str().unwrap();
        assert_ne!(class, "TokenizersBackend", "{model}");
        // transformers before 4.47 reads the template from tokenizer_config.json only.
        assert_eq!(
            cfg["chat_template"].as_str(),
            tok.chat_template(),
            "{model}"
        );
        let jinja = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        assert_eq!(jinja.as_deref(), tok.chat_template(), "{model}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn opt_tok() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("tiny-opt")).unwrap()
}

fn pair(prompt: &str, chosen: &str, rejected: &str) -> PairText {
    PairText {
        prompt: prompt.into(),
        chosen: chosen.into(),
        rejected: rejected.into(),
    }
}

#[test]
fn truncation_keeps_prompt_end_with_bos_and_answer_start() {
    let tok = opt_tok();
    let text = pair(
        "\n\nHuman: Is it possible to download a car? Please tell me everything.\n\nAssistant:",
        " I am not sure what you mean by that. Can you clarify?",
        " No.",
    );
    let full = tokenize_pair(
        &text,
        &tok,
        &DataOptions {
            max_length: 512,
            max_prompt_length: 512,
        },
    )
    .unwrap();
    assert!(!full.truncated);
    let bos = tok.bos_id().unwrap();
    assert_eq!(full.prompt_input_ids[0], bos);
    let plen = full.prompt_input_ids.len();
    let chosen_answer = &full.chosen_input_ids[plen..];
    assert!(
        plen > 8 && chosen_answer.len() > 8,
        "fixture text long enough"
    );

    let opts = DataOptions {
        max_length: 16,
        max_prompt_length: 8,
    };
    let cut = tokenize_pair(&text, &tok, &opts).unwrap();
    assert!(cut.truncated);
    // Prompt: BOS + its last 7 tokens.
    let mut want_prompt = vec![bos];
    want_prompt.extend_from_slice(&full.prompt_input_ids[plen - 7..]);
    assert_eq!(cut.prompt_input_ids, want_prompt);
    // Chosen: prompt + the first 8 answer tokens (no EOS: cut off).
    assert_eq!(cut.chosen_input_ids.len(), 16);
    assert_eq!(&cut.chosen_input_ids[..8], &want_prompt[..]);
    assert_eq!(&cut.chosen_input_ids[8..], &chosen_answer[..8]);
    assert_eq!(cut.chosen_labels[..8], [-100; 8]);
    assert_eq!(
        cut.chosen_labels[8..],
        chosen_answer[..8]
            .iter()
            .map(|&x| x as i64)
            .collect::<Vec<_>>()[..]
    );
    // Rejected is short: it keeps its EOS.
    assert_eq!(*cut.rejected_input_ids.last().unwrap(), tok.eos_id());
    assert!(cut.rejected_input_ids.len() <= 16);
    assert_eq!(&cut.rejected_input_ids[..8], &want_prompt[..]);

    // TRL 1.16 behaviour (prompt never cut): answers cut to max_length - prompt length.
    let trl = tokenize_pair(
        &text,
        &tok,
        &DataOptions {
            max_length: plen + 3,
            max_prompt_length: plen + 3,
        },
    )
    .unwrap();
    assert_eq!(trl.prompt_input_ids, full.prompt_input_ids);
    assert_eq!(trl.chosen_input_ids.len(), plen + 3);
    assert_eq!(&trl.chosen_input_ids[plen..], &chosen_answer[..3]);
}

#[test]
fn pairs_that_cannot_fit_are_skipped() {
    let tok = opt_tok();
    let text = pair(
        "\n\nHuman: Is it possible to download a car?\n\nAssistant:",
        " Yes.",
        " No.",
    );
    let full = tokenize_pair(
        &text,
        &tok,
        &DataOptions {
            max_length: 512,
            max_prompt_length: 512,
        },
    )
    .unwrap();
    let plen = full.prompt_input_ids.len();
    let r = tokenize_pair(
        &text,
        &tok,
        &DataOptions {
            max_length: plen,
            max_prompt_length: plen,
        },
    );
    assert_eq!(r.unwrap_err(), SkipReason::PromptTooLong);
    let r = tokenize_pair(
        &text,
        &tok,
        &DataOptions {
            max_length: 4,
            max_prompt_length: 100,
        },
    );
    assert_eq!(r.unwrap_err(), SkipReason::PromptTooLong);
    // A cut prompt leaves room again.
    let ok = tokenize_pair(
        &text,
        &tok,
        &DataOptions {
            max_length: 6,
            max_prompt_length: 4,
        },
    )
    .unwrap();
    assert!(ok.truncated);
    assert_eq!(ok.prompt_input_ids.len(), 4);

    // In a file: the pair that cannot fit is counted, the other kept.
    let dir = scratch_dir("skip");
    let path = dir.join("p.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"Hi\", \"chosen\": \" a\", \"rejected\": \" b\"}\n\
         {\"prompt\": \"\\n\\nHuman: Is it possible to download a car?\\n\\nAssistant:\", \"chosen\": \" Yes.\", \"rejected\": \" No.\"}\n",
    )
    .unwrap();
    let ds = load_dataset(
        &path,
        &tok,
        &DataOptions {
            max_length: 8,
            max_prompt_length: 8,
        },
    )
    .unwrap();
    assert_eq!(ds.pairs.len(), 1);
    assert_eq!(ds.stats.rows, 2);
    assert_eq!(ds.stats.skipped.get(&SkipReason::PromptTooLong), Some(&1));
    assert!(ds.stats.skipped_examples[0].0.ends_with("p.jsonl:2"));
    assert_eq!(ds.stats.to_json()["skipped"], 1);
    assert!(ds.stats.render().contains("prompt alone fills max_length"));
    let err = load_dataset(
        &path,
        &tok,
        &DataOptions {
            max_length: 2,
            max_prompt_length: 2,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, DataError::NothingKept { skipped: 2, .. }),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn load_err(name: &str, contents: &str, model: &str) -> String {
    let dir = scratch_dir(&format!("err-{name}"));
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    let tok = Tokenizer::from_dir(&fixtures().join(model)).unwrap();
    let e = load_pairs_text(&path, &tok).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).ok();
    e
}

#[test]
fn bad_rows_name_file_line_and_field() {
    let good = "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n";
    let e = load_err(
        "a.jsonl",
        &format!("{good}\n{{\"prompt\": \"p\", \"chosen\": \n"),
        "tiny-opt",
    );
    assert!(e.contains("a.jsonl:3: invalid JSON"), "{e}");
    let e = load_err(
        "b.jsonl",
        &format!("{good}{{\"prompt\": \"p\", \"chosen\": \"c\"}}\n"),
        "tiny-opt",
    );
    assert!(e.contains("b.jsonl:2: field `rejected`: missing"), "{e}");
    let e = load_err(
        "c.jsonl",
        &format!("{good}{good}{{\"prompt\": 5, \"chosen\": \"c\", \"rejected\": \"r\"}}\n"),
        "tiny-opt",
    );
    assert!(
        e.contains(
            "c.jsonl:3: field `prompt`: expected a string or a list of messages, got a number"
        ),
        "{e}"
    );
    let row = r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "bot", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let e = load_err("d.jsonl", row, "tiny-qwen2");
    assert!(
        e.contains("d.jsonl:1: field `chosen[0].role`: unknown role \"bot\""),
        "{e}"
    );
    // Conversational data needs a template.
    let row = r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let e = load_err("e.jsonl", row, "tiny-opt");
    assert!(
        e.contains("e.jsonl:1: conversational row") && e.contains("no chat template"),
        "{e}"
    );
    // The Mistral template raises on a system message.
    let row = r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let e = load_err("f.jsonl", row, "tiny-mistral");
    assert!(
        e.contains("f.jsonl:1: chat template failed to render `prompt`")
            && e.contains("Only user and assistant roles are supported"),
        "{e}"
    );
    // JSON array: element index.
    let e = load_err(
        "g.json",
        &format!("[{}, {{\"chosen\": \"c\", \"rejected\": []}}]", good.trim()),
        "tiny-opt",
    );
    assert!(e.contains("g.json[1]: field `rejected`"), "{e}");
    let e = load_err("h.jsonl", "\n\n", "tiny-opt");
    assert!(e.contains("h.jsonl: the data set is empty"), "{e}");
}

#[test]
fn json_array_bom_crlf_input() {
    let tok = opt_tok();
    let dir = scratch_dir("formats");
    let a = dir.join("a.json");
    std::fs::write(&a, "\u{feff}\r\n[{\"prompt\": \"P\", \"chosen\": \" c\", \"rejected\": \" r\"},\r\n {\"chosen\": \"Q: x yes\", \"rejected\": \"Q: x no\"}]\r\n").unwrap();
    let texts = load_pairs_text(&a, &tok).unwrap();
    assert_eq!(
        texts,
        vec![pair("P", " c", " r"), pair("Q: x", " yes", " no")]
    );
    let ds = load_dataset(&a, &tok, &OPTS).unwrap();
    assert_eq!(ds.format, "mixed");
    let b = dir.join("b.jsonl");
    std::fs::write(&b, "\u{feff}{\"chosen\": \"Q: x yes\", \"rejected\": \"Q: x no\"}\r\n\r\n{\"chosen\": \"ab\", \"rejected\": \"ab c\"}\r\n").unwrap();
    let ds = load_dataset(&b, &tok, &OPTS).unwrap();
    assert_eq!(ds.format, "implicit");
    assert_eq!(ds.pairs[1].text, pair("a", "b", "b c"));
    assert_eq!(ds.stats.rows, 2);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_configured_chat_template_stands_in_for_the_models() {
    // tiny-qwen2's tokenizer without its template, given it back by data.chat_template (inline
    // or as a file), tokenises the chat pairs as the model's own (TRL-golden) tokenizer does.
    let src = fixtures().join("tiny-qwen2");
    let own = Tokenizer::from_dir(&src).unwrap();
    let template = own.chat_template().unwrap().to_string();
    let dir = scratch_dir("no-template");
    for f in ["tokenizer.json", "config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let pairs = fixtures().join("golden/pairs-chat.jsonl");
    let bare = Tokenizer::from_dir(&dir).unwrap();
    assert!(bare.chat_template().is_none());
    let err = load_dataset(&pairs, &bare, &OPTS).unwrap_err().to_string();
    assert!(err.contains("data.chat_template"), "{err}");

    let want = load_dataset(&pairs, &own, &OPTS).unwrap();
    let file = dir.join("template.jinja");
    std::fs::write(&file, &template).unwrap();
    let file = file.display().to_string();
    for setting in [template.as_str(), file.as_str()] {
        let mut tok = Tokenizer::from_dir(&dir).unwrap();
        orpo::data::apply_chat_template_setting(&mut tok, Some(setting)).unwrap();
        assert_eq!(tok.chat_template(), Some(template.as_str()));
        let got = load_dataset(&pairs, &tok, &OPTS).unwrap();
        assert_eq!(got.pairs.len(), want.pairs.len());
        for (g, w) in got.pairs.iter().zip(&want.pairs) {
            assert_eq!(g.prompt_input_ids, w.prompt_input_ids);
            assert_eq!(g.chosen_input_ids, w.chosen_input_ids);
            assert_eq!(g.rejected_input_ids, w.rejected_input_ids);
        }
    }
    let mut tok = Tokenizer::from_dir(&dir).unwrap();
    let err = orpo::data::apply_chat_template_setting(&mut tok, Some("{% for m in messages %}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("data.chat_template"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_saved_tokenizer_lists_added_special_tokens_as_4x_reads_them() {
    // transformers 5 saves `extra_special_tokens` as a list; 4.47-4.55 take that key for a
    // dict and fail to load (`'list' object has no attribute 'keys'`).
    let src = fixtures().join("tiny-llama3");
    let dir = scratch_dir("extra-special");
    for f in ["tokenizer.json", "chat_template.jinja", "config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let listed = serde_json::json!(["<|eot_id|>", "<|start_header_id|>"]);
    cfg["extra_special_tokens"] = listed.clone();
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let out = dir.join("saved");
    tok.save_to(&out).unwrap();
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["additional_special_tokens"], listed);
    assert!(saved.get("extra_special_tokens").is_none(), "{saved}");
    std::fs::remove_dir_all(&dir).ok();
}
