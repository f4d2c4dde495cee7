//! Trainable causal language models, built only from candle ops that record a backward pass.
//!
//! candle-nn's fused kernels (softmax, layer_norm, rms_norm, rope) drop gradients silently, so
//! every layer here is composed from differentiable primitives (see `layers.rs`).

mod arch;
mod error;
mod files;
mod gathered;
mod head;
mod layers;
mod linear;
mod llama;
mod load;
pub mod lora;
pub mod nf4;
mod opt;
mod packed;
mod params;
pub mod recompute;
pub mod rope;

pub use arch::{Architecture, ModelConfig};
pub use error::ModelError;
pub use files::{read_weights, resolve_model_config_dir, resolve_model_dir};
pub use gathered::set_max_attention_groups;
pub use layers::set_recompute_attention_probs;
pub use load::{AdapterInfo, LoadOptions, Quantize};
pub use packed::{Packed, Padding, Prefix, Segment};
pub use params::Params;

use candle_core::{DType, Device, Result as CResult, Tensor};
use recompute::SideGrads;
use std::collections::HashMap;
use std::path::Path;

/// A decoder-only model whose forward pass stops before the LM head, so the loss can apply the
/// head itself (only to the positions it needs) without materialising full logits twice.
pub enum CausalLm {
    Opt(opt::Opt),
    Llama(llama::Llama),
}

impl CausalLm {
    /// Loads config and weights from a Hugging Face folder; weights become f32 `Var`s.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(dir, device, LoadOptions::default())
    }

    /// Loads a model for full fine-tuning, LoRA training (base frozen, adapters trainable) or
    /// with a saved adapter merged in, as `opts` says.
    pub fn load_with(dir: &Path, device: &Device, opts: LoadOptions) -> Result<Self, ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        // A base to quantize is read on the host, a tensor at a time from its files:
        // its full-precision weights are never all in memory and never reach the device, only
        // their 4-bit form (and the rest, moved as taken). A merge reads its base the same
        // way, each tensor kept in the output dtype once merged.
        let quantize = opts.quantize.is_some() && opts.lora.is_some() && !opts.merge;
        let mut source = match quantize || opts.merge {
            true => match files::lazy_weights_with_files(dir)? {
                Some((lazy, files)) => load::WeightSource::new(dir, HashMap::new(), opts)
                    .with_lazy(lazy)
                    .with_files(files),
                None => {
                    let (tensors, files) = files::read_weights_with_files(dir, &Device::Cpu)?;
                    load::WeightSource::new(dir, tensors, opts).with_files(files)
                }
            },
            false => {
                let (tensors, files) = files::read_weights_with_files(dir, device)?;
                load::WeightSource::new(dir, tensors, opts).with_files(files)
            }
        };
        if quantize && !device.is_cpu() {
            source = source.with_target(device.clone());
        }
        let model = match config.arch {
            Architecture::Opt => CausalLm::Opt(opt::Opt::new(&config, &mut source)?),
            // Every other architecture is a member of the Llama family.
            _ => CausalLm::Llama(llama::Llama::new(&config, &mut source)?),
        };
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            CausalLm::Opt(m) => &m.config,
            CausalLm::Llama(m) => &m.config,
        }
    }

    /// Turns gradient checkpointing on: each decoder layer keeps only its input and is
    /// recomputed in backward. Parameter gradients from recomputations land in the returned
    /// `SideGrads`; merge them into the `GradStore` after `backward()` (see `gradients`).
    pub fn enable_recompute(&mut self) -> SideGrads {
        let side = SideGrads::default();
        match self {
            CausalLm::Opt(m) => m.recompute = Some(side.clone()),
            CausalLm::Llama(m) => m.recompute = Some(side.clone()),
        }
        side
    }

    /// `objective.backward()`, plus the gradients of recomputed layers when checkpointing.
    pub fn gradients(&self, objective: &Tensor) -> CResult<candle_core::backprop::GradStore> {
        let mut grads = objective.backward()?;
        let side = match self {
            CausalLm::Opt(m) => m.recompute.as_ref(),
            CausalLm::Llama(m) => m.recompute.as_ref(),
        };
        if let Some(side) = side {
            side.merge_into(&mut grads)?;
        }
        Ok(grads)
    }

    /// The adapter's settings when this model trains (or evaluates) LoRA adapters.
    pub fn adapter(&self) -> Option<&AdapterInfo> {
        match self {
            CausalLm::Opt(m) => m.adapter.as_ref(),
            CausalLm::Llama(m) => m.adapter.as_ref(),
        }
    }

    /// Column sums `[e]` of the LM head, f32 and detached: a row's logits summed over the
    /// vocabulary are `h · sums` (the head has no bias). Computed once when the head is a
    /// constant (frozen under LoRA, or a detached copy), as it never changes.
    pub fn head_column_sums(&self) -> CResult<Tensor> {
        let w = self.lm_head();
        if w.is_variable() {
            return crate::ops::column_sums(&w.detach());
        }
        let cache = match self {
            CausalLm::Opt(m) => &m.head_sums,
            CausalLm::Llama(m) => &m.head_sums,
        };
        if let Some(sums) = cache.get() {
            return Ok(sums.clone());
        }
        let sums = crate::ops::column_sums(&w)?;
        Ok(cache.get_or_init(|| sums).clone())
    }

    /// The same weights (shared, not copied) as constants, with no parameters: its forward
    /// passes record no graph, so each layer's intermediates are freed as soon as the layer
    /// returns (evaluation). Checkpointing, if on, stays on only as the LM head's chunking.
    pub fn detached(&self) -> CausalLm {
        match self {
            CausalLm::Opt(m) => CausalLm::Opt(m.detached()),
            CausalLm::Llama(m) => CausalLm::Llama(m.detached()),
        }
    }

    pub fn params(&self) -> &Params {
        match self {
            CausalLm::Opt(m) => &m.params,
            CausalLm::Llama(m) => &m.params,
        }
    }

    /// Final hidden states `[n, len, e]` for token ids `[n, len]` (u32) and a 0/1 attention
    /// mask `[n, len]` (u32), right-padded.
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor) -> CResult<Tensor> {
        self.hidden_states_rows(ids, &layers::mask_rows(mask)?)
    }

    /// [`Self::hidden_states`] with the mask as host rows (the trainer's: no device read).
    pub fn hidden_states_rows(&self, ids: &Tensor, rows: &[Vec<u32>]) -> CResult<Tensor> {
        match self {
            CausalLm::Opt(m) => m.forward(ids, rows),
            CausalLm::Llama(m) => m.forward(ids, rows),
        }
    }

    /// Whether `hidden_packed` is available (an exact packed path: every architecture but
    /// Gemma 2, see `Llama::supports_packing`).
    pub fn supports_packing(&self) -> bool {
        match self {
            CausalLm::Opt(_) => true,
            CausalLm::Llama(m) => m.supports_packing(),
        }
    }

    /// The padding layout `hidden_packed` is exact for (pass it to `collate`): OPT's padding
    /// positions share one position id and one hidden state, so one stand-in row serves a
    /// sequence; rotary models give each padding position its own position and hidden state.
    pub fn packed_padding(&self) -> Padding {
        match self {
            CausalLm::Opt(_) => Padding::StandIn,
            CausalLm::Llama(_) => Padding::Explicit,
        }
    }

    /// Hidden states `[total, e]` of a packed batch (see `Opt::forward_packed`,
    /// `Llama::forward_packed`).
    pub fn hidden_packed(&self, packed: &Packed) -> CResult<Tensor> {
        if packed.padding != self.packed_padding() {
            candle_core::bail!(
                "packed batch laid out with {:?} padding, the model needs {:?}",
                packed.padding,
                self.packed_padding()
            );
        }
        match self {
            CausalLm::Opt(m) => m.forward_packed(packed),
            CausalLm::Llama(m) => m.forward_packed(packed),
        }
    }

    /// The LM head weight `[vocab, e]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> Tensor {
        match self {
            CausalLm::Opt(m) => m.lm_head(),
            CausalLm::Llama(m) => m.lm_head(),
        }
    }

    /// Dtype of the matrix products: F32, or BF16 (inputs rounded, f32 accumulation).
    pub fn compute_dtype(&self) -> DType {
        match self {
            CausalLm::Opt(m) => m.compute,
            CausalLm::Llama(m) => m.compute,
        }
    }

    /// Logits `[m, vocab]` (f32) of hidden states `[m, e]` through the LM head, the product in
    /// the compute dtype as torch autocast runs the head.
    pub fn head_logits(&self, h: &Tensor) -> CResult<Tensor> {
        let logits = head::head_product(h, &self.lm_head(), self.compute_dtype())?;
        head::soft_cap(logits, self.head_options().softcap)
    }

    fn head_options(&self) -> head::HeadOptions {
        head::HeadOptions {
            compute: self.compute_dtype(),
            softcap: self.config().final_softcap,
        }
    }

    /// Per-row log-probs of `targets` `[m]` and logit sums `[m]` (detached, for metrics) of
    /// hidden states `[m, e]`. Under gradient checkpointing the head runs in recomputed row
    /// chunks, so all of the logits never exist at once.
    pub fn head_scores(&self, h: &Tensor, targets: &Tensor) -> CResult<(Tensor, Tensor)> {
        let side = match self {
            CausalLm::Opt(m) => m.recompute.as_ref(),
            CausalLm::Llama(m) => m.recompute.as_ref(),
        };
        head::head_scores(h, &self.lm_head(), targets, self.head_options(), side)
    }

    /// Full logits `[n, len, vocab]`; for inference checks and tests.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor) -> CResult<Tensor> {
        let h = self.hidden_states(ids, mask)?;
        let (n, l, e) = h.dims3()?;
        self.head_logits(&h.reshape((n * l, e))?)?
            .reshape((n, l, ()))
    }
}
