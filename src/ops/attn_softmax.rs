//! Attention's probabilities from its raw scores as one op: `softmax(cap(s * scale) + bias)`
//! (`cap(x) = c * tanh(x / c)`, Gemma 2's soft cap, when given), computed in f32 and stored in
//! the scores' dtype (bf16 under bf16 products: what the product with `v` takes). The backward
//! recomputes the probabilities from the scores, as flash attention does, so a layer keeps the
//! scores and the output for backward (4 bytes an element in bf16) where the chain of candle ops
//! keeps ~20 (the scores' f32 copy, the scaled and biased copies, f32 and bf16 probabilities),
//! and runs one pass forward and one backward where the chain runs ~6 and ~8.
//!
//! CPU: the row kernel here; CUDA: `attn_softmax.cu` (compiled by `build.rs`), the same
//! arithmetic. Off unless [`set_fused_attention`] (`ORPO_FUSED_ATTENTION=1`) turns it on: its
//! CUDA kernels have not yet run on a GPU.

use super::{par_items, stored_as, widened_f32};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static FUSED_ATTENTION: AtomicBool = AtomicBool::new(false);

/// Turns the fused attention probabilities on or off for the whole process.
pub fn set_fused_attention(on: bool) {
    FUSED_ATTENTION.store(on, Ordering::Relaxed);
}

/// Whether attention uses [`attn_softmax`] (see [`set_fused_attention`]).
pub fn fused_attention() -> bool {
    FUSED_ATTENTION.load(Ordering::Relaxed)
}

/// Probabilities `[n, h, lq, lk]` (the scores' dtype, f32 or bf16) of scores `[n, h, lq, lk]`
/// under a finite f32 bias `[n, 1 or h, lq, lk]`.
pub fn attn_softmax(
    scores: &Tensor,
    bias: &Tensor,
    scale: f64,
    cap: Option<f64>,
) -> Result<Tensor> {
    let op = AttnSoftmax::new(scores, bias, scale, cap)?;
    scores.contiguous()?.apply_op2(&bias.contiguous()?, op)
}

#[derive(Clone, Copy)]
struct AttnSoftmax {
    heads: usize,
    lq: usize,
    per_head: bool,
    scale: f32,
    /// 0 without a cap.
    cap: f32,
}

impl AttnSoftmax {
    fn new(scores: &Tensor, bias: &Tensor, scale: f64, cap: Option<f64>) -> Result<Self> {
        let (n, h, lq, lk) = scores.dims4()?;
        let (bn, bh, bq, bk) = bias.dims4()?;
        if (bn, bq, bk) != (n, lq, lk) || (bh != 1 && bh != h) {
            bail!(
                "attn-softmax: bias {:?} does not fit scores {:?}",
                bias.shape(),
                scores.shape()
            );
        }
        if bias.dtype() != DType::F32 {
            bail!("attn-softmax: the bias must be f32");
        }
        Ok(AttnSoftmax {
            heads: h,
            lq,
            per_head: bh == h,
            scale: scale as f32,
            cap: cap.unwrap_or(0.0) as f32,
        })
    }

    fn bias_row(&self, row: usize) -> usize {
        if self.per_head {
            row
        } else {
            (row / (self.heads * self.lq)) * self.lq + row % self.lq
        }
    }

    fn value(&self, s: f32, b: f32) -> f32 {
        let mut v = s * self.scale;
        if self.cap > 0.0 {
            v = self.cap * (v / self.cap).tanh();
        }
        v + b
    }

    /// The row's max and 1 / sum of exponentials, from its scores `s` and bias `b`.
    fn row_stats(&self, s: &[f32], b: &[f32]) -> (f32, f32) {
        let m = s
            .iter()
            .zip(b)
            .map(|(&s, &b)| self.value(s, b))
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = s
            .iter()
            .zip(b)
            .map(|(&s, &b)| (self.value(s, b) - m).exp())
            .sum();
        (m, 1.0 / sum)
    }
}

impl CustomOp2 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "attn-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        sl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let scores = widened_f32(self.name(), s, sl)?;
        let bias = widened_f32(self.name(), b, bl)?;
        let cols = sl.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; scores.len()];
        par_items(&mut out, cols, scores.len(), |row0, chunk| {
            for (i, y) in chunk.chunks_exact_mut(cols).enumerate() {
                let row = row0 + i;
                let x = &scores[row * cols..(row + 1) * cols];
                let br = self.bias_row(row);
                let bb = &bias[br * cols..(br + 1) * cols];
                let (m, inv) = self.row_stats(x, bb);
                for ((y, &x), &b) in y.iter_mut().zip(x).zip(bb) {
                    *y = (self.value(x, b) - m).exp() * inv;
                }
            }
        });
        Ok((stored_as(out, s.dtype()), sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        sl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, (s, sl), (b, bl))
    }

    fn bwd(
        &self,
        scores: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(scores.dtype())?.contiguous()?;
        let dx = scores.apply_op3_no_bwd(bias, &g, &AttnSoftmaxBwd(*self))?;
        Ok((Some(dx), None))
    }
}

/// `ds = p * (g - sum(p * g)) * dv/ds` with `p` recomputed from the scores.
struct AttnSoftmaxBwd(AttnSoftmax);

impl CustomOp3 for AttnSoftmaxBwd {
    fn name(&self) -> &'static str {
        "attn-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        sl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let scores = widened_f32(self.name(), s, sl)?;
        let bias = widened_f32(self.name(), b, bl)?;
        let grad = widened_f32(self.name(), g, gl)?;
        let cols = sl.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; scores.len()];
        par_items(&mut dx, cols, scores.len(), |row0, chunk| {
            for (i, d) in chunk.chunks_exact_mut(cols).enumerate() {
                let row = row0 + i;
                let x = &scores[row * cols..(row + 1) * cols];
                let gr = &grad[row * cols..(row + 1) * cols];
                let br = op.bias_row(row);
                let bb = &bias[br * cols..(br + 1) * cols];
                let (m, inv) = op.row_stats(x, bb);
                let p = |x: f32, b: f32| (op.value(x, b) - m).exp() * inv;
                let dot: f32 = x
                    .iter()
                    .zip(bb)
                    .zip(gr)
                    .map(|((&x, &b), &g)| p(x, b) * g)
                    .sum();
                for (((d, &x), &b), &g) in d.iter_mut().zip(x).zip(bb).zip(gr) {
                    let dv = if op.cap > 0.0 {
                        let t = (x * op.scale / op.cap).tanh();
                        op.scale * (1.0 - t * t)
                    } else {
                        op.scale
                    };
                    *d = p(x, b) * (g - dot) * dv;
                }
            }
        });
        Ok((stored_as(dx, s.dtype()), sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        sl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(&self.0, (s, sl), (b, bl), (g, gl))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::AttnSoftmax;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attn_softmax.ptx"));
    const MODULE: &str = "orpo_attn_softmax";

    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        crate::ops::cuda_view("attn-softmax", s, l)
    }

    fn config(l: &Layout) -> (LaunchConfig, i32) {
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        let rows = l.shape().elem_count() / cols;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        (cfg, cols as i32)
    }

    fn launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        op: &AttnSoftmax,
        sl: &Layout,
        inputs: &[&CudaView<'_, T>],
        bias: &CudaView<'_, f32>,
    ) -> Result<CudaStorage> {
        let (cfg, cols) = config(sl);
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(sl.shape().elem_count())? };
        let (heads, lq, per_head) = (op.heads as i32, op.lq as i32, op.per_head as i32);
        let mut b = func.builder();
        b.arg(inputs[0]);
        b.arg(bias);
        for g in &inputs[1..] {
            b.arg(*g);
        }
        b.arg(&out);
        b.arg(&cols);
        b.arg(&heads);
        b.arg(&lq);
        b.arg(&per_head);
        b.arg(&op.scale);
        b.arg(&op.cap);
        // SAFETY: arguments as the kernel's signature; one warp per row of `cols`.
        unsafe { b.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }

    pub fn forward(
        op: &AttnSoftmax,
        (s, sl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let bias = view::<f32>(b, bl)?;
        let out = match s.dtype() {
            DType::F32 => {
                let x = view::<f32>(s, sl)?;
                launch(&dev, "attn_softmax_fwd_f32", op, sl, &[&x], &bias)?
            }
            DType::BF16 => {
                let x = view::<bf16>(s, sl)?;
                launch(&dev, "attn_softmax_fwd_bf16", op, sl, &[&x], &bias)?
            }
            other => bail!("attn-softmax (CUDA): f32 or bf16 scores expected, got {other:?}"),
        };
        Ok((out, sl.shape().clone()))
    }

    pub fn backward(
        op: &AttnSoftmax,
        (s, sl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let bias = view::<f32>(b, bl)?;
        let out = match s.dtype() {
            DType::F32 => {
                let (x, g) = (view::<f32>(s, sl)?, view::<f32>(g, gl)?);
                launch(&dev, "attn_softmax_bwd_f32", op, sl, &[&x, &g], &bias)?
            }
            DType::BF16 => {
                let (x, g) = (view::<bf16>(s, sl)?, view::<bf16>(g, gl)?);
                launch(&dev, "attn_softmax_bwd_bf16", op, sl, &[&x, &g], &bias)?
            }
            other => bail!("attn-softmax (CUDA): f32 or bf16 scores expected, got {other:?}"),
        };
        Ok((out, sl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The chain of candle ops it replaces, in f32.
    fn chain(s: &Tensor, bias: &Tensor, scale: f64, cap: Option<f64>) -> Result<Tensor> {
        let mut v = (s.to_dtype(DType::F32)? * scale)?;
        if let Some(c) = cap {
            v = ((v / c)?.tanh()? * c)?;
        }
        crate::ops::softmax_last_chain(&v.broadcast_add(bias)?)
    }

    fn case(dtype: DType, heads_in_bias: bool, cap: Option<f64>) -> Result<()> {
        let dev = Device::Cpu;
        let (n, h, lq, lk) = (2, 3, 4, 5);
        let s = (Tensor::randn(0f32, 2.0, (n, h, lq, lk), &dev)?).to_dtype(dtype)?;
        let bh = if heads_in_bias { h } else { 1 };
        let mut b = vec![0f32; n * bh * lq * lk];
        for (i, v) in b.iter_mut().enumerate() {
            if (i * 7) % 5 == 0 {
                *v = f32::MIN;
            }
        }
        b[..lk].fill(f32::MIN); // a row without keys: uniform weights
        let bias = Tensor::from_vec(b, (n, bh, lq, lk), &dev)?;
        let var = Var::from_tensor(&s)?;
        let w = Tensor::randn(0f32, 1.0, (n, h, lq, lk), &dev)?;
        let p = attn_softmax(var.as_tensor(), &bias, 0.35, cap)?;
        assert_eq!(p.dtype(), dtype);
        let g = (p.to_dtype(DType::F32)? * &w)?.sum_all()?.backward()?;
        let got = g
            .get(var.as_tensor())
            .expect("gradient")
            .to_dtype(DType::F32)?;
        let var32 = Var::from_tensor(&s.to_dtype(DType::F32)?)?;
        let p_ref = chain(var32.as_tensor(), &bias, 0.35, cap)?;
        let g_ref = (&p_ref * &w)?.sum_all()?.backward()?;
        let want = g_ref.get(var32.as_tensor()).expect("gradient");
        let tol = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
        let dp = (p.to_dtype(DType::F32)? - &p_ref)?
            .abs()?
            .max_keepdim(D::Minus1)?;
        assert!(dp.flatten_all()?.max(0)?.to_scalar::<f32>()? <= tol);
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let dg = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            dg <= tol * scale.max(1e-3),
            "{dtype:?} {cap:?}: grad diff {dg} of {scale}"
        );
        Ok(())
    }

    /// Values and gradients as the candle-op chain's, f32 and bf16, with a bias per head or
    /// shared, with and without a soft cap, a row without keys among them.
    #[test]
    fn matches_the_chain_of_ops() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            for per_head in [false, true] {
                for cap in [None, Some(1.5)] {
                    case(dtype, per_head, cap)?;
                }
            }
        }
        Ok(())
    }
}
