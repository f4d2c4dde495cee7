//! Layer norm and RMS norm over the last dim as fused ops with a fused backward.
//!
//! Forward: one row-parallel pass computing each row's statistics (f64 accumulation) and the
//! normalised, scaled and shifted output; the per-row `(mean, rstd)` are kept inside the op for
//! the backward pass. Backward: one row-parallel pass writing `dx`, with the `dw`/`db` column
//! sums accumulated per thread in f64 and added up in row order (deterministic for a given
//! thread count). Gradients are only computed for the inputs that take part in the graph.

use super::{f32_slice, par_items};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape};
use candle_core::{Tensor, D};
use std::sync::{Mutex, OnceLock, PoisonError};

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

/// Per-row `(mean, rstd)`; the mean is 0 for RMS norm.
type Stats = Vec<[f32; 2]>;

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

#[cfg(feature = "cuda")]
mod cuda {
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
}

/// Rows and columns of a `[..., d]` input whose parameters have `d` elements.
fn rows_cols(op: &str, l: &Layout, params: &[usize]) -> Result<(usize, usize)> {
    let Some(&cols) = l.shape().dims().last() else {
        bail!("{op}: expected at least one dim");
    };
    if cols == 0 {
        bail!("{op}: empty last dim");
    }
    if let Some(p) = params.iter().find(|&&p| p != cols) {
        bail!("{op}: parameter of {p} elements for a last dim of {cols}");
    }
    Ok((l.shape().elem_count() / cols, cols))
}

/// [`par_items`] over rows of `cols` elements, returning each run's `f(first_row, run)` in row
/// order.
fn par_rows<R, F>(out: &mut [f32], cols: usize, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize, &mut [f32]) -> R + Sync,
{
    let results = Mutex::new(Vec::new());
    let work = out.len();
    par_items(out, cols, work, |row0, run| {
        let r = f(row0, run);
        results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((row0, r));
    });
    let mut results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    results.sort_by_key(|&(row0, _)| row0);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Forward over all rows: the output and the per-row statistics.
fn norm_fwd<const CENTER: bool>(
    op: &str,
    x: &[f32],
    l: &Layout,
    w: &[f32],
    b: Option<&[f32]>,
    eps: f64,
) -> Result<(Vec<f32>, Stats)> {
    let (rows, cols) = rows_cols(op, l, &[w.len(), b.map_or(w.len(), <[f32]>::len)])?;
    let mut y = vec![0f32; x.len()];
    let fwd = FwdRows { x, w, b, eps, cols };
    let runs = par_rows(&mut y, cols, |row0, out| fwd.run::<CENTER>(row0, out));
    let stats: Stats = runs.into_iter().flatten().collect();
    debug_assert_eq!(stats.len(), rows);
    Ok((y, stats))
}

/// The forward kernel's inputs; [`FwdRows::run`] does a run of rows.
struct FwdRows<'a> {
    x: &'a [f32],
    w: &'a [f32],
    b: Option<&'a [f32]>,
    eps: f64,
    cols: usize,
}

impl FwdRows<'_> {
    /// Writes the output rows `out` (from row `row0` on) and returns their statistics, using
    /// the AVX2 instance when the CPU has it.
    fn run<const CENTER: bool>(&self, row0: usize, out: &mut [f32]) -> Stats {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { self.rows_avx2::<CENTER>(row0, out) };
            }
        }
        self.rows::<CENTER>(row0, out)
    }

    /// [`Self::rows`] compiled for AVX2. (`ops::simd` does not do here: the row-run closures
    /// it is given are not inlined into its AVX2 instance, so they would stay SSE2.)
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn rows_avx2<const CENTER: bool>(&self, row0: usize, out: &mut [f32]) -> Stats {
        self.rows::<CENTER>(row0, out)
    }

    #[inline(always)]
    fn rows<const CENTER: bool>(&self, row0: usize, out: &mut [f32]) -> Stats {
        let cols = self.cols;
        let src = &self.x[row0 * cols..row0 * cols + out.len()];
        let mut stats = Vec::with_capacity(out.len() / cols);
        for (xr, yr) in src.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            let st = row_stats::<CENTER>(xr, self.eps);
            fwd_row(xr, self.w, self.b, st, yr);
            stats.push(st);
        }
        stats
    }
}

/// `(mean, 1 / sqrt(var + eps))` of a row, accumulated in f64; with `CENTER == false` the mean
/// is taken as 0 (RMS norm: `var` is then the mean square).
#[inline(always)]
fn row_stats<const CENTER: bool>(x: &[f32], eps: f64) -> [f32; 2] {
    let n = x.len() as f64;
    let mean = if CENTER {
        let mut acc = [0f64; 8];
        let mut c = x.chunks_exact(8);
        for xs in &mut c {
            for k in 0..8 {
                acc[k] += xs[k] as f64;
            }
        }
        let s: f64 = acc.iter().sum::<f64>() + c.remainder().iter().map(|&v| v as f64).sum::<f64>();
        s / n
    } else {
        0.0
    };
    let mut acc = [0f64; 8];
    let mut c = x.chunks_exact(8);
    for xs in &mut c {
        for k in 0..8 {
            let d = xs[k] as f64 - mean;
            acc[k] += d * d;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &v in c.remainder() {
        let d = v as f64 - mean;
        s += d * d;
    }
    let rstd = 1.0 / (s / n + eps).sqrt();
    [mean as f32, rstd as f32]
}

/// `y = (x - mean) * rstd * w (+ b)` for one row.
#[inline(always)]
fn fwd_row(x: &[f32], w: &[f32], b: Option<&[f32]>, [mean, rstd]: [f32; 2], y: &mut [f32]) {
    match b {
        Some(b) => {
            for (((yv, &xv), &wv), &bv) in y.iter_mut().zip(x).zip(w).zip(b) {
                *yv = (xv - mean) * rstd * wv + bv;
            }
        }
        None => {
            for ((yv, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
                *yv = (xv - mean) * rstd * wv;
            }
        }
    }
}

/// Runs [`NormBwd`] and splits its packed output into the gradients for `x`, `w` and `b`
/// (`None` where not wanted).
fn norm_bwd(
    op: &NormBwd,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad_res: &Tensor,
) -> Result<[Option<Tensor>; 3]> {
    // x and w are the op's own contiguous inputs; the incoming gradient may be strided.
    let g = grad_res.contiguous()?;
    let packed = x.apply_op3_no_bwd(w, &g, op)?;
    let (n, cols) = (x.elem_count(), w.elem_count());
    let [want_x, want_w, want_b] = op.want;
    let dx = if want_x {
        Some(packed.narrow(0, 0, n)?.reshape(x.shape())?)
    } else {
        None
    };
    let dw = if want_w {
        Some(packed.narrow(0, n, cols)?.reshape(w.shape())?)
    } else {
        None
    };
    let db = match b {
        Some(b) if want_b => Some(packed.narrow(0, n + cols, cols)?.reshape(b.shape())?),
        _ => None,
    };
    Ok([dx, dw, db])
}

/// Backward of both norms from `(x, w, g)`, written as one packed 1-d buffer
/// `[dx (x's elements), dw (d), db (d, layer norm only)]`:
///
/// `xhat = (x - mean) * rstd`, `gy = g * w`,
/// `dx = rstd * (gy - mean(gy) - xhat * mean(gy * xhat))` (no `mean(gy)` term for RMS norm),
/// `dw = sum over rows of g * xhat`, `db = sum over rows of g`.
struct NormBwd<'a> {
    /// Layer norm (subtract the mean) rather than RMS norm.
    center: bool,
    eps: f64,
    /// The forward pass's per-row statistics; recomputed from `x` when absent.
    stats: Option<&'a [[f32; 2]]>,
    /// Which of the gradients for `x`, `w`, `b` to compute (the rest stay 0).
    want: [bool; 3],
}

impl CustomOp3 for NormBwd<'_> {
    fn name(&self) -> &'static str {
        if self.center {
            "layer-norm-fused-bwd"
        } else {
            "rms-norm-fused-bwd"
        }
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
        let x = f32_slice(self.name(), "input", s1, l1)?;
        let w = f32_slice(self.name(), "weight", s2, l2)?;
        let g = f32_slice(self.name(), "gradient", s3, l3)?;
        let (rows, cols) = rows_cols(self.name(), l1, &[w.len()])?;
        if g.len() != x.len() {
            bail!(
                "{}: gradient of {} elements for an input of {}",
                self.name(),
                g.len(),
                x.len()
            );
        }
        let stats = self.stats.filter(|s| s.len() == rows);
        let [want_x, want_w, want_b] = self.want;
        let want_b = want_b && self.center;
        let n_params = if self.center { 2 } else { 1 };
        let mut out = vec![0f32; x.len() + n_params * cols];
        let (dx, dparams) = out.split_at_mut(x.len());
        // Per run of rows: f64 partial sums of dw and db.
        let bwd = BwdRows {
            x,
            w,
            g,
            stats,
            eps: self.eps,
            cols,
            want: [want_x, want_w, want_b],
        };
        let partials = par_rows(dx, cols, |row0, run| {
            if self.center {
                bwd.run::<true>(row0, run)
            } else {
                bwd.run::<false>(row0, run)
            }
        });
        if want_w || want_b {
            let mut sum_w = vec![0f64; if want_w { cols } else { 0 }];
            let mut sum_b = vec![0f64; if want_b { cols } else { 0 }];
            for (pw, pb) in &partials {
                for (s, p) in sum_w.iter_mut().zip(pw).chain(sum_b.iter_mut().zip(pb)) {
                    *s += p;
                }
            }
            let (dw, db) = dparams.split_at_mut(cols);
            for (d, s) in dw.iter_mut().zip(&sum_w).chain(db.iter_mut().zip(&sum_b)) {
                *d = *s as f32;
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// The backward kernel's inputs; [`BwdRows::run`] does a run of rows.
struct BwdRows<'a> {
    x: &'a [f32],
    w: &'a [f32],
    g: &'a [f32],
    /// Per-row statistics (recomputed from `x` when absent).
    stats: Option<&'a [[f32; 2]]>,
    eps: f64,
    cols: usize,
    /// Whether to compute `dx`, `dw`, `db`.
    want: [bool; 3],
}

impl BwdRows<'_> {
    /// Writes the `dx` rows `run` (from row `row0` on) and returns these rows' f64 partial sums
    /// of `dw` and `db` (empty where not wanted), using the AVX2 instance when the CPU has it.
    fn run<const CENTER: bool>(&self, row0: usize, run: &mut [f32]) -> (Vec<f64>, Vec<f64>) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { self.rows_avx2::<CENTER>(row0, run) };
            }
        }
        self.rows::<CENTER>(row0, run)
    }

    /// [`Self::rows`] compiled for AVX2 (see [`FwdRows::rows_avx2`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn rows_avx2<const CENTER: bool>(&self, row0: usize, run: &mut [f32]) -> (Vec<f64>, Vec<f64>) {
        self.rows::<CENTER>(row0, run)
    }

    #[inline(always)]
    fn rows<const CENTER: bool>(&self, row0: usize, run: &mut [f32]) -> (Vec<f64>, Vec<f64>) {
        let cols = self.cols;
        let [want_x, want_w, want_b] = self.want;
        let mut acc_w = vec![0f64; if want_w { cols } else { 0 }];
        let mut acc_b = vec![0f64; if want_b { cols } else { 0 }];
        for (k, dr) in run.chunks_exact_mut(cols).enumerate() {
            let i = row0 + k;
            let xr = &self.x[i * cols..(i + 1) * cols];
            let gr = &self.g[i * cols..(i + 1) * cols];
            let st = match self.stats {
                Some(s) => s[i],
                None => row_stats::<CENTER>(xr, self.eps),
            };
            let dx = want_x.then_some(&mut *dr);
            let dw = want_w.then_some(acc_w.as_mut_slice());
            let db = want_b.then_some(acc_b.as_mut_slice());
            bwd_row::<CENTER>(xr, self.w, gr, st, dx, dw, db);
        }
        (acc_w, acc_b)
    }
}

/// One row of the backward pass: writes `dx` and adds this row's terms to the `dw`/`db`
/// accumulators (each only when given).
#[inline(always)]
fn bwd_row<const CENTER: bool>(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    [mean, rstd]: [f32; 2],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f64]>,
    db: Option<&mut [f64]>,
) {
    if let Some(dw) = dw {
        for ((a, &xv), &gv) in dw.iter_mut().zip(x).zip(g) {
            *a += (gv * ((xv - mean) * rstd)) as f64;
        }
    }
    if let Some(db) = db {
        for (a, &gv) in db.iter_mut().zip(g) {
            *a += gv as f64;
        }
    }
    let Some(dx) = dx else {
        return;
    };
    // sum(gy) and sum(gy * xhat), 8 f64 lanes.
    let (mut acc_g, mut acc_gx) = ([0f64; 8], [0f64; 8]);
    let mut xc = x.chunks_exact(8);
    let mut wc = w.chunks_exact(8);
    let mut gc = g.chunks_exact(8);
    for ((xs, ws), gs) in (&mut xc).zip(&mut wc).zip(&mut gc) {
        for k in 0..8 {
            let gy = gs[k] * ws[k];
            let xh = (xs[k] - mean) * rstd;
            if CENTER {
                acc_g[k] += gy as f64;
            }
            acc_gx[k] += (gy * xh) as f64;
        }
    }
    let mut s_g: f64 = acc_g.iter().sum();
    let mut s_gx: f64 = acc_gx.iter().sum();
    for ((&xv, &wv), &gv) in xc
        .remainder()
        .iter()
        .zip(wc.remainder())
        .zip(gc.remainder())
    {
        let gy = gv * wv;
        if CENTER {
            s_g += gy as f64;
        }
        s_gx += (gy * ((xv - mean) * rstd)) as f64;
    }
    let n = x.len() as f64;
    let (a, c) = ((s_g / n) as f32, (s_gx / n) as f32);
    for (((d, &xv), &wv), &gv) in dx.iter_mut().zip(x).zip(w).zip(g) {
        let xh = (xv - mean) * rstd;
        *d = rstd * (gv * wv - a - xh * c);
    }
}
