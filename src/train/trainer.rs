//! What a run needs, loaded and validated, and one optimizer step's forward and backward
//! passes over its micro-batches (the loop around them is `run.rs`).

use super::batch::collate;
use super::checkpoint::BaseModel;
use super::forward::{forward, Readout};
use super::log::LogEntry;
use super::loss::Metrics;
use super::plan::{Batching, Plan};
use crate::config::Config;
use crate::data::{Dataset, Tokenizer};
use crate::eval::EvalMetrics;
use crate::memory::{MemoryMeter, Usage};
use crate::model::CausalLm;
use crate::Error;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// Everything a run needs, loaded and validated before the first step.
pub struct Trainer {
    pub config: Config,
    pub model: CausalLm,
    pub base: BaseModel,
    pub tokenizer: Tokenizer,
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub device: Device,
    /// Memory in use, for the debug logs and the run's peak (`None` where nothing counts).
    pub memory: Option<MemoryMeter>,
}

pub struct TrainSummary {
    pub log: Vec<LogEntry>,
    pub eval: Option<EvalMetrics>,
    pub output_dir: PathBuf,
}

/// One optimizer step's summed gradients, its micro-batches' metrics and its token count.
pub struct StepGradients {
    pub grads: HashMap<String, Tensor>,
    /// Each micro-batch's metrics, still on the device, with how many of its pairs the pair
    /// metrics count (all when `None`).
    readouts: Vec<(Readout, Option<usize>)>,
    pub tokens: usize,
}

impl StepGradients {
    /// The micro-batches' metrics. This reads the device, so on a GPU it waits for the
    /// backward passes: call it once whatever follows them has been queued.
    pub fn metrics(&self) -> Result<Vec<Metrics>, Error> {
        Ok(self
            .readouts
            .iter()
            .map(|(r, k)| r.metrics(*k))
            .collect::<candle_core::Result<_>>()?)
    }
}

/// GiB to two decimals, for logs.
pub(super) fn gib2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Gradients of `objective` for every parameter, added into `acc`.
fn accumulate(
    model: &CausalLm,
    objective: &Tensor,
    acc: &mut HashMap<String, Tensor>,
) -> Result<(), Error> {
    let grads = model.gradients(objective)?;
    for (name, var) in model.params().iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            // A gradient is data: should an op's backward have built it from tracked tensors,
            // its graph (the step's activations) must not live on with it.
            let g = g.detach();
            // Micro-batches add in the parameter's dtype (a gradient may be kept narrower,
            // see `ops::bf16_copy`).
            let g = match acc.remove(name) {
                Some(prev) => crate::ops::add_grads(&prev, &g, var.dtype())?,
                None => g,
            };
            acc.insert(name.to_string(), g);
        }
    }
    Ok(())
}

impl Trainer {
    /// Memory now and its peak since the previous reading.
    pub(super) fn memory_read(&self) -> Option<Usage> {
        self.memory.as_ref().map(MemoryMeter::read)
    }

    pub fn plan(&self) -> Plan {
        let t = &self.config.train;
        let batching = Batching {
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            drop_last: t.dataloader_drop_last,
        };
        Plan::new(
            self.train.pairs.len(),
            batching,
            t.epochs,
            t.max_steps,
            t.shuffle,
            t.seed,
        )
    }

    /// Runs one optimizer step's forward and backward passes; returns the summed gradients
    /// (already divided by the number of micro-batches), the micro-batch metrics (still on the
    /// device) and tokens.
    pub fn step_gradients(
        &self,
        micro_batches: &[Vec<usize>],
        metric_pairs: Option<usize>,
    ) -> Result<StepGradients, Error> {
        let cfg = &self.config;
        let n_micro = micro_batches.len() as f64;
        let mut grads = HashMap::new();
        let mut readouts = Vec::with_capacity(micro_batches.len());
        let mut tokens = 0;
        for idx in micro_batches {
            let pairs: Vec<_> = idx.iter().map(|&i| &self.train.pairs[i]).collect();
            let batch = collate(
                &pairs,
                self.tokenizer.pad_id(),
                cfg.orpo.nll_on_prompt,
                self.model.packed_padding(),
                &self.device,
            )?;
            tokens += batch.tokens;
            self.memory_read();
            let t0 = Instant::now();
            let out = forward(&self.model, &batch, cfg.orpo.beta)?;
            let t1 = Instant::now();
            // Kept for backward: activations, the bf16 weight copies, the batch.
            let fwd_mem = self.memory_read();
            let objective = (out.objective / n_micro)?;
            accumulate(&self.model, &objective, &mut grads)?;
            let bwd_mem = self.memory_read();
            // On a GPU both times are the host's (queuing kernels): nothing here reads the device.
            tracing::debug!(
                forward_s = (t1 - t0).as_secs_f64(),
                backward_s = t1.elapsed().as_secs_f64(),
                len = batch.len,
                tokens = batch.tokens,
                forward_peak_gib = fwd_mem.map(|u| gib2(u.peak_gib())),
                after_forward_gib = fwd_mem.map(|u| gib2(u.now_gib())),
                backward_peak_gib = bwd_mem.map(|u| gib2(u.peak_gib())),
                after_backward_gib = bwd_mem.map(|u| gib2(u.now_gib())),
                pool_peak_gib = [fwd_mem, bwd_mem]
                    .iter()
                    .filter_map(|u| u.and_then(|u| u.reserved_peak_gib()))
                    .reduce(f64::max)
                    .map(gib2),
                "micro-batch"
            );
            readouts.push((out.readout, metric_pairs));
        }
        Ok(StepGradients {
            grads,
            readouts,
            tokens,
        })
    }
}
