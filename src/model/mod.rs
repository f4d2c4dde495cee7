//! Trainable causal language models, built only from candle ops that record a backward pass.
//!
//! candle-nn's fused kernels (softmax, layer_norm, rms_norm, rope) drop gradients silently, so
//! every layer here is composed from differentiable primitives (see `layers.rs`).

mod arch;
mod layers;
mod llama;
mod load;
mod opt;
mod packed;
mod params;

pub use arch::{Architecture, ModelConfig};
pub use load::{resolve_model_dir, ModelError};
pub use packed::{Packed, Segment};
pub use params::Params;

use candle_core::{Device, Result as CResult, Tensor};
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
        let config = ModelConfig::from_dir(dir)?;
        let tensors = load::read_weights(dir, device)?;
        let mut source = load::WeightSource::new(dir, tensors);
        let model = match config.arch {
            Architecture::Opt => CausalLm::Opt(opt::Opt::new(&config, &mut source)?),
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => {
                CausalLm::Llama(llama::Llama::new(&config, &mut source)?)
            }
        };
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            CausalLm::Opt(m) => &m.config,
            CausalLm::Llama(m) => &m.config,
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
        match self {
            CausalLm::Opt(m) => m.forward(ids, mask),
            CausalLm::Llama(m) => m.forward(ids, mask),
        }
    }

    /// Whether `hidden_packed` is available (exact only where every padding position of a row
    /// has the same hidden state: OPT's padding shares one position id).
    pub fn supports_packing(&self) -> bool {
        matches!(self, CausalLm::Opt(_))
    }

    /// Hidden states `[total, e]` of a packed batch (see `Opt::forward_packed`).
    pub fn hidden_packed(&self, packed: &Packed) -> CResult<Tensor> {
        match self {
            CausalLm::Opt(m) => m.forward_packed(packed),
            CausalLm::Llama(_) => candle_core::bail!("packed batches are only exact for OPT"),
        }
    }

    /// The LM head weight `[vocab, e]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> Tensor {
        match self {
            CausalLm::Opt(m) => m.lm_head(),
            CausalLm::Llama(m) => m.lm_head(),
        }
    }

    /// Full logits `[n, len, vocab]`; for inference checks and tests.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor) -> CResult<Tensor> {
        let h = self.hidden_states(ids, mask)?;
        let (n, l, e) = h.dims3()?;
        let w = self.lm_head();
        h.reshape((n * l, e))?.matmul(&w.t()?)?.reshape((n, l, ()))
    }
}
