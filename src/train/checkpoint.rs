//! Writing models in Hugging Face layout, atomically: everything goes to a temporary sibling
//! folder (or file) first and is renamed into place only when complete.

use super::save_dtype;
use crate::data::Tokenizer;
use crate::model::{lora, CausalLm};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {msg}")]
    Other { path: PathBuf, msg: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SaveError + '_ {
    move |e| SaveError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn other(path: &Path, e: impl std::fmt::Display) -> SaveError {
    SaveError::Other {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SaveError> {
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn tmp_sibling(path: &Path) -> PathBuf {
    hidden_sibling(path, "tmp")
}

/// `.NAME.TAG-PID` beside `path`: hidden, and recognisable as a leftover of this process if it
/// dies (`run_dir::remove_unfinished` clears those of processes that are gone).
pub(crate) fn hidden_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), SaveError> {
    // safetensors writes through a temporary file of its own (`.tmpXXXXXX`, mode 0600) beside
    // its target; a folder of ours around it keeps that one recognisable too, should the
    // process die mid-write.
    let tmp_dir = tmp_sibling(path);
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir).map_err(io(&tmp_dir))?;
    }
    std::fs::create_dir(&tmp_dir).map_err(io(&tmp_dir))?;
    let tmp = tmp_dir.join(path.file_name().unwrap_or("weights.safetensors".as_ref()));
    // The file gets the permissions of one created here, which the umask decides, as for the
    // JSON files.
    let probe = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let permissions = probe.metadata().map_err(io(&tmp))?.permissions();
    drop(probe);
    safetensors::serialize_to_file(tensors, Some(pt_format()), &tmp).map_err(|e| other(&tmp, e))?;
    std::fs::set_permissions(&tmp, permissions).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::remove_dir_all(&tmp_dir).map_err(io(&tmp_dir))
}

/// Files of the base model's folder a saved model carries over as they are.
pub(crate) const PASSED_ON: [&str; 2] = ["tokenizer.model", "added_tokens.json"];

/// The header metadata `save_pretrained` writes. transformers before 4.48 or so reads
/// `metadata.get("format")` without a None check, so a file without it fails to load there.
fn pt_format() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// The files of a model folder: config.json (its `dtype` the weights'), the weights in `dtype`
/// (f16 falls back to f32 for weights beyond its range) under their Hugging Face names
/// (model.safetensors, or shards above 5 GB: see `shard`), generation_config.json when the
/// source had one, tokenizer files. A LoRA model writes PEFT's adapter_config.json and
/// adapter_model.safetensors (f32, as PEFT keeps adapters) instead of the first two (the base
/// stays where it is; `orpo merge` makes a full model). Returns the weights' dtype.
fn write_model_files(
    dir: &Path,
    model: &CausalLm,
    tok: &Tokenizer,
    base: &BaseModel,
    dtype: DType,
) -> Result<DType, SaveError> {
    // The parameters as they are (no copy: nothing updates them while they are written).
    let tensors: Vec<(String, Tensor)> = model
        .params()
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_tensor().detach()))
        .collect();
    let mut saved = DType::F32;
    if let Some(info) = model.adapter() {
        let config = crate::model::lora::adapter_config(
            &info.spec,
            &base.name,
            base.revision.as_deref(),
            &info.modules,
        );
        let text = serde_json::to_string_pretty(&config).map_err(|e| other(dir, e))?;
        write_atomic(&dir.join(lora::ADAPTER_CONFIG), text.as_bytes())?;
        save_tensors(
            &tensors.into_iter().collect(),
            &dir.join(lora::ADAPTER_WEIGHTS),
        )?;
    } else {
        let (tensors, in_dtype) = save_dtype::convert(tensors, dtype).map_err(|e| other(dir, e))?;
        saved = in_dtype;
        let mut config = model.config().raw.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.remove("torch_dtype");
            obj.insert("dtype".into(), save_dtype::config_name(saved).into());
        }
        let text = serde_json::to_string_pretty(&config).map_err(|e| other(dir, e))?;
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        super::shard::save_weights(dir, tensors, super::shard::MAX_SHARD_BYTES)?;
    }
    let gen = base.dir.join("generation_config.json");
    if gen.is_file() {
        let bytes = std::fs::read(&gen).map_err(io(&gen))?;
        // Training never reads it; a broken one is not passed on to the saved model.
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(_) => write_atomic(&dir.join("generation_config.json"), &bytes)?,
            Err(e) => tracing::warn!("{} is not valid JSON ({e}); not copied", gen.display()),
        }
    }
    // Tokenizer files orpo does not read but others do (a slow tokenizer, llama.cpp's GGUF
    // converter for SentencePiece models): the base model's, unchanged, or none.
    for name in PASSED_ON {
        let src = base.dir.join(name);
        let path = dir.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(io(&src))?;
            write_atomic(&path, &bytes)?;
        } else if path.exists() {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    for (name, bytes) in tok.saved_files(dir).map_err(|e| other(dir, e))? {
        let path = dir.join(name);
        match bytes {
            Some(b) => write_atomic(&path, &b)?,
            None if path.exists() => std::fs::remove_file(&path).map_err(io(&path))?,
            None => {}
        }
    }
    Ok(saved)
}

/// The model a run started from: its folder, and the name an adapter records for it (the hub
/// id, or the folder's absolute path).
#[derive(Debug, Clone)]
pub struct BaseModel {
    pub dir: PathBuf,
    pub name: String,
    /// The hub revision a hub id was read at (an adapter's `revision`, which PEFT loads the
    /// base at); none for a local folder.
    pub revision: Option<String>,
}

impl BaseModel {
    pub fn new(id: &str, revision: Option<&str>, dir: &Path) -> Self {
        let local = Path::new(id).is_dir();
        let name = if local {
            std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
                .to_string()
        } else {
            id.to_string()
        };
        BaseModel {
            dir: dir.to_path_buf(),
            name,
            revision: revision.filter(|_| !local).map(str::to_string),
        }
    }
}

/// Saves the model at the root of `dir` (each file replaced atomically), a full model's
/// weights in `dtype` where it holds them; returns the dtype they were saved in.
pub fn save_model(
    dir: &Path,
    model: &CausalLm,
    tok: &Tokenizer,
    base: &BaseModel,
    dtype: DType,
) -> Result<DType, SaveError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_model_files(dir, model, tok, base, dtype)
}

/// Writes a whole checkpoint folder: built under a temporary name, renamed when complete, so
/// a crash never leaves a `checkpoint-STEP` that looks finished but is not.
pub fn save_checkpoint(
    dir: &Path,
    model: &CausalLm,
    tok: &Tokenizer,
    base: &BaseModel,
    extra: impl FnOnce(&Path) -> Result<(), SaveError>,
) -> Result<(), SaveError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = tmp_sibling(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    // f32, the master weights themselves: a resumed run continues from them exactly.
    write_model_files(&tmp, model, tok, base, DType::F32)?;
    extra(&tmp)?;
    if dir.exists() {
        // Replaced, never deleted in place: a crash leaves the old folder or the new one under
        // this name, complete, or neither (both then hidden and the previous checkpoint the
        // newest).
        let old = hidden_sibling(dir, "old");
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        return std::fs::remove_dir_all(&old).map_err(io(&old));
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))
}
