//! The LM head's per-row scores from its logits as one op: `[m, 2]` f32 of
//! `(logits[t] - logsumexp(logits), sum(logits))` for logits `[m, v]` in f32 or bf16.
//!
//! The first is the target's log-prob (the loss reads it); the second a metric, without a
//! gradient. Backward: `g * (onehot(t) - softmax(logits))`, written in the logits' dtype
//! (under bf16 products what the head's product takes back), with the logsumexp recomputed.
//! candle's chain (a cast of the bf16 logits to f32, max, broadcast subtraction, exp, sums,
//! gather; their backward as many again) keeps several f32 `[m, v]` tensors for backward
//! (`v` = 128,256 for Llama 3); this keeps the logits alone.
//!
//! CPU: the loop here (f64 sums); CUDA: `logprob_sum.cu` (compiled by `build.rs`, f32 block
//! sums). The CPU with its kernels on keeps its own fused log-softmax (`token_logprobs`).

use super::{par_items, stored_as, widened_f32};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Whether [`logprob_and_sum`] serves `device`: CUDA with the project's kernels on, and the
/// CPU with its own kernels off (so the CPU tests the path CUDA takes).
pub fn logprob_sum_serves(device: &candle_core::Device) -> bool {
    match device {
        candle_core::Device::Cuda(_) => super::cuda_kernels(),
        candle_core::Device::Cpu => !super::fused_kernels(),
        _ => false,
    }
}

/// `[m, 2]` f32: each row's `(log softmax(logits)[target], sum(logits))`, for logits `[m, v]`
/// (f32 or bf16) and integer targets `[m]`; only the first column carries a gradient. A
/// target `>= v` is an error on the CPU and NaN on CUDA.
pub fn logprob_and_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (m, _) = logits.dims2()?;
    if targets.dims() != [m] || !targets.dtype().is_int() {
        bail!(
            "logprob_and_sum: logits {:?} need integer targets [{m}], got {:?} {:?}",
            logits.shape(),
            targets.dtype(),
            targets.shape()
        );
    }
    if !matches!(logits.dtype(), DType::F32 | DType::BF16) {
        bail!(
            "logprob_and_sum: f32 or bf16 logits, got {:?}",
            logits.dtype()
        );
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits.contiguous()?.apply_op2(&targets, LogprobSum)
}

/// Block size for one block per row of `cols` (1024 threads for a vocabulary).
#[cfg(feature = "cuda")]
fn block(cols: usize) -> u32 {
    if cols < 1024 {
        32
    } else {
        1024
    }
}

/// Targets as `usize`, each checked against the vocabulary.
fn targets_of(op: &str, s: &CpuStorage, l: &Layout, rows: usize, v: usize) -> Result<Vec<usize>> {
    let (CpuStorage::U32(t), Some((a, b))) = (s, l.contiguous_offsets()) else {
        bail!("{op}: targets must be contiguous u32");
    };
    if b - a != rows {
        bail!("{op}: {} targets for {rows} rows", b - a);
    }
    t[a..b]
        .iter()
        .enumerate()
        .map(|(i, &t)| match t as usize {
            t if t < v => Ok(t),
            t => bail!("{op}: target {t} at row {i} is out of range for vocabulary {v}"),
        })
        .collect()
}

/// `(logsumexp, sum)` of a row, in f64.
fn row_stats(x: &[f32]) -> (f64, f64) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let (mut s, mut total) = (0f64, 0f64);
    for &v in x {
        s += (v as f64 - m).exp();
        total += v as f64;
    }
    (m + s.ln(), total)
}

struct LogprobSum;

impl CustomOp2 for LogprobSum {
    fn name(&self) -> &'static str {
        "logprob-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, v) = l1.shape().dims2()?;
        let x = widened_f32(self.name(), s1, l1)?;
        let t = targets_of(self.name(), s2, l2, rows, v)?;
        let mut out = vec![0f32; 2 * rows];
        par_items(&mut out, 2, x.len(), |row0, run| {
            for (k, o) in run.chunks_exact_mut(2).enumerate() {
                let r = row0 + k;
                let xr = &x[r * v..(r + 1) * v];
                let (lse, total) = row_stats(xr);
                o[0] = (xr[t[r]] as f64 - lse) as f32;
                o[1] = total as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, _) = l1.shape().dims2()?;
        let out = cuda::launch("logprob_sum_fwd", (s1, l1), (s2, l2), None)?;
        Ok((out, Shape::from((rows, 2))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let dx = logits.apply_op3_no_bwd(targets, &g, &LogprobSumBwd)?;
        Ok((Some(dx), None))
    }
}

/// `(logits, targets, g [m, 2]) -> g[:, 0] * (onehot(t) - softmax(logits))`.
struct LogprobSumBwd;

impl CustomOp3 for LogprobSumBwd {
    fn name(&self) -> &'static str {
        "logprob-sum-bwd"
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
        let (rows, v) = l1.shape().dims2()?;
        let x = widened_f32(self.name(), s1, l1)?;
        let t = targets_of(self.name(), s2, l2, rows, v)?;
        let g = widened_f32(self.name(), s3, l3)?;
        if g.len() != 2 * rows {
            bail!("{}: gradient {:?} for {rows} rows", self.name(), l3.shape());
        }
        let mut dx = vec![0f32; x.len()];
        par_items(&mut dx, v, x.len(), |row0, run| {
            for (k, d) in run.chunks_exact_mut(v).enumerate() {
                let r = row0 + k;
                let xr = &x[r * v..(r + 1) * v];
                let (lse, _) = row_stats(xr);
                let gr = g[2 * r];
                for (c, (d, &xv)) in d.iter_mut().zip(xr).enumerate() {
                    let p = (xv as f64 - lse).exp() as f32;
                    *d = gr * (if c == t[r] { 1.0 } else { 0.0 } - p);
                }
            }
        });
        Ok((stored_as(dx, s1.dtype()), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::launch("logprob_sum_bwd", (s1, l1), (s2, l2), Some((s3, l3)))?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, DType, Layout, Result};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/logprob_sum.ptx"));
    const MODULE: &str = "orpo_logprob_sum";

    /// Forward (`g` None: writes `[rows, 2]` f32) or backward (writes `[rows, v]` in the
    /// logits' dtype) of `logits` `[rows, v]` and u32 `targets`.
    pub fn launch(
        kernel: &str,
        logits: (&CudaStorage, &Layout),
        targets: (&CudaStorage, &Layout),
        g: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        match logits.0.dtype() {
            DType::F32 => typed::<f32>(&format!("{kernel}_f32"), logits, targets, g),
            DType::BF16 => typed::<bf16>(&format!("{kernel}_bf16"), logits, targets, g),
            other => bail!("logprob-sum (CUDA): f32 or bf16 logits expected, got {other:?}"),
        }
    }

    fn typed<T: CudaDType + DeviceRepr>(
        name: &str,
        (x, xl): (&CudaStorage, &Layout),
        (t, tl): (&CudaStorage, &Layout),
        g: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (rows, cols) = xl.shape().dims2()?;
        if cols > i32::MAX as usize || tl.shape().elem_count() != rows {
            bail!(
                "logprob-sum (CUDA): logits {:?}, targets {:?}",
                xl.shape(),
                tl.shape()
            );
        }
        let xv = crate::ops::cuda_view::<T>("logprob-sum", x, xl)?;
        let tv = crate::ops::cuda_view::<u32>("logprob-sum", t, tl)?;
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (super::block(cols), 1, 1),
            shared_mem_bytes: 0,
        };
        let cols = cols as i32;
        match g {
            None => {
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<f32>(2 * rows)? };
                let mut b = func.builder();
                b.arg(&xv);
                b.arg(&tv);
                b.arg(&out);
                b.arg(&cols);
                // SAFETY: arguments as the kernel's signature (x, targets, out, cols).
                unsafe { b.launch(cfg) }.w()?;
                Ok(f32::wrap_cuda_slice(out, dev))
            }
            Some((g, gl)) => {
                let gv = crate::ops::cuda_view::<f32>("logprob-sum", g, gl)?;
                if gl.shape().elem_count() != 2 * rows {
                    bail!(
                        "logprob-sum (CUDA): gradient {:?} for {rows} rows",
                        gl.shape()
                    );
                }
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
                let mut b = func.builder();
                b.arg(&xv);
                b.arg(&tv);
                b.arg(&gv);
                b.arg(&out);
                b.arg(&cols);
                // SAFETY: arguments as the kernel's signature (x, targets, g, dx, cols).
                unsafe { b.launch(cfg) }.w()?;
                Ok(T::wrap_cuda_slice(out, dev))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients as the chain's (`token_logprobs_chain` and a row sum), f32 and
    /// bf16 logits; an out-of-range target is an error.
    #[test]
    fn matches_the_chain_of_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (m, v) = (5, 300);
        let logits = (Tensor::randn(0f32, 3.0, (m, v), &dev)?).to_dtype(DType::BF16)?;
        let targets = Tensor::new(&[0u32, 7, 299, 150, 7], &dev)?;
        let w = Tensor::randn(0f32, 1.0, (m, 2), &dev)?;
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&logits.to_dtype(dtype)?)?;
            let s = logprob_and_sum(x.as_tensor(), &targets)?;
            assert_eq!(s.dims(), [m, 2]);
            let g = (&s * &w)?.sum_all()?.backward()?;
            let got = g.get(x.as_tensor()).unwrap().to_dtype(DType::F32)?;
            let x32 = Var::from_tensor(&logits.to_dtype(DType::F32)?)?;
            let lp = crate::ops::token_logprobs_chain(x32.as_tensor(), &targets)?;
            let sums = x32.as_tensor().sum(1)?.detach();
            let want_s = Tensor::stack(&[&lp, &sums], 1)?;
            let w0 = w.narrow(1, 0, 1)?.squeeze(1)?;
            let want_g = (lp * &w0)?.sum_all()?.backward()?;
            let want = want_g.get(x32.as_tensor()).unwrap();
            let ds = (s - &want_s)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(ds < 1e-4, "{dtype:?}: scores differ by {ds}");
            // bf16: the gradient is stored in bf16 (2^-9 relative rounding).
            let tol = if dtype == DType::F32 { 1e-6 } else { 4e-3 };
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let dg = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            assert!(dg < tol, "{dtype:?}: gradients differ by {dg} of their max");
        }
        let bad = Tensor::new(&[0u32, 1, 2, 3, 300], &dev)?;
        let err = logprob_and_sum(&logits, &bad).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        Ok(())
    }
}
