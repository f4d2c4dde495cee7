//! `orpo eval`: a saved model (or adapter on its base) on held-out pairs.

use super::output::stdout;
use candle_core::DType;
use orpo::config::{BaseQuant, Config, Dtype};
use orpo::model::Quantize;
use orpo::Error;
use std::path::{Path, PathBuf};

/// Whether a `--set` argument sets `key`.
fn overrides(set: &[String], key: &str) -> bool {
    set.iter()
        .any(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key))
}

pub fn eval(
    model: String,
    base: Option<String>,
    data: PathBuf,
    config: Option<PathBuf>,
    set: Vec<String>,
    as_json: bool,
) -> Result<(), Error> {
    // A file where a folder belongs would otherwise read as a hub id that does not exist.
    let flags = [
        ("--model", Some(&model), "a model or adapter folder"),
        ("--base", base.as_ref(), "a model folder"),
    ];
    for (flag, path, what) in flags {
        if let Some(path) = path.filter(|p| Path::new(p).is_file()) {
            return Err(Error::Input(format!(
                "{flag} {path}: is a file, not {what}"
            )));
        }
    }
    // A run's model (its orpo.toml beside it) is evaluated as the run evaluated: without
    // --config, with the run's lengths, columns, ORPO settings and evaluation batches.
    let run = orpo::train::run_dir::run_config(Path::new(&model));
    let from_run = config.is_none() && run.is_some();
    let explicit_length = config.is_some() || from_run || overrides(&set, "data.max_length");
    // Without a config, a folder or hub id is read from its `train` split (everything, for a
    // folder whose files name no split), unless --set names one.
    let explicit_split = config.is_some() || overrides(&set, "data.eval_split");
    let mut config = match config {
        // --model stands for the config's model.id, which the file may then leave out.
        Some(path) => {
            let sets: Vec<String> = std::iter::once(format!("model.id={model}"))
                .chain(set.iter().cloned())
                .collect();
            Config::load(&path, &sets)?
        }
        None => match &run {
            Some(r) => evaluated_as(r, model.clone()),
            None => Config::with_model(model.clone()),
        }
        .with_overrides("(command line)", &set)?,
    };
    // --model wins over the config's model.id: the config only supplies batch size, beta, lengths.
    config.model.id = model;
    let device = orpo::device::select_device(&config.model.device)?;
    // A run's model is evaluated as it trained: its orpo.toml gives the products' dtype and,
    // for a QLoRA adapter, the base's quantization, unless --set says otherwise (a model from
    // elsewhere: as the config or --set says).
    let dir = Path::new(&config.model.id);
    let adapter = orpo::model::lora::is_adapter_dir(dir);
    let quant_set = overrides(&set, "lora.quantize") || overrides(&set, "lora.double_quant");
    let lora = match &run {
        Some(r) if adapter && !quant_set => &r.lora,
        _ => &config.lora,
    };
    let dtype = match &run {
        Some(r) if !overrides(&set, "model.dtype") => r.model.dtype,
        _ => config.model.dtype,
    };
    let quantize = (lora.quantize == BaseQuant::Nf4).then_some(Quantize {
        double_quant: lora.double_quant,
    });
    if run.is_some() {
        tracing::info!(
            dtype = ?dtype,
            quantize = %lora.quantize,
            double_quant = lora.double_quant,
            from_run,
            "evaluating as the run trained: dtype and quantization from its orpo.toml (--set \
             model.dtype / lora.quantize override), and without --config its lengths, columns, \
             beta and batch sizes"
        );
    }
    let setup = orpo::train::EvalSetup {
        compute: match dtype {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
        },
        quantize,
    };
    let mut loaded = orpo::train::load_model(
        &config.model.id,
        config.model.revision.as_deref(),
        base.as_deref(),
        setup,
        &device,
    )?;
    orpo::data::apply_chat_template_setting(
        &mut loaded.tokenizer,
        config.data.chat_template.as_deref(),
    )?;
    if let Some(limit) = loaded.model.config().max_sequence_length() {
        if !explicit_length && config.data.max_length > limit {
            // Defaults adapt to the model; explicit settings are checked below.
            config.data.max_length = limit;
            config.data.max_prompt_length = config.data.max_prompt_length.min(limit);
        }
    }
    let opts = orpo::data::DataOptions {
        max_length: config.data.max_length,
        max_prompt_length: config.data.max_prompt_length,
    };
    let split = if explicit_split {
        config.data.eval_split.clone()
    } else {
        "train".to_string()
    };
    let src = config.data.source_at(&data.display().to_string(), &split);
    let ds = orpo::data::load_source(&src, &loaded.tokenizer, &opts)?;
    orpo::train::check_data_fits(&config, loaded.model.config(), &[&ds])?;
    if ds.pairs.is_empty() {
        return Err(Error::Input(format!("{}: no usable pairs", data.display())));
    }
    let m = orpo::eval::evaluate(
        &loaded.model,
        &ds,
        config.train.eval_batch_size(),
        config.orpo.beta,
        loaded.tokenizer.pad_id(),
        config.orpo.nll_on_prompt,
        config.train.dataloader_drop_last,
    )?;
    match as_json {
        true => stdout(&format!("{}\n", m.to_json())),
        false => stdout(&m.render()),
    }
}

/// The settings of `run` that decide an evaluation's numbers — lengths, column names, ORPO's
/// beta and NLL span, evaluation batches — for evaluating `model`. The rest stays default: the
/// run's data sources, device and model revision belong to its training, and its chat template
/// is saved with the model.
fn evaluated_as(run: &Config, model: String) -> Config {
    let mut c = Config::with_model(model);
    let (d, r) = (&mut c.data, &run.data);
    d.max_length = r.max_length;
    d.max_prompt_length = r.max_prompt_length;
    d.prompt_column = r.prompt_column.clone();
    d.chosen_column = r.chosen_column.clone();
    d.rejected_column = r.rejected_column.clone();
    c.orpo = run.orpo.clone();
    c.train.batch_size = run.train.batch_size;
    c.train.eval_batch_size = run.train.eval_batch_size;
    c.train.dataloader_drop_last = run.train.dataloader_drop_last;
    c
}
