//! `orpo data`: loads and tokenises the configured splits as training would, checks them
//! against the model's config.json as training does, and describes them.

use super::output::stdout;
use orpo::config::Config;
use orpo::data::Tokenizer;
use orpo::Error;
use std::path::Path;

pub fn data(
    config_path: &Path,
    set: &[String],
    as_json: bool,
    show: usize,
    ids: bool,
) -> Result<(), Error> {
    if ids && show == 0 {
        return Err(Error::Input(
            "--ids lists the tokens of the pairs --show renders: give --show N too".into(),
        ));
    }
    let config = Config::load(config_path, set)?;
    // The model's config and tokenizer only: a 7B model's weights are not fetched to check data.
    let dir =
        orpo::model::resolve_model_config_dir(&config.model.id, config.model.revision.as_deref())?;
    let mut tok = Tokenizer::from_dir(&dir)?;
    orpo::data::apply_chat_template_setting(&mut tok, config.data.chat_template.as_deref())?;
    let opts = orpo::data::DataOptions {
        max_length: config.data.max_length,
        max_prompt_length: config.data.max_prompt_length,
    };
    if config.data.train.is_none() {
        return Err(Error::Input(format!(
            "{}: data.train is not set",
            config_path.display()
        )));
    }
    // The splits as training reads them: data.eval, or pairs held out by data.eval_size.
    let (train, eval) = orpo::train::load_splits(&config, &tok)?;
    // And fitted to the model as training checks them: ids in its vocabulary, sequences
    // within its positions (config.json only; no weights are read).
    let model = orpo::model::ModelConfig::from_dir(&dir)?;
    let all: Vec<_> = std::iter::once(&train).chain(eval.as_ref()).collect();
    orpo::train::check_data_fits(&config, &model, &all)?;
    let splits = std::iter::once(("train", train)).chain(eval.map(|e| ("eval", e)));
    let mut json_out = serde_json::Map::new();
    for (split, ds) in splits {
        let n_show = show.min(ds.pairs.len());
        if as_json {
            let mut v = serde_json::json!({
                "source": ds.source,
                "files": ds.files,
                "format": ds.format,
                "pairs": ds.pairs.len(),
                "max_length": opts.max_length,
                "max_prompt_length": opts.max_prompt_length,
            });
            if let (Some(obj), serde_json::Value::Object(stats)) =
                (v.as_object_mut(), ds.stats.to_json())
            {
                obj.extend(stats);
                if n_show > 0 {
                    let examples: Vec<_> = (0..n_show)
                        .map(|i| orpo::data::show::example_json(&ds, i, &tok))
                        .collect();
                    obj.insert("examples".into(), examples.into());
                }
            }
            json_out.insert(split.into(), v);
        } else {
            stdout(&format!(
                "== {split}: {} ({} format)\npairs:          {} (max_length {}, max_prompt_length {})\n{}",
                ds.source,
                ds.format,
                ds.pairs.len(),
                opts.max_length,
                opts.max_prompt_length,
                ds.stats.render()
            ))?;
            if n_show > 0 {
                stdout(&format!(
                    "masked (label -100) tokens are shown {}like this{}, trained tokens {}like this{}\n",
                    orpo::data::show::MASKED.0,
                    orpo::data::show::MASKED.1,
                    orpo::data::show::TRAINED.0,
                    orpo::data::show::TRAINED.1
                ))?;
            }
            for i in 0..n_show {
                stdout(&orpo::data::show::render_example(&ds, i, &tok, ids))?;
            }
        }
    }
    if as_json {
        stdout(&format!("{}\n", serde_json::Value::Object(json_out)))?;
    }
    Ok(())
}
