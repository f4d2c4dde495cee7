//! A linear layer as the models use it: base weight and bias (trainable `Var`s, or frozen
//! tensors under LoRA; a frozen weight may be 4-bit NF4, QLoRA), an optional LoRA pair, and
//! the compute dtype of its matrix products.

use super::layers::linear;
use super::nf4::Nf4Rows;
use crate::ops::{bf16_copy, nf4_linear};
use candle_core::{DType, Result, Tensor};

/// A layer's base weight `[out, in]`: a tensor, or NF4 indices dequantized at each product.
#[derive(Clone)]
pub enum Weight {
    Dense(Tensor),
    Nf4(Nf4Rows),
}

impl Weight {
    /// The weight as a tensor (dequantized in f32 if quantized).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Nf4(q) => q.dequantize(DType::F32),
        }
    }
}

/// `s · B (A x)`: the trainable low-rank update of a frozen layer.
#[derive(Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// DoRA's magnitudes (None: plain LoRA).
    pub dora: Option<Dora>,
}

/// A DoRA layer's trainable magnitude `[out]`, and the squared row norms `[out]` of its frozen
/// weight in f32 (from the file's values, before any bf16 rounding).
#[derive(Clone)]
pub struct Dora {
    pub magnitude: Tensor,
    pub w_sq: Tensor,
}

impl LoraPair {
    /// Row norms `[out]` of `W + s·B·A` in f32, detached (PEFT detaches DoRA's denominator, as
    /// the paper's §4.3 proposes, so no gradient flows through it). Expanded as
    /// `‖W‖² + 2s·(W Aᵀ)·B + s²·(B A Aᵀ)·B` row by row: no weight-sized temporary, and W's
    /// own norms exact where the products run on its bf16 copy.
    pub fn dora_norm(&self, w: &Tensor) -> Result<Tensor> {
        let Some(d) = &self.dora else {
            candle_core::bail!("dora_norm of a LoRA pair without DoRA magnitudes")
        };
        let (a, b) = (self.a.detach(), self.b.detach());
        let wa = w
            .detach()
            .matmul(&a.to_dtype(w.dtype())?.t()?)?
            .to_dtype(DType::F32)?;
        let cross = (wa * &b)?.sum(1)?;
        let ba_sq = (b.matmul(&a.matmul(&a.t()?)?)? * &b)?.sum(1)?;
        let s = self.scale;
        ((&d.w_sq + (cross * (2.0 * s))?)? + (ba_sq * (s * s))?)?.sqrt()
    }
}

/// Squared row norms `[out]` of a weight, in f32.
pub fn row_norms_sq(w: &Tensor) -> Result<Tensor> {
    w.to_dtype(DType::F32)?.sqr()?.sum(1)
}

#[derive(Clone)]
pub struct Linear {
    pub w: Weight,
    pub b: Option<Tensor>,
    pub lora: Option<LoraPair>,
    /// BF16: inputs and weights are rounded to bf16 for the product (f32 accumulation, f32
    /// result), as torch autocast does; the bias add and everything around stays f32.
    pub compute: DType,
    /// `w` cast to bf16 once for every use in a forward pass (see `with_bf16_copy`).
    pub wb: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(l) = &self.lora {
            if let Some(d) = &l.dora {
                return self.forward_dora(x, l, &d.magnitude);
            }
        }
        let w = match &self.w {
            Weight::Dense(w) => w,
            Weight::Nf4(q) => return self.forward_nf4(x, q),
        };
        let y = match self.compute {
            DType::BF16 => {
                let xb = x.to_dtype(DType::BF16)?;
                let y = matmul_bf16(&xb, &self.weight_bf16()?)?;
                let y = match &self.b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                match &self.lora {
                    Some(l) => {
                        let d = matmul_bf16(&matmul_bf16(&xb, &l.a)?.to_dtype(DType::BF16)?, &l.b)?;
                        (y + (d * l.scale)?)?
                    }
                    None => y,
                }
            }
            _ => {
                let y = linear(x, w, self.b.as_ref())?;
                match &self.lora {
                    // The scale is folded into the small B: one [tokens, out] product less
                    // kept for backward per layer.
                    Some(l) => (y + linear(&linear(x, &l.a, None)?, &(&l.b * l.scale)?, None)?)?,
                    None => y,
                }
            }
        };
        Ok(y)
    }

    /// A quantized layer: the product over the dequantized rows in the compute dtype
    /// (bitsandbytes' `bnb_4bit_compute_dtype`), bias and LoRA pair as a dense layer's.
    fn forward_nf4(&self, x: &Tensor, q: &Nf4Rows) -> Result<Tensor> {
        let y = match self.compute {
            DType::BF16 => nf4_linear(&x.to_dtype(DType::BF16)?, q)?.to_dtype(DType::F32)?,
            _ => nf4_linear(x, q)?,
        };
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.lora {
            Some(l) => y + self.lora_update(x, l)?,
            None => Ok(y),
        }
    }

    /// `s · B (A x)` in f32, its products in the compute dtype.
    fn lora_update(&self, x: &Tensor, l: &LoraPair) -> Result<Tensor> {
        match self.compute {
            DType::BF16 => {
                let ax = matmul_bf16(&x.to_dtype(DType::BF16)?, &l.a)?.to_dtype(DType::BF16)?;
                matmul_bf16(&ax, &l.b)? * l.scale
            }
            _ => linear(&linear(x, &l.a, None)?, &(&l.b * l.scale)?, None),
        }
    }

    /// DoRA as PEFT computes it: `b + m / ‖W + s·B·A‖ · (W x + s·B (A x))`, row by row.
    fn forward_dora(&self, x: &Tensor, l: &LoraPair, m: &Tensor) -> Result<Tensor> {
        let base = match (&self.w, self.compute) {
            (Weight::Nf4(q), DType::BF16) => {
                nf4_linear(&x.to_dtype(DType::BF16)?, q)?.to_dtype(DType::F32)?
            }
            (Weight::Nf4(q), _) => nf4_linear(x, q)?,
            (Weight::Dense(_), DType::BF16) => {
                matmul_bf16(&x.to_dtype(DType::BF16)?, &self.weight_bf16()?)?
            }
            (Weight::Dense(w), _) => linear(x, w, None)?,
        };
        let update = self.lora_update(x, l)?;
        let factor = (m / l.dora_norm(&self.w.dense()?)?)?;
        let y = (base + update)?.broadcast_mul(&factor)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `forward` in the compute dtype where that is free: under bf16 products a layer without
    /// bias or LoRA pair gives the product's own bf16 output (the same values `forward` widens
    /// to f32), for a consumer that takes bf16 (`ops::swiglu`); otherwise `forward`'s f32.
    pub fn forward_compute(&self, x: &Tensor) -> Result<Tensor> {
        if self.compute != DType::BF16 || self.b.is_some() || self.lora.is_some() {
            return self.forward(x);
        }
        let xb = x.to_dtype(DType::BF16)?;
        match &self.w {
            Weight::Nf4(q) => nf4_linear(&xb, q),
            Weight::Dense(_) => linear(&xb, &self.weight_bf16()?, None),
        }
    }

    /// The layer with its weight's bf16 copy made now, under bf16 products of f32 weights (a
    /// clone otherwise): uses of it and of its `detached` twin share one cast.
    pub fn with_bf16_copy(&self) -> Result<Linear> {
        let wb = match (self.compute, &self.w, &self.wb) {
            (DType::BF16, Weight::Dense(w), None) if w.dtype() == DType::F32 => Some(bf16_copy(w)?),
            _ => self.wb.clone(),
        };
        Ok(Linear { wb, ..self.clone() })
    }

    /// The layer giving only the output features `start..start + len` (views of the weight,
    /// bias, LoRA B and bf16 copy: rows of each).
    pub fn output_rows(&self, start: usize, len: usize) -> Result<Linear> {
        let rows = |t: &Tensor| t.narrow(0, start, len);
        Ok(Linear {
            w: match &self.w {
                Weight::Dense(w) => Weight::Dense(rows(w)?),
                Weight::Nf4(q) => Weight::Nf4(q.narrow(start, len)?),
            },
            b: self.b.as_ref().map(rows).transpose()?,
            lora: match &self.lora {
                Some(l) => Some(LoraPair {
                    a: l.a.clone(),
                    b: rows(&l.b)?,
                    scale: l.scale,
                    dora: match &l.dora {
                        Some(d) => Some(Dora {
                            magnitude: rows(&d.magnitude)?,
                            w_sq: rows(&d.w_sq)?,
                        }),
                        None => None,
                    },
                }),
                None => None,
            },
            compute: self.compute,
            wb: self.wb.as_ref().map(rows).transpose()?,
        })
    }

    /// A dense weight's bf16 operand (a quantized one dequantizes inside its product).
    fn weight_bf16(&self) -> Result<Tensor> {
        match (&self.wb, &self.w) {
            (Some(wb), _) => Ok(wb.clone()),
            (None, Weight::Dense(w)) => bf16_weight(w),
            (None, Weight::Nf4(q)) => q.dequantize(DType::BF16),
        }
    }

    /// Every tensor of the layer (trainable or not).
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut out = match &self.w {
            Weight::Dense(w) => vec![w],
            Weight::Nf4(q) => vec![&q.weight.packed, &q.weight.scales],
        };
        out.extend(self.b.iter());
        if let Some(l) = &self.lora {
            out.extend([&l.a, &l.b]);
            out.extend(l.dora.iter().map(|d| &d.magnitude));
        }
        out
    }

    /// The same layer over detached tensors: runs without recording a graph (for recompute).
    pub fn detached(&self) -> Linear {
        Linear {
            w: match &self.w {
                Weight::Dense(w) => Weight::Dense(w.detach()),
                Weight::Nf4(q) => Weight::Nf4(q.clone()),
            },
            b: self.b.as_ref().map(Tensor::detach),
            lora: self.lora.as_ref().map(|l| LoraPair {
                a: l.a.detach(),
                b: l.b.detach(),
                scale: l.scale,
                dora: l.dora.as_ref().map(|d| Dora {
                    magnitude: d.magnitude.detach(),
                    w_sq: d.w_sq.clone(),
                }),
            }),
            compute: self.compute,
            wb: self.wb.as_ref().map(Tensor::detach),
        }
    }
}

/// `x @ w^T` with `x` already bf16 and `w` cast if needed; the result in f32.
fn matmul_bf16(xb: &Tensor, w: &Tensor) -> Result<Tensor> {
    linear(xb, &bf16_weight(w)?, None)?.to_dtype(DType::F32)
}

/// A trainable f32 weight's copy keeps its gradient in bf16 (`ops::bf16_copy`).
fn bf16_weight(w: &Tensor) -> Result<Tensor> {
    bf16_copy(w)
}
