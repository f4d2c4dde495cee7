//! The `orpo` command line: its flags, the dispatch to `cli`'s commands, and the error report.

use clap::{Args, Parser, Subcommand};
use orpo::config::SaveDtype;
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;

#[derive(Parser)]
#[command(
    name = "orpo",
    version,
    about = "ORPO preference fine-tuning for causal language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file
    #[arg(long, short)]
    config: PathBuf,
    /// Override a key: --set section.key=value (repeatable)
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model with ORPO
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Reuse an output_dir that already holds a run
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Continue from the newest complete checkpoint in output_dir, or from PATH
        #[arg(long, value_name = "PATH", num_args = 0..=1)]
        resume: Option<Option<PathBuf>>,
    },
    /// ORPO metrics on held-out pairs
    Eval {
        /// Model folder (or hub id), or a LoRA adapter folder (or an adapter repository's hub
        /// id), to evaluate; a run's as it trained and evaluated (its orpo.toml's dtype, a QLoRA
        /// base's quantization and, without --config, its lengths, columns, beta and batch
        /// sizes; --set overrides)
        #[arg(long)]
        model: String,
        /// Base model of an adapter (default: adapter_config.json's base_model_name_or_path)
        #[arg(long)]
        base: Option<String>,
        /// Preference pairs: a file, folder, glob or hub dataset id, read with the config's
        /// columns, subset and revision (the split: data.eval_split with a config, else train)
        #[arg(long)]
        data: PathBuf,
        /// Optional config for batch size, beta, lengths and the data's columns (instead of a
        /// run's orpo.toml)
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override a key: --set section.key=value (repeatable)
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Print one JSON object with TRL's eval_* keys
        #[arg(long)]
        json: bool,
    },
    /// Fold a LoRA adapter into its base model and write a full model
    Merge {
        /// Base model folder or hub id (default: adapter_config.json's base_model_name_or_path)
        #[arg(long)]
        base: Option<String>,
        /// Adapter folder written by `orpo train` with LoRA (or by PEFT)
        #[arg(long)]
        adapter: PathBuf,
        /// Folder for the merged model
        #[arg(long)]
        out: PathBuf,
        /// Replace the model (or run) in an --out folder that is not empty
        #[arg(long)]
        overwrite: bool,
        /// dtype of the merged weights: float32, bfloat16, float16, or auto (the base's)
        #[arg(long, default_value = "float32")]
        dtype: SaveDtype,
    },
    /// Load and tokenise a dataset exactly as training would, and describe it
    Data {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print a machine-readable summary
        #[arg(long)]
        json: bool,
        /// Render the first N pairs as the model sees them (prompt/answer boundary, label mask)
        #[arg(long, value_name = "N", default_value_t = 0)]
        show: usize,
        /// With --show: also list every token as id:"piece" (masked ones prefixed by -)
        #[arg(long)]
        ids: bool,
    },
    /// Check this build's kernels on a device against a float64 CPU reference
    CheckKernels {
        /// cpu, cuda, cuda:N or auto
        #[arg(long, default_value = "auto")]
        device: String,
        /// Only the ops whose name contains this
        #[arg(long)]
        only: Option<String>,
        /// Print one JSON object per check
        #[arg(long)]
        json: bool,
    },
}

/// Counts the bytes tensors hold on the CPU, for the memory figures in the logs.
#[global_allocator]
static ALLOC: orpo::memory::CountingAlloc = orpo::memory::CountingAlloc;

fn main() -> ExitCode {
    cli::setup::fix_thread_count();
    cli::setup::keep_freed_memory();
    let cli = Cli::parse();
    cli::setup::init_logging();
    cli::setup::apply_switches();
    let result = match cli.command {
        Command::Train {
            config,
            overwrite,
            resume,
        } => cli::train(&config.config, &config.set, overwrite, resume),
        Command::Eval {
            model,
            base,
            data: d,
            config,
            set,
            json,
        } => cli::eval(model, base, d, config, set, json),
        Command::Merge {
            base,
            adapter,
            out,
            overwrite,
            dtype,
        } => {
            orpo::merge::merge(base.as_deref(), &adapter, &out, overwrite, dtype).map(|base_dir| {
                cli::stderr(&format!(
                    "merged {} into {}; full model written to {}\n",
                    adapter.display(),
                    base_dir.display(),
                    out.display()
                ))
            })
        }
        Command::Data {
            config,
            json,
            show,
            ids,
        } => cli::data(&config.config, &config.set, json, show, ids),
        Command::CheckKernels { device, only, json } => {
            cli::check_kernels(&device, only.as_deref(), json)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(&format!("\n  caused by: {text}"));
                }
                source = s.source();
            }
            cli::stderr(&format!("{msg}\n"));
            ExitCode::from(e.exit_code())
        }
    }
}
