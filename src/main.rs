//! The `orpo` command line: parses flags, builds the library's pieces, reports errors.

use clap::{Args, Parser, Subcommand};
use orpo::config::Config;
use orpo::data::Tokenizer;
use orpo::train::load_trainer;
use orpo::train::resume::latest_checkpoint;
use orpo::train::run_dir::{clear_run, holds_run};
use orpo::Error;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
        /// Model folder (or hub id), or a LoRA adapter folder, to evaluate
        #[arg(long)]
        model: String,
        /// Base model of an adapter (default: adapter_config.json's base_model_name_or_path)
        #[arg(long)]
        base: Option<String>,
        /// Preference pairs: a file, folder, glob or hub dataset id, read with the config's
        /// columns, subset and revision (the split: data.eval_split with a config, else train)
        #[arg(long)]
        data: PathBuf,
        /// Optional config for batch size, beta, lengths and the data's columns
        #[arg(long, short)]
        config: Option<PathBuf>,
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORPO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: logs redirected to a file or a pipe stay plain text.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn train(args: ConfigArgs, overwrite: bool, resume: Option<Option<PathBuf>>) -> Result<(), Error> {
    let config = Config::load(&args.config, &args.set)?;
    let out = PathBuf::from(&config.train.output_dir);
    if out.exists() && !out.is_dir() {
        return Err(Error::Input(format!(
            "train.output_dir `{}` is a file, not a folder",
            out.display()
        )));
    }
    let resume_from = match resume {
        Some(Some(p)) => {
            if !p.join("trainer_state.json").is_file() {
                return Err(Error::Input(format!(
                    "--resume {}: not a checkpoint folder (no trainer_state.json)",
                    p.display()
                )));
            }
            Some(p)
        }
        Some(None) => Some(latest_checkpoint(&out).ok_or_else(|| {
            Error::Input(format!(
                "--resume: no complete checkpoint-STEP folder in `{}`",
                out.display()
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
        eprintln!(
            "finished {} steps: loss {:.4}, rewards/accuracies {:.3}; model saved to {}",
            last.step,
            last.metrics.loss,
            last.metrics.rewards_accuracy(),
            summary.output_dir.display()
        );
    }
    if let Some(eval) = summary.eval {
        eprint!("{}", eval.render());
    }
    Ok(())
}

/// Whether a `--set` argument sets `key`.
fn overrides(set: &[String], key: &str) -> bool {
    set.iter()
        .any(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key))
}

fn eval(
    model: String,
    base: Option<String>,
    data: PathBuf,
    config: Option<PathBuf>,
    set: Vec<String>,
    as_json: bool,
) -> Result<(), Error> {
    let explicit_length = config.is_some() || overrides(&set, "data.max_length");
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
        None => Config::with_model(model.clone()).with_overrides("(command line)", &set)?,
    };
    // --model wins over the config's model.id: the config only supplies batch size, beta, lengths.
    config.model.id = model;
    let device = orpo::device::select_device(&config.model.device)?;
    let loaded = orpo::train::load_model(
        &config.model.id,
        config.model.revision.as_deref(),
        base.as_deref(),
        &device,
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
        config.train.batch_size,
        config.orpo.beta,
        loaded.tokenizer.pad_id(),
        config.orpo.nll_on_prompt,
    )?;
    if as_json {
        println!("{}", m.to_json());
    } else {
        print!("{}", m.render());
    }
    Ok(())
}

fn data(args: ConfigArgs, as_json: bool, show: usize, ids: bool) -> Result<(), Error> {
    let config = Config::load(&args.config, &args.set)?;
    let dir = orpo::model::resolve_model_dir(&config.model.id, config.model.revision.as_deref())?;
    let tok = Tokenizer::from_dir(&dir)?;
    let opts = orpo::data::DataOptions {
        max_length: config.data.max_length,
        max_prompt_length: config.data.max_prompt_length,
    };
    let Some(train) = config.data.source(false) else {
        return Err(Error::Input(format!(
            "{}: data.train is not set",
            args.config.display()
        )));
    };
    let mut splits = vec![("train", train)];
    if let Some(e) = config.data.source(true) {
        splits.push(("eval", e));
    }
    let mut json_out = serde_json::Map::new();
    for (split, src) in splits {
        let ds = orpo::data::load_source(&src, &tok, &opts)?;
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
            println!("== {split}: {} ({} format)", ds.source, ds.format);
            println!(
                "pairs:          {} (max_length {}, max_prompt_length {})",
                ds.pairs.len(),
                opts.max_length,
                opts.max_prompt_length
            );
            print!("{}", ds.stats.render());
            if n_show > 0 {
                println!(
                    "masked (label -100) tokens are shown {}like this{}, trained tokens {}like this{}",
                    orpo::data::show::MASKED.0,
                    orpo::data::show::MASKED.1,
                    orpo::data::show::TRAINED.0,
                    orpo::data::show::TRAINED.1
                );
            }
            for i in 0..n_show {
                print!("{}", orpo::data::show::render_example(&ds, i, &tok, ids));
            }
        }
    }
    if as_json {
        println!("{}", serde_json::Value::Object(json_out));
    }
    Ok(())
}

/// Counts the bytes tensors hold on the CPU, for the memory figures in the logs.
#[global_allocator]
static ALLOC: orpo::memory::CountingAlloc = orpo::memory::CountingAlloc;

/// Training frees and reallocates the same activation-sized buffers every step. glibc returns
/// blocks over its dynamic mmap threshold to the OS and faults fresh zeroed pages back in on
/// the next step; raising the threshold to its maximum (32 MiB) and not trimming the heap keeps
/// them for reuse (about 5% faster on the CPU benchmark, same peak RSS).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn check_kernels(device: &str, only: Option<&str>, json: bool) -> Result<(), Error> {
    use std::io::Write;
    let device = orpo::device::select_device_for("--device", device)?;
    // Each line as its check ends, so a device fault that ends the process keeps the rest.
    let outcomes = orpo::kernel_check::run(&device, only, |o| {
        if json {
            println!("{}", o.to_json());
        } else {
            let verdict = if o.passed() { "PASS" } else { "FAIL" };
            let errors: Vec<String> = o
                .errors
                .iter()
                .map(|(k, e)| format!("{k} {e:.1e}"))
                .collect();
            let detail = o.failure.clone().unwrap_or_else(|| errors.join("  "));
            println!(
                "{verdict}  {:<18} {:<5} {:<16} {:<8} tol {:.0e}  {detail}",
                o.op,
                format!("{:?}", o.dtype).to_lowercase(),
                o.shape,
                o.mode.name(),
                o.tolerance,
            );
        }
        let _ = std::io::stdout().flush();
    });
    if outcomes.is_empty() {
        return Err(Error::Input(format!(
            "--only {:?} matches no op",
            only.unwrap_or_default()
        )));
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    eprintln!(
        "{} of {} kernel checks passed on {:?}",
        outcomes.len() - failed,
        outcomes.len(),
        device
    );
    if failed > 0 {
        return Err(Error::Check(format!("{failed} kernel checks failed")));
    }
    Ok(())
}

fn main() -> ExitCode {
    // candle asks for the thread count on every parallel op, and without RAYON_NUM_THREADS it
    // re-reads the CPU/cgroup files each time; resolve it once, before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    keep_freed_memory();
    let cli = Cli::parse();
    init_logging();
    if std::env::var_os("ORPO_FUSED_KERNELS").is_some_and(|v| v == "0") {
        orpo::ops::set_fused_kernels(false);
        tracing::info!("ORPO_FUSED_KERNELS=0: CPU kernels off, plain candle ops throughout");
    }
    if std::env::var_os("ORPO_CUDA_KERNELS").is_some_and(|v| v == "0") {
        orpo::ops::set_cuda_kernels(false);
        tracing::info!("ORPO_CUDA_KERNELS=0: the project's CUDA kernels off, candle ops instead");
    }
    if std::env::var_os("ORPO_FUSED_ATTENTION").is_some_and(|v| v == "1") {
        orpo::ops::set_fused_attention(true);
        tracing::info!("ORPO_FUSED_ATTENTION=1: attention's probabilities as one fused op");
    }
    if std::env::var_os("ORPO_RECOMPUTE_ATTENTION").is_some_and(|v| v == "0") {
        orpo::model::set_recompute_attention_probs(false);
        tracing::info!(
            "ORPO_RECOMPUTE_ATTENTION=0: attention's probabilities keep their chain for backward"
        );
    }
    if let Some(v) = std::env::var_os("ORPO_ATTENTION_GROUPS") {
        match v
            .to_str()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n >= 1)
        {
            Some(n) => {
                orpo::model::set_max_attention_groups(n);
                tracing::info!("ORPO_ATTENTION_GROUPS={n}: at most {n} batched attention calls");
            }
            None => tracing::warn!("ORPO_ATTENTION_GROUPS={v:?} ignored: expected a count >= 1"),
        }
    }
    if std::env::var_os("ORPO_CUDA_EVENTS").is_some_and(|v| v == "1") {
        orpo::device::set_cuda_events(true);
        tracing::info!("ORPO_CUDA_EVENTS=1: cudarc's per-allocation stream events kept");
    }
    if std::env::var_os("ORPO_KEEP_GPU_MEMORY").is_some_and(|v| v == "0") {
        orpo::memory::set_keep_freed_device_memory(false);
        tracing::info!(
            "ORPO_KEEP_GPU_MEMORY=0: the GPU's memory pool returns freed memory at each sync"
        );
    }
    let result = match cli.command {
        Command::Train {
            config,
            overwrite,
            resume,
        } => train(config, overwrite, resume),
        Command::Eval {
            model,
            base,
            data: d,
            config,
            set,
            json,
        } => eval(model, base, d, config, set, json),
        Command::Merge {
            base,
            adapter,
            out,
            overwrite,
        } => orpo::merge::merge(base.as_deref(), &adapter, &out, overwrite).map(|base_dir| {
            eprintln!(
                "merged {} into {}; full model written to {}",
                adapter.display(),
                base_dir.display(),
                out.display()
            )
        }),
        Command::Data {
            config,
            json,
            show,
            ids,
        } => data(config, json, show, ids),
        Command::CheckKernels { device, only, json } => {
            check_kernels(&device, only.as_deref(), json)
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
            eprintln!("{msg}");
            ExitCode::from(e.exit_code())
        }
    }
}
