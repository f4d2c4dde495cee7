//! Where a data set's rows come from: a file, a folder or glob of shards, or a Hugging Face
//! dataset repository (`org/name`) fetched through hf-hub's cache.
//!
//! Folders and hub repos are searched for a split's files the way `datasets` does for plain
//! data repos: a file belongs to split `S` when a folder on its path is named `S`
//! (`train/0000.parquet`, `{config}/{split}/...`) or its name is `S` plus an optional shard
//! suffix (`train.jsonl`, `data/train-00000-of-00003.parquet`, `test-2000.jsonl`). When no file
//! names any split, every data file is the `train` split. `subset` (a dataset config) keeps
//! the files under a folder of that name (`harmless-base/train.jsonl.gz`).

use std::path::{Path, PathBuf};

use super::error::DataError;

/// Column names of the three fields, for data sets that call them something else
/// (`question` / `response_j` / `response_k`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

impl Default for ColumnMap {
    fn default() -> Self {
        ColumnMap {
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        }
    }
}

impl ColumnMap {
    pub fn is_default(&self) -> bool {
        *self == ColumnMap::default()
    }

    /// `(canonical field, column)` pairs.
    pub fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            ("prompt", self.prompt.as_str()),
            ("chosen", self.chosen.as_str()),
            ("rejected", self.rejected.as_str()),
        ]
    }
}

/// A data set to load: a location and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSource {
    /// A file, a folder, a glob (`shards/*.parquet`) or a hub dataset id `org/name`.
    pub location: String,
    /// Further locations (a list in the config), read after `location` in order.
    pub more: Vec<String>,
    /// Split to read from folders and hub repos (ignored for a single file or a glob).
    pub split: String,
    /// Dataset config name: a folder of that name inside the repo or folder.
    pub subset: Option<String>,
    /// Hub revision (branch, tag or commit); `main` when absent.
    pub revision: Option<String>,
    pub columns: ColumnMap,
}

impl DataSource {
    /// A source with the `train` split and the usual column names.
    pub fn new(location: impl Into<String>) -> Self {
        DataSource {
            location: location.into(),
            more: Vec::new(),
            split: "train".into(),
            subset: None,
            revision: None,
            columns: ColumnMap::default(),
        }
    }
}

/// One file of a resolved source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Where it is on disk.
    pub path: PathBuf,
    /// How errors name it (the hub repo path for hub files).
    pub name: String,
}

/// A source resolved to files.
#[derive(Debug, Clone)]
pub struct ResolvedSource {
    /// e.g. `pairs.jsonl`, `shards/ (3 files, split train)`, `hub dataset org/name@main ...`.
    pub description: String,
    pub files: Vec<SourceFile>,
}

/// Names a data file may have inside folders and repos.
const DATA_EXTS: [&str; 7] = [
    ".jsonl",
    ".json",
    ".ndjson",
    ".jsonl.gz",
    ".json.gz",
    ".ndjson.gz",
    ".parquet",
];

fn is_data_file(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel).to_ascii_lowercase();
    DATA_EXTS.iter().any(|e| name.ends_with(e))
}

/// A file's split name: its name before the first dot, less a shard suffix of numbers
/// (`train-00000-of-00003` -> `train`, `test-2000` -> `test`).
fn file_split_name(rel: &str) -> String {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    let stem = name.split('.').next().unwrap_or(name);
    let mut kept = Vec::new();
    for part in stem.split('-') {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            break;
        }
        kept.push(part);
    }
    kept.join("-")
}

fn folders(rel: &str) -> Vec<&str> {
    let mut parts: Vec<&str> = rel.split('/').collect();
    parts.pop();
    parts
}

fn in_split(rel: &str, split: &str) -> bool {
    folders(rel).contains(&split) || file_split_name(rel) == split
}

/// `datasets`' split-name aliases.
fn split_aliases(split: &str) -> &'static [&'static str] {
    match split {
        "train" => &["training"],
        "validation" => &["valid", "val", "dev"],
        "test" => &["testing", "eval"],
        _ => &[],
    }
}

const KNOWN_SPLITS: [&str; 4] = ["train", "validation", "test", "eval"];

/// Picks the data files of `split` (and `subset`) among `files`, paths relative to the
/// folder or repo root with `/` separators. Errors list what is there.
pub fn select_split(
    files: &[String],
    split: &str,
    subset: Option<&str>,
    location: &str,
) -> Result<Vec<String>, DataError> {
    let err = |msg: String| DataError::Source {
        location: location.to_string(),
        msg,
    };
    let mut data: Vec<&String> = files.iter().filter(|f| is_data_file(f)).collect();
    data.sort();
    if data.is_empty() {
        return Err(err(format!(
            "no data files ({}) found",
            DATA_EXTS.join(", ")
        )));
    }
    if let Some(subset) = subset {
        let all = data.clone();
        data.retain(|f| folders(f).contains(&subset));
        if data.is_empty() {
            let mut names: Vec<&str> = all
                .iter()
                .filter_map(|f| folders(f).last().copied())
                .collect();
            names.sort();
            names.dedup();
            return Err(err(format!(
                "no files for subset `{subset}` (folders with data: {})",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            )));
        }
    }
    for name in std::iter::once(split).chain(split_aliases(split).iter().copied()) {
        let hit: Vec<String> = data
            .iter()
            .filter(|f| in_split(f, name))
            .map(|f| f.to_string())
            .collect();
        if !hit.is_empty() {
            return Ok(hit);
        }
    }
    // No file names a split at all: everything is `train`, as in `datasets`.
    let any_named = data.iter().any(|f| {
        KNOWN_SPLITS
            .iter()
            .chain(["validation", "valid", "val", "dev", "testing"].iter())
            .any(|s| in_split(f, s))
    });
    if split == "train" && !any_named {
        return Ok(data.iter().map(|f| f.to_string()).collect());
    }
    let mut found: Vec<String> = data.iter().map(|f| file_split_name(f)).collect();
    found.sort();
    found.dedup();
    Err(err(format!(
        "no files for split `{split}` (file splits found: {}); set data.train_split / data.eval_split",
        found.join(", ")
    )))
}

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// True for `org/name`: one slash, no leading `.` or `/`, no data-file extension.
fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty())
        && !s.starts_with('.')
        && !s.contains('\\')
        && !is_data_file(s)
}

/// Every file under `dir`, as `/`-separated paths relative to it, hidden entries skipped.
fn walk(dir: &Path) -> Result<Vec<String>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| DataError::Io {
            path: d.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            // Follow links: the hub cache's snapshot files are links into its blobs.
            let path = e.path();
            if path.is_dir() {
                stack.push((path, rel));
            } else if path.is_file() {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Resolves a source to the files to read, in order: `location`'s, then each of `more`'s.
pub fn resolve(src: &DataSource) -> Result<ResolvedSource, DataError> {
    if src.more.is_empty() {
        return resolve_one(src);
    }
    let mut parts = Vec::new();
    let mut files = Vec::new();
    for loc in std::iter::once(&src.location).chain(&src.more) {
        let one = DataSource {
            location: loc.clone(),
            more: Vec::new(),
            ..src.clone()
        };
        let r = resolve_one(&one)?;
        parts.push(r.description);
        files.extend(r.files);
    }
    Ok(ResolvedSource {
        description: parts.join(" + "),
        files,
    })
}

fn resolve_one(src: &DataSource) -> Result<ResolvedSource, DataError> {
    let loc = src.location.as_str();
    let err = |msg: String| DataError::Source {
        location: loc.to_string(),
        msg,
    };
    let path = Path::new(loc);
    if path.is_file() {
        return Ok(ResolvedSource {
            description: loc.to_string(),
            files: vec![SourceFile {
                path: path.to_path_buf(),
                name: loc.to_string(),
            }],
        });
    }
    if path.is_dir() {
        let rels = walk(path)?;
        let picked = select_split(&rels, &src.split, src.subset.as_deref(), loc)?;
        let files: Vec<SourceFile> = picked
            .iter()
            .map(|r| SourceFile {
                path: path.join(r),
                name: path.join(r).display().to_string(),
            })
            .collect();
        return Ok(ResolvedSource {
            description: format!(
                "folder {loc} (split {}{}, {} file{})",
                src.split,
                subset_note(src),
                files.len(),
                plural(files.len())
            ),
            files,
        });
    }
    if has_glob_chars(loc) {
        let paths = glob::glob(loc).map_err(|e| err(format!("invalid glob pattern: {e}")))?;
        let mut files: Vec<PathBuf> = paths.flatten().filter(|p| p.is_file()).collect();
        files.sort();
        if files.is_empty() {
            return Err(err("the glob pattern matches no file".into()));
        }
        return Ok(ResolvedSource {
            description: format!("{loc} ({} file{})", files.len(), plural(files.len())),
            files: files
                .into_iter()
                .map(|p| SourceFile {
                    name: p.display().to_string(),
                    path: p,
                })
                .collect(),
        });
    }
    if looks_like_hub_id(loc) {
        return resolve_hub(src);
    }
    Err(err(
        "no such file or folder (and not a glob, nor a hub dataset id of the form org/name)".into(),
    ))
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn subset_note(src: &DataSource) -> String {
    match &src.subset {
        Some(s) => format!(", subset {s}"),
        None => String::new(),
    }
}

/// The snapshot folder of a cached dataset repo: `refs/REVISION` holds the commit, or the
/// revision is itself a commit with a snapshot.
fn cached_snapshot(id: &str, revision: &str) -> Option<PathBuf> {
    let repo = hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Dataset,
        revision.to_string(),
    );
    let root = hf_hub::Cache::from_env().path().join(repo.folder_name());
    let commit = std::fs::read_to_string(root.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snap = root.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// Gives the local path of a repo file (downloading it when online).
type Fetch<'a> = Box<dyn Fn(&str) -> Result<PathBuf, DataError> + 'a>;

fn resolve_hub(src: &DataSource) -> Result<ResolvedSource, DataError> {
    let id = src.location.as_str();
    let revision = src.revision.as_deref().unwrap_or("main");
    let err = |msg: String| DataError::Source {
        location: id.to_string(),
        msg,
    };
    let (rels, fetch): (Vec<String>, Fetch<'_>) = if crate::hub::offline() {
        let snap = cached_snapshot(id, revision).ok_or_else(|| {
                err(format!(
                    "hub dataset (revision {revision}) is not in the hub cache {} and HF_HUB_OFFLINE is set",
                    hf_hub::Cache::from_env().path().display()
                ))
            })?;
        let rels = walk(&snap)?;
        let fetch = move |rel: &str| Ok(snap.join(rel));
        (rels, Box::new(fetch))
    } else {
        let api = crate::hub::api(false).map_err(|e| err(format!("hub client: {e}")))?;
        let repo = api.repo(hf_hub::Repo::with_revision(
            id.to_string(),
            hf_hub::RepoType::Dataset,
            revision.to_string(),
        ));
        let info = repo.info().map_err(|e| {
                err(format!(
                    "cannot list the hub dataset at revision {revision}: {e} (private or gated repos need HF_TOKEN)"
                ))
            })?;
        let rels = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let fetch = move |rel: &str| {
            repo.get(rel).map_err(|e| DataError::Source {
                location: id.to_string(),
                msg: format!("downloading {rel}: {e}"),
            })
        };
        (rels, Box::new(fetch))
    };
    let picked = select_split(&rels, &src.split, src.subset.as_deref(), id)?;
    let mut files = Vec::with_capacity(picked.len());
    for rel in &picked {
        files.push(SourceFile {
            path: fetch(rel)?,
            name: format!("{id}/{rel}"),
        });
    }
    Ok(ResolvedSource {
        description: format!(
            "hub dataset {id}@{revision} (split {}{}, {} file{})",
            src.split,
            subset_note(src),
            files.len(),
            plural(files.len())
        ),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(files: &[&str], split: &str, subset: Option<&str>) -> Result<Vec<String>, String> {
        let files: Vec<String> = files.iter().map(|s| s.to_string()).collect();
        select_split(&files, split, subset, "x").map_err(|e| e.to_string())
    }

    #[test]
    fn split_names() {
        assert_eq!(
            file_split_name("data/train-00000-of-00003.parquet"),
            "train"
        );
        assert_eq!(
            file_split_name("train_prefs-00000-of-00001.parquet"),
            "train_prefs"
        );
        assert_eq!(file_split_name("test-2000.jsonl"), "test");
        assert_eq!(file_split_name("red-team.jsonl.gz"), "red-team");
    }

    #[test]
    fn selects_like_datasets() {
        let repo = [
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
        ];
        assert_eq!(pick(&repo, "train", None).unwrap().len(), 2);
        assert_eq!(
            pick(&repo, "test", None).unwrap(),
            vec!["data/test-00000-of-00001.parquet"]
        );
        let e = pick(&repo, "validation", None).unwrap_err();
        assert!(e.contains("file splits found: test, train"), "{e}");

        let hh = [
            "harmless-base/train.jsonl.gz",
            "harmless-base/test.jsonl.gz",
            "helpful-base/train.jsonl.gz",
        ];
        assert_eq!(pick(&hh, "train", None).unwrap().len(), 2);
        assert_eq!(
            pick(&hh, "test", Some("harmless-base")).unwrap(),
            vec!["harmless-base/test.jsonl.gz"]
        );
        assert!(pick(&hh, "train", Some("nope"))
            .unwrap_err()
            .contains("harmless-base, helpful-base"));

        let uf = [
            "data/train_prefs-00000-of-00001.parquet",
            "data/train_sft-0.parquet",
        ];
        assert_eq!(pick(&uf, "train_prefs", None).unwrap().len(), 1);
        // Unnamed shards are all train.
        let shards = ["part-0.jsonl", "part-1.jsonl"];
        assert_eq!(pick(&shards, "train", None).unwrap().len(), 2);
        assert!(pick(&shards, "test", None).is_err());
        assert_eq!(
            pick(
                &["default/validation/0000.parquet"],
                "validation",
                Some("default")
            )
            .unwrap(),
            vec!["default/validation/0000.parquet"]
        );
        assert_eq!(pick(&["dev.jsonl"], "validation", None).unwrap().len(), 1);
    }

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("Anthropic/hh-rlhf"));
        assert!(!looks_like_hub_id("data/pairs.jsonl"));
        assert!(!looks_like_hub_id("./a/b"));
        assert!(!looks_like_hub_id("a/b/c"));
    }
}
