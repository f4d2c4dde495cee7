//! The gradient norm's sums of squares on CUDA with the kernel of `sum_sq.cu` (compiled by
//! `build.rs`): one pass over each f32 or bf16 gradient, partial sums per block in f64.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sum_sq.ptx"));
const MODULE: &str = "orpo_sum_sq";
/// `SUM_SQ_THREADS` in sum_sq.cu.
const THREADS: usize = 256;
/// Elements a thread sums at least before the work is split over more blocks.
const PER_THREAD: usize = 16;
/// At most this many partial sums per tensor (about eight blocks for each of an H100's SMs).
const MAX_BLOCKS: usize = 1024;

/// Partial sums of squares of `g` (f32 or bf16, contiguous, non-empty, on a CUDA device) as an f64
/// vector on its device; their sum is `g`'s sum of squares. Their number depends on the
/// element count only.
pub fn partial_sums(g: &Tensor) -> Result<Tensor> {
    g.apply_op1_no_bwd(&SumSq)
}

fn blocks(n: usize) -> usize {
    n.div_ceil(THREADS * PER_THREAD).clamp(1, MAX_BLOCKS)
}

struct SumSq;

impl CustomOp1 for SumSq {
    fn name(&self) -> &'static str {
        "sum-sq"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("sum-sq runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        if n == 0 {
            bail!("sum-sq (CUDA): empty tensor"); // a launch of no block is an error
        }
        let blocks = blocks(n);
        let dev = s.device().clone();
        let (x32, x16);
        let kernel = match s.dtype() {
            DType::F32 => "sum_sq_f32",
            DType::BF16 => "sum_sq_bf16",
            other => bail!("sum-sq (CUDA): f32 or bf16 expected, got {other:?}"),
        };
        let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel (one per block).
        let mut out = unsafe { dev.alloc::<f64>(blocks)? };
        let mut b = func.builder();
        if s.dtype() == DType::BF16 {
            x16 = crate::ops::cuda_view::<half::bf16>("sum-sq", s, l)?;
            b.arg(&x16);
        } else {
            x32 = crate::ops::cuda_view::<f32>("sum-sq", s, l)?;
            b.arg(&x32);
        }
        b.arg(&n);
        b.arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments as the kernel's signature (x, n, out); `blocks` outputs.
        unsafe { b.launch(cfg) }.w()?;
        Ok((f64::wrap_cuda_slice(out, dev), Shape::from(blocks)))
    }
}
