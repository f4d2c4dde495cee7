//! The dtype a trained full model is saved in (`train.save_dtype`, `orpo merge --dtype`):
//! resolving `auto` to the base model's, and converting the f32 master weights.

use crate::config::SaveDtype;
use candle_core::{DType, Tensor};
use std::io::Read;
use std::path::Path;

/// f16's largest finite value: a weight beyond it would be saved as infinity.
const F16_MAX: f32 = 65504.0;

/// The dtype `setting` stands for with the base model in `base_dir`.
pub fn resolve(setting: SaveDtype, base_dir: &Path) -> DType {
    match setting {
        SaveDtype::F32 => DType::F32,
        SaveDtype::Bf16 => DType::BF16,
        SaveDtype::F16 => DType::F16,
        SaveDtype::Auto => base_dtype(base_dir).unwrap_or_else(|| {
            tracing::warn!(
                "save_dtype = auto: {} names no dtype in config.json and has no safetensors to \
                 read one from; saving float32",
                base_dir.display()
            );
            DType::F32
        }),
    }
}

/// The base model's dtype as transformers' `dtype="auto"` finds it: config.json's `dtype`
/// (transformers 5) or `torch_dtype` (4.x), else the first floating-point tensor's in its
/// safetensors. None when neither says (a `pytorch_model.bin`, say).
pub fn base_dtype(dir: &Path) -> Option<DType> {
    let config = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let named = config.as_ref().and_then(|c| {
        ["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| c.get(*k).and_then(|v| v.as_str()))
            .and_then(dtype_named)
    });
    named.or_else(|| stored_dtype(dir))
}

fn dtype_named(name: &str) -> Option<DType> {
    match name.trim_start_matches("torch.") {
        "float32" | "float" => Some(DType::F32),
        "bfloat16" => Some(DType::BF16),
        "float16" | "half" => Some(DType::F16),
        _ => None,
    }
}

/// The dtype of the first floating-point tensor in the folder's (first) safetensors file, read
/// from its header alone.
fn stored_dtype(dir: &Path) -> Option<DType> {
    let single = dir.join("model.safetensors");
    let file = if single.is_file() {
        single
    } else {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).ok()?)
                .ok()?;
        let mut shards: Vec<&str> = index
            .get("weight_map")?
            .as_object()?
            .values()
            .filter_map(|v| v.as_str())
            .collect();
        shards.sort();
        dir.join(shards.first()?)
    };
    let mut f = std::fs::File::open(file).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    // A header is JSON of a few hundred bytes a tensor; a larger length is not a header.
    if len > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).ok()?;
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    names
        .into_iter()
        .find_map(|n| match header[n].get("dtype")?.as_str()? {
            "F32" => Some(DType::F32),
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            _ => None,
        })
}

/// transformers' name of a dtype in config.json.
pub fn config_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// `tensors` converted to `dtype`, and the dtype they are in: f32 where f16 cannot hold a
/// weight (one beyond ±65504 would become infinite), with a warning naming it.
pub fn convert(
    tensors: Vec<(String, Tensor)>,
    dtype: DType,
) -> candle_core::Result<(Vec<(String, Tensor)>, DType)> {
    if dtype == DType::F32 {
        return Ok((tensors, dtype));
    }
    if dtype == DType::F16 {
        for (name, t) in &tensors {
            let max = t
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            if max > F16_MAX {
                tracing::warn!(
                    "{name} holds {max:e}, beyond float16's range (±{F16_MAX}); the model is \
                     saved in float32 instead"
                );
                return Ok((tensors, DType::F32));
            }
        }
    }
    let converted = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    Ok((converted, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn auto_reads_config_then_the_stored_weights() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(base_dtype(d), None);
        let t = Tensor::zeros(2, DType::BF16, &Device::Cpu).unwrap();
        let i = Tensor::zeros(2, DType::I64, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("a.ids".to_string(), i), ("b.w".to_string(), t)]),
            d.join("model.safetensors"),
        )
        .unwrap();
        assert_eq!(base_dtype(d), Some(DType::BF16));
        std::fs::write(d.join("config.json"), r#"{"torch_dtype": "float16"}"#).unwrap();
        assert_eq!(base_dtype(d), Some(DType::F16));
        std::fs::write(
            d.join("config.json"),
            r#"{"dtype": "float32", "torch_dtype": "x"}"#,
        )
        .unwrap();
        assert_eq!(resolve(SaveDtype::Auto, d), DType::F32);
        assert_eq!(resolve(SaveDtype::Bf16, d), DType::BF16);
    }

    #[test]
    fn float16_out_of_range_stays_float32() {
        let dev = Device::Cpu;
        let small = Tensor::new(&[1.0f32, -2.5], &dev).unwrap();
        let big = Tensor::new(&[1.0f32, -7.0e4], &dev).unwrap();
        let (out, dtype) = convert(vec![("s".into(), small.clone())], DType::F16).unwrap();
        assert_eq!((out[0].1.dtype(), dtype), (DType::F16, DType::F16));
        let (out, dtype) =
            convert(vec![("s".into(), small), ("b".into(), big)], DType::F16).unwrap();
        assert_eq!(dtype, DType::F32);
        assert!(out.iter().all(|(_, t)| t.dtype() == DType::F32));
        // bf16 holds f32's range.
        let big = Tensor::new(&[1.0e30f32], &dev).unwrap();
        let (out, dtype) = convert(vec![("b".into(), big)], DType::BF16).unwrap();
        assert_eq!((out[0].1.dtype(), dtype), (DType::BF16, DType::BF16));
    }
}
