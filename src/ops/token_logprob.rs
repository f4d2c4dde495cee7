//! `log softmax(logits)[target]` per row as one fused op with a fused backward.

use super::{exp_nonpos, f32_slice, par_items, row_max, simd_fn};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
use candle_core::{Tensor, D};
use std::sync::OnceLock;

/// `logits[i, t_i] - logsumexp(logits[i, :])` for every row.
///
/// `logits`: `[..., v]` float, `targets`: `[...]` (the same leading dims) of an integer dtype
/// (u32 natively; other integer dtypes are converted). Returns `[...]` in the logits' dtype.
/// Backward (logits only): `g_i * (onehot(t_i) - softmax(logits_i))`, written straight into
/// one `[..., v]` buffer; rows whose incoming gradient is 0 cost no `exp`.
///
/// f32 logits on the CPU use the fused kernel; other dtypes/devices fall back to
/// [`token_logprobs_chain`]. A target `>= v` is an error.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let dims = logits.dims();
    if dims.is_empty() || targets.dims() != &dims[..dims.len() - 1] {
        bail!(
            "token_logprobs: logits {:?} need targets of shape {:?}, got {:?}",
            logits.shape(),
            dims.get(..dims.len().saturating_sub(1)).unwrap_or(&[]),
            targets.shape()
        );
    }
    if !targets.dtype().is_int() {
        bail!(
            "token_logprobs: targets must be integers, got {:?}",
            targets.dtype()
        );
    }
    if !super::fusable_f32(logits) {
        return token_logprobs_chain(logits, targets);
    }
    let targets = if targets.dtype() == DType::U32 {
        targets.contiguous()?
    } else {
        targets.to_dtype(DType::U32)?
    };
    logits.contiguous()?.apply_op2(
        &targets,
        TokenLogprobs {
            lse: OnceLock::new(),
        },
    )
}

/// The plain candle-op formulation (as in `train::forward`): max-shifted logsumexp minus the
/// gathered target logit. Reference and fallback; out-of-range targets are not checked here.
pub fn token_logprobs_chain(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let rows = logits.elem_count() / v.max(1);
    let out_shape = targets.shape().clone();
    let logits = logits.reshape((rows, v))?;
    let targets = targets.reshape(rows)?;
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let lse = logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&m)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?;
    (picked - lse)?.reshape(out_shape)
}

struct TokenLogprobs {
    /// Per-row logsumexp from the forward pass, reused by the backward pass.
    lse: OnceLock<Vec<f32>>,
}

/// Validated `usize` targets for `rows` rows over a vocabulary of `v`.
fn targets_of(op: &str, s: &CpuStorage, l: &Layout, rows: usize, v: usize) -> Result<Vec<usize>> {
    let t = match s {
        CpuStorage::U32(d) => d.as_slice(),
        other => bail!("{op}: targets must be u32, got {:?}", other.dtype()),
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: targets must be contiguous");
    };
    let t = &t[a..b];
    if t.len() != rows {
        bail!("{op}: {} targets for {rows} rows", t.len());
    }
    t.iter()
        .enumerate()
        .map(|(i, &t)| {
            let t = t as usize;
            if t >= v {
                bail!("{op}: target {t} at row {i} is out of range for vocabulary {v}");
            }
            Ok(t)
        })
        .collect()
}

/// Rows and vocabulary size of a `[..., v]` layout.
fn rows_cols(op: &str, l: &Layout) -> Result<(usize, usize)> {
    let Some(&v) = l.shape().dims().last() else {
        bail!("{op}: logits need at least one dim");
    };
    if v == 0 {
        bail!("{op}: empty vocabulary");
    }
    Ok((l.shape().elem_count() / v, v))
}

simd_fn! {
    /// `(log-prob of the target, logsumexp)` for consecutive rows of `v` logits.
    fn lp_rows(x: &[f32], t: &[usize], out: &mut [[f32; 2]], v: usize) {
        for ((xr, &ti), o) in x.chunks_exact(v).zip(t).zip(out) {
            let lse = row_lse(xr);
            *o = [xr[ti] - lse, lse];
        }
    }
}

simd_fn! {
    /// `dx[i, :] = g_i * (onehot(t_i) - exp(x[i, :] - lse_i))` for consecutive rows of `v`;
    /// rows with `g_i == 0` are left as they are (zeros).
    fn bwd_rows(x: &[f32], t: &[usize], g: &[f32], lse: Option<&[f32]>, dx: &mut [f32], v: usize) {
        for (i, (xr, dr)) in x.chunks_exact(v).zip(dx.chunks_exact_mut(v)).enumerate() {
            let gi = g[i];
            if gi == 0.0 {
                continue;
            }
            let lse_i = match lse {
                Some(l) => l[i],
                None => row_lse(xr),
            };
            let ng = -gi;
            for (d, &xv) in dr.iter_mut().zip(xr) {
                *d = ng * exp_nonpos(xv - lse_i);
            }
            dr[t[i]] += gi;
        }
    }
}

/// `logsumexp` of one row: max shift, f32 lanes within blocks, f64 across blocks.
#[inline(always)]
fn row_lse(x: &[f32]) -> f32 {
    let m = row_max(x);
    if !m.is_finite() {
        // All -inf gives -inf; +inf or NaN propagate as NaN like the chain does.
        return if m == f32::NEG_INFINITY { m } else { f32::NAN };
    }
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; 8];
        let mut c = block.chunks_exact(8);
        for xs in &mut c {
            for k in 0..8 {
                acc[k] += exp_nonpos(xs[k] - m);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for &xv in c.remainder() {
            s += exp_nonpos(xv - m);
        }
        total += s as f64;
    }
    m + (total.ln() as f32)
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token-logprobs-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), "logits", s1, l1)?;
        let (rows, v) = rows_cols(self.name(), l1)?;
        let t = targets_of(self.name(), s2, l2, rows, v)?;
        // (log-prob, lse) per row.
        let mut out = vec![[0f32; 2]; rows];
        par_items(&mut out, 1, x.len(), |row0, run| {
            let rows = row0..row0 + run.len();
            lp_rows(&x[rows.start * v..rows.end * v], &t[rows], run, v);
        });
        let lse = out.iter().map(|o| o[1]).collect();
        // A fresh op struct is made per call, so the first (only) forward owns the stash.
        let _ = self.lse.set(lse);
        let lp = out.iter().map(|o| o[0]).collect();
        let shape = Shape::from(&l1.shape().dims()[..l1.shape().rank() - 1]);
        Ok((CpuStorage::F32(lp), shape))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let op = TokenLogprobsBwd {
            lse: self.lse.get().map(Vec::as_slice),
        };
        Ok((Some(logits.apply_op3_no_bwd(targets, &g, &op)?), None))
    }
}

/// `dx[i, :] = g_i * (onehot(t_i) - exp(x[i, :] - lse_i))`.
struct TokenLogprobsBwd<'a> {
    /// The forward pass's per-row logsumexp; recomputed from the logits when absent.
    lse: Option<&'a [f32]>,
}

impl CustomOp3 for TokenLogprobsBwd<'_> {
    fn name(&self) -> &'static str {
        "token-logprobs-fused-bwd"
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
        let x = f32_slice(self.name(), "logits", s1, l1)?;
        let (rows, v) = rows_cols(self.name(), l1)?;
        let t = targets_of(self.name(), s2, l2, rows, v)?;
        let g = f32_slice(self.name(), "gradient", s3, l3)?;
        if g.len() != rows {
            bail!("{}: {} gradients for {rows} rows", self.name(), g.len());
        }
        let lse = self.lse.filter(|l| l.len() == rows);
        let mut dx = vec![0f32; x.len()];
        par_items(&mut dx, v, x.len(), |row0, run| {
            let rows = row0..row0 + run.len() / v;
            let lse = lse.map(|l| &l[rows.clone()]);
            let x = &x[rows.start * v..rows.end * v];
            bwd_rows(x, &t[rows.clone()], &g[rows], lse, run, v);
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
