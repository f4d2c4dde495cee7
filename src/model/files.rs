//! Reading checkpoints: local folders or hub ids, single or sharded safetensors, or the
//! legacy `pytorch_model.bin` (names without the `model.` prefix), any float dtype -> f32.

use super::error::ModelError;
use super::lora;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const HUB_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    // Not read by orpo; passed on to saved models (see `train::checkpoint`).
    "tokenizer.model",
    "added_tokens.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    // A LoRA adapter repository (PEFT's layout) instead of a model.
    "adapter_config.json",
    "adapter_model.safetensors",
];

/// The file a repository must hold: a model's config, or else an adapter's.
const ANCHORS: [&str; 2] = ["config.json", lora::ADAPTER_CONFIG];

/// A local folder is used as is; anything else that looks like `org/name` is fetched through
/// hf-hub (its cache honours `HF_HOME`; `HF_HUB_OFFLINE=1` reads the cache only, see `crate::hub`):
/// a model, or a LoRA adapter repository (adapter_config.json, no config.json).
pub fn resolve_model_dir(id: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    resolve(id, revision, true)
}

/// As [`resolve_model_dir`], with the configs and tokenizer files only: no weights fetched
/// (nor their shards required in an offline cache), for checking data against a model
/// without downloading it whole.
pub fn resolve_model_config_dir(id: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    resolve(id, revision, false)
}

fn resolve(id: &str, revision: Option<&str>, with_weights: bool) -> Result<PathBuf, ModelError> {
    let local = Path::new(id);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    let looks_like_hub = id.split('/').count() == 2 && !id.starts_with('.') && !id.starts_with('/');
    if !looks_like_hub {
        return Err(ModelError::Hub {
            id: id.to_string(),
            msg: "no such folder, and not a hub id of the form org/name".into(),
        });
    }
    let revision = revision.unwrap_or("main").to_string();
    let repo = hf_hub::Repo::with_revision(id.to_string(), hf_hub::RepoType::Model, revision);
    let offline = crate::hub::offline();
    let hub_err = |msg: String| ModelError::Hub {
        id: id.to_string(),
        msg,
    };
    let config_path = if offline {
        let cache = hf_hub::Cache::from_env().repo(repo);
        let index = cache
            .get("model.safetensors.index.json")
            .filter(|_| with_weights);
        if let Some(p) = index {
            for shard in shard_names(&p)? {
                cache.get(&shard).ok_or_else(|| {
                    hub_err(format!("offline and shard {shard} is not in the cache"))
                })?;
            }
        }
        ANCHORS.iter().find_map(|f| cache.get(f))
    } else {
        let api = crate::hub::api(true).map_err(|e| hub_err(e.to_string()))?;
        let api = api.repo(repo);
        let anchor = match api.get("config.json") {
            Ok(p) => p,
            // An adapter repository has no config.json.
            Err(e) => api
                .get(lora::ADAPTER_CONFIG)
                .map_err(|_| hub_err(format!("config.json: {e}")))?,
        };
        let adapter_repo = anchor.ends_with(lora::ADAPTER_CONFIG);
        let dir = anchor.parent().unwrap_or(Path::new(".")).to_path_buf();
        for f in &HUB_FILES[1..] {
            // Optional files: a model has only some of them, an adapter repository no model
            // weights, a model no adapter. The legacy weights only where there are no
            // safetensors (many repositories hold both).
            let adapter_file = f.starts_with("adapter_");
            let weights = f.starts_with("model.") || *f == "pytorch_model.bin";
            if (adapter_file && !adapter_repo) || (weights && (adapter_repo || !with_weights)) {
                continue;
            }
            let has_safetensors = dir.join("model.safetensors").exists()
                || dir.join("model.safetensors.index.json").exists();
            if *f == "pytorch_model.bin" && has_safetensors {
                continue;
            }
            let _ = api.get(f);
        }
        let index = dir.join("model.safetensors.index.json");
        if with_weights && index.exists() {
            for shard in shard_names(&index)? {
                api.get(&shard)
                    .map_err(|e| hub_err(format!("{shard}: {e}")))?;
            }
        }
        Some(anchor)
    };
    let config_path = config_path.ok_or_else(|| {
        hub_err(
            "neither config.json nor adapter_config.json is in the hub cache (HF_HUB_OFFLINE is \
             set)"
                .into(),
        )
    })?;
    Ok(config_path.parent().unwrap_or(Path::new(".")).to_path_buf())
}

fn shard_names(index: &Path) -> Result<Vec<String>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::Io {
        path: index.to_path_buf(),
        source: e,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Weights {
        path: index.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Weights {
            path: index.to_path_buf(),
            msg: "no `weight_map` object".into(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Every tensor of the checkpoint on `device`, in its stored dtype (the builders convert: a
/// frozen bf16 weight never exists as f32), under `model.`-prefixed names.
pub fn read_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>, ModelError> {
    Ok(read_weights_with_files(dir, device)?.0)
}

/// Tensors by name, and the file each came from (for messages about a tensor).
type WeightsAndFiles = (HashMap<String, Tensor>, HashMap<String, PathBuf>);

/// [`read_weights`], with the file each tensor came from.
pub fn read_weights_with_files(dir: &Path, device: &Device) -> Result<WeightsAndFiles, ModelError> {
    let bin = dir.join("pytorch_model.bin");
    let wrap = |path: &Path| {
        let path = path.to_path_buf();
        move |e: candle_core::Error| ModelError::Weights {
            path: path.clone(),
            msg: e.to_string(),
        }
    };
    // safetensors names no tensor when an entry's shape, dtype and offsets disagree; the
    // header check of the tensor-at-a-time reader does, so a failed load asks it first.
    let load = |path: &Path| {
        candle_core::safetensors::load(path, device).map_err(|e| {
            match lazy_weights_with_files(dir) {
                Err(named) => named,
                Ok(_) => wrap(path)(e),
            }
        })
    };
    let mut raw: Vec<(String, Tensor, PathBuf)> = Vec::new();
    let mut extend = |tensors: HashMap<String, Tensor>, path: &Path| {
        raw.extend(tensors.into_iter().map(|(n, t)| (n, t, path.to_path_buf())));
    };
    if let Some(paths) = safetensors_files(dir)? {
        for p in paths {
            extend(load(&p)?, &p);
        }
    } else if bin.is_file() {
        let tensors = candle_core::pickle::read_all(&bin).map_err(wrap(&bin))?;
        let mut moved = HashMap::new();
        for (n, t) in tensors {
            moved.insert(n, t.to_device(device).map_err(wrap(&bin))?);
        }
        extend(moved, &bin);
    } else {
        return Err(ModelError::Weights {
            path: dir.to_path_buf(),
            msg: "no model.safetensors, model.safetensors.index.json or pytorch_model.bin".into(),
        });
    }
    let mut out = HashMap::new();
    let mut files = HashMap::new();
    for (name, t, path) in raw {
        let name = if name.starts_with("model.") || name.starts_with("lm_head.") {
            name
        } else {
            format!("model.{name}")
        };
        out.insert(name.clone(), t);
        files.insert(name, path);
    }
    Ok((out, files))
}

/// A checkpoint's safetensors files, each tensor read from its file when taken: a base
/// quantized on the host, or merged, never exists whole in memory, only one tensor of it at a
/// time. Read, not memory-mapped: mapped pages would count in the process's resident memory
/// as the whole file is walked, though they are only the kernel's cache.
pub struct LazyWeights {
    files: Vec<File>,
    /// Name (with the `model.` prefix, as `read_weights_with_files` names them) -> file,
    /// byte range in it, shape, dtype.
    pub(super) index: HashMap<String, (usize, std::ops::Range<u64>, Vec<usize>, DType)>,
}

impl LazyWeights {
    pub(super) fn read(&self, name: &str) -> Result<Option<Tensor>, candle_core::Error> {
        let Some((file, range, shape, dtype)) = self.index.get(name) else {
            return Ok(None);
        };
        let mut f = &self.files[*file];
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        f.seek(SeekFrom::Start(range.start))?;
        f.read_exact(&mut bytes)?;
        Tensor::from_raw_buffer(&bytes, *dtype, shape, &Device::Cpu).map(Some)
    }
}

/// `dir`'s `model.safetensors`, or the shards its index names (a missing one is named);
/// `None` when it has neither.
fn safetensors_files(dir: &Path) -> Result<Option<Vec<PathBuf>>, ModelError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(Some(vec![single]));
    }
    if !index.is_file() {
        return Ok(None);
    }
    let mut paths = Vec::new();
    for shard in shard_names(&index)? {
        let p = dir.join(&shard);
        if !p.is_file() {
            return Err(ModelError::Weights {
                path: index.clone(),
                msg: format!("shard {shard} is missing"),
            });
        }
        paths.push(p);
    }
    Ok(Some(paths))
}

/// Lazily read weights, and the file each tensor is in (for messages).
pub type LazyAndFiles = (LazyWeights, HashMap<String, PathBuf>);

/// `dir`'s safetensors (one file or shards) indexed for reading a tensor at a time, with the
/// file of each tensor; `None` for a `pytorch_model.bin` checkpoint, which is read whole.
pub fn lazy_weights_with_files(dir: &Path) -> Result<Option<LazyAndFiles>, ModelError> {
    let Some(paths) = safetensors_files(dir)? else {
        return Ok(None);
    };
    let mut lazy = LazyWeights {
        files: Vec::new(),
        index: HashMap::new(),
    };
    let mut files = HashMap::new();
    for (i, path) in paths.iter().enumerate() {
        let bad = |msg: String| ModelError::Weights {
            path: path.clone(),
            msg,
        };
        let mut file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let (start, header) = read_header(&mut file).map_err(bad)?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        for (stored, info) in header.tensors() {
            let dtype = DType::try_from(info.dtype).map_err(|e| bad(e.to_string()))?;
            let (a, b) = info.data_offsets;
            let range = start + a as u64..start + b as u64;
            let want = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
            if range.end > len {
                return Err(bad(format!(
                    "the file is cut short: tensor `{stored}` ends at byte {}, the file at {len}",
                    range.end
                )));
            }
            if b - a != want {
                return Err(bad(format!(
                    "tensor `{stored}`: {} bytes for a {:?} {dtype:?} tensor of {want}",
                    b - a,
                    info.shape
                )));
            }
            let name = if stored.starts_with("model.") || stored.starts_with("lm_head.") {
                stored.clone()
            } else {
                format!("model.{stored}")
            };
            files.insert(name.clone(), path.clone());
            lazy.index
                .insert(name, (i, range, info.shape.clone(), dtype));
        }
        lazy.files.push(file);
    }
    Ok(Some((lazy, files)))
}

/// A safetensors file's header: where its data starts, and its tensors.
fn read_header(file: &mut File) -> Result<(u64, safetensors::tensor::Metadata), String> {
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        return Err(format!("not a safetensors file: a header of {n} bytes"));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    let meta = serde_json::from_slice(&header).map_err(|e| match misfit_entry(&header) {
        Some(msg) => format!("a damaged safetensors header: {msg}"),
        None => format!("not a safetensors file: its header: {e}"),
    })?;
    Ok((8 + n, meta))
}

/// The first entry of a safetensors header whose shape and dtype do not fit its byte offsets,
/// described by name (safetensors' own message names no tensor).
fn misfit_entry(header: &[u8]) -> Option<String> {
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).ok()?;
    for (name, e) in entries.iter().filter(|(k, _)| *k != "__metadata__") {
        let dtype: safetensors::Dtype = serde_json::from_value(e["dtype"].clone()).ok()?;
        let shape: Vec<u64> = serde_json::from_value(e["shape"].clone()).ok()?;
        let [a, b]: [u64; 2] = serde_json::from_value(e["data_offsets"].clone()).ok()?;
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize() as u64, |n, &d| n.checked_mul(d));
        if b < a || bits != Some((b - a) * 8) {
            return Some(format!(
                "tensor `{name}`: a {dtype:?} tensor of shape {shape:?} at bytes {a}..{b}, \
                 which do not hold it"
            ));
        }
    }
    None
}

/// Refuses a weight the model is about to use that is not floating point (an integer tensor
/// would be converted silently) or that holds NaN or infinite values (training would stop at
/// step 1 with a non-finite loss, naming nothing), naming the file and the tensor.
pub(super) fn check_weight(file: &Path, name: &str, t: &Tensor) -> Result<(), ModelError> {
    let bad = |msg: String| ModelError::Weights {
        path: file.to_path_buf(),
        msg,
    };
    if !matches!(
        t.dtype(),
        DType::F32 | DType::F16 | DType::BF16 | DType::F64
    ) {
        return Err(bad(format!(
            "tensor `{name}` has dtype {:?}; weights must be floating point (F32, F16, BF16 or \
             F64)",
            t.dtype()
        )));
    }
    // `x - x` is 0 for every finite x and NaN for NaN and ±inf, and a sum of zeros cannot
    // overflow (a plain sum of large f16 weights could): an elementwise op and a reduction in
    // the stored dtype, on the load's device, small next to reading and converting the file.
    #[allow(clippy::eq_op)]
    let total = (t - t)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if !total.is_finite() {
        return Err(bad(format!("tensor `{name}` holds NaN or infinite values")));
    }
    Ok(())
}
