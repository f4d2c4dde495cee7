//! Rotary position embeddings: `config.json`'s RoPE settings and the cos/sin tables, with the
//! frequency scalings of transformers' `ROPE_INIT_FUNCTIONS` that fine-tuning meets.

use candle_core::{Device, Result, Tensor};
use serde_json::Value;

/// A JSON value as the config writes it, for messages (long values cut).
pub(crate) fn shown(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (`linear`).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (Qwen2.5/Qwen3 long-context configs): frequencies of pair index below `low` kept,
    /// above `high` divided by `factor`, a linear ramp between; cos/sin scaled.
    Yarn {
        factor: f64,
        low: f64,
        high: f64,
    },
    /// Phi-3.5's and Phi-4-mini's: a divisor per frequency, `long` for batches longer than the
    /// original context and `short` otherwise (transformers picks by the padded batch length).
    LongRope {
        short: Vec<f64>,
        long: Vec<f64>,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// Leading dimensions of each head that rotate (all of them unless `partial_rotary_factor`).
    pub dim: usize,
    pub scaling: RopeScaling,
    /// Multiplies cos and sin (`longrope`'s attention factor; 1 otherwise).
    pub attention_factor: f64,
}

impl Rope {
    /// Reads `rope_theta`, `partial_rotary_factor` and the scaling from either spelling: the
    /// top level with a `rope_scaling` dict (most hub configs) or transformers 5's
    /// `rope_parameters`. Errors are messages for the config's error; values that would make
    /// the rotary tables non-finite (a `rope_theta` or `factor` <= 0, ...) are refused with the
    /// key named.
    pub fn from_config(raw: &Value, head_dim: usize) -> std::result::Result<Rope, String> {
        Self::parse(raw, head_dim, None)
    }

    /// [`Self::from_config`], with `label` naming the dict that holds the scaling keys in
    /// messages (Gemma 3's per-layer-type settings); `None`: `rope_scaling` or `rope_parameters`.
    fn parse(
        raw: &Value,
        head_dim: usize,
        label: Option<&str>,
    ) -> std::result::Result<Rope, String> {
        let params = raw.get("rope_parameters").filter(|v| v.is_object());
        let scaling = match raw.get("rope_scaling") {
            Some(s) if s.is_object() => Some(s),
            None | Some(Value::Null) => params,
            Some(other) => {
                return Err(format!(
                    "`rope_scaling` must be an object or null, found {}",
                    shown(other)
                ))
            }
        };
        let params_label = label.unwrap_or("rope_parameters");
        let scaling_label = match label {
            Some(l) => l,
            None if raw.get("rope_scaling").is_some_and(Value::is_object) => "rope_scaling",
            None => "rope_parameters",
        };
        // A number at the top level or in `rope_parameters`; null counts as absent.
        let number = |key: &str| -> std::result::Result<Option<f64>, String> {
            let (v, name) = match raw.get(key).filter(|v| !v.is_null()) {
                Some(v) => (Some(v), key.to_string()),
                None => (
                    params.and_then(|p| p.get(key)).filter(|v| !v.is_null()),
                    format!("{params_label}.{key}"),
                ),
            };
            match v {
                None => Ok(None),
                Some(v) => match v.as_f64().filter(|x| x.is_finite()) {
                    Some(x) => Ok(Some(x)),
                    None => Err(format!("`{name}` must be a number, found {}", shown(v))),
                },
            }
        };
        let theta_name = if raw.get("rope_theta").is_some_and(|v| !v.is_null()) {
            "rope_theta".to_string()
        } else {
            format!("{params_label}.rope_theta")
        };
        let theta = number("rope_theta")?.unwrap_or(10000.0);
        if theta <= 0.0 {
            return Err(format!(
                "`{theta_name}` must be a positive number, found {theta}"
            ));
        }
        let partial = number("partial_rotary_factor")?.unwrap_or(1.0);
        // transformers: int(head_dim * factor), which must stay even to rotate in pairs.
        let dim = (head_dim as f64 * partial) as usize;
        if !(partial > 0.0 && partial <= 1.0) || dim == 0 || !dim.is_multiple_of(2) {
            return Err(format!(
                "partial_rotary_factor {partial} gives {dim} rotary dimensions of head_dim \
                 {head_dim}; expected an even number in 2..={head_dim}"
            ));
        }
        let kind = match scaling.and_then(|s| s.get("rope_type").or_else(|| s.get("type"))) {
            None | Some(Value::Null) => "default",
            Some(Value::String(k)) => k.as_str(),
            Some(other) => {
                return Err(format!(
                    "`{scaling_label}.rope_type` must be a string, found {}",
                    shown(other)
                ))
            }
        };
        // A number in the scaling dict: absent or null is `None`, anything else but a finite
        // number an error.
        let optional = |key: &str| -> std::result::Result<Option<f64>, String> {
            match scaling.and_then(|s| s.get(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64().filter(|x| x.is_finite()) {
                    Some(x) => Ok(Some(x)),
                    None => Err(format!(
                        "`{scaling_label}.{key}` must be a number, found {}",
                        shown(v)
                    )),
                },
            }
        };
        let field = |key: &str| -> std::result::Result<f64, String> {
            optional(key)?.ok_or_else(|| format!("rope_type `{kind}` needs a number `{key}`"))
        };
        let positive_in = |key: &str, x: f64| -> std::result::Result<f64, String> {
            if x > 0.0 {
                Ok(x)
            } else {
                Err(format!(
                    "`{scaling_label}.{key}` must be a positive number (rope_type `{kind}`), \
                     found {x}"
                ))
            }
        };
        let positive = |key: &str| positive_in(key, field(key)?);
        let factors = |key: &str| -> std::result::Result<Vec<f64>, String> {
            let list = scaling
                .and_then(|s| s.get(key))
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>());
            match list {
                Some(v) if v.len() == dim / 2 => {
                    if let Some(bad) = v.iter().find(|&&f| !(f.is_finite() && f > 0.0)) {
                        return Err(format!(
                            "`{scaling_label}.{key}` must hold positive numbers, found {bad}"
                        ));
                    }
                    Ok(v)
                }
                _ => Err(format!(
                    "rope_type `{kind}` needs `{key}`: a list of {} numbers",
                    dim / 2
                )),
            }
        };
        // transformers: a top-level `original_max_position_embeddings` (Phi-3's spelling) wins
        // over the scaling dict's; without either, `max_position_embeddings`.
        let original_context = || -> std::result::Result<f64, String> {
            let (value, name) = match raw
                .get("original_max_position_embeddings")
                .filter(|v| !v.is_null())
            {
                Some(v) => (
                    Some(v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                        format!(
                            "`original_max_position_embeddings` must be a number, found {}",
                            shown(v)
                        )
                    })?),
                    "original_max_position_embeddings".to_string(),
                ),
                None => match optional("original_max_position_embeddings")? {
                    Some(x) => (
                        Some(x),
                        format!("{scaling_label}.original_max_position_embeddings"),
                    ),
                    None => (
                        number("max_position_embeddings")?,
                        "max_position_embeddings".to_string(),
                    ),
                },
            };
            let value = value.ok_or_else(|| {
                format!("rope_type `{kind}` needs `original_max_position_embeddings`")
            })?;
            if value > 0.0 {
                Ok(value)
            } else {
                Err(format!(
                    "`{name}` must be a positive number (rope_type `{kind}`), found {value}"
                ))
            }
        };
        // Phi-3 and DeepSeek configs give no factor: the context extension is the ratio.
        let factor_or_ratio = |original: f64| -> std::result::Result<f64, String> {
            match optional("factor")? {
                Some(f) => positive_in("factor", f),
                None => {
                    let m = number("max_position_embeddings")?
                        .ok_or_else(|| format!("rope_type `{kind}` needs a number `factor`"))?;
                    let ratio = m / original;
                    if ratio > 0.0 && ratio.is_finite() {
                        Ok(ratio)
                    } else {
                        Err(format!(
                            "rope_type `{kind}` without `{scaling_label}.factor` takes \
                             `max_position_embeddings` / `original_max_position_embeddings` \
                             = {m} / {original}, which must be positive"
                        ))
                    }
                }
            }
        };
        let mut attention_factor = 1.0;
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: positive("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: positive("factor")?,
                low_freq_factor: positive("low_freq_factor")?,
                high_freq_factor: positive("high_freq_factor")?,
                original_max_position_embeddings: original_context()?,
            },
            "yarn" => {
                let original = original_context()?;
                let factor = factor_or_ratio(original)?;
                // transformers' get_mscale.
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                attention_factor = match (
                    optional("attention_factor")?,
                    optional("mscale")?.filter(|&m| m != 0.0),
                    optional("mscale_all_dim")?.filter(|&m| m != 0.0),
                ) {
                    (Some(f), _, _) => positive_in("attention_factor", f)?,
                    (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
                    _ => mscale(factor, 1.0),
                };
                let beta_fast = optional("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
                let beta_slow = optional("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
                let truncate = scaling
                    .and_then(|s| s.get("truncate"))
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                // The pair index at which a frequency turns `rotations` times over the original
                // context (transformers' find_correction_range).
                let d = dim as f64;
                let at = |rotations: f64| {
                    d * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (at(beta_fast), at(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001; // as transformers, against a zero-width ramp
                }
                RopeScaling::Yarn { factor, low, high }
            }
            "longrope" => {
                let original = original_context()?;
                let factor = factor_or_ratio(original)?;
                attention_factor = match optional("attention_factor")? {
                    Some(f) => positive_in("attention_factor", f)?,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / original.ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short: factors("short_factor")?,
                    long: factors("long_factor")?,
                    original_max_position_embeddings: original as usize,
                }
            }
            other => {
                return Err(format!(
                    "rope_type `{other}` is not supported yet (default, linear, llama3, yarn, \
                     longrope)"
                ))
            }
        };
        let rope = Rope {
            theta,
            dim,
            scaling,
            attention_factor,
        };
        // A last guard for combinations no single key's check catches (a `yarn` ramp of zero
        // width, an original context of 1 under `longrope`, ...): training would meet NaN.
        let finite = |len: usize| rope.inv_freq(len).iter().all(|f| f.is_finite());
        if !(rope.attention_factor.is_finite() && finite(0) && finite(usize::MAX)) {
            return Err(format!(
                "the rotary settings (`{theta_name}` {theta}, rope_type `{kind}` in \
                 `{scaling_label}`) give non-finite rotary frequencies"
            ));
        }
        Ok(rope)
    }

    /// Gemma 3's two rotary settings, (full-attention layers, sliding layers): transformers 5's
    /// `rope_parameters` keyed by layer type, or the hub's spelling (`rope_theta` and
    /// `rope_scaling` for the full layers, `rope_local_base_freq` for the sliding ones), with
    /// `Gemma3TextConfig`'s defaults 1e6 and 1e4.
    pub fn gemma3(raw: &Value, head_dim: usize) -> std::result::Result<(Rope, Rope), String> {
        let by_type = raw
            .get("rope_parameters")
            .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
        if by_type.is_none() {
            // The hub's spelling: the thetas are checked here, under the keys the file uses.
            for key in ["rope_theta", "rope_local_base_freq"] {
                match raw.get(key) {
                    None | Some(Value::Null) => {}
                    Some(v) if v.as_f64().is_some_and(|t| t.is_finite() && t > 0.0) => {}
                    Some(v) => {
                        return Err(format!(
                            "`{key}` must be a positive number, found {}",
                            shown(v)
                        ))
                    }
                }
            }
        }
        let part = |layer_type: &str, theta_key: &str, default_theta: f64| -> Value {
            let mut part = serde_json::Map::new();
            if let Some(m) = raw.get("max_position_embeddings") {
                part.insert("max_position_embeddings".into(), m.clone());
            }
            let mut params = match by_type.and_then(|p| p.get(layer_type)) {
                Some(Value::Object(p)) => p.clone(),
                _ => serde_json::Map::new(),
            };
            if by_type.is_none() {
                if let Some(theta) = raw.get(theta_key) {
                    params.insert("rope_theta".into(), theta.clone());
                }
                if layer_type == "full_attention" {
                    if let Some(Value::Object(scaling)) = raw.get("rope_scaling") {
                        params.extend(scaling.clone());
                    }
                }
            }
            params
                .entry("rope_theta")
                .or_insert_with(|| default_theta.into());
            part.insert("rope_parameters".into(), Value::Object(params));
            Value::Object(part)
        };
        let label = |layer_type: &str| match by_type {
            Some(_) => format!("rope_parameters.{layer_type}"),
            None if layer_type == "full_attention" => "rope_scaling".to_string(),
            None => "rope_local_base_freq".to_string(),
        };
        let global = Rope::parse(
            &part("full_attention", "rope_theta", 1e6),
            head_dim,
            Some(&label("full_attention")),
        )?;
        let local = Rope::parse(
            &part("sliding_attention", "rope_local_base_freq", 1e4),
            head_dim,
            Some(&label("sliding_attention")),
        )?;
        Ok((global, local))
    }

    /// The inverse frequencies, one per rotated pair, as transformers computes them for a
    /// batch padded to `len` positions.
    pub fn inv_freq(&self, len: usize) -> Vec<f32> {
        let d = self.dim as f64;
        (0..self.dim / 2)
            .map(|i| {
                let f = 1.0 / self.theta.powf((2 * i) as f64 / d);
                (match &self.scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    &RopeScaling::Yarn { factor, low, high } => {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / factor * ramp + f * (1.0 - ramp)
                    }
                    RopeScaling::LongRope {
                        short,
                        long,
                        original_max_position_embeddings,
                    } => {
                        let ext = if len > *original_max_position_embeddings {
                            long
                        } else {
                            short
                        };
                        f / ext[i]
                    }
                    &RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: old,
                    } => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < old / high {
                            f
                        } else if wavelen > old / low {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }) as f32
            })
            .collect()
    }

    /// cos/sin tables `[len, dim/2]` for positions 0..len of a batch padded to `len`, in f32 as
    /// transformers computes them (its tables repeat these halves: `cat(freqs, freqs)`).
    pub fn tables(&self, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let inv = self.inv_freq(len);
        let half = inv.len();
        let scale = self.attention_factor as f32;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in &inv {
                let f = (p as f32) * f;
                cos.push(f.cos() * scale);
                sin.push(f.sin() * scale);
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_between() {
        let raw = json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}});
        let rope = Rope::from_config(&raw, 64).unwrap();
        let plain = Rope {
            scaling: RopeScaling::None,
            ..rope.clone()
        };
        let (scaled, base) = (rope.inv_freq(1), plain.inv_freq(1));
        // Values from transformers 5.24's _compute_llama3_parameters (head_dim 64): 14 kept,
        // 15-17 blended, 18 on divided by 8.
        let want = [
            (0, 1.0),
            (14, 3.211_446e-3),
            (15, 1.371_893_7e-3),
            (16, 5.248_46e-4),
            (17, 1.785_077_9e-4),
            (18, 7.784_655_5e-5),
            (31, 3.767_322_6e-7),
        ];
        for (i, w) in want {
            assert!(
                (scaled[i] - w).abs() <= 1e-6 * w,
                "{i}: {} vs {w}",
                scaled[i]
            );
        }
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[31] - base[31] / 8.0).abs() <= 1e-6 * scaled[31]);
    }

    #[test]
    fn longrope_picks_factors_by_batch_length_and_scales_cos_and_sin() {
        // Phi-3's spelling: no `factor`, the context extension is max / original (512 / 64).
        let raw = json!({"max_position_embeddings": 512, "original_max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
            "partial_rotary_factor": 0.5, "short_factor": [1.0, 1.5, 2.0, 4.0],
            "long_factor": [2.0, 3.0, 5.0, 9.0]}});
        let rope = Rope::from_config(&raw, 16).unwrap();
        // transformers 5.24's _compute_longrope_parameters, seq_len 64 and 65.
        let close = |got: Vec<f32>, want: [f32; 4]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6 * w, "{g} vs {w}");
            }
        };
        close(rope.inv_freq(64), [1.0, 6.666_667e-2, 5.0e-3, 2.5e-4]);
        close(
            rope.inv_freq(65),
            [0.5, 3.333_333_4e-2, 2.0e-3, 1.111_111_1e-4],
        );
        assert!((rope.attention_factor - 1.224_744_871_391_589).abs() < 1e-12);
        let (cos, _) = rope.tables(2, &Device::Cpu).unwrap();
        let first: Vec<f32> = cos.get(0).unwrap().to_vec1().unwrap();
        assert!(first.iter().all(|&c| (c - 1.224_744_9).abs() < 1e-6));
    }

    #[test]
    fn yarn_matches_transformers() {
        // transformers 5.24's _compute_yarn_parameters, head_dim 64: a Qwen-style config, and a
        // DeepSeek-style one with mscale / mscale_all_dim and factor from the context ratio.
        let qwen = json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32768}, "rope_theta": 1e6});
        let deepseek = json!({"max_position_embeddings": 163840, "rope_theta": 1e4,
            "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096,
            "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}});
        let cases = [
            (
                qwen,
                1.138_629_436_111_989,
                [
                    (0, 1.0),
                    (5, 0.115_478_2),
                    (8, 0.031_622_78),
                    (10, 0.013_335_215),
                    (12, 0.005_154_795_5),
                    (14, 0.001_778_530_3),
                    (16, 5.833_333_7e-4),
                    (20, 4.445_698_5e-5),
                    (31, 3.849_816_3e-7),
                ],
            ),
            (
                deepseek,
                1.085_726_399_256_135_5,
                [
                    (0, 1.0),
                    (5, 0.237_137_36),
                    (8, 0.1),
                    (10, 0.056_234_13),
                    (12, 0.026_879_36),
                    (14, 0.012_447_956),
                    (16, 5.500_000_4e-3),
                    (20, 7.905_694e-4),
                    (31, 3.333_803_5e-6),
                ],
            ),
        ];
        for (raw, factor, want) in cases {
            let rope = Rope::from_config(&raw, 64).unwrap();
            assert!((rope.attention_factor - factor).abs() < 1e-12, "{rope:?}");
            let inv = rope.inv_freq(1);
            for (i, w) in want {
                assert!((inv[i] - w).abs() <= 2e-6 * w, "{i}: {} vs {w}", inv[i]);
            }
        }
    }

    #[test]
    fn both_spellings_and_errors() {
        let new = json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6,
                                             "factor": 2.0, "partial_rotary_factor": 0.5}});
        let rope = Rope::from_config(&new, 32).unwrap();
        assert_eq!(rope.theta, 1e6);
        assert_eq!(rope.dim, 16);
        assert_eq!(rope.scaling, RopeScaling::Linear { factor: 2.0 });
        let e = Rope::from_config(&json!({"rope_scaling": {"type": "dynamic"}}), 32).unwrap_err();
        assert!(e.contains("rope_type `dynamic`"), "{e}");
        let e = Rope::from_config(
            &json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "factor": 2.0,
                    "long_factor": [1.0, 2.0], "original_max_position_embeddings": 64}}),
            4,
        )
        .unwrap_err();
        assert!(e.contains("`short_factor`: a list of 2 numbers"), "{e}");
        let e =
            Rope::from_config(&json!({"rope_scaling": {"rope_type": "llama3"}}), 32).unwrap_err();
        assert!(e.contains("`factor`"), "{e}");
        let e = Rope::from_config(&json!({"partial_rotary_factor": 0.1}), 32).unwrap_err();
        assert!(e.contains("partial_rotary_factor 0.1"), "{e}");
    }
}
