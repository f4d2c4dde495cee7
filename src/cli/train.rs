//! `orpo train`: where the run starts (fresh, resumed, or replacing one), signals, the summary.

use super::output::stderr;
use orpo::config::Config;
use orpo::train::load_trainer;
use orpo::train::resume::latest_checkpoint;
use orpo::train::run_dir::{clear_run, finished, holds_run};
use orpo::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub fn train(
    config: &Path,
    set: &[String],
    overwrite: bool,
    resume: Option<Option<PathBuf>>,
) -> Result<(), Error> {
    let config = Config::load(config, set)?;
    let out = PathBuf::from(&config.train.output_dir);
    if out.exists() && !out.is_dir() {
        return Err(Error::Input(format!(
            "train.output_dir `{}` is a file, not a folder",
            out.display()
        )));
    }
    // A run writes (and --overwrite clears) model files at output_dir's root: never over the
    // weights it starts from.
    for (key, source) in [
        ("model.id", Some(&config.model.id)),
        ("lora.init_from", config.lora.init_from.as_ref()),
    ] {
        let Some(source) = source else { continue };
        if let (Ok(a), Ok(b)) = (std::fs::canonicalize(&out), std::fs::canonicalize(source)) {
            if a == b {
                return Err(Error::Input(format!(
                    "train.output_dir `{}` is the folder {key} reads the weights from; the run \
                     would write over them: choose another output_dir",
                    out.display()
                )));
            }
        }
    }
    let resume_from = match resume {
        Some(Some(p)) => {
            if !p.exists() {
                return Err(Error::Input(format!(
                    "--resume {}: no such folder",
                    p.display()
                )));
            }
            if !p.join("trainer_state.json").is_file() {
                return Err(Error::Input(format!(
                    "--resume {}: not a checkpoint folder (no trainer_state.json)",
                    p.display()
                )));
            }
            Some(p)
        }
        // A run that finished has nothing left to train (its last checkpoint is before the
        // end): it is checked to be this config's run, and left as it is.
        Some(None) if finished(&out) => {
            orpo::train::same_run::check(&out, &config, "", None)?;
            stderr(&format!(
                "train.output_dir `{}` holds this run, finished (final model, evaluation and \
                 training_curves.svg written); nothing to resume (--overwrite trains it again)\n",
                out.display()
            ));
            return Ok(());
        }
        Some(None) => Some(latest_checkpoint(&out).ok_or_else(|| {
            let model_only = orpo::train::run_dir::checkpoints(&out)
                .into_iter()
                .any(|(_, dir)| orpo::train::resume::model_only(&dir));
            Error::Input(format!(
                "--resume: no complete checkpoint-STEP folder in `{}`{}",
                out.display(),
                match model_only {
                    true =>
                        " (its checkpoints were saved with train.save_only_model, without \
                             the optimizer state a run resumes from)",
                    false => "",
                }
            ))
        })?),
        None => {
            if holds_run(&out) && !overwrite {
                return Err(Error::Input(format!(
                    "train.output_dir `{}` already holds a run; pass --resume to continue it or --overwrite to replace it",
                    out.display()
                )));
            }
            None
        }
    };
    let mut trainer = load_trainer(&config)?;
    // Only once everything is validated: a refused run leaves the old one whole.
    if overwrite && holds_run(&out) {
        let n = clear_run(&out)?;
        tracing::info!(output_dir = %out.display(), entries = n, "removed the previous run (--overwrite)");
    }
    // From the first step on, a first SIGINT/SIGTERM finishes the step, checkpoints and exits;
    // a second exits at once. Before it (loading, tokenizing) a signal ends the process as usual.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop));
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    let summary = trainer.run(resume_from.as_deref(), &stop)?;
    if let Some(last) = summary.log.last() {
        stderr(&format!(
            "finished {} steps: loss {:.4}, rewards/accuracies {:.3}; model saved to {}\n",
            last.step,
            last.metrics.loss,
            last.metrics.rewards_accuracy(),
            summary.output_dir.display()
        ));
    }
    if let Some(eval) = summary.eval {
        stderr(&eval.render());
    }
    Ok(())
}
