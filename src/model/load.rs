//! A model's parameters from its checkpoint's weights: checked against the shapes the
//! architecture expects, in the compute dtype, trainable or frozen, with LoRA or DoRA adapters
//! (new or saved, or merged into the base) and 4-bit quantized frozen linear weights.

use super::error::ModelError;
use super::files::{check_weight, LazyWeights};
use super::linear::{row_norms_sq, Dora, Linear, LoraPair, Weight};
use super::lora::{self, AdapterInit, LoraSpec, Targets};
use super::nf4::{self, Nf4Rows};
use super::params::Params;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// How the model's weights are set up: full fine-tuning (every tensor a trainable `Var`), or
/// LoRA (base frozen, adapters trainable), or a saved adapter merged into the base.
pub struct LoadOptions {
    pub lora: Option<(LoraSpec, AdapterInit)>,
    /// Fold a saved adapter into the base weights (`orpo merge`); the result is a full model.
    pub merge: bool,
    pub compute: DType,
    /// QLoRA: the frozen base's linear layers (not the head) held as 4-bit NF4.
    pub quantize: Option<Quantize>,
    /// Every weight a constant (evaluation): none trainable, and under bf16 products the
    /// weights those read kept in bf16, as a LoRA base is.
    pub frozen: bool,
    /// With `merge`: each tensor kept in this dtype once merged (`orpo merge`'s output
    /// dtype), so the model never exists whole in f32.
    pub merged_dtype: Option<DType>,
}

/// How a frozen base is quantized (bitsandbytes' `BitsAndBytesConfig(load_in_4bit=True,
/// bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantize {
    pub double_quant: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            lora: None,
            merge: false,
            compute: DType::F32,
            quantize: None,
            frozen: false,
            merged_dtype: None,
        }
    }
}

/// Hands tensors to the model builders, checking names and shapes; registers each as a
/// trainable `Var`, or keeps it as a frozen tensor when LoRA trains adapters instead.
pub struct WeightSource {
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// The file each tensor came from (see `with_files`); a tensor not listed names `dir`.
    files: HashMap<String, PathBuf>,
    pub params: Params,
    compute: DType,
    frozen: bool,
    lora: Option<LoraPlan>,
    quantize: Option<Quantize>,
    /// Where taken tensors go, when they were read elsewhere (a quantized base is read on
    /// the host, so its full-precision weights never occupy the GPU).
    target: Option<Device>,
    /// Tensors still in their files (read on the host as taken), beside `tensors`.
    lazy: Option<LazyWeights>,
    /// See [`LoadOptions::merged_dtype`].
    merged_dtype: Option<DType>,
}

struct LoraPlan {
    spec: LoraSpec,
    init: AdapterInit,
    merge: bool,
    /// Names of the adapted modules, for adapter_config.json's target_modules.
    modules: BTreeSet<String>,
    /// Full names of the adapted layers (`model.layers.0.self_attn.q_proj`).
    adapted: BTreeSet<String>,
    /// Every module name the checkpoint's tensors imply (each dot-prefix of a tensor's name,
    /// and `lm_head`), which a pattern target must not match unless adapted: PEFT would adapt
    /// the head, and refuses an adapter whose pattern matches a container or a norm.
    modules_in_file: BTreeSet<String>,
}

/// What a LoRA model needs to save its adapter.
#[derive(Clone)]
pub struct AdapterInfo {
    pub spec: LoraSpec,
    pub modules: BTreeSet<String>,
}

impl WeightSource {
    pub fn new(dir: &Path, tensors: HashMap<String, Tensor>, opts: LoadOptions) -> Self {
        let frozen = (opts.lora.is_some() || opts.frozen) && !opts.merge;
        // Only a pattern target is checked against them.
        let modules_in_file = match &opts.lora {
            Some((spec, _)) if matches!(spec.targets, Targets::Pattern(_)) => {
                let mut names: BTreeSet<String> = tensors
                    .keys()
                    .flat_map(|name| {
                        let parts: Vec<&str> = name.split('.').collect();
                        (1..parts.len())
                            .map(|n| parts[..n].join("."))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                names.insert("lm_head".into());
                names
            }
            _ => BTreeSet::new(),
        };
        WeightSource {
            dir: dir.to_path_buf(),
            tensors,
            files: HashMap::new(),
            params: Params::default(),
            compute: opts.compute,
            frozen,
            quantize: opts.quantize.filter(|_| frozen),
            target: None,
            lazy: None,
            merged_dtype: opts.merged_dtype.filter(|_| opts.merge),
            lora: opts.lora.map(|(spec, init)| LoraPlan {
                spec,
                init,
                merge: opts.merge,
                modules: BTreeSet::new(),
                adapted: BTreeSet::new(),
                modules_in_file,
            }),
        }
    }

    /// Names these files in messages about a tensor (from [`read_weights_with_files`](super::files::read_weights_with_files)).
    pub fn with_files(mut self, files: HashMap<String, PathBuf>) -> Self {
        self.files = files;
        self
    }

    /// Moves each tensor to `device` as it is taken (the tensors were read on another).
    pub fn with_target(mut self, device: Device) -> Self {
        self.target = Some(device);
        self
    }

    /// Takes tensors from their files too, reading each on the host when taken (its module
    /// names join those a pattern target is checked against).
    pub fn with_lazy(mut self, lazy: LazyWeights) -> Self {
        if let Some(plan) = self.lora.as_mut() {
            if matches!(plan.spec.targets, Targets::Pattern(_)) {
                for name in lazy.index.keys() {
                    let parts: Vec<&str> = name.split('.').collect();
                    for n in 1..parts.len() {
                        plan.modules_in_file.insert(parts[..n].join("."));
                    }
                }
            }
        }
        self.lazy = Some(lazy);
        self
    }

    /// The device the model's tensors live on.
    fn device(&self) -> Device {
        match &self.target {
            Some(d) => d.clone(),
            None => self
                .tensors
                .values()
                .next()
                .map(|t| t.device().clone())
                .unwrap_or(Device::Cpu),
        }
    }

    pub fn compute(&self) -> DType {
        self.compute
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
            || self
                .lazy
                .as_ref()
                .is_some_and(|m| m.index.contains_key(name))
    }

    /// A tensor's dtype in the checkpoint, before it is taken.
    fn stored_dtype(&self, name: &str) -> Option<DType> {
        match self.tensors.get(name) {
            Some(t) => Some(t.dtype()),
            None => self.lazy.as_ref()?.index.get(name).map(|e| e.3),
        }
    }

    fn err(&self, msg: String) -> ModelError {
        ModelError::Weights {
            path: self.dir.clone(),
            msg,
        }
    }

    fn take_raw(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = match self.tensors.remove(name) {
            Some(t) => t,
            None => self.take_lazy(name, shape)?,
        };
        if t.dims() != shape {
            return Err(self.err(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        check_weight(self.files.get(name).unwrap_or(&self.dir), name, &t)?;
        match &self.target {
            Some(device) => Ok(t.to_device(device)?),
            None => Ok(t),
        }
    }

    /// A tensor read from its file on the host (its shape checked first: a wrong one is not read).
    fn take_lazy(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let dims = self
            .lazy
            .as_ref()
            .and_then(|m| m.index.get(name))
            .map(|e| e.2.clone());
        let Some(dims) = dims else {
            return Err(self.err(format!("tensor `{name}` is missing")));
        };
        if dims.as_slice() != shape {
            return Err(self.err(format!(
                "tensor `{name}` has shape {dims:?}, expected {shape:?}"
            )));
        }
        let file = self
            .files
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.dir.clone());
        let read_err = |msg: String| ModelError::Weights {
            path: file.clone(),
            msg: format!("tensor `{name}`: {msg}"),
        };
        let lazy = self
            .lazy
            .as_mut()
            .ok_or_else(|| read_err("not indexed".into()))?;
        let t = lazy
            .read(name)
            .map_err(|e| read_err(e.to_string()))?
            .ok_or_else(|| read_err("not in its file".into()))?;
        lazy.index.remove(name);
        Ok(t)
    }

    /// Like `take_raw`, but left where it was read (a weight about to be quantized).
    fn take_unmoved(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let target = self.target.take();
        let t = self.take_raw(name, shape);
        self.target = target;
        t
    }

    /// The tensor as f32 (the dtype of master weights and of everything but bf16 products).
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        Ok(self
            .take_raw(name, shape)?
            .to_dtype(DType::F32)?
            .contiguous()?)
    }

    fn register(&mut self, name: &str, t: Tensor) -> Result<Tensor, ModelError> {
        if self.frozen {
            return Ok(t);
        }
        let t = match self.merged_dtype {
            Some(dtype) => t.to_dtype(dtype)?,
            None => t,
        };
        Ok(self.params.insert(name.to_string(), Var::from_tensor(&t)?))
    }

    /// Takes tensor `name` with the expected shape as a parameter (frozen under LoRA).
    pub fn param(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self.take(name, shape)?;
        self.register(name, t)
    }

    /// An embedding table: a parameter, except frozen under bf16 compute with bf16 in the file,
    /// where it stays bf16 (rows looked up convert to f32 exactly, so nothing changes but the
    /// memory: a large vocabulary never exists in f32). Lookups call `.to_dtype(F32)`.
    pub fn embedding(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let file_bf16 = self.stored_dtype(name) == Some(DType::BF16);
        if self.frozen && self.compute == DType::BF16 && file_bf16 {
            return Ok(self.take_raw(name, shape)?.contiguous()?);
        }
        let t = self.param(name, shape)?;
        self.params.mark_embedding(name);
        Ok(t)
    }

    /// An untied LM head: a parameter, except frozen under bf16 compute, where it is only ever
    /// read by bf16 products and so is kept in bf16 from the file on, as frozen linear
    /// weights are (the same products, bit for bit).
    pub fn head(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        if self.frozen && self.compute == DType::BF16 {
            return Ok(self
                .take_raw(name, shape)?
                .to_dtype(DType::BF16)?
                .contiguous()?);
        }
        self.param(name, shape)
    }

    pub fn optional_param(
        &mut self,
        name: &str,
        shape: &[usize],
        wanted: bool,
    ) -> Result<Option<Tensor>, ModelError> {
        if wanted {
            self.param(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The linear layer `prefix` (`{prefix}.weight` `[out_f, in_f]`, optional bias), with a LoRA
    /// pair when it is a target; a merged adapter is folded into the weight instead.
    pub fn linear(
        &mut self,
        prefix: &str,
        out_f: usize,
        in_f: usize,
        bias: bool,
    ) -> Result<Linear, ModelError> {
        let name = format!("{prefix}.weight");
        let pair = self.lora_pair(prefix, out_f, in_f)?;
        let dora = pair.is_some() && self.lora.as_ref().is_some_and(|p| p.spec.use_dora);
        // DoRA's weight norms from the file's values, before any bf16 rounding.
        let norms = |w: &Tensor| dora.then(|| row_norms_sq(w)).transpose();
        if let Some(q) = self.quantize {
            return self.quantized_linear(prefix, out_f, in_f, bias, pair, q);
        }
        let (w, w_sq) = if self.frozen && self.compute == DType::BF16 {
            // A frozen weight is only ever read by bf16 products: keep it in bf16 from the
            // file on, so a 7B base never exists in f32.
            let raw = self.take_raw(&name, &[out_f, in_f])?;
            let w_sq = norms(&raw)?;
            (raw.to_dtype(DType::BF16)?.contiguous()?, w_sq)
        } else {
            let w = self.take(&name, &[out_f, in_f])?;
            let w_sq = norms(&w)?;
            (w, w_sq)
        };
        let mut lora = None;
        let mut w = w;
        if let Some(mut pair) = pair {
            if let Some(w_sq) = w_sq {
                pair.dora = Some(self.dora(prefix, out_f, w_sq)?);
            }
            if self.lora.as_ref().is_some_and(|p| p.merge) {
                let merged = (&w + (pair.b.matmul(&pair.a)? * pair.scale)?)?;
                w = match &pair.dora {
                    // PEFT's DoRA merge: each row of W + s·B·A rescaled to its magnitude.
                    Some(d) => merged
                        .broadcast_mul(&(&d.magnitude / pair.dora_norm(&w)?)?.unsqueeze(1)?)?,
                    None => merged,
                };
            } else {
                lora = Some(pair);
            }
        }
        let w = self.register(&name, w)?;
        let b = self.optional_param(&format!("{prefix}.bias"), &[out_f], bias)?;
        Ok(Linear {
            w: Weight::Dense(w),
            b,
            lora,
            compute: self.compute,
            wb: None,
        })
    }

    /// A frozen linear layer of a quantized base: its weight quantized to NF4 on the host and
    /// only the 4-bit form put on the device; DoRA's row norms come from the dequantized
    /// weight, as PEFT takes them.
    fn quantized_linear(
        &mut self,
        prefix: &str,
        out_f: usize,
        in_f: usize,
        bias: bool,
        pair: Option<LoraPair>,
        q: Quantize,
    ) -> Result<Linear, ModelError> {
        let device = self.device();
        let raw = self.take_unmoved(&format!("{prefix}.weight"), &[out_f, in_f])?;
        let w = Nf4Rows::whole(nf4::quantize_weight(&raw, q.double_quant, &device)?);
        drop(raw);
        let lora = match pair {
            Some(mut pair) => {
                if self.lora.as_ref().is_some_and(|p| p.spec.use_dora) {
                    let w_sq = row_norms_sq(&w.dequantize(DType::F32)?)?;
                    pair.dora = Some(self.dora(prefix, out_f, w_sq)?);
                }
                Some(pair)
            }
            None => None,
        };
        let b = self.optional_param(&format!("{prefix}.bias"), &[out_f], bias)?;
        Ok(Linear {
            w: Weight::Nf4(w),
            b,
            lora,
            compute: self.compute,
            wb: None,
        })
    }

    /// A DoRA layer's magnitude `[out_f]`: fresh, the row norms of W (`w_sq`'s roots: B starts
    /// at zero), as PEFT initialises it; or the saved adapter's. A trainable `Var` unless
    /// merging.
    fn dora(&mut self, prefix: &str, out_f: usize, w_sq: Tensor) -> Result<Dora, ModelError> {
        let name = lora::magnitude_name(prefix);
        let Some(plan) = self.lora.as_mut() else {
            return Err(self_err(&self.dir, format!("no LoRA plan for `{name}`")));
        };
        let m = match &mut plan.init {
            AdapterInit::Fresh { .. } => w_sq.sqrt()?,
            AdapterInit::Saved(saved) => {
                let m = saved.remove(&name).ok_or_else(|| {
                    self_err(
                        &self.dir,
                        format!(
                            "the adapter's adapter_config.json sets use_dora = true, but it \
                             lacks `{name}`"
                        ),
                    )
                })?;
                if m.dims() != [out_f] {
                    return Err(self_err(
                        &self.dir,
                        format!(
                            "adapter tensor `{name}` has shape {:?}, expected [{out_f}]",
                            m.dims()
                        ),
                    ));
                }
                m.contiguous()?
            }
        };
        let magnitude = if plan.merge {
            m
        } else {
            self.params.insert(name, Var::from_tensor(&m)?)
        };
        Ok(Dora { magnitude, w_sq })
    }

    fn lora_pair(
        &mut self,
        prefix: &str,
        out_f: usize,
        in_f: usize,
    ) -> Result<Option<LoraPair>, ModelError> {
        let device = self.device();
        let Some(plan) = self.lora.as_mut() else {
            return Ok(None);
        };
        if !plan.spec.matches(prefix) {
            return Ok(None);
        }
        let r = plan.spec.r;
        // Before anything is sized by r (a fresh A alone is r x in_f floats).
        let key = match plan.init {
            AdapterInit::Fresh { .. } => "lora.r".to_string(),
            AdapterInit::Saved(_) => format!("the adapter's `r` ({})", lora::ADAPTER_CONFIG),
        };
        lora::check_rank_fits(&key, r, prefix, out_f, in_f).map_err(|m| self_err(&self.dir, m))?;
        plan.modules.insert(lora::module_name(prefix).to_string());
        plan.adapted.insert(prefix.to_string());
        let scale = plan.spec.scale();
        let (na, nb) = (lora::peft_name(prefix, 'A'), lora::peft_name(prefix, 'B'));
        let (a, b) = match &mut plan.init {
            AdapterInit::Fresh { seed } => (
                lora::init_a(prefix, r, in_f, *seed, &device)?,
                Tensor::zeros((out_f, r), DType::F32, &device)?,
            ),
            AdapterInit::Saved(saved) => {
                let mut get = |n: &str, shape: [usize; 2]| -> Result<Tensor, String> {
                    let t = saved
                        .remove(n)
                        .ok_or_else(|| format!("the adapter lacks `{n}`"))?;
                    if t.dims() != shape {
                        return Err(format!(
                            "adapter tensor `{n}` has shape {:?}, expected {shape:?}",
                            t.dims()
                        ));
                    }
                    Ok(t)
                };
                let a = get(&na, [r, in_f]).map_err(|m| self_err(&self.dir, m))?;
                let b = get(&nb, [out_f, r]).map_err(|m| self_err(&self.dir, m))?;
                (a.contiguous()?, b.contiguous()?)
            }
        };
        // DoRA's magnitude needs the weight (`WeightSource::dora`).
        let (a, b) = if plan.merge {
            (a, b)
        } else {
            (
                self.params.insert(na, Var::from_tensor(&a)?),
                self.params.insert(nb, Var::from_tensor(&b)?),
            )
        };
        Ok(Some(LoraPair {
            a,
            b,
            scale,
            dora: None,
        }))
    }

    /// The trainable tensors, after checking that LoRA found its targets and used every
    /// saved adapter tensor (a mismatch means the adapter belongs to another model).
    pub fn finish(&mut self) -> Result<(Params, Option<AdapterInfo>), ModelError> {
        let info = match self.lora.take() {
            None => None,
            Some(plan) => {
                if plan.modules.is_empty() {
                    let want = match &plan.spec.targets {
                        Targets::AllLinear => "LoRA targets [all-linear] match".to_string(),
                        Targets::Modules(m) => format!("LoRA targets [{}] match", m.join(", ")),
                        Targets::Pattern(p) => format!("lora.targets pattern {:?} matches", p.text),
                    };
                    // PEFT matches a string against whole names such as
                    // `model.layers.0.self_attn.q_proj`: a bare module name matches none.
                    let hint = match &plan.spec.targets {
                        Targets::Pattern(p) if !p.text.contains(['.', '*', '(', '|', '[']) => {
                            format!(
                                " (a string is a regular expression over whole module names; \
                                 for the modules named so, write a list: targets = [{:?}])",
                                p.text
                            )
                        }
                        _ => String::new(),
                    };
                    return Err(self.err(format!("{want} no linear layer of this model{hint}")));
                }
                if let Targets::Pattern(p) = &plan.spec.targets {
                    let stray = plan
                        .modules_in_file
                        .iter()
                        .find(|m| p.is_match(m) && !plan.adapted.contains(*m));
                    if let Some(m) = stray {
                        let why = if m == "lm_head" {
                            "the output head, which orpo gives no adapter (PEFT would)".to_string()
                        } else {
                            "no linear layer orpo adapts (PEFT refuses to load an adapter whose \
                             pattern matches a container, norm or embedding)"
                                .to_string()
                        };
                        return Err(self.err(format!(
                            "lora.targets pattern {:?} matches `{m}`, {why}; narrow it to linear \
                             layers' names",
                            p.text
                        )));
                    }
                }
                // PEFT ignores a listed target that matches nothing when others match; a
                // misspelt name would then go unnoticed.
                if let Targets::Modules(names) = &plan.spec.targets {
                    for t in names {
                        if !plan.modules.contains(lora::module_name(t)) {
                            tracing::warn!(
                                "lora.targets: `{t}` matches no linear layer of this model \
                                 (adapted: {})",
                                plan.modules.iter().cloned().collect::<Vec<_>>().join(", ")
                            );
                        }
                    }
                }
                if let AdapterInit::Saved(rest) = &plan.init {
                    if let Some(name) = rest.keys().find(|n| n.ends_with(".lora_magnitude_vector"))
                    {
                        return Err(self.err(format!(
                            "the adapter holds DoRA magnitudes (`{name}`) but its \
                             adapter_config.json does not set use_dora = true"
                        )));
                    }
                    if let Some(name) = rest.keys().min() {
                        return Err(self.err(format!(
                            "adapter tensor `{name}` has no matching layer in this model"
                        )));
                    }
                }
                (!plan.merge).then_some(AdapterInfo {
                    spec: plan.spec,
                    modules: plan.modules,
                })
            }
        };
        Ok((std::mem::take(&mut self.params), info))
    }
}

fn self_err(dir: &Path, msg: String) -> ModelError {
    ModelError::Weights {
        path: dir.to_path_buf(),
        msg,
    }
}
