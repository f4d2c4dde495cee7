//! Softmax over the last dim as one fused op with a fused backward.

use super::{dot, exp_nonpos, f32_slice, par_items, row_max, simd_fn};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape};
use candle_core::{Tensor, D};

/// Softmax over the last dim, numerically stable (row max shift).
///
/// Rows may contain `-inf` (masked) entries; they get probability 0 and gradient 0. A row that
/// is entirely `-inf` yields all zeros (and zero gradient) rather than NaN.
///
/// f32 tensors on the CPU and on CUDA run one fused op (any layout: a non-contiguous input
/// is copied first): forward, the CPU kernel here or candle's CUDA softmax kernel; backward,
/// the CPU kernel with the CPU kernels on, else [`softmax_last_bwd_ops`] (so with the CPU
/// kernels off the CPU takes CUDA's backward). candle's CUDA kernel gives NaN on a row that is
/// entirely `-inf`: callers mask with finite values (see `layers::AttnBias`). Other dtypes
/// and devices fall back to [`softmax_last_chain`].
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("softmax_last: expected at least one dim, got a scalar");
    }
    let device_op = x.dtype() == DType::F32 && (x.device().is_cpu() || x.device().is_cuda());
    if !device_op {
        return softmax_last_chain(x);
    }
    x.contiguous()?.apply_op1(SoftmaxLast)
}

/// Softmax's backward `dx = y * (g - rowsum(y * g))` in candle ops, for any device. The row
/// sums and their broadcast back are matrix products with a ones vector: on a GPU candle's
/// row reduction and broadcasting kernels run these shapes several times slower than cuBLAS.
pub fn softmax_last_bwd_ops(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let shape = y.shape().clone();
    let cols = y.dim(D::Minus1)?;
    let rows = shape.elem_count() / cols.max(1);
    let y = y.contiguous()?.reshape((rows, cols))?;
    let yg = (&y * g.contiguous()?.reshape((rows, cols))?)?;
    let column = Tensor::ones((cols, 1), y.dtype(), y.device())?;
    let row = Tensor::ones((1, cols), y.dtype(), y.device())?;
    let sums = yg.matmul(&column)?.matmul(&row)?; // [rows, cols]: each row's sum
    (yg - (y * sums)?)?.reshape(shape)
}

/// The plain candle-op formulation: reference and fallback (CUDA, other dtypes). A fully
/// masked row gives zeros, as the fused kernel: a NaN there would reach every row through
/// the next layer's keys (`NaN + -inf` is NaN, so masking does not stop it).
pub fn softmax_last_chain(x: &Tensor) -> Result<Tensor> {
    // A finite shift keeps `-inf - max` at -inf (exp 0) for an all `-inf` row; other rows'
    // maxima are finite and unchanged.
    let m = x
        .max_keepdim(D::Minus1)?
        .detach()
        .clamp(f32::MIN as f64, f32::MAX as f64)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    // A row's sum is >= 1 (its maximum gives exp(0)) unless the row is fully masked (0): add
    // 1 there, as a constant, so the row divides to zeros with a zero (not 0/0) gradient
    // and every other row's arithmetic and gradient is untouched (a clamp would halve the
    // gradient of a single-key row, whose sum is exactly 1).
    let sum = e.sum_keepdim(D::Minus1)?;
    let empty = sum.detach().eq(0f64)?.to_dtype(sum.dtype())?;
    e.broadcast_div(&(sum + empty)?)
}

pub(super) struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "softmax-last-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), "input", storage, layout)?;
        let shape = layout.shape().clone();
        let cols = match shape.dims().last() {
            Some(&c) => c,
            None => bail!("{}: expected at least one dim", self.name()),
        };
        let mut y = vec![0f32; x.len()];
        if cols > 0 {
            par_items(&mut y, cols, x.len(), |row0, out| {
                softmax_rows(&x[row0 * cols..row0 * cols + out.len()], out, cols);
            });
        }
        Ok((CpuStorage::F32(y), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_last(storage, layout)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if !super::fusable_f32(res) {
            return Ok(Some(softmax_last_bwd_ops(res, grad_res)?));
        }
        // res is our own (contiguous) output; the incoming gradient may be strided.
        let g = grad_res.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&g, &SoftmaxLastBwd)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{kernels, WrapErr};
    use candle_core::{bail, CudaStorage, Layout, Result, Shape};

    /// candle's f32 softmax kernel (candle-nn's `softmax_last_dim`): one warp per row. The
    /// kernel indexes with a 32-bit `int` (`row * ncols + col`), so it runs over chunks of at
    /// most `i32::MAX` elements: long-context scores (`[n, h, l, l]` past 2^31 elements at
    /// 8 pairs of 2,048+ tokens) would otherwise read and write outside the buffers.
    pub fn softmax_last(storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = storage.device();
        let src = storage.as_cuda_slice::<f32>()?;
        let src = match layout.contiguous_offsets() {
            Some((a, b)) => src.slice(a..b),
            None => bail!("softmax-last-fused: the input must be contiguous"),
        };
        let shape = layout.shape().clone();
        let el = shape.elem_count();
        let cols = shape.dims().last().copied().unwrap_or(1).max(1);
        let rows = el / cols;
        if cols > i32::MAX as usize {
            bail!("softmax-last-fused: rows of {cols} elements are past the kernel's 32-bit index");
        }
        let func = dev.get_or_load_func("softmax_f32", &kernels::REDUCE)?;
        // SAFETY: every element is written by the kernel (no launch only when el == 0).
        let mut dst = unsafe { dev.alloc::<f32>(el)? };
        let chunk_rows = (i32::MAX as usize / cols).max(1);
        let ncols = cols as i32;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = rows.min(r0 + chunk_rows);
            let (a, b) = (r0 * cols, r1 * cols);
            let cfg = LaunchConfig {
                grid_dim: ((r1 - r0) as u32, 1, 1),
                block_dim: (1, 32, 1),
                shared_mem_bytes: 0,
            };
            let src_chunk = src.slice(a..b);
            let mut dst_chunk = dst.slice_mut(a..b);
            let mut builder = func.builder();
            builder.arg(&src_chunk);
            builder.arg(&mut dst_chunk);
            builder.arg(&ncols);
            // SAFETY: arguments as the kernel's signature (src, dst, ncols); each chunk holds
            // at most i32::MAX elements.
            unsafe { builder.launch(cfg) }.w()?;
            r0 = r1;
        }
        Ok((CudaStorage::wrap_cuda_slice(dst, dev.clone()), shape))
    }
}

simd_fn! {
    /// [`softmax_row`] over consecutive rows of `cols`.
    fn softmax_rows(x: &[f32], y: &mut [f32], cols: usize) {
        for (xr, yr) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
            softmax_row(xr, yr);
        }
    }
}

/// `y = softmax(x)` for one row; all zeros when the row has no finite-or-+inf entry.
#[inline(always)]
fn softmax_row(x: &[f32], y: &mut [f32]) {
    let m = row_max(x);
    if m == f32::NEG_INFINITY {
        y.fill(0.0);
        return;
    }
    let mut acc = [0f32; 8];
    let mut xc = x.chunks_exact(8);
    let mut yc = y.chunks_exact_mut(8);
    for (xs, ys) in (&mut xc).zip(&mut yc) {
        for k in 0..8 {
            let e = exp_nonpos(xs[k] - m);
            ys[k] = e;
            acc[k] += e;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (xv, yv) in xc.remainder().iter().zip(yc.into_remainder()) {
        let e = exp_nonpos(xv - m);
        *yv = e;
        s += e;
    }
    let inv = 1.0 / s;
    for v in y.iter_mut() {
        *v *= inv;
    }
}

/// `dx = y * (g - sum(g * y))` row by row, from the forward output `y` and the gradient `g`.
struct SoftmaxLastBwd;

impl CustomOp2 for SoftmaxLastBwd {
    fn name(&self) -> &'static str {
        "softmax-last-fused-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(self.name(), "output", s1, l1)?;
        let g = f32_slice(self.name(), "gradient", s2, l2)?;
        if l1.shape() != l2.shape() {
            bail!(
                "{}: shape mismatch {:?} vs {:?}",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let shape = l1.shape().clone();
        let cols = shape.dims().last().copied().unwrap_or(1);
        let mut dx = vec![0f32; y.len()];
        if cols > 0 {
            par_items(&mut dx, cols, y.len(), |row0, out| {
                let range = row0 * cols..row0 * cols + out.len();
                softmax_bwd_rows(&y[range.clone()], &g[range], out, cols);
            });
        }
        Ok((CpuStorage::F32(dx), shape))
    }
}

simd_fn! {
    /// `dx = y * (g - sum(g * y))` over consecutive rows of `cols`.
    fn softmax_bwd_rows(y: &[f32], g: &[f32], dx: &mut [f32], cols: usize) {
        for ((yr, gr), dr) in y
            .chunks_exact(cols)
            .zip(g.chunks_exact(cols))
            .zip(dx.chunks_exact_mut(cols))
        {
            let s = dot(yr, gr);
            for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                // y == 0 at masked entries, so their gradient is exactly 0.
                *d = yv * (gv - s);
            }
        }
    }
}
