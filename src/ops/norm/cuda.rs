//! RMS norm on CUDA: candle's `rmsnorm` kernel forward, our `rms_norm.cu` backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{kernels, WrapErr};
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape};
use candle_core::{Tensor, D};

fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    crate::ops::cuda_view("rms-norm", s, l)
}

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
const MODULE: &str = "orpo_rms_norm";

/// One block per row of `cols`: 32 threads below 1024 columns, else 1024 (as candle's
/// `rmsnorm` kernel is launched).
fn row_blocks(rows: usize, cols: usize) -> (LaunchConfig, u32) {
    let block = if cols < 1024 { 32 } else { 1024 };
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, block)
}

/// `(dx, dw)` with `rms_norm.cu`'s kernel: `dx` and the rows of `g * xhat` in one pass,
/// then `dw` as their column sums, a product with ones (`with_w` only).
pub fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    with_w: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let cols = x.dim(D::Minus1)?;
    let rows = x.elem_count() / cols.max(1);
    let g = g.contiguous()?;
    let both = x.apply_op3_no_bwd(w, &g, &Bwd { eps, with_w })?;
    let n = x.elem_count();
    let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = with_w
        .then(|| {
            let ones = Tensor::ones((1, rows), DType::F32, x.device())?;
            ones.matmul(&both.narrow(0, n, n)?.reshape((rows, cols))?)?
                .reshape(w.shape())
        })
        .transpose()?;
    Ok((dx, dw))
}

/// `(x, w, g) -> [dx, g * xhat (with_w only)]`, flat.
struct Bwd {
    eps: f64,
    with_w: bool,
}

impl CustomOp3 for Bwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("rms-norm-bwd runs on CUDA only (the CPU has its own kernel)")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = xl.shape().elem_count();
        let cols = xl.shape().dims().last().copied().unwrap_or(1).max(1);
        if n > i32::MAX as usize || gl.shape().elem_count() != n {
            bail!(
                "rms-norm-bwd (CUDA): {:?} with a gradient of {:?}",
                xl.shape(),
                gl.shape()
            );
        }
        let (xv, wv, gv) = (view(x, xl)?, view(w, wl)?, view(g, gl)?);
        let outputs = if self.with_w { 2 * n } else { n };
        // SAFETY: every element is written by the kernel.
        let mut out = unsafe { dev.alloc::<f32>(outputs)? };
        let func = dev.get_or_load_custom_func("rms_norm_bwd_f32", MODULE, PTX)?;
        let (cfg, _) = row_blocks(n / cols, cols);
        let (cols, eps) = (cols as i32, self.eps as f32);
        // The kernel skips `g * xhat` given a null pointer.
        let null = 0u64;
        {
            let (mut dx, mut gxhat) = out.split_at_mut(n);
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(&wv);
            b.arg(&gv);
            b.arg(&mut dx);
            if self.with_w {
                b.arg(&mut gxhat);
            } else {
                b.arg(&null);
            }
            b.arg(&cols);
            b.arg(&eps);
            // SAFETY: arguments as the kernel's signature (x, w, g, dx, gxhat, cols, eps).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(outputs)))
    }
}

/// candle's `rmsnorm_f32` kernel (candle-nn's `rms_norm`): one block per row, f32 sums.
pub fn rms_norm(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let shape = xl.shape().clone();
    let el = shape.elem_count();
    let cols = shape.dims().last().copied().unwrap_or(1).max(1);
    if el > i32::MAX as usize || wl.shape().elem_count() != cols {
        bail!(
            "rms-norm (CUDA): {shape:?} with a weight of {:?}",
            wl.shape()
        );
    }
    let (src, alpha) = (view(x, xl)?, view(w, wl)?);
    let (cfg, block) = row_blocks(el / cols, cols);
    let func = dev.get_or_load_func("rmsnorm_f32", &kernels::REDUCE)?;
    // SAFETY: every element is written by the kernel.
    let dst = unsafe { dev.alloc::<f32>(el)? };
    let mut builder = func.builder();
    builder.arg(&src);
    builder.arg(&dst);
    builder.arg(&alpha);
    let (cols, block, eps) = (cols as i32, block as i32, eps as f32);
    builder.arg(&cols);
    builder.arg(&block);
    builder.arg(&eps);
    // SAFETY: arguments as the kernel's signature (src, dst, alpha, ncols, block_size, eps).
    unsafe { builder.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
}
