//! Exact resume: a checkpoint's weights, optimizer moments, step, elapsed time and log, plus a
//! fingerprint of the batching plan. Data order needs no saved state: each epoch's permutation
//! is a pure function of (seed, epoch), so step N+1 trains on the same pairs either way.

use super::plan::Plan;
use crate::model::CausalLm;
use crate::Error;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What makes two runs take the same steps over the same pairs.
pub fn plan_fingerprint(plan: &Plan) -> Value {
    json!({
        "n_pairs": plan.n_pairs,
        "batch_size": plan.batch_size,
        "grad_accum": plan.grad_accum,
        "shuffle": plan.shuffle,
        "seed": plan.seed,
        "total_steps": plan.total_steps,
    })
}

/// The newest complete `checkpoint-STEP` in `out_dir`. Checkpoints are renamed into place only
/// when complete, so any folder with that name and a trainer_state.json is trustworthy.
pub fn latest_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(out_dir).ok()?;
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            let path = e.path();
            path.join("trainer_state.json")
                .is_file()
                .then_some((step, path))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
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
    pub optimizer: HashMap<String, Tensor>,
}

fn bad(dir: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("cannot resume from {}: {msg}", dir.display()))
}

impl ResumeState {
    /// Reads a checkpoint and checks it belongs to a run with the same plan.
    pub fn load(dir: &Path, plan: &Plan, device: &Device) -> Result<Self, Error> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| bad(dir, e))?;
        let state: Value = serde_json::from_str(&text).map_err(|e| bad(dir, e))?;
        let saved_plan = &state["plan"];
        let want = plan_fingerprint(plan);
        if saved_plan != &want {
            return Err(bad(
                dir,
                format!("its batching plan {saved_plan} differs from this config's {want}; resume with the config the run started with"),
            ));
        }
        let step = state["global_step"]
            .as_u64()
            .ok_or_else(|| bad(dir, "trainer_state.json has no global_step"))?
            as usize;
        let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)
            .map_err(|e| bad(dir, e))?;
        Ok(ResumeState {
            dir: dir.to_path_buf(),
            step,
            epoch: state["epoch"].as_f64().unwrap_or(0.0),
            elapsed_s: state["elapsed_s"].as_f64().unwrap_or(0.0),
            total_tokens: state["total_tokens"].as_u64().unwrap_or(0) as usize,
            pending_tokens: state["pending_tokens"].as_u64().unwrap_or(0) as usize,
            pending_metrics: state["pending_metrics"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            pending_losses: state["pending_losses"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            log_history: state["log_history"].as_array().cloned().unwrap_or_default(),
            eval_history: state["eval_history"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            optimizer,
        })
    }

    /// Overwrites the model's trainable weights (the whole model, or its LoRA adapter) with
    /// the checkpoint's.
    pub fn restore_weights(&self, model: &CausalLm, device: &Device) -> Result<(), Error> {
        let (file, tensors) = match model.adapter() {
            Some(_) => {
                let path = self.dir.join(crate::model::lora::ADAPTER_WEIGHTS);
                let t = candle_core::safetensors::load(&path, device);
                (
                    crate::model::lora::ADAPTER_WEIGHTS,
                    t.map_err(|e| bad(&self.dir, e))?,
                )
            }
            // One file or shards, as the checkpoint was written.
            None => (
                "the model's weights",
                crate::model::read_weights(&self.dir, device).map_err(|e| bad(&self.dir, e))?,
            ),
        };
        let params = model.params();
        for (name, var) in params.iter() {
            let t = tensors
                .get(name)
                .ok_or_else(|| bad(&self.dir, format!("{file} lacks `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(bad(
                    &self.dir,
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
}
