//! The corpus in tests/bad_inputs/: every class of bad input gets an error that names the file,
//! the line (array element or Parquet row) and the field, before any training; `orpo data`
//! exits with 2 on them. Odd but valid inputs (BOM, CRLF, blank lines, extra columns, a very
//! long line) load.

use std::path::{Path, PathBuf};
use std::process::Command;

use orpo::data::{load_source, DataOptions, DataSource, SkipReason, Tokenizer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(name: &str) -> PathBuf {
    root().join("tests/bad_inputs").join(name)
}

fn tok(model: &str) -> Tokenizer {
    Tokenizer::from_dir(&root().join("tests/fixtures").join(model)).unwrap()
}

const OPTS: DataOptions = DataOptions {
    max_length: 128,
    max_prompt_length: 64,
};

/// (file, fixture model, fragments the error must contain; `{f}` stands for the file path).
const CASES: &[(&str, &str, &[&str])] = &[
    ("invalid_json.jsonl", "tiny-opt", &["{f}:3: invalid JSON"]),
    (
        "invalid_utf8.jsonl",
        "tiny-opt",
        &["{f}:2: invalid JSON", "not valid UTF-8"],
    ),
    (
        "missing_field.jsonl",
        "tiny-opt",
        &[
            "{f}:2: field `rejected`: missing",
            "the row has columns: prompt, chosen",
        ],
    ),
    (
        "empty_field.jsonl",
        "tiny-opt",
        &["{f}:3: field `chosen`: is empty"],
    ),
    (
        "wrong_type.jsonl",
        "tiny-opt",
        &["{f}:1: field `prompt`: expected a string or a list of messages, got a number"],
    ),
    (
        "null_field.jsonl",
        "tiny-opt",
        &["{f}:1: field `rejected`: is null"],
    ),
    (
        "not_object.jsonl",
        "tiny-opt",
        &["{f}:2: expected a JSON object", "got a list"],
    ),
    (
        "mixed_types.jsonl",
        "tiny-opt",
        &[
            "{f}:1: field `rejected`",
            "both must be strings or both message lists",
        ],
    ),
    (
        "unknown_role.jsonl",
        "tiny-qwen2",
        &["{f}:1: field `chosen[0].role`: unknown role \"bot\""],
    ),
    (
        "role_not_string.jsonl",
        "tiny-qwen2",
        &["{f}:1: field `rejected[0].role`: expected a string, got a number"],
    ),
    (
        "content_wrong_type.jsonl",
        "tiny-qwen2",
        &["{f}:1: field `chosen[0].content`: expected a string or a list of text parts"],
    ),
    (
        "image_part.jsonl",
        "tiny-qwen2",
        &["{f}:1: field `prompt[0].content[0].type`: only text parts are supported"],
    ),
    (
        "ends_with_user.jsonl",
        "tiny-qwen2",
        &["{f}:1: field `rejected`: the conversation must end with an assistant turn"],
    ),
    (
        "no_shared_prompt.jsonl",
        "tiny-qwen2",
        &["{f}:1: field `chosen`", "share no leading message"],
    ),
    (
        "chat_without_template.jsonl",
        "tiny-opt",
        &["{f}:1: conversational row", "no chat template"],
    ),
    (
        "template_fails.jsonl",
        "tiny-mistral",
        &["{f}:1: chat template failed to render `prompt`"],
    ),
    ("empty.jsonl", "tiny-opt", &["{f}: the data set is empty"]),
    (
        "all_identical.jsonl",
        "tiny-opt",
        &["{f}: every pair (2) has identical chosen and rejected answers"],
    ),
    (
        "bad_element.json",
        "tiny-opt",
        &["{f}[1]: field `rejected`"],
    ),
    ("truncated_array.json", "tiny-opt", &["{f}: invalid JSON"]),
    ("not_array.json", "tiny-opt", &["{f}: invalid JSON"]),
    (
        "truncated.jsonl.gz",
        "tiny-opt",
        &["{f}: cannot decompress gzip data"],
    ),
    ("corrupt.parquet", "tiny-opt", &["{f}:", "Parquet"]),
    (
        "csv_named.parquet",
        "tiny-opt",
        &["{f}: named .parquet but not a Parquet file"],
    ),
];

fn load_err(file: &Path, model: &str) -> String {
    let src = DataSource::new(file.display().to_string());
    match load_source(&src, &tok(model), &OPTS) {
        Ok(ds) => panic!(
            "{}: expected an error, loaded {} pairs",
            file.display(),
            ds.pairs.len()
        ),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_bad_input_names_file_line_and_field() {
    for (name, model, fragments) in CASES {
        let path = corpus(name);
        let e = load_err(&path, model);
        for frag in *fragments {
            let frag = frag.replace("{f}", &path.display().to_string());
            assert!(e.contains(&frag), "{name}: expected `{frag}` in:\n{e}");
        }
    }
}

#[test]
fn the_corpus_is_covered() {
    // A file added to tests/bad_inputs/ must get a case.
    for entry in std::fs::read_dir(root().join("tests/bad_inputs")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            CASES.iter().any(|(n, _, _)| *n == name),
            "tests/bad_inputs/{name} has no case in CASES"
        );
    }
}

fn write_config(dir: &Path, model: &str, train: &Path, extra: &str) -> PathBuf {
    let cfg = dir.join("c.toml");
    let text = format!(
        "[model]\nid = {:?}\n[data]\ntrain = {:?}\nmax_length = 128\nmax_prompt_length = 64\n{extra}",
        root().join("tests/fixtures").join(model).display().to_string(),
        train.display().to_string()
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
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
fn orpo_data_exits_2_and_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, model, fragments) in CASES {
        if ![
            "invalid_json.jsonl",
            "unknown_role.jsonl",
            "corrupt.parquet",
            "empty.jsonl",
        ]
        .contains(name)
        {
            continue;
        }
        let path = corpus(name);
        let cfg = write_config(dir.path(), model, &path, "");
        let (code, _, err) = orpo(&["data", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        let frag = fragments[0].replace("{f}", &path.display().to_string());
        assert!(err.contains(&frag), "{name}: expected `{frag}` in:\n{err}");
    }
}

#[test]
fn config_mistakes_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/golden/pairs-implicit.jsonl");
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "chosen_col = \"x\"\n",
            &[],
            "did you mean `data.chosen_column`",
        ),
        (
            "",
            &["data.max_length=abc"],
            "data.max_length: expected an integer",
        ),
        (
            "",
            &["data.max_prompt_length=500"],
            "larger than data.max_length",
        ),
        (
            "[optim]\nscheduler = \"cosin\"\n",
            &[],
            "unknown scheduler `cosin`",
        ),
        ("[dataa]\n", &[], "did you mean `[data]`"),
        (
            "",
            &["data.train_split="],
            "data.train_split: must not be empty",
        ),
        (
            "",
            &["data.train=/nonexistent/x.jsonl"],
            "data source `/nonexistent/x.jsonl`: no such file or folder",
        ),
    ];
    for (extra, sets, frag) in cases {
        let cfg = write_config(dir.path(), "tiny-opt", &data, extra);
        let mut args = vec!["data", "--config", cfg.to_str().unwrap()];
        for s in *sets {
            args.push("--set");
            args.push(s);
        }
        let (code, _, err) = orpo(&args);
        assert_eq!(code, 2, "{extra} {sets:?}: {err}");
        assert!(err.contains(frag), "expected `{frag}` in:\n{err}");
    }
}

#[test]
fn odd_but_valid_inputs_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.jsonl");
    let long = "word ".repeat(200_000);
    let text = format!(
        "\u{feff}{{\"prompt\": \"Hi\", \"chosen\": \" yes\", \"rejected\": \" no\", \"score\": 3, \"meta\": {{\"a\": [1]}}}}\r\n\r\n   \r\n\
         {{\"prompt\": \"Q\", \"chosen\": \" {long}\", \"rejected\": \" short\"}}\r\n\
         {{\"prompt\": \"Same\", \"chosen\": \" x\", \"rejected\": \" x\"}}\n"
    );
    std::fs::write(&path, text).unwrap();
    let ds = load_source(
        &DataSource::new(path.display().to_string()),
        &tok("tiny-opt"),
        &OPTS,
    )
    .unwrap();
    assert_eq!(ds.stats.rows, 3);
    assert_eq!(ds.pairs.len(), 2);
    assert_eq!(ds.stats.truncated, 1);
    assert_eq!(
        ds.stats.skipped.get(&SkipReason::IdenticalAnswers),
        Some(&1)
    );
    assert!(
        ds.stats.skipped_examples[0].0.ends_with("odd.jsonl:5"),
        "{:?}",
        ds.stats.skipped_examples
    );
    assert!(ds.locations[1].ends_with("odd.jsonl:4"));
    assert!(ds.pairs[1].chosen_input_ids.len() <= 128);
}

/// Renamed columns: a configured prompt column is required (without it the row would become
/// an implicit-prompt pair), and errors list the row's columns as they are in the file.
#[test]
fn mapped_columns_are_required_and_errors_list_the_files_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("renamed.jsonl");
    std::fs::write(
        &file,
        "{\"question\": \" Hi?\", \"good\": \" Yes.\", \"bad\": \" No.\", \"id\": 7}\n",
    )
    .unwrap();
    let load = |prompt: &str, chosen: &str| {
        let mut src = DataSource::new(file.display().to_string());
        src.columns.prompt = prompt.into();
        src.columns.chosen = chosen.into();
        src.columns.rejected = "bad".into();
        load_source(&src, &tok("tiny-opt"), &OPTS)
    };
    assert_eq!(load("question", "good").unwrap().pairs.len(), 1);
    let f = file.display().to_string();
    let e = load("query", "good").err().unwrap().to_string();
    assert!(
        e.contains(&format!("{f}:1: field `query`: missing"))
            && e.contains("the row has columns: question, good, bad, id")
            && e.contains("data.prompt_column"),
        "{e}"
    );
    let e = load("question", "best").err().unwrap().to_string();
    assert!(
        e.contains("field `best`: missing") && e.contains("columns: question, good, bad, id"),
        "{e}"
    );
}

#[test]
fn an_empty_chat_template_is_named_not_reported_as_identical_answers() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root().join("tests/fixtures/tiny-qwen2")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(tmp.path().join("chat_template.jinja"), "\n").unwrap();
    let src = DataSource::new(
        root()
            .join("examples/data/chat-10.jsonl")
            .display()
            .to_string(),
    );
    let tok = Tokenizer::from_dir(tmp.path()).unwrap();
    let e = load_source(&src, &tok, &OPTS).err().unwrap().to_string();
    assert!(
        e.contains("chat-10.jsonl:1: conversational row") && e.contains("chat template is empty"),
        "{e}"
    );
}
