//! `orpo merge`: fold a LoRA adapter into its base model (W + s·B·A) and write a full model in
//! Hugging Face layout, loadable without PEFT.

use crate::config::SaveDtype;
use crate::data::Tokenizer;
use crate::model::lora::{self, AdapterInit};
use crate::model::{resolve_model_dir, CausalLm, LoadOptions};
use crate::train::checkpoint::{save_model, BaseModel};
use crate::train::save_dtype;
use crate::Error;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Merges the adapter in `adapter` into `base` (or the base its adapter_config.json names) and
/// saves the result to `out`, its weights in `dtype` (`auto`: the base's); returns the base
/// model's folder. An `out` that exists and is not
/// empty is refused unless `overwrite`, which first removes the run or model files there.
pub fn merge(
    base: Option<&str>,
    adapter: &Path,
    out: &Path,
    overwrite: bool,
    dtype: SaveDtype,
) -> Result<PathBuf, Error> {
    // Flags that name a file where a folder belongs, before anything is read or written.
    let flags = [
        ("--adapter", Some(adapter), "an adapter folder"),
        ("--base", base.map(Path::new), "a model folder"),
    ];
    for (flag, path, what) in flags {
        if let Some(path) = path.filter(|p| p.is_file()) {
            return Err(Error::Input(format!(
                "{flag} {}: is a file, not {what}",
                path.display()
            )));
        }
    }
    check_out(out)?;
    // A local folder, or an adapter repository on the hub.
    let resolved;
    let adapter = match adapter.is_dir() {
        true => adapter,
        false => {
            resolved = resolve_model_dir(&adapter.to_string_lossy(), None)?;
            resolved.as_path()
        }
    };
    if !lora::is_adapter_dir(adapter) {
        return Err(Error::Input(format!(
            "{}: no {} here; --adapter must be a LoRA adapter folder",
            adapter.display(),
            lora::ADAPTER_CONFIG
        )));
    }
    let device = Device::Cpu;
    let saved = lora::read_adapter(adapter, &device)?;
    let base_id = base.map(str::to_string).or(saved.base).ok_or_else(|| {
        Error::Input(format!(
            "{}: adapter_config.json names no base model; pass --base",
            adapter.display()
        ))
    })?;
    if base.is_none() && Path::new(&base_id).is_file() {
        return Err(Error::Input(format!(
            "{}: base_model_name_or_path {base_id:?} is a file, not a model folder; pass --base",
            adapter.join(lora::ADAPTER_CONFIG).display()
        )));
    }
    // PEFT loads the base at the adapter's `revision`; a --base given is taken as it is.
    let base_revision = saved.base_revision.as_deref().filter(|_| base.is_none());
    let base_dir = resolve_model_dir(&base_id, base_revision)?;
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(out, &base_dir) || same(out, adapter) {
        return Err(Error::Input(format!(
            "--out {} would overwrite an input; choose a new folder",
            out.display()
        )));
    }
    let occupied = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied && !overwrite {
        return Err(Error::Input(format!(
            "--out {} already exists and is not empty; choose a new folder or pass --overwrite",
            out.display()
        )));
    }
    if crate::train::run_dir::run_config(adapter)
        .is_some_and(|c| c.lora.quantize != crate::config::BaseQuant::None)
    {
        tracing::info!(
            "the adapter trained against a 4-bit NF4 base (its orpo.toml); it is merged into \
             the base's full-precision weights, as QLoRA adapters are"
        );
    }
    let wanted = save_dtype::resolve(dtype, &base_dir);
    let opts = LoadOptions {
        lora: Some((saved.spec, AdapterInit::Saved(saved.tensors))),
        merge: true,
        // A bf16 model is held in bf16 as it is merged (half an f32 copy's memory; the merged
        // weights rounded once, as saving them would). f16 is chosen only after every weight
        // is seen to fit its range, so that model is held in f32 until saved.
        merged_dtype: (wanted == DType::BF16).then_some(DType::BF16),
        ..LoadOptions::default()
    };
    let model = CausalLm::load_with(&base_dir, &device, opts)?;
    let has_tokenizer =
        adapter.join("tokenizer.json").is_file() || adapter.join("vocab.json").is_file();
    let tokenizer = Tokenizer::from_dir(if has_tokenizer { adapter } else { &base_dir })?;
    if occupied {
        // An adapter left there would be loaded in place of the merged model.
        crate::train::run_dir::clear_run(out)?;
    }
    let saved = save_model(
        out,
        &model,
        &tokenizer,
        &BaseModel::new(&base_id, base_revision, &base_dir),
        wanted,
    )?;
    if saved != wanted {
        tracing::warn!(
            "merged weights saved in {} rather than {}",
            save_dtype::config_name(saved),
            save_dtype::config_name(wanted)
        );
    }
    Ok(base_dir)
}

/// `--out` must be a folder, or a path one can be made at: an existing file there (or in
/// place of one of its parents) is an input error, not a failure to write.
fn check_out(out: &Path) -> Result<(), Error> {
    if out.is_file() {
        return Err(Error::Input(format!(
            "--out {}: is a file, not a folder",
            out.display()
        )));
    }
    if let Some(file) = out.ancestors().skip(1).find(|p| p.is_file()) {
        return Err(Error::Input(format!(
            "--out {}: {} is a file, not a folder",
            out.display(),
            file.display()
        )));
    }
    Ok(())
}
