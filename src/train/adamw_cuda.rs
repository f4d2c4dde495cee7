//! AdamW's update on CUDA with the kernel of `adamw.cu` (compiled by `build.rs`): one pass
//! over the flat f32 parameter and moments and the f32 or bf16 gradient, in place.

use super::optim::Coefs;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    bail, CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Result, Storage, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
const MODULE: &str = "orpo_adamw";

/// Updates `p` and its moments `m`, `v` (all f32, contiguous, on one CUDA device) from `g`
/// (f32 or bf16).
pub fn update(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, c: Coefs) -> Result<()> {
    if p.elem_count() == 0 {
        return Ok(()); // nothing to update, and a launch of no block is an error
    }
    if ![g, m, v].iter().all(|t| t.device().same_device(p.device())) {
        bail!("adamw (CUDA): parameter, gradient and moments on different devices");
    }
    let g = g.contiguous()?;
    // The op locks p and g, then the moments: a moment sharing storage with either would
    // wait on itself, and the kernel assumes four separate buffers.
    let buffers = [p, &g, m, v].map(storage_addr);
    for (i, a) in buffers.iter().enumerate() {
        if buffers[..i].contains(a) {
            bail!("adamw (CUDA): parameter, gradient and moments must not share storage");
        }
    }
    p.inplace_op2(&g, &Step { m, v, c })
}

/// Identifies a tensor's storage (the address of its device buffer's handle), taking and
/// releasing its lock.
fn storage_addr(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    std::ptr::from_ref(&*s).addr()
}

fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("adamw (CUDA): the {what} must be contiguous"),
    }
}

/// The `n` moments behind a CUDA f32 tensor's storage and layout.
fn moment_view<'a>(s: &'a Storage, l: &Layout, n: usize) -> Result<CudaView<'a, f32>> {
    let (a, b) = offsets(l, "moment")?;
    if b - a != n {
        bail!("adamw (CUDA): parameter and moment sizes differ");
    }
    let Storage::Cuda(s) = s else {
        bail!("adamw (CUDA): the moments must be on the GPU");
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// `m, v = beta m + (1 - beta) g', beta2 v + (1 - beta2) g'^2` (`g' = g * grad_scale`), then
/// `p = p * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps)`: on `p` (the op's destination)
/// and `g` (its source), writing the moments it holds, as the CPU update (`HostUpdate`) does.
struct Step<'a> {
    m: &'a Tensor,
    v: &'a Tensor,
    c: Coefs,
}

impl InplaceOp2 for Step<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("adamw-step runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let ((d0, d1), (s0, s1)) = (offsets(dst_l, "parameter")?, offsets(src_l, "gradient")?);
        let n = d1 - d0;
        if s1 - s0 != n {
            bail!("adamw (CUDA): parameter and gradient sizes differ");
        }
        // The moments are written through views candle lends for reading: candle's in-place
        // ops write one tensor, and the moments are the optimizer's own (nothing else holds
        // them), on the one stream every tensor uses, so cudarc's read/write bookkeeping
        // (off by default, see device.rs) has nothing to order.
        let (ms, ml) = self.m.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (m, v) = (moment_view(&ms, ml, n)?, moment_view(&vs, vl, n)?);
        let c = self.c;
        let kernel = match src.dtype() {
            DType::F32 => "adamw_step",
            DType::BF16 => "adamw_step_bf16_grad",
            other => bail!("adamw (CUDA): f32 or bf16 gradient expected, got {other:?}"),
        };
        let func = dst
            .device
            .clone()
            .get_or_load_custom_func(kernel, MODULE, PTX)?;
        let g32;
        let g16;
        let mut p = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
        let mut b = func.builder();
        b.arg(&mut p);
        b.arg(&m);
        b.arg(&v);
        if src.dtype() == DType::BF16 {
            g16 = src.as_cuda_slice::<half::bf16>()?.slice(s0..s1);
            b.arg(&g16);
        } else {
            g32 = src.as_cuda_slice::<f32>()?.slice(s0..s1);
            b.arg(&g32);
        }
        b.arg(&n);
        b.arg(&c.beta1);
        b.arg(&c.one_minus_beta1);
        b.arg(&c.beta2);
        b.arg(&c.one_minus_beta2);
        b.arg(&c.grad_scale);
        b.arg(&c.decay);
        b.arg(&c.step_size);
        b.arg(&c.bc2_sqrt);
        b.arg(&c.eps);
        // SAFETY: arguments as the kernel's signature; n elements in each buffer (the moments'
        // sizes checked in moment_view), none of them aliasing another (checked in update).
        // cudarc sees the moments as read (their views): its event bookkeeping, when on, would
        // miss these writes, which orders nothing on candle's one stream.
        unsafe { b.launch(crate::ops::grid_stride(n, 1024)) }.w()?;
        Ok(())
    }
}
