//! Layer norm and RMS norm over the last dim as fused ops with a fused backward.
//!
//! Forward: one row-parallel pass computing each row's statistics (f64 accumulation) and the
//! normalised, scaled and shifted output; the per-row `(mean, rstd)` are kept inside the op for
//! the backward pass. Backward: one row-parallel pass writing `dx`, with the `dw`/`db` column
//! sums accumulated per thread in f64 and added up in row order (deterministic for a given
//! thread count). Gradients are only computed for the inputs that take part in the graph.

use super::f32_slice;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape};
use candle_core::{Tensor, D};
use std::sync::OnceLock;

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use cpu::{norm_bwd, norm_fwd, NormBwd, Stats};

/// Layer norm over the last dim: `(x - mean) / sqrt(var + eps) * w + b` with the biased
/// variance; `w` and `b` (shape `[d]`, or `[1, .., 1, d]`) are optional.
///
/// f32 tensors on the CPU use the fused kernel (a non-contiguous input is copied first); other
/// dtypes/devices, or `w`/`b` of another shape, fall back to [`layer_norm_chain`].
pub fn layer_norm(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("layer_norm: expected at least one dim, got a scalar");
    }
    if !fusable(x, &[w, b]) {
        return layer_norm_chain(x, w, b, eps);
    }
    let cols = x.dim(D::Minus1)?;
    let w = match w {
        Some(w) => w.contiguous()?,
        None => Tensor::ones(cols, DType::F32, &Device::Cpu)?,
    };
    let b = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(cols, DType::F32, &Device::Cpu)?,
    };
    x.contiguous()?.apply_op3(
        &w,
        &b,
        LayerNorm {
            eps,
            stats: OnceLock::new(),
        },
    )
}

/// RMS norm over the last dim: `x / sqrt(mean(x^2) + eps) * w`, `w` of shape `[d]` (or
/// `[1, .., 1, d]`).
///
/// f32 tensors on the CPU or on CUDA run one op (a non-contiguous input is copied first):
/// forward, the CPU kernel here or candle's CUDA `rmsnorm` kernel (what candle-nn's `rms_norm`
/// runs, which records no backward); backward, the CPU kernel with the CPU kernels on,
/// `rms_norm.cu`'s kernel on CUDA, else [`rms_norm_bwd_ops`] (the same arithmetic in candle
/// ops, which the CPU takes with its kernels off). Other dtypes and devices, or a `w` of
/// another shape, fall back to [`rms_norm_chain`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("rms_norm: expected at least one dim, got a scalar");
    }
    let device_f32 = |t: &Tensor| {
        t.dtype() == DType::F32
            && (t.device().is_cpu() || t.device().is_cuda())
            && t.device().same_device(x.device())
    };
    if !fits(x, &[Some(w)], device_f32) {
        return rms_norm_chain(x, w, eps);
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        RmsNorm {
            eps,
            stats: OnceLock::new(),
        },
    )
}

/// RMS norm's backward in candle ops, for any device: `(dx, dw)` of `y = x * rstd * w` for
/// the gradient `g` of `y` (`dw` only `with_w`), with `xhat = x * rstd`, `gy = g * w`:
/// `dx = rstd * (gy - xhat * mean(gy * xhat))`, `dw = sum over rows of g * xhat`.
///
/// Row sums, column sums and the broadcasts of per-row and per-column values are matrix
/// products with ones vectors: on a GPU candle's reductions and broadcasting kernels run these
/// shapes several times slower than cuBLAS (see `softmax_last_bwd_ops`).
pub fn rms_norm_bwd_ops(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    with_w: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let cols = x.dim(D::Minus1)?;
    let rows = x.elem_count() / cols.max(1);
    let (dt, dev) = (x.dtype(), x.device());
    // Detached operands: the results are gradients, not nodes of a graph. A `dw` computed
    // from the tracked `x` would hold the whole forward graph alive for as long as the
    // weight's gradient lives (and, through an optimizer built of candle ops, beyond).
    let (x, w) = (&x.detach(), &w.detach());
    let x2 = x.contiguous()?.reshape((rows, cols))?;
    let g2 = g.contiguous()?.reshape((rows, cols))?;
    let sum_cols = Tensor::ones((cols, 1), dt, dev)?;
    let spread_cols = Tensor::ones((1, cols), dt, dev)?;
    let ones_rows = Tensor::ones((1, rows), dt, dev)?;
    let mean_sq = (x2.sqr()?.matmul(&sum_cols)? / cols as f64)?;
    // [rows, cols]: each row's 1 / sqrt(mean(x^2) + eps), laid out contiguous.
    let rstd = (mean_sq + eps)?.sqrt()?.recip()?.matmul(&spread_cols)?;
    let xhat = (&x2 * &rstd)?;
    let w_rows = ones_rows.t()?.matmul(&w.reshape((1, cols))?)?;
    let gy = (&g2 * w_rows)?;
    let c = ((&gy * &xhat)?.matmul(&sum_cols)? / cols as f64)?.matmul(&spread_cols)?;
    let dx = ((gy - (&xhat * c)?)? * rstd)?.reshape(x.shape())?;
    let dw = with_w
        .then(|| ones_rows.matmul(&(g2 * xhat)?)?.reshape(w.shape()))
        .transpose()?;
    Ok((dx, dw))
}

/// The plain candle-op formulation (as in `model::layers::layer_norm`): reference and fallback.
pub fn layer_norm_chain(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = w {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// The plain candle-op formulation (as in `model::layers::rms_norm`): reference and fallback.
pub fn rms_norm_chain(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Whether the fused kernel applies: non-empty f32 `x` on the CPU and f32 CPU parameters of
/// `d` elements whose shape broadcasts to `[.., d]` without growing `x`'s rank.
fn fusable(x: &Tensor, params: &[Option<&Tensor>]) -> bool {
    fits(x, params, super::fusable_f32)
}

/// Whether `x` and its parameters pass `ok` and the parameters have `d` elements in a shape
/// that broadcasts to `x`'s `[.., d]` without growing its rank.
fn fits(x: &Tensor, params: &[Option<&Tensor>], ok: impl Fn(&Tensor) -> bool) -> bool {
    let cols = x.dims().last().copied().unwrap_or(0);
    cols > 0
        && x.elem_count() > 0
        && ok(x)
        && params.iter().flatten().all(|p| {
            ok(p)
                && p.rank() <= x.rank()
                && p.elem_count() == cols
                && p.dims().last() == Some(&cols)
        })
}

struct LayerNorm {
    eps: f64,
    /// Per-row statistics from the forward pass, reused by the backward pass.
    stats: OnceLock<Stats>,
}

struct RmsNorm {
    eps: f64,
    /// Per-row statistics from the forward pass, reused by the backward pass.
    stats: OnceLock<Stats>,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp3::name(self);
        let x = f32_slice(name, "input", s1, l1)?;
        let w = f32_slice(name, "weight", s2, l2)?;
        let b = f32_slice(name, "bias", s3, l3)?;
        let (y, stats) = norm_fwd::<true>(name, x, l1, w, Some(b), self.eps)?;
        // A fresh op struct is made per call, so the first (only) forward owns the stash.
        let _ = self.stats.set(stats);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = NormBwd {
            center: true,
            eps: self.eps,
            stats: self.stats.get().map(Vec::as_slice),
            want: [x.track_op(), w.track_op(), b.track_op()],
        };
        let [dx, dw, db] = norm_bwd(&op, x, w, Some(b), grad_res)?;
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp2::name(self);
        let x = f32_slice(name, "input", s1, l1)?;
        let w = f32_slice(name, "weight", s2, l2)?;
        let (y, stats) = norm_fwd::<false>(name, x, l1, w, None, self.eps)?;
        let _ = self.stats.set(stats);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm((s1, l1), (s2, l2), self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !super::fusable_f32(x) {
            #[cfg(feature = "cuda")]
            if x.device().is_cuda() && super::cuda_kernels() {
                let (dx, dw) = cuda::rms_norm_bwd(x, w, grad_res, self.eps, w.track_op())?;
                return Ok((Some(dx), dw));
            }
            let (dx, dw) = rms_norm_bwd_ops(x, w, grad_res, self.eps, w.track_op())?;
            return Ok((Some(dx), dw));
        }
        let op = NormBwd {
            center: false,
            eps: self.eps,
            stats: self.stats.get().map(Vec::as_slice),
            want: [x.track_op(), w.track_op(), false],
        };
        let [dx, dw, _] = norm_bwd(&op, x, w, None, grad_res)?;
        Ok((dx, dw))
    }
}
