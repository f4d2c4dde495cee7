//! Every way data arrives: gzip JSON Lines, Parquet (written here with the parquet writer),
//! folders and globs of shards, column mapping, UltraFeedback-style rows, content given as
//! text parts; and `orpo data` end to end (summary, --json, --show).

mod common;

use common::json_lines;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use orpo::data::{
    load_source, load_source_text, ColumnMap, DataOptions, DataSource, PairText, Tokenizer,
};
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tok(model: &str) -> Tokenizer {
    Tokenizer::from_dir(&root().join("tests/fixtures").join(model)).unwrap()
}

const OPTS: DataOptions = DataOptions {
    max_length: 192,
    max_prompt_length: 192,
};

fn src(p: &Path) -> DataSource {
    DataSource::new(p.display().to_string())
}

/// Writes string columns `cols` of `rows` to a Parquet file (snappy), as `datasets` would.
fn write_string_parquet(path: &Path, cols: &[&str], rows: &[Value]) {
    let fields: String = cols
        .iter()
        .map(|c| format!("REQUIRED BYTE_ARRAY {c} (UTF8);"))
        .collect();
    let schema = Arc::new(parse_message_type(&format!("message schema {{ {fields} }}")).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let values: Vec<ByteArray> = rows
            .iter()
            .map(|r| ByteArray::from(r[cols[i]].as_str().unwrap()))
            .collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        col.close().unwrap();
        i += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

/// The 2000 HH-RLHF pairs of the project's shared data when they sit beside the checkout (as
/// in CI), else the 64-pair sample that ships with the repository.
fn hh_pairs() -> PathBuf {
    let shared = root().join("../shared/data/hh-rlhf-harmless/test-2000.jsonl");
    if shared.is_file() {
        shared
    } else {
        root().join("examples/data/hh-rlhf-64.jsonl")
    }
}

#[test]
fn parquet_and_gzip_give_the_same_pairs_as_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok("tiny-opt");
    let jsonl = hh_pairs();
    let rows = json_lines(&jsonl);
    let pq = dir.path().join("train-00000-of-00001.parquet");
    write_string_parquet(&pq, &["chosen", "rejected"], &rows);
    let gz = dir.path().join("pairs.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), Default::default());
    std::io::Write::write_all(&mut enc, &std::fs::read(&jsonl).unwrap()).unwrap();
    enc.finish().unwrap();

    let a = load_source(&src(&jsonl), &tok, &OPTS).unwrap();
    for other in [&pq, &gz] {
        let b = load_source(&src(other), &tok, &OPTS).unwrap();
        assert_eq!(a.pairs, b.pairs, "{}", other.display());
        // Same counts and lengths; only the skipped rows' locations name another file.
        let (mut sa, mut sb) = (a.stats.clone(), b.stats.clone());
        sa.skipped_examples.clear();
        sb.skipped_examples.clear();
        assert_eq!(sa, sb);
        assert_eq!(b.format, "implicit");
    }
    let b = load_source(&src(&pq), &tok, &OPTS).unwrap();
    // Parquet rows are named by their 0-based index; JSON Lines rows by their 1-based line.
    let line: usize = a.locations[0].rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        b.locations[0].ends_with(&format!("train-00000-of-00001.parquet row {}", line - 1)),
        "{} vs {}",
        a.locations[0],
        b.locations[0]
    );
}

#[test]
fn folders_and_globs_of_shards() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok("tiny-opt");
    let rows = json_lines(&root().join("tests/fixtures/golden/pairs-explicit.jsonl"));
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_string_parquet(
        &data.join("train-00000-of-00002.parquet"),
        &["prompt", "chosen", "rejected"],
        &rows[..4],
    );
    let lines: Vec<String> = rows[4..8].iter().map(|r| r.to_string()).collect();
    std::fs::write(data.join("train-00001-of-00002.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(data.join("test-00000-of-00001.jsonl"), rows[8].to_string()).unwrap();
    std::fs::write(dir.path().join("README.md"), "# card").unwrap();

    let whole = load_source_text(
        &src(&root().join("tests/fixtures/golden/pairs-explicit.jsonl")),
        &tok,
    )
    .unwrap();
    let ds = load_source(&src(dir.path()), &tok, &OPTS).unwrap();
    assert_eq!(ds.files.len(), 2, "{:?}", ds.files);
    assert_eq!(ds.pairs.len(), 8);
    let texts: Vec<PairText> = ds.pairs.iter().map(|p| p.text.clone()).collect();
    assert_eq!(texts, whole[..8].to_vec());
    assert!(ds.source.contains("split train") && ds.source.contains("2 files"));

    let mut test = src(dir.path());
    test.split = "test".into();
    let ds = load_source(&test, &tok, &OPTS).unwrap();
    assert_eq!(ds.pairs.len(), 1);
    let mut val = src(dir.path());
    val.split = "validation".into();
    let e = load_source(&val, &tok, &OPTS).unwrap_err().to_string();
    assert!(
        e.contains("no files for split `validation`") && e.contains("test, train"),
        "{e}"
    );

    let glob = format!("{}/data/train-*", dir.path().display());
    let ds = load_source(&DataSource::new(glob), &tok, &OPTS).unwrap();
    assert_eq!(ds.pairs.len(), 8);
    let e = load_source(
        &DataSource::new(format!("{}/nothing-*.jsonl", dir.path().display())),
        &tok,
        &OPTS,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("matches no file"), "{e}");
}

#[test]
fn column_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok("tiny-opt");
    let path = dir.path().join("se.jsonl");
    std::fs::write(
        &path,
        "{\"qid\": 1, \"question\": \"Why?\", \"response_j\": \" Because.\", \"response_k\": \" No.\"}\n\
         {\"qid\": 2, \"question\": \"How?\", \"response_j\": \" Carefully.\"}\n",
    )
    .unwrap();
    let mut s = src(&path);
    s.columns = ColumnMap {
        prompt: "question".into(),
        chosen: "response_j".into(),
        rejected: "response_k".into(),
    };
    let e = load_source(&s, &tok, &OPTS).unwrap_err().to_string();
    assert!(e.contains("se.jsonl:2: field `response_k`: missing"), "{e}");
    std::fs::write(
        &path,
        "{\"qid\": 1, \"question\": \"Why?\", \"response_j\": \" Because.\", \"response_k\": \" No.\"}\n",
    )
    .unwrap();
    let ds = load_source(&s, &tok, &OPTS).unwrap();
    assert_eq!(
        ds.pairs[0].text,
        PairText {
            prompt: "Why?".into(),
            chosen: " Because.".into(),
            rejected: " No.".into()
        }
    );
    // Without the mapping, the error lists the row's columns and the key to set.
    let e = load_source(&src(&path), &tok, &OPTS)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("field `chosen`: missing (the row has columns: qid, question, response_j, response_k; name yours with data.chosen_column)"),
        "{e}"
    );
}

fn msg(role: &str, content: Value) -> Value {
    json!({"role": role, "content": content})
}

#[test]
fn ultrafeedback_rows_and_text_parts() {
    let tok = tok("tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    let explicit = json!({
        "prompt": [msg("user", json!("What is 2+2?"))],
        "chosen": [msg("assistant", json!("4"))],
        "rejected": [msg("assistant", json!("5"))],
    });
    // UltraFeedback binarized: a string prompt, answers repeating the user turn, scores.
    let uf = json!({
        "prompt": "What is 2+2?",
        "prompt_id": "abc",
        "chosen": [msg("user", json!("What is 2+2?")), msg("assistant", json!("4"))],
        "rejected": [msg("user", json!("What is 2+2?")), msg("assistant", json!("5"))],
        "score_chosen": 9.0,
        "score_rejected": 2.5,
    });
    // A string prompt next to answers that do not repeat it becomes the user turn.
    let bare = json!({
        "prompt": "What is 2+2?",
        "chosen": [msg("assistant", json!("4"))],
        "rejected": [msg("assistant", json!("5"))],
    });
    // Content as a list of text parts.
    let parts = json!({
        "prompt": [msg("user", json!([{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]))],
        "chosen": [msg("assistant", json!([{"type": "text", "text": "4"}]))],
        "rejected": [msg("assistant", json!("5"))],
    });
    let path = dir.path().join("chat.jsonl");
    let lines: Vec<String> = [&explicit, &uf, &bare, &parts]
        .iter()
        .map(|v| v.to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let texts = load_source_text(&src(&path), &tok).unwrap();
    assert_eq!(texts.len(), 4);
    for t in &texts[1..] {
        assert_eq!(t, &texts[0]);
    }
    assert!(texts[0].prompt.contains("What is 2+2?"));
}

/// UltraFeedback as the hub serves it: Parquet with list<struct<content, role>> columns.
/// (prompt, chosen messages, rejected messages, score); messages are (role, content).
type ChatRow<'a> = (
    &'a str,
    Vec<(&'a str, &'a str)>,
    Vec<(&'a str, &'a str)>,
    f64,
);

fn write_chat_parquet(path: &Path, rows: &[ChatRow]) {
    let list = |name: &str| {
        format!(
            "OPTIONAL group {name} (LIST) {{ REPEATED group list {{ OPTIONAL group element {{ \
             OPTIONAL BYTE_ARRAY content (UTF8); OPTIONAL BYTE_ARRAY role (UTF8); }} }} }}"
        )
    };
    let schema = format!(
        "message schema {{ REQUIRED BYTE_ARRAY prompt (UTF8); {} {} REQUIRED DOUBLE score_chosen; }}",
        list("chosen"),
        list("rejected")
    );
    let schema = Arc::new(parse_message_type(&schema).unwrap());
    let props = Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut col_idx = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        match col_idx {
            0 => {
                let v: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.0)).collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            1..=4 => {
                // chosen.content, chosen.role, rejected.content, rejected.role
                let (mut vals, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
                for r in rows {
                    let msgs = if col_idx <= 2 { &r.1 } else { &r.2 };
                    for (k, (role, content)) in msgs.iter().enumerate() {
                        let text = if col_idx % 2 == 1 { content } else { role };
                        vals.push(ByteArray::from(*text));
                        def.push(4);
                        rep.push(if k == 0 { 0 } else { 1 });
                    }
                }
                col.typed::<ByteArrayType>()
                    .write_batch(&vals, Some(&def), Some(&rep))
                    .unwrap();
            }
            _ => {
                let v: Vec<f64> = rows.iter().map(|r| r.3).collect();
                col.typed::<DoubleType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
        }
        col.close().unwrap();
        col_idx += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn conversational_parquet() {
    let tok = tok("tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("train_prefs-00000-of-00001.parquet");
    write_chat_parquet(
        &pq,
        &[
            (
                "Hi?",
                vec![("user", "Hi?"), ("assistant", "Hello!")],
                vec![("user", "Hi?"), ("assistant", "Go away.")],
                8.0,
            ),
            (
                "2+2?",
                vec![("user", "2+2?"), ("assistant", "4")],
                vec![("user", "2+2?"), ("assistant", "5")],
                9.5,
            ),
        ],
    );
    let jsonl = dir.path().join("same.jsonl");
    let row = |p: &str, a: &str, b: &str| {
        json!({"prompt": [msg("user", json!(p))], "chosen": [msg("assistant", json!(a))], "rejected": [msg("assistant", json!(b))]}).to_string()
    };
    std::fs::write(
        &jsonl,
        format!(
            "{}\n{}\n",
            row("Hi?", "Hello!", "Go away."),
            row("2+2?", "4", "5")
        ),
    )
    .unwrap();
    let a = load_source(&src(&pq), &tok, &OPTS).unwrap();
    let b = load_source(&src(&jsonl), &tok, &OPTS).unwrap();
    assert_eq!(a.format, "conversational");
    assert_eq!(a.pairs, b.pairs);
    // The folder's split is found by its file name.
    let mut s = src(dir.path());
    s.split = "train_prefs".into();
    assert_eq!(load_source(&s, &tok, &OPTS).unwrap().pairs, b.pairs);
}

fn orpo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn orpo_data_summary_json_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nid = {:?}\n[data]\ntrain = {:?}\neval = {:?}\nmax_length = 64\nmax_prompt_length = 32\n",
            root().join("tests/fixtures/tiny-qwen2").display().to_string(),
            root().join("tests/fixtures/golden/pairs-chat.jsonl").display().to_string(),
            root().join("tests/fixtures/golden/pairs-chat.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (code, out, err) = orpo(&["data", "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("== train: ") && out.contains("(conversational format)"),
        "{out}"
    );
    assert!(
        out.contains("pairs:") && out.contains("truncated:") && out.contains("median"),
        "{out}"
    );

    let (code, out, err) = orpo(&["data", "--config", c, "--json", "--show", "2"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let t = &v["train"];
    assert_eq!(t["format"], "conversational");
    assert_eq!(t["rows"], 10);
    assert_eq!(
        t["pairs"].as_u64().unwrap() + t["skipped"].as_u64().unwrap(),
        10
    );
    assert!(t["truncated"].as_u64().unwrap() > 0);
    for k in ["min", "median", "p95", "max"] {
        assert!(t["tokens"]["total"][k].as_u64().unwrap() <= 64);
    }
    let ex = &t["examples"][0];
    let ids = ex["chosen"]["input_ids"].as_array().unwrap();
    let labels = ex["chosen"]["labels"].as_array().unwrap();
    let masked = ex["chosen"]["masked_tokens"].as_u64().unwrap() as usize;
    assert_eq!(ids.len(), labels.len());
    assert!(labels[..masked].iter().all(|l| l == -100));
    assert!(labels[masked..]
        .iter()
        .zip(&ids[masked..])
        .all(|(l, i)| l == i));
    assert!(ex["location"]
        .as_str()
        .unwrap()
        .ends_with("pairs-chat.jsonl:1"));
    assert!(v["eval"]["pairs"].as_u64().is_some());

    let (code, out, err) = orpo(&["data", "--config", c, "--show", "1", "--ids"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("--- example 1 of"), "{out}");
    assert!(
        out.contains("⟦") && out.contains("⟧«") && out.contains("»"),
        "{out}"
    );
    assert!(out.contains("  ids: -"), "{out}");
    // --ids without --show would print nothing of what it asks for.
    let (code, _, err) = orpo(&["data", "--config", c, "--ids"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--show"), "{err}");
}

#[test]
fn hh_rlhf_2000_pairs() {
    let hh_path = hh_pairs();
    let hh = hh_path.as_path();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nid = {:?}\n[data]\ntrain = {:?}\nmax_length = 512\nmax_prompt_length = 256\n",
            root().join("tests/fixtures/tiny-opt").display().to_string(),
            hh.display().to_string()
        ),
    )
    .unwrap();
    let start = std::time::Instant::now();
    let (code, out, err) = orpo(&["data", "--config", cfg.to_str().unwrap(), "--json"]);
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let t = &v["train"];
    assert_eq!(t["format"], "implicit");
    let n = std::fs::read_to_string(hh)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    assert_eq!(t["rows"], n);
    assert_eq!(t["pairs"], n);
    assert!(t["tokens"]["prompt"]["median"].as_u64().unwrap() > 20);
    assert!(t["tokens"]["total"]["max"].as_u64().unwrap() <= 512);
    // Measured ~2.5 s with the test profile on a 2-core machine; generous for slow CI.
    assert!(secs < 60.0, "took {secs:.1} s");
}

/// A list of locations (`data.train = [...]`) reads each in turn, every pair located in its
/// own file.
#[test]
fn a_list_of_locations_is_read_in_order() {
    let a = root().join("examples/data/explicit-10.jsonl");
    let b = root().join("examples/data/hh-rlhf-eval-16.jsonl");
    let mut both = src(&a);
    both.more = vec![b.display().to_string()];
    let tok = tok("tiny-opt");
    let ds = load_source(&both, &tok, &OPTS).unwrap();
    let (na, nb) = (
        load_source(&src(&a), &tok, &OPTS).unwrap().pairs.len(),
        load_source(&src(&b), &tok, &OPTS).unwrap().pairs.len(),
    );
    assert_eq!(ds.pairs.len(), na + nb);
    assert!(ds.locations[0].starts_with(&a.display().to_string()));
    assert!(ds.locations[na].starts_with(&b.display().to_string()));
    assert!(ds.source.contains(" + "), "{}", ds.source);
    // A missing member is named.
    both.more.push("no-such-file.jsonl".into());
    let e = load_source(&both, &tok, &OPTS).err().unwrap().to_string();
    assert!(e.contains("no-such-file.jsonl"), "{e}");
}

#[test]
fn eval_size_holds_out_a_seeded_share_of_the_training_pairs() {
    let t = tok("tiny-opt");
    let path = root().join("examples/data/hh-rlhf-64.jsonl");
    let opts = DataOptions {
        max_length: 2048,
        max_prompt_length: 2048,
    };
    let all = load_source(&src(&path), &t, &opts).unwrap();
    let n = all.pairs.len();
    assert_eq!(n, 64);
    let ids = |ds: &orpo::data::Dataset| -> Vec<Vec<u32>> {
        ds.pairs
            .iter()
            .map(|p| p.chosen_input_ids.clone())
            .collect()
    };
    // A fraction rounds up, as datasets' train_test_split: 64 * 0.1 = 6.4 -> 7.
    let (train, eval) = orpo::data::split_eval(all.clone(), 0.1, 42).unwrap();
    assert_eq!((train.pairs.len(), eval.pairs.len()), (57, 7));
    assert_eq!((train.stats.kept, eval.stats.kept), (57, 7));
    assert_eq!(train.locations.len() + eval.locations.len(), n);
    // Together the parts are the data set, each in file order.
    let mut merged: Vec<(String, Vec<u32>)> = train
        .locations
        .iter()
        .cloned()
        .zip(ids(&train))
        .chain(eval.locations.iter().cloned().zip(ids(&eval)))
        .collect();
    let line = |loc: &str| -> usize { loc.rsplit(':').next().unwrap().parse().unwrap() };
    for part in [&train, &eval] {
        let lines: Vec<usize> = part.locations.iter().map(|l| line(l)).collect();
        assert!(lines.windows(2).all(|w| w[0] < w[1]), "{lines:?}");
    }
    merged.sort_by_key(|(loc, _)| line(loc));
    let want: Vec<(String, Vec<u32>)> = all.locations.iter().cloned().zip(ids(&all)).collect();
    assert_eq!(merged, want);
    // The same seed holds out the same pairs; another seed others.
    let (_, again) = orpo::data::split_eval(all.clone(), 0.1, 42).unwrap();
    assert_eq!(ids(&again), ids(&eval));
    let (_, other) = orpo::data::split_eval(all.clone(), 0.1, 7).unwrap();
    assert_ne!(ids(&other), ids(&eval));
    // A whole number is a count; nothing left to train on is refused.
    let (_, five) = orpo::data::split_eval(all.clone(), 5.0, 42).unwrap();
    assert_eq!(five.pairs.len(), 5);
    let e = orpo::data::split_eval(all, 64.0, 42)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data.eval_size") && e.contains("64 of the 64"),
        "{e}"
    );
}
