//! Exact resume: a checkpoint's weights, optimizer moments, step, elapsed time and log, plus a
//! fingerprint of the batching plan. Data order needs no saved state: each epoch's permutation
//! is a pure function of (seed, epoch), so step N+1 trains on the same pairs either way.

use super::plan::{Plan, ShuffleOrder};
use crate::config::Config;
use crate::model::CausalLm;
use crate::Error;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What makes two runs take the same steps over the same pairs.
pub fn plan_fingerprint(plan: &Plan) -> Value {
    let mut v = json!({
        "n_pairs": plan.n_pairs,
        "batch_size": plan.batch_size,
        "grad_accum": plan.grad_accum,
        "shuffle": plan.shuffle,
        "seed": plan.seed,
        "total_steps": plan.total_steps,
    });
    if plan.shuffle {
        v["shuffle_order"] = plan.order.name().into();
    }
    // Only when set: checkpoints from before the setting still match.
    if plan.drop_last {
        v["drop_last"] = true.into();
    }
    v
}

/// A checkpoint's plan fingerprint, with the shuffled order that checkpoints written before
/// orpo followed torch's order leave unnamed.
fn saved_plan(state: &Value) -> Value {
    let mut plan = state["plan"].clone();
    if plan.get("shuffle") == Some(&Value::Bool(true)) && plan.get("shuffle_order").is_none() {
        plan["shuffle_order"] = ShuffleOrder::ChaCha8.name().into();
    }
    plan
}

/// The order checkpoint `dir`'s run shuffles its pairs in, so that a resumed run goes on over
/// the pairs it would have trained on.
pub fn checkpoint_order(dir: &Path) -> Result<ShuffleOrder, Error> {
    let order = saved_plan(&read_state(dir)?)["shuffle_order"].clone();
    Ok(match order.as_str() {
        Some("chacha8") => ShuffleOrder::ChaCha8,
        _ => ShuffleOrder::Torch,
    })
}

/// What a field of the plan's fingerprint comes from, for error messages.
fn plan_key(field: &str) -> &str {
    match field {
        "n_pairs" => "pairs (data.train after filtering):",
        "batch_size" => "train.batch_size =",
        "grad_accum" => "train.grad_accum =",
        "shuffle" => "train.shuffle =",
        "seed" => "train.seed =",
        "total_steps" => "steps (train.epochs, train.max_steps):",
        "shuffle_order" => "shuffled order",
        other => other,
    }
}

/// The newest complete `checkpoint-STEP` in `out_dir`. Checkpoints are renamed into place only
/// when complete and set aside before removal, so a folder of that name with its state and
/// optimizer files is trustworthy (the files check covers folders of older versions, which
/// removed checkpoints in place).
pub fn latest_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    super::run_dir::checkpoints(out_dir)
        .into_iter()
        .rev()
        .map(|(_, path)| path)
        .find(|p| p.join(STATE_FILE).is_file() && p.join(OPTIMIZER_FILE).is_file())
}

pub struct ResumeState {
    pub dir: PathBuf,
    pub step: usize,
    pub epoch: f64,
    pub elapsed_s: f64,
    pub total_tokens: usize,
    pub pending_tokens: usize,
    pub pending_metrics: Vec<Value>,
    /// Step losses since the last logged line.
    pub pending_losses: Vec<Value>,
    pub log_history: Vec<Value>,
    /// Evaluations during training (absent in checkpoints of runs without them).
    pub eval_history: Vec<Value>,
    /// The step of `load_best_model_at_end`'s best checkpoint so far.
    pub best_checkpoint: Option<usize>,
    /// Written for an interrupt, off the save schedule: once the resumed run has saved past
    /// it, an uninterrupted run would not have it.
    pub interrupt: bool,
    pub optimizer: HashMap<String, Tensor>,
    /// Whether this run's optimizer keeps 8-bit moments (what `optimizer` must hold).
    eight_bit: bool,
}

fn bad(dir: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("cannot resume from {}: {msg}", dir.display()))
}

/// An error about one file of the checkpoint: `cannot resume from DIR: DIR/FILE: msg`.
fn bad_file(dir: &Path, file: &str, msg: impl std::fmt::Display) -> Error {
    bad(dir, format!("{}: {msg}", dir.join(file).display()))
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The files a full model's weights come in (see `crate::model::read_weights`).
const MODEL_FILES: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
];

/// A JSON value as an error message shows it: short, and never the whole of a long array.
fn shown(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

/// Typed, checked reads of trainer_state.json's keys; every error names the file and the key.
struct StateFile<'a> {
    dir: &'a Path,
    obj: &'a serde_json::Map<String, Value>,
}

impl StateFile<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        bad_file(self.dir, STATE_FILE, format!("`{key}` {msg}"))
    }

    /// A whole number, or `None` when the key is absent.
    fn whole(&self, key: &str) -> Result<Option<usize>, Error> {
        match self.obj.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.err(key, format!("must be a whole number, found {}", shown(v)))
                }),
        }
    }

    /// A count of tokens: a whole number no run could exceed (JSON's exact integers, up to
    /// 2^53, which also keeps the run's sums from overflowing); 0 when the key is absent.
    fn tokens(&self, key: &str) -> Result<usize, Error> {
        const MAX: usize = 1 << 53;
        match self.whole(key)? {
            Some(n) if n > MAX => Err(self.err(
                key,
                format!("is {n}, more tokens than any run holds (at most 2^53)"),
            )),
            n => Ok(n.unwrap_or(0)),
        }
    }

    /// The steps of a history's entries (`log_history`, `eval_history`), checked to rise
    /// strictly and to stay within the checkpoint's `global_step`.
    fn history_steps(
        &self,
        key: &str,
        entries: &[Value],
        global_step: usize,
    ) -> Result<Vec<usize>, Error> {
        let mut steps: Vec<usize> = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let step = entry
                .get("step")
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    self.err(
                        key,
                        format!("entry {i} has no whole `step`: {}", shown(entry)),
                    )
                })?;
            if step > global_step {
                return Err(self.err(
                    key,
                    format!(
                        "entry {i} is at step {step}, after the checkpoint's global_step \
                         {global_step}"
                    ),
                ));
            }
            if let Some(&prev) = steps.last() {
                if step <= prev {
                    return Err(self.err(
                        key,
                        format!(
                            "entry {i} is at step {step}, not after the previous entry's \
                             step {prev} (steps must rise)"
                        ),
                    ));
                }
            }
            steps.push(step);
        }
        Ok(steps)
    }

    /// A finite non-negative number; 0 when the key is absent.
    fn seconds_like(&self, key: &str) -> Result<f64, Error> {
        match self.obj.get(key) {
            None => Ok(0.0),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| {
                    self.err(
                        key,
                        format!("must be a finite non-negative number, found {}", shown(v)),
                    )
                }),
        }
    }

    /// An array; empty when the key is absent (older checkpoints lack some).
    fn array(&self, key: &str) -> Result<Vec<Value>, Error> {
        match self.obj.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(v) => Err(self.err(key, format!("must be an array, found {}", shown(v)))),
        }
    }
}

/// The STEP of a folder named `checkpoint-STEP`, if it is named so.
fn folder_step(dir: &Path) -> Option<(String, usize)> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
    Some((name, step))
}

/// A checkpoint's trainer_state.json, checked to hold a JSON object.
fn read_state(dir: &Path) -> Result<Value, Error> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| bad_file(dir, STATE_FILE, e))?;
    let state: Value = serde_json::from_str(&text)
        .map_err(|e| bad_file(dir, STATE_FILE, format!("invalid JSON: {e}")))?;
    if !state.is_object() {
        return Err(bad_file(
            dir,
            STATE_FILE,
            format!("must hold a JSON object, found {}", shown(&state)),
        ));
    }
    Ok(state)
}

/// Whether checkpoint `dir` (its `state`) belongs to the run `config` describes: its settings
/// and training pairs (`same_run`) and its batching plan.
fn check_same_run(
    dir: &Path,
    state: &Value,
    plan: &Plan,
    config: &Config,
    data_fingerprint: &str,
) -> Result<(), Error> {
    let saved_data = match state.get("data_fingerprint") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(v) => {
            return Err(bad_file(
                dir,
                STATE_FILE,
                format!("`data_fingerprint` must be a string, found {}", shown(v)),
            ))
        }
    };
    super::same_run::check(dir, config, data_fingerprint, saved_data)?;
    let saved_plan = &saved_plan(state);
    let want = plan_fingerprint(plan);
    if saved_plan != &want {
        let differs: Vec<String> = want
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| saved_plan.get(k.as_str()) != Some(*v))
            .map(|(k, v)| {
                let was = saved_plan.get(k.as_str()).map_or("unset".into(), shown);
                format!("{} {v} (the run: {was})", plan_key(k))
            })
            .collect();
        return Err(bad(
            dir,
            format!(
                "its batching plan differs from this config's: {}; resume with the config and data the run started with",
                differs.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Whether checkpoint `dir` was saved without its optimizer state (`train.save_only_model`):
/// its weights load, but no run resumes from it.
pub fn model_only(dir: &Path) -> bool {
    !dir.join(OPTIMIZER_FILE).is_file()
        && read_state(dir).is_ok_and(|s| s.get(MODEL_ONLY_KEY) == Some(&Value::Bool(true)))
}

/// trainer_state.json's mark of a checkpoint without optimizer state.
pub const MODEL_ONLY_KEY: &str = "save_only_model";

/// Why checkpoint `dir` belongs to another run than the one `config` describes, if it is a
/// complete checkpoint of one (an unreadable or incomplete folder is nobody's run).
pub fn another_run(
    dir: &Path,
    plan: &Plan,
    config: &Config,
    data_fingerprint: &str,
) -> Option<String> {
    if !dir.join(OPTIMIZER_FILE).is_file() && !model_only(dir) {
        return None;
    }
    let state = read_state(dir).ok()?;
    check_same_run(dir, &state, plan, config, data_fingerprint)
        .err()
        .map(|e| e.to_string())
}

impl ResumeState {
    /// Reads a checkpoint and checks it belongs to the run `config` describes (its settings and
    /// training pairs, `same_run`; its batching plan), at a step within it. Every error names
    /// the file (and, for trainer_state.json, the key) at fault.
    pub fn load(
        dir: &Path,
        plan: &Plan,
        config: &Config,
        data_fingerprint: &str,
        device: &Device,
    ) -> Result<Self, Error> {
        if model_only(dir) {
            return Err(bad(
                dir,
                "it was saved with train.save_only_model, without the optimizer state a run \
                 resumes from (its weights load as any model: model.id = this folder starts a \
                 new run from them)",
            ));
        }
        let state = read_state(dir)?;
        check_same_run(dir, &state, plan, config, data_fingerprint)?;
        let obj = state
            .as_object()
            .ok_or_else(|| bad_file(dir, STATE_FILE, "must hold a JSON object"))?;
        let file = StateFile { dir, obj };
        let total = plan.total_steps;
        let step = file
            .whole("global_step")?
            .ok_or_else(|| file.err("global_step", "is missing"))?;
        if step == 0 || step > total {
            return Err(file.err(
                "global_step",
                format!("is {step}, outside this run's steps 1..={total}"),
            ));
        }
        if let Some((name, folder)) = folder_step(dir) {
            if folder != step {
                return Err(file.err(
                    "global_step",
                    format!("is {step}, but the folder is {name} (step {folder})"),
                ));
            }
        }
        let epoch = file.seconds_like("epoch")?;
        let elapsed_s = file.seconds_like("elapsed_s")?;
        let total_tokens = file.tokens("total_tokens")?;
        let pending_tokens = file.tokens("pending_tokens")?;
        let pending_metrics = file.array("pending_metrics")?;
        let pending_losses = file.array("pending_losses")?;
        let log_history = file.array("log_history")?;
        let eval_history = file.array("eval_history")?;
        let logged = file.history_steps("log_history", &log_history, step)?;
        // A step-0 evaluation is train.eval_on_start's.
        file.history_steps("eval_history", &eval_history, step)?;
        // One loss a step since the last logged line (older checkpoints keep none), each
        // step's micro-batches' metrics beside them.
        let since_log = step - logged.last().copied().unwrap_or(0);
        if pending_losses.len() > since_log {
            return Err(file.err(
                "pending_losses",
                format!(
                    "holds {} losses, but {since_log} step(s) passed since the last logged line \
                     (global_step {step})",
                    pending_losses.len()
                ),
            ));
        }
        if pending_metrics.len() < pending_losses.len() {
            return Err(file.err(
                "pending_metrics",
                format!(
                    "holds {} micro-batches' metrics, fewer than the {} steps in \
                     `pending_losses`",
                    pending_metrics.len(),
                    pending_losses.len()
                ),
            ));
        }
        // load_best_model_at_end's checkpoint so far (`checkpoint-N`, as transformers names
        // the folder; older checkpoints hold none).
        let best_checkpoint = match obj.get("best_model_checkpoint") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(|s| s.strip_prefix("checkpoint-"))
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&n| n >= 1 && n <= step)
                    .ok_or_else(|| {
                        file.err(
                            "best_model_checkpoint",
                            format!("is {v}, not \"checkpoint-N\" for a step up to {step}"),
                        )
                    })?,
            ),
        };
        let interrupt = match obj.get("interrupt") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| file.err("interrupt", format!("is {v}, not true or false")))?,
        };
        let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), device)
            .map_err(|e| bad_file(dir, OPTIMIZER_FILE, e))?;
        Ok(ResumeState {
            dir: dir.to_path_buf(),
            step,
            epoch,
            elapsed_s,
            total_tokens,
            pending_tokens,
            pending_metrics,
            pending_losses,
            log_history,
            eval_history,
            best_checkpoint,
            interrupt,
            optimizer,
            eight_bit: config.optim.optimizer == crate::config::Optimizer::AdamW8bit,
        })
    }

    /// Overwrites the model's trainable weights (the whole model, or its LoRA adapter) with
    /// the checkpoint's (whose errors say first when the checkpoint is another kind of run's),
    /// and checks the optimizer state fits them (`optim_state::check_state`: every moment there, of
    /// the parameter's size, finite, the step the checkpoint's).
    pub fn restore_weights(&self, model: &CausalLm, device: &Device) -> Result<(), Error> {
        restore_model_weights(&self.dir, model, device)?;
        // Damaged moments would fail mid-run, or train on silently, without naming the file.
        super::optim_state::check_state(model.params(), &self.optimizer, self.eight_bit, self.step)?
            .map_err(|msg| bad_file(&self.dir, OPTIMIZER_FILE, msg))
    }
}

/// Overwrites the model's trainable weights (the whole model, or its LoRA adapter) with those
/// of checkpoint folder `dir`.
pub fn restore_model_weights(dir: &Path, model: &CausalLm, device: &Device) -> Result<(), Error> {
    use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
    let has = |f: &str| dir.join(f).is_file();
    let holds_adapter = has(ADAPTER_WEIGHTS) || has(ADAPTER_CONFIG);
    let holds_model = MODEL_FILES.iter().any(|f| has(f));
    let (file, tensors) = match model.adapter() {
        Some(_) => {
            if !has(ADAPTER_WEIGHTS) && holds_model {
                return Err(bad(
                    dir,
                    format!(
                        "the checkpoint holds a full model ({}) but lora.enabled is true in this config; resume with the config the run started with",
                        MODEL_FILES.iter().find(|f| has(f)).unwrap_or(&MODEL_FILES[0])
                    ),
                ));
            }
            let t = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), device)
                .map_err(|e| bad_file(dir, ADAPTER_WEIGHTS, e))?;
            (ADAPTER_WEIGHTS.to_string(), t)
        }
        None => {
            if !holds_model {
                if holds_adapter {
                    return Err(bad(
                        dir,
                        format!(
                            "the checkpoint holds a LoRA adapter ({}) but lora.enabled is false in this config; resume with the config the run started with",
                            if has(ADAPTER_WEIGHTS) { ADAPTER_WEIGHTS } else { ADAPTER_CONFIG }
                        ),
                    ));
                }
                return Err(bad_file(
                    dir,
                    MODEL_FILES[0],
                    format!("not found (nor {} or {})", MODEL_FILES[1], MODEL_FILES[2]),
                ));
            }
            // One file or shards, as the checkpoint was written. read_weights' errors
            // name the file at fault.
            let t = crate::model::read_weights(dir, device).map_err(|e| bad(dir, e))?;
            let file = MODEL_FILES
                .iter()
                .find(|f| has(f))
                .unwrap_or(&MODEL_FILES[0]);
            (dir.join(file).display().to_string(), t)
        }
    };
    let params = model.params();
    for (name, var) in params.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| bad(dir, format!("{file} lacks `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(bad(
                dir,
                format!(
                    "`{name}` has shape {:?}, the model {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(t)?;
    }
    Ok(())
}
