//! AdamW as torch implements it (decoupled decay, bias correction), with transformers' rule
//! for which tensors decay, global-norm clipping, and state that can be saved and restored.

use crate::model::Params;
use candle_core::{DType, Result, Tensor};
use std::collections::HashMap;

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
}

struct Moments {
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    settings: AdamWSettings,
    step: u64,
    state: HashMap<String, Moments>,
}

impl AdamW {
    pub fn new(settings: AdamWSettings) -> Self {
        AdamW {
            settings,
            step: 0,
            state: HashMap::new(),
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(
        &mut self,
        params: &Params,
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let s = self.settings;
        let bc1 = 1.0 - s.beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - s.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bc1;
        for (name, var) in params.iter() {
            let Some(g) = grads.get(name) else { continue };
            let p = var.as_tensor().detach();
            let st = match self.state.get_mut(name) {
                Some(st) => st,
                None => {
                    let z = p.zeros_like()?;
                    self.state
                        .insert(name.to_string(), Moments { m: z.clone(), v: z });
                    self.state.get_mut(name).expect("just inserted")
                }
            };
            st.m = ((&st.m * s.beta1)? + (g * (1.0 - s.beta1))?)?;
            st.v = ((&st.v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
            let p = if s.weight_decay != 0.0 && decays(name) {
                (p * (1.0 - lr * s.weight_decay))?
            } else {
                p
            };
            let denom = ((st.v.sqrt()? / bc2_sqrt)? + s.eps)?;
            let update = ((&st.m / denom)? * step_size)?;
            var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// Moments under `exp_avg.NAME` / `exp_avg_sq.NAME`, plus the step count.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, st) in &self.state {
            out.insert(format!("exp_avg.{name}"), st.m.clone());
            out.insert(format!("exp_avg_sq.{name}"), st.v.clone());
        }
        let dev = self
            .state
            .values()
            .next()
            .map(|s| s.m.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        out.insert("step".into(), Tensor::new(&[self.step as f64], &dev)?);
        Ok(out)
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.state.clear();
        for (key, t) in tensors {
            if let Some(name) = key.strip_prefix("exp_avg.") {
                let v = tensors.get(&format!("exp_avg_sq.{name}")).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks exp_avg_sq.{name}"))
                })?;
                self.state.insert(
                    name.to_string(),
                    Moments {
                        m: t.to_dtype(DType::F32)?,
                        v: v.to_dtype(DType::F32)?,
                    },
                );
            }
        }
        if let Some(s) = tensors.get("step") {
            self.step = s.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as u64;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients (what is logged as `grad_norm`).
pub fn global_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.values() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (torch's clip_grad_norm_).
pub fn clip(grads: &mut HashMap<String, Tensor>, norm: f64, max_norm: f64) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
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
