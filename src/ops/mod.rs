//! Fused candle ops with hand-written backward passes.
//!
//! Each op replaces a chain of small candle ops (and the `[rows, cols]` temporaries they
//! materialise) with one row-parallel pass forward and one backward. The CPU kernels are f32
//! only; the public functions fall back to the equivalent plain-op chain on any other dtype or
//! device, so callers need not special-case CUDA or half precision.

mod attn_softmax;
mod bf16_copy;
mod gather;
mod linear;
mod logprob_sum;
mod lookup;
mod nf4;
mod norm;
mod relu;
mod rope;
mod softmax;
mod swiglu;
mod token_logprob;

pub use attn_softmax::{attn_softmax, fused_attention, set_fused_attention};
pub use bf16_copy::{add_grads, bf16_copy, set_narrow_weight_grads};
pub use gather::RowGather;
pub use linear::{column_sums, linear, linear_chain};
pub use logprob_sum::{logprob_and_sum, logprob_sum_serves};
pub use lookup::TableLookup;
pub use nf4::{nf4_dequantize, nf4_linear};
pub use norm::{layer_norm, layer_norm_chain, rms_norm, rms_norm_bwd_ops, rms_norm_chain};
pub use relu::relu;
pub use rope::{rotary, rotary_chain};
pub use softmax::{softmax_last, softmax_last_bwd_ops, softmax_last_chain};
pub use swiglu::{swiglu, swiglu_chain};
pub use token_logprob::{token_logprobs, token_logprobs_chain};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static FUSED_KERNELS: AtomicBool = AtomicBool::new(true);

/// Turns the CPU kernels of this module (and the optimizer's host update) on or off for the
/// whole process. Off, every op takes the plain candle-op path that CUDA and other dtypes
/// take, so that path can be tested against the goldens on the CPU (`tests/plain_ops.rs`);
/// the binary reads `ORPO_FUSED_KERNELS=0` to rule the kernels out when a result looks wrong.
pub fn set_fused_kernels(on: bool) {
    FUSED_KERNELS.store(on, Ordering::Relaxed);
}

/// Whether the CPU kernels are on (see [`set_fused_kernels`]).
pub fn fused_kernels() -> bool {
    FUSED_KERNELS.load(Ordering::Relaxed)
}

static CUDA_KERNELS: AtomicBool = AtomicBool::new(true);

/// Turns the project's own CUDA kernels (`swiglu.cu`, `rms_norm.cu`'s backward,
/// `logprob_sum.cu`, the row gathers' `gather.cu`, the odds term's `odds.cu`, AdamW's
/// `adamw.cu`, the gradient norm's `sum_sq.cu`; not the opt-in `attn_softmax.cu`) on or off for the whole process: off, those take candle ops on CUDA (the
/// path the CPU tests with its kernels off), to tell a kernel's fault from the rest when a
/// device result looks wrong (`ORPO_CUDA_KERNELS=0`). candle's own kernels stay.
pub fn set_cuda_kernels(on: bool) {
    CUDA_KERNELS.store(on, Ordering::Relaxed);
}

/// Whether the project's own CUDA kernels are on (see [`set_cuda_kernels`]).
pub fn cuda_kernels() -> bool {
    CUDA_KERNELS.load(Ordering::Relaxed)
}

/// Whether a fused CPU kernel may take `t`: kernels on, f32, on the CPU.
pub(crate) fn fusable_f32(t: &Tensor) -> bool {
    fused_kernels() && t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu)
}

/// Below this many elements the work is done on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// The contiguous f32 slice behind `storage`/`layout`, or an error naming `op`.
fn f32_slice<'a>(
    op: &str,
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        other => bail!("{op}: {what} must be f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// Contiguous elements of a CPU storage as f32 (bf16 widened exactly), or an error naming `op`.
pub(crate) fn widened_f32(op: &str, s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: inputs must be contiguous");
    };
    Ok(match s {
        CpuStorage::F32(d) => d[a..b].to_vec(),
        CpuStorage::BF16(d) => d[a..b].iter().map(|v| v.to_f32()).collect(),
        other => bail!("{op}: f32 or bf16 expected, got {:?}", other.dtype()),
    })
}

/// f32 results stored in `dtype` (bf16 rounds to nearest even, as CUDA's __float2bfloat16).
pub(crate) fn stored_as(values: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(values),
    }
}

/// The contiguous `T` elements behind a CUDA storage and layout, or an error naming `op`.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    op: &str,
    s: &'a candle_core::CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{op} (CUDA): inputs must be contiguous"),
    }
}

/// Launch shape for a grid-stride kernel over `n` elements (`n > 0`): `threads` a block, at
/// most 2^20 blocks (the loop covers the rest). cudarc's `for_num_elems` takes a `u32` count
/// and gives no block at all for a multiple of 2^32.
#[cfg(feature = "cuda")]
pub(crate) fn grid_stride(
    n: usize,
    threads: u32,
) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, 1 << 20) as u32;
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Splits `out` (items of `item_len` elements) into contiguous runs of whole items and calls
/// `f(first_item, run)` on each, over up to `candle_core::utils::get_num_threads()` scoped
/// threads when there is enough work (`work` elements touched in total).
pub(crate) fn par_items<T, F>(out: &mut [T], item_len: usize, work: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync,
{
    let items = out.len().checked_div(item_len).unwrap_or(0);
    let threads = num_threads().min(items).max(1);
    if threads == 1 || work < PAR_MIN_ELEMS {
        f(0, out);
        return;
    }
    let per = items.div_ceil(threads);
    std::thread::scope(|s| {
        let f = &f;
        let mut chunks = out.chunks_mut(per * item_len).enumerate();
        // Keep the first chunk for this thread.
        let first = chunks.next();
        for (k, chunk) in chunks {
            s.spawn(move || f(k * per, chunk));
        }
        if let Some((_, chunk)) = first {
            f(0, chunk);
        }
    });
}

/// candle's thread count, looked up once (candle re-reads it from the OS on every call).
fn num_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

/// Defines a function whose body is compiled twice, for baseline x86-64 (SSE2, what the crate
/// is built for) and for AVX2, with the AVX2 instance picked at run time. The body must be a
/// plain function of its arguments: an AVX2 wrapper around a *closure* (the old `simd(|| ..)`)
/// leaves the closure uninlined and SSE2. The row helpers below are `#[inline(always)]` so
/// they are compiled into each instance.
macro_rules! simd_fn {
    ($(#[$m:meta])* $v:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])* $v fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn imp($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2($($a: $t),*) $(-> $r)? {
                imp($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { avx2($($a),*) };
            }
            imp($($a),*)
        }
    };
}
pub(crate) use simd_fn;

/// Max of a row (NEG_INFINITY for an empty or fully masked row), 8 independent lanes so the
/// compiler can vectorise it.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    m
}

/// `exp(x)` for `x <= 88` (the callers only pass `x - max <= ~0`): Cephes-style range
/// reduction plus a degree-6 polynomial, branch-free so row loops vectorise (libm's `expf` does
/// not). Max relative error ~2 ulp; `x < -87.3` (including `-inf`) gives exactly 0; NaN stays NaN.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, which then sits in the low mantissa
    // bits (no float-to-int conversion, so the loop stays vectorised on plain SSE2).
    const ROUND: f32 = 12_582_912.0;
    const LO: f32 = -87.3;
    let xc = if x < LO { LO } else { x };
    let xc = if xc > 88.0 { 88.0 } else { xc };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    let y = y * f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let y = if x < LO { 0.0 } else { y };
    // NaN in, NaN out (written as a select so it vectorises).
    #[allow(clippy::eq_op)]
    if x != x {
        x
    } else {
        y
    }
}

/// `sum(a * b)` with 8 independent lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn par_items_covers_every_item_once() {
        for (items, item_len) in [(0, 3), (1, 1 << 16), (7, 1 << 13), (1000, 100)] {
            let mut out = vec![0usize; items * item_len];
            par_items(&mut out, item_len, items * item_len, |first, run| {
                for (k, v) in run.iter_mut().enumerate() {
                    *v += first * item_len + k + 1;
                }
            });
            assert!(out.iter().enumerate().all(|(i, &v)| v == i + 1));
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 1.0 {
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "max rel err {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-100.0), 0.0);
        assert!(exp_nonpos(f32::NAN).is_nan());
    }

    #[test]
    fn lane_helpers_match_naive() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        let y: Vec<f32> = (0..37).map(|i| ((i * 31) % 13) as f32 * 0.5).collect();
        assert_eq!(
            row_max(&x),
            x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        let naive: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot(&x, &y) - naive).abs() < 1e-3);
        assert_eq!(row_max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn non_f32_and_strided_inputs_are_errors_not_panics() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f64, 6., &dev)?.reshape((2, 3))?;
        let err = x.apply_op1_no_bwd(&softmax::SoftmaxLast).unwrap_err();
        assert!(err.to_string().contains("f32"), "{err}");
        let xt = x.to_dtype(candle_core::DType::F32)?.t()?;
        let err = xt.apply_op1_no_bwd(&softmax::SoftmaxLast).unwrap_err();
        assert!(err.to_string().contains("contiguous"), "{err}");
        // The public functions fall back to the plain-op chain instead.
        let y = softmax_last(&x)?;
        assert_eq!(y.dtype(), candle_core::DType::F64);
        let t = Tensor::new(&[0u32, 2], &dev)?;
        let lp = token_logprobs(&x, &t)?;
        assert_eq!(lp.dims(), &[2]);
        // Out-of-range targets are reported.
        let x32 = x.to_dtype(candle_core::DType::F32)?;
        let bad = Tensor::new(&[0u32, 3], &dev)?;
        let err = token_logprobs(&x32, &bad).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        Ok(())
    }
}
