//! AdamW as torch implements it (decoupled decay, bias correction), with transformers' rule
//! for which tensors decay, global-norm clipping folded into the update, and state that can
//! be saved and restored. On CPU the update runs in place over flat f32 buffers in one pass
//! (no temporaries the size of the model); elsewhere it falls back to tensor ops. With
//! `eight_bit`, bitsandbytes' 8-bit AdamW (`adamw8bit.rs`) holds the moments of the tensors
//! it would quantize.

use super::adamw8bit::{self, Quantized};
use crate::model::Params;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor};
use std::collections::HashMap;
use std::sync::Mutex;

/// transformers' rule: no weight decay for biases and normalisation weights.
pub fn decays(name: &str) -> bool {
    let n = name.to_lowercase();
    let parts: Vec<&str> = n.split('.').collect();
    !(n.contains("bias")
        || n.contains("layernorm")
        || n.contains("rmsnorm")
        || parts.contains(&"norm")
        || parts.iter().any(|p| p.ends_with("_norm")))
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// bitsandbytes' 8-bit moments (transformers' `optim = "adamw_bnb_8bit"`).
    pub eight_bit: bool,
}

enum Moments {
    /// CPU: plain buffers updated in place.
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    Device {
        m: Tensor,
        v: Tensor,
    },
    /// 8-bit, on the CPU.
    Host8 {
        m: Quantized,
        v: Quantized,
    },
    /// 8-bit elsewhere: u8 codes and f32 absmax values, flat.
    Device8 {
        m_codes: Tensor,
        m_absmax: Tensor,
        v_codes: Tensor,
        v_absmax: Tensor,
    },
}

pub struct AdamW {
    settings: AdamWSettings,
    step: u64,
    state: HashMap<String, Moments>,
    /// The 8-bit kernel's code tables, on the device that first needed them.
    #[cfg(feature = "cuda")]
    tables: Option<Tensor>,
}

/// Whether bitsandbytes keeps a tensor's moments in 8 bits: tensors of at least
/// `min_8bit_size` values, except embeddings, which transformers registers for 32-bit state.
pub fn eight_bit_moments(params: &Params, name: &str, elems: usize) -> bool {
    elems >= adamw8bit::MIN_8BIT_SIZE && !params.is_embedding(name)
}

/// The per-step constants of one update.
#[derive(Clone, Copy)]
pub(super) struct Coefs {
    pub beta1: f32,
    pub beta2: f32,
    /// `1 - beta` rounded from f64, as torch's scalar is (`1.0f32 - beta` differs: for beta2
    /// 0.999 by 1.3e-5 relative).
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub decay: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub grad_scale: f32,
}

/// An in-place update's parameter (dst) and gradient (src) as f32 slices.
fn host_pair<'a>(
    op: &str,
    dst: &'a mut CpuStorage,
    dst_l: &Layout,
    src: &'a CpuStorage,
    src_l: &Layout,
) -> Result<(&'a mut [f32], &'a [f32])> {
    let (Some((d0, d1)), Some((s0, s1))) = (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
    else {
        candle_core::bail!("{op} needs contiguous parameter and gradient");
    };
    let (CpuStorage::F32(p), CpuStorage::F32(g)) = (dst, src) else {
        candle_core::bail!("{op} needs f32 parameter and gradient");
    };
    Ok((&mut p[d0..d1], &g[s0..s1]))
}

/// In-place AdamW over one parameter (dst) with its gradient (src); moments live in the op.
struct HostUpdate<'a> {
    m: Mutex<&'a mut [f32]>,
    v: Mutex<&'a mut [f32]>,
    c: Coefs,
}

fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Coefs) {
    for i in 0..p.len() {
        let gi = g[i] * c.grad_scale;
        let mi = c.beta1 * m[i] + c.one_minus_beta1 * gi;
        let vi = c.beta2 * v[i] + c.one_minus_beta2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let denom = vi.sqrt() / c.bc2_sqrt + c.eps;
        p[i] = p[i] * c.decay - c.step_size * mi / denom;
    }
}

impl InplaceOp2 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let (p, g) = host_pair(self.name(), dst, dst_l, src, src_l)?;
        let poisoned = |_| candle_core::Error::Msg("poisoned".into());
        let mut m = self.m.lock().map_err(poisoned)?;
        let mut v = self.v.lock().map_err(poisoned)?;
        if p.len() != g.len() || p.len() != m.len() {
            candle_core::bail!("adamw-update: size mismatch");
        }
        let threads = candle_core::utils::get_num_threads().max(1);
        let chunk = p.len().div_ceil(threads).max(1 << 14);
        std::thread::scope(|s| {
            for (((pc, gc), mc), vc) in p
                .chunks_mut(chunk)
                .zip(g.chunks(chunk))
                .zip(m.chunks_mut(chunk))
                .zip(v.chunks_mut(chunk))
            {
                let c = self.c;
                s.spawn(move || update_chunk(pc, gc, mc, vc, c));
            }
        });
        Ok(())
    }
}

/// In-place 8-bit AdamW over one parameter (dst) with its gradient (src).
struct HostUpdate8<'a> {
    m: Mutex<&'a mut Quantized>,
    v: Mutex<&'a mut Quantized>,
    c: Coefs,
}

impl InplaceOp2 for HostUpdate8<'_> {
    fn name(&self) -> &'static str {
        "adamw8bit-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let (p, g) = host_pair(self.name(), dst, dst_l, src, src_l)?;
        let poisoned = |_| candle_core::Error::Msg("poisoned".into());
        let mut m = self.m.lock().map_err(poisoned)?;
        let mut v = self.v.lock().map_err(poisoned)?;
        if p.len() != g.len() || p.len() != m.codes.len() || p.len() != v.codes.len() {
            candle_core::bail!("adamw8bit-update: size mismatch");
        }
        adamw8bit::update(p, g, &mut m, &mut v, self.c);
        Ok(())
    }
}

impl AdamW {
    pub fn new(settings: AdamWSettings) -> Self {
        AdamW {
            settings,
            step: 0,
            state: HashMap::new(),
            #[cfg(feature = "cuda")]
            tables: None,
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`, with the
    /// gradients multiplied by `grad_scale` first (the clipping coefficient).
    pub fn step(
        &mut self,
        params: &Params,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let s = self.settings;
        let bc1 = 1.0 - s.beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - s.beta2.powi(self.step as i32)).sqrt();
        for (name, var) in params.iter() {
            let Some(g) = grads.get(name) else { continue };
            let decay = if s.weight_decay != 0.0 && decays(name) {
                1.0 - lr * s.weight_decay
            } else {
                1.0
            };
            let p = var.as_tensor();
            let host = crate::ops::fusable_f32(p) && p.is_contiguous();
            if !self.state.contains_key(name) {
                let n = p.elem_count();
                let eight = s.eight_bit && eight_bit_moments(params, name, n);
                let fresh = match (eight, host) {
                    (false, true) => Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                    // Two buffers: the CUDA update writes them in place.
                    (false, false) => Moments::Device {
                        m: p.zeros_like()?,
                        v: p.zeros_like()?,
                    },
                    (true, true) => Moments::Host8 {
                        m: Quantized::zeros(n),
                        v: Quantized::zeros(n),
                    },
                    (true, false) => {
                        let blocks = n.div_ceil(adamw8bit::BLOCK);
                        let dev = p.device();
                        Moments::Device8 {
                            m_codes: Tensor::zeros(n, DType::U8, dev)?,
                            m_absmax: Tensor::zeros(blocks, DType::F32, dev)?,
                            v_codes: Tensor::zeros(n, DType::U8, dev)?,
                            v_absmax: Tensor::zeros(blocks, DType::F32, dev)?,
                        }
                    }
                };
                self.state.insert(name.to_string(), fresh);
            }
            let Some(st) = self.state.get_mut(name) else {
                continue;
            };
            let coefs = Coefs {
                beta1: s.beta1 as f32,
                beta2: s.beta2 as f32,
                one_minus_beta1: (1.0 - s.beta1) as f32,
                one_minus_beta2: (1.0 - s.beta2) as f32,
                decay: decay as f32,
                step_size: (lr / bc1) as f32,
                bc2_sqrt: bc2_sqrt as f32,
                eps: s.eps as f32,
                grad_scale: grad_scale as f32,
            };
            match st {
                Moments::Host { m, v } => {
                    // A gradient kept in bf16 (ops::bf16_copy) widens exactly.
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    let op = HostUpdate {
                        m: Mutex::new(m.as_mut_slice()),
                        v: Mutex::new(v.as_mut_slice()),
                        c: coefs,
                    };
                    p.inplace_op2(&g, &op)?;
                }
                #[cfg(feature = "cuda")]
                Moments::Device { m, v }
                    if p.device().is_cuda()
                        && crate::ops::cuda_kernels()
                        && [p, &*m, &*v].iter().all(|t| t.dtype() == DType::F32)
                        && matches!(g.dtype(), DType::F32 | DType::BF16)
                        && p.is_contiguous() =>
                {
                    super::adamw_cuda::update(p, g, m, v, coefs)?;
                }
                Moments::Host8 { m, v } => {
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    let op = HostUpdate8 {
                        m: Mutex::new(m),
                        v: Mutex::new(v),
                        c: coefs,
                    };
                    p.inplace_op2(&g, &op)?;
                }
                #[cfg(feature = "cuda")]
                Moments::Device8 {
                    m_codes,
                    m_absmax,
                    v_codes,
                    v_absmax,
                } if p.device().is_cuda()
                    && crate::ops::cuda_kernels()
                    && p.dtype() == DType::F32
                    && matches!(g.dtype(), DType::F32 | DType::BF16)
                    && p.is_contiguous() =>
                {
                    use super::adamw8bit_cuda::{tables, update, DeviceMoment};
                    if self.tables.is_none() {
                        self.tables = Some(tables(p.device())?);
                    }
                    let Some(t) = &self.tables else { continue };
                    let m = DeviceMoment {
                        codes: m_codes,
                        absmax: m_absmax,
                    };
                    let v = DeviceMoment {
                        codes: v_codes,
                        absmax: v_absmax,
                    };
                    update(p, g, m, v, t, coefs)?;
                }
                Moments::Device8 {
                    m_codes,
                    m_absmax,
                    v_codes,
                    v_absmax,
                } => {
                    // Without the kernel: the CPU update on host copies, written back.
                    let dev = p.device().clone();
                    let host = |t: &Tensor| t.flatten_all()?.to_device(&Device::Cpu);
                    let mut mq = Quantized {
                        codes: host(m_codes)?.to_vec1()?,
                        absmax: host(m_absmax)?.to_vec1()?,
                    };
                    let mut vq = Quantized {
                        codes: host(v_codes)?.to_vec1()?,
                        absmax: host(v_absmax)?.to_vec1()?,
                    };
                    let mut pv: Vec<f32> = host(&p.to_dtype(DType::F32)?)?.to_vec1()?;
                    let gv: Vec<f32> = host(&g.to_dtype(DType::F32)?)?.to_vec1()?;
                    adamw8bit::update(&mut pv, &gv, &mut mq, &mut vq, coefs);
                    let back = Tensor::from_vec(pv, p.shape(), &dev)?.to_dtype(p.dtype())?;
                    var.set(&back)?;
                    let n = mq.codes.len();
                    let blocks = mq.absmax.len();
                    *m_codes = Tensor::from_vec(mq.codes, n, &dev)?;
                    *m_absmax = Tensor::from_vec(mq.absmax, blocks, &dev)?;
                    *v_codes = Tensor::from_vec(vq.codes, n, &dev)?;
                    *v_absmax = Tensor::from_vec(vq.absmax, blocks, &dev)?;
                }
                Moments::Device { m, v } => {
                    let g = (g.to_dtype(p.dtype())? * grad_scale)?;
                    *m = ((&*m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
                    *v = ((&*v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
                    let denom = ((v.sqrt()? / bc2_sqrt)? + s.eps)?;
                    let update = ((&*m / denom)? * (lr / bc1))?;
                    var.set(&((p.detach() * decay)? - update)?)?;
                }
            }
        }
        Ok(())
    }

    /// Moments under `exp_avg.NAME` / `exp_avg_sq.NAME` (8-bit ones as `exp_avg_8bit.NAME`
    /// codes and `exp_avg_absmax.NAME`, likewise `exp_avg_sq_…`), plus the step count.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let cpu = &Device::Cpu;
        for (name, st) in &self.state {
            let (m, v) = match st {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, m.len(), cpu)?,
                    Tensor::from_slice(v, v.len(), cpu)?,
                ),
                Moments::Device { m, v } => (m.flatten_all()?, v.flatten_all()?),
                Moments::Host8 { m, v } => {
                    for (key, q) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        let (n, b) = (q.codes.len(), q.absmax.len());
                        out.insert(
                            format!("{key}_8bit.{name}"),
                            Tensor::from_slice(&q.codes, n, cpu)?,
                        );
                        out.insert(
                            format!("{key}_absmax.{name}"),
                            Tensor::from_slice(&q.absmax, b, cpu)?,
                        );
                    }
                    continue;
                }
                Moments::Device8 {
                    m_codes,
                    m_absmax,
                    v_codes,
                    v_absmax,
                } => {
                    out.insert(format!("exp_avg_8bit.{name}"), m_codes.clone());
                    out.insert(format!("exp_avg_absmax.{name}"), m_absmax.clone());
                    out.insert(format!("exp_avg_sq_8bit.{name}"), v_codes.clone());
                    out.insert(format!("exp_avg_sq_absmax.{name}"), v_absmax.clone());
                    continue;
                }
            };
            out.insert(format!("exp_avg.{name}"), m);
            out.insert(format!("exp_avg_sq.{name}"), v);
        }
        out.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores moments saved by `state_tensors` for the parameters in `params`, after
    /// `check_state` has accepted them (its messages name what is wrong with a file; the
    /// guard here only keeps a tensor of the wrong length out of the update).
    pub fn load_state(&mut self, params: &Params, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.state.clear();
        let flat = |key: String, len: usize| -> Result<Tensor> {
            match tensors.get(&key) {
                Some(t) if t.elem_count() == len => t.flatten_all(),
                _ => candle_core::bail!("optimizer state `{key}` is missing or misshapen"),
            }
        };
        for (name, var) in params.iter() {
            let p = var.as_tensor();
            let n = p.elem_count();
            let host = crate::ops::fusable_f32(p) && p.is_contiguous();
            let st = if self.settings.eight_bit && eight_bit_moments(params, name, n) {
                let blocks = n.div_ceil(adamw8bit::BLOCK);
                let mc = flat(format!("exp_avg_8bit.{name}"), n)?;
                let ma = flat(format!("exp_avg_absmax.{name}"), blocks)?;
                let vc = flat(format!("exp_avg_sq_8bit.{name}"), n)?;
                let va = flat(format!("exp_avg_sq_absmax.{name}"), blocks)?;
                if host {
                    Moments::Host8 {
                        m: Quantized {
                            codes: mc.to_vec1()?,
                            absmax: ma.to_vec1()?,
                        },
                        v: Quantized {
                            codes: vc.to_vec1()?,
                            absmax: va.to_vec1()?,
                        },
                    }
                } else {
                    let dev = p.device();
                    Moments::Device8 {
                        m_codes: mc.to_device(dev)?,
                        m_absmax: ma.to_device(dev)?,
                        v_codes: vc.to_device(dev)?,
                        v_absmax: va.to_device(dev)?,
                    }
                }
            } else {
                let m = flat(format!("exp_avg.{name}"), n)?.to_dtype(DType::F32)?;
                let v = flat(format!("exp_avg_sq.{name}"), n)?.to_dtype(DType::F32)?;
                if host {
                    Moments::Host {
                        m: m.to_vec1()?,
                        v: v.to_vec1()?,
                    }
                } else {
                    let on_device = |t: Tensor| t.to_device(p.device())?.reshape(p.shape());
                    Moments::Device {
                        m: on_device(m)?,
                        v: on_device(v)?,
                    }
                }
            };
            self.state.insert(name.to_string(), st);
        }
        let step = flat("step".into(), 1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?[0];
        self.step = step as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::decays;

    #[test]
    fn decay_rule_matches_transformers() {
        for name in [
            "model.decoder.layers.0.fc1.weight",
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.3.mlp.down_proj.weight",
        ] {
            assert!(decays(name), "{name}");
        }
        for name in [
            "model.decoder.layers.0.fc1.bias",
            "model.decoder.final_layer_norm.weight",
            "model.decoder.layers.1.self_attn_layer_norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight",
        ] {
            assert!(!decays(name), "{name}");
        }
    }
}
