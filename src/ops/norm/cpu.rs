//! The CPU kernels: row statistics, the normalised rows, and the backward pass's `dx` and
//! `dw`/`db` column sums (f64, added in row order).

use crate::ops::{f32_slice, par_items};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::{Mutex, PoisonError};

/// Per-row `(mean, rstd)`; the mean is 0 for RMS norm.
pub(super) type Stats = Vec<[f32; 2]>;

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
pub(super) fn norm_fwd<const CENTER: bool>(
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
pub(super) fn norm_bwd(
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
pub(super) struct NormBwd<'a> {
    /// Layer norm (subtract the mean) rather than RMS norm.
    pub(super) center: bool,
    pub(super) eps: f64,
    /// The forward pass's per-row statistics; recomputed from `x` when absent.
    pub(super) stats: Option<&'a [[f32; 2]]>,
    /// Which of the gradients for `x`, `w`, `b` to compute (the rest stay 0).
    pub(super) want: [bool; 3],
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
