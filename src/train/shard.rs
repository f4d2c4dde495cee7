//! A model's weights as transformers' `save_pretrained` writes them: one `model.safetensors`,
//! or above the shard size `model-0000K-of-0000N.safetensors` files plus
//! `model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map"}`), which
//! transformers, PEFT and `model::load` all read.

use super::checkpoint::{save_tensors, write_atomic, SaveError};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// transformers' default `max_shard_size` ("5GB", decimal).
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

/// Groups `tensors` (in order) into shards of at most `max_bytes` each, as huggingface_hub's
/// `split_state_dict_into_shards` does: a tensor that would overflow the current shard starts
/// the next one; a tensor larger than `max_bytes` gets a shard of its own.
fn plan_shards(tensors: &[(String, Tensor)], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0u64;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let bytes = tensor_bytes(t);
        if !current.is_empty() && size + bytes > max_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += bytes;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// Whether `name` is a shard file of the form `model-00001-of-00003.safetensors`.
pub(super) fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name
        .strip_prefix("model-")
        .and_then(|s| s.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(mid.split_once("-of-"), Some((k, n)) if digits(k) && digits(n))
}

/// Writes `tensors` into `dir` (each file atomically), single or sharded at `max_bytes`, then
/// removes the other layout's files left by an earlier save into the same folder (loaders
/// prefer `model.safetensors`, so a stale one would shadow new shards).
pub fn save_weights(
    dir: &Path,
    tensors: Vec<(String, Tensor)>,
    max_bytes: u64,
) -> Result<(), SaveError> {
    let shards = plan_shards(&tensors, max_bytes);
    let mut written: Vec<String> = Vec::new();
    if shards.len() <= 1 {
        save_tensors(&tensors.into_iter().collect(), &dir.join(SINGLE))?;
        written.push(SINGLE.into());
    } else {
        let n = shards.len();
        let total: u64 = tensors.iter().map(|(_, t)| tensor_bytes(t)).sum();
        let mut weight_map = BTreeMap::new();
        let mut slots: Vec<Option<(String, Tensor)>> = tensors.into_iter().map(Some).collect();
        for (k, members) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
            let mut shard = HashMap::new();
            for &i in members {
                if let Some((name, t)) = slots[i].take() {
                    weight_map.insert(name.clone(), file.clone());
                    shard.insert(name, t);
                }
            }
            save_tensors(&shard, &dir.join(&file))?;
            written.push(file);
        }
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).map_err(|e| SaveError::Other {
            path: dir.join(INDEX),
            msg: e.to_string(),
        })? + "\n";
        write_atomic(&dir.join(INDEX), text.as_bytes())?;
        written.push(INDEX.into());
    }
    remove_stale(dir, &written)
}

fn remove_stale(dir: &Path, keep: &[String]) -> Result<(), SaveError> {
    let io = |e| SaveError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name == SINGLE || name == INDEX || is_shard_name(&name);
        if ours && !keep.contains(&name) {
            std::fs::remove_file(entry.path()).map_err(|e| SaveError::Io {
                path: entry.path(),
                source: e,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(n: usize) -> Tensor {
        Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn shards_fill_in_order_and_big_tensors_stand_alone() {
        let ts: Vec<(String, Tensor)> = [10, 10, 10, 40, 5, 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("w{i}"), t(n)))
            .collect();
        // 4 bytes per element: 40, 40, 40, 160, 20, 20 bytes; at most 100 per shard.
        assert_eq!(
            plan_shards(&ts, 100),
            vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]
        );
        assert_eq!(plan_shards(&ts, 1000), vec![vec![0, 1, 2, 3, 4, 5]]);
        assert!(plan_shards(&[], 100).is_empty());
    }

    #[test]
    fn shard_names_are_recognised_exactly() {
        assert!(is_shard_name("model-00001-of-00002.safetensors"));
        assert!(!is_shard_name("model-1-of-2.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
        assert!(!is_shard_name("adapter_model-00001-of-00002.safetensors"));
    }
}
