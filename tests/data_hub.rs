//! Hub dataset ids (`org/name`, subset, split, revision) resolve from a populated hf-hub cache
//! with `HF_HUB_OFFLINE=1`, no network: `$HF_HOME/hub/datasets--org--name/{refs/REV,
//! snapshots/COMMIT/...}`, split files found as `datasets` finds them.

use std::path::{Path, PathBuf};
use std::process::Command;

use orpo::data::{load_source, DataOptions, DataSource, Tokenizer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden_lines(name: &str) -> Vec<String> {
    std::fs::read_to_string(root().join("tests/fixtures/golden").join(name))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn gzip(path: &Path, text: &str) {
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
    enc.finish().unwrap();
}

/// A cached dataset repo `hub/datasets--{org}--{name}` with `refs/{rev} -> commit`.
fn cached_repo(home: &Path, org_name: &str, refs: &[(&str, &str)]) -> PathBuf {
    let repo = home
        .join("hub")
        .join(format!("datasets--{}", org_name.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (rev, commit) in refs {
        std::fs::write(repo.join("refs").join(rev), commit).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
    }
    repo
}

#[test]
fn offline_hub_datasets_from_the_cache() {
    let home = tempfile::tempdir().unwrap();
    let c1 = "1111111111111111111111111111111111111111";
    let c2 = "2222222222222222222222222222222222222222";
    // HH-RLHF's layout: {subset}/{split}.jsonl.gz.
    let repo = cached_repo(home.path(), "anthropic/hh", &[("main", c1), ("v2", c2)]);
    let lines = golden_lines("pairs-implicit.jsonl");
    let snap = repo.join("snapshots").join(c1);
    for (subset, range) in [("harmless-base", 0..6), ("helpful-base", 6..10)] {
        std::fs::create_dir_all(snap.join(subset)).unwrap();
        gzip(
            &snap.join(subset).join("train.jsonl.gz"),
            &lines[range.clone()].join("\n"),
        );
        gzip(
            &snap.join(subset).join("test.jsonl.gz"),
            &lines[range.start],
        );
    }
    std::fs::write(snap.join("README.md"), "---\nlicense: mit\n---\n").unwrap();
    // Revision v2: data/{split}-NNNNN-of-NNNNN.jsonl shards.
    let snap2 = repo.join("snapshots").join(c2).join("data");
    std::fs::create_dir_all(&snap2).unwrap();
    std::fs::write(
        snap2.join("train-00000-of-00002.jsonl"),
        lines[..3].join("\n"),
    )
    .unwrap();
    std::fs::write(
        snap2.join("train-00001-of-00002.jsonl"),
        lines[3..5].join("\n"),
    )
    .unwrap();

    // This test binary holds only this test, so setting the environment cannot race.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let tok = Tokenizer::from_dir(&root().join("tests/fixtures/tiny-opt")).unwrap();
    let opts = DataOptions {
        max_length: 192,
        max_prompt_length: 192,
    };
    let load = |split: &str, subset: Option<&str>, rev: Option<&str>| {
        let mut s = DataSource::new("anthropic/hh");
        s.split = split.into();
        s.subset = subset.map(str::to_string);
        s.revision = rev.map(str::to_string);
        load_source(&s, &tok, &opts)
    };

    let ds = load("train", None, None).unwrap();
    assert_eq!(ds.pairs.len(), 10);
    assert_eq!(
        ds.files,
        vec![
            "anthropic/hh/harmless-base/train.jsonl.gz",
            "anthropic/hh/helpful-base/train.jsonl.gz"
        ]
    );
    assert!(
        ds.source.starts_with("hub dataset anthropic/hh@main"),
        "{}",
        ds.source
    );
    assert_eq!(
        ds.locations[7],
        "anthropic/hh/helpful-base/train.jsonl.gz:2"
    );
    assert_eq!(
        load("train", Some("harmless-base"), None)
            .unwrap()
            .pairs
            .len(),
        6
    );
    assert_eq!(
        load("test", Some("helpful-base"), None)
            .unwrap()
            .pairs
            .len(),
        1
    );
    let e = load("train", Some("red-team"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no files for subset `red-team`") && e.contains("harmless-base"),
        "{e}"
    );
    assert_eq!(load("train", None, Some("v2")).unwrap().pairs.len(), 5);
    // A commit hash is a revision too.
    assert_eq!(load("train", None, Some(c2)).unwrap().pairs.len(), 5);
    let e = load("train", None, Some("v3")).unwrap_err().to_string();
    assert!(
        e.contains("not in the hub cache") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    let mut absent = DataSource::new("nobody/nothing");
    absent.split = "train".into();
    let e = load_source(&absent, &tok, &opts).unwrap_err().to_string();
    assert!(e.contains("data source `nobody/nothing`"), "{e}");

    // End to end: `orpo data` with the hub id and [data] keys.
    let cfg = home.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nid = {:?}\n[data]\ntrain = \"anthropic/hh\"\neval = \"anthropic/hh\"\nsubset = \"harmless-base\"\nmax_length = 192\nmax_prompt_length = 192\n",
            root().join("tests/fixtures/tiny-opt").display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_orpo"))
        .args(["data", "--json", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["train"]["pairs"], 6);
    assert_eq!(v["eval"]["pairs"], 1);
    assert_eq!(
        v["eval"]["files"][0],
        "anthropic/hh/harmless-base/test.jsonl.gz"
    );
}
