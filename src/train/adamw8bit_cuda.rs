//! The 8-bit AdamW update on CUDA with the kernel of `adamw8bit.cu` (compiled by `build.rs`):
//! one block per 256 values, the parameter and both moments' codes and absmax values updated
//! in place, bit for bit as the CPU update (`adamw8bit.rs`).

use super::adamw8bit::{maps, BLOCK};
use super::optim::Coefs;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    bail, CpuStorage, CudaStorage, DType, Device, InplaceOp2, Layout, Result, Storage, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw8bit.ptx"));
const MODULE: &str = "orpo_adamw8bit";

/// The kernel's code tables on `device`: the signed and unsigned maps, then their midpoints.
pub fn tables(device: &Device) -> Result<Tensor> {
    let (sm, um) = maps();
    let all: Vec<f32> = [&sm.values, &um.values, &sm.bounds, &um.bounds]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    Tensor::from_vec(all, 1022, device)
}

/// One moment on the device: a u8 code per element, an f32 absmax per block.
pub struct DeviceMoment<'a> {
    pub codes: &'a Tensor,
    pub absmax: &'a Tensor,
}

/// Updates `p` (f32, contiguous, CUDA) and its moments from `g` (f32 or bf16).
pub fn update(
    p: &Tensor,
    g: &Tensor,
    m: DeviceMoment,
    v: DeviceMoment,
    tables: &Tensor,
    c: Coefs,
) -> Result<()> {
    if p.elem_count() == 0 {
        return Ok(());
    }
    let g = g.contiguous()?;
    let tensors = [&g, m.codes, m.absmax, v.codes, v.absmax, tables];
    if !tensors.iter().all(|t| t.device().same_device(p.device())) {
        bail!("adamw8bit (CUDA): parameter, gradient and state on different devices");
    }
    p.inplace_op2(&g, &Step { m, v, tables, c })
}

struct Step<'a> {
    m: DeviceMoment<'a>,
    v: DeviceMoment<'a>,
    tables: &'a Tensor,
    c: Coefs,
}

/// `n` elements of a CUDA tensor of type `T` (contiguous).
fn view<'a, T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
    s: &'a Storage,
    l: &Layout,
    n: usize,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("adamw8bit (CUDA): the {what} must be contiguous");
    };
    if b - a != n {
        bail!(
            "adamw8bit (CUDA): the {what} has {} values, {n} expected",
            b - a
        );
    }
    let Storage::Cuda(s) = s else {
        bail!("adamw8bit (CUDA): the {what} must be on the GPU");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

impl InplaceOp2 for Step<'_> {
    fn name(&self) -> &'static str {
        "adamw8bit-step"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("adamw8bit-step runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            bail!("adamw8bit (CUDA): parameter and gradient must be contiguous");
        };
        let n = d1 - d0;
        if s1 - s0 != n {
            bail!("adamw8bit (CUDA): parameter and gradient sizes differ");
        }
        let blocks = n.div_ceil(BLOCK);
        // The state is written through views candle lends for reading: it is the optimizer's
        // own (nothing else holds it), on the one stream every tensor uses (as adamw_cuda.rs).
        let (cms, cml) = self.m.codes.storage_and_layout();
        let (ams, aml) = self.m.absmax.storage_and_layout();
        let (cvs, cvl) = self.v.codes.storage_and_layout();
        let (avs, avl) = self.v.absmax.storage_and_layout();
        let (ts, tl) = self.tables.storage_and_layout();
        let cm = view::<u8>(&cms, cml, n, "first moment's codes")?;
        let am = view::<f32>(&ams, aml, blocks, "first moment's absmax")?;
        let cv = view::<u8>(&cvs, cvl, n, "second moment's codes")?;
        let av = view::<f32>(&avs, avl, blocks, "second moment's absmax")?;
        let tables = view::<f32>(&ts, tl, 1022, "code tables")?;
        let kernel = match src.dtype() {
            DType::F32 => "adamw8bit_step",
            DType::BF16 => "adamw8bit_step_bf16_grad",
            other => bail!("adamw8bit (CUDA): f32 or bf16 gradient expected, got {other:?}"),
        };
        let func = dst
            .device
            .clone()
            .get_or_load_custom_func(kernel, MODULE, PTX)?;
        let c = self.c;
        let g32;
        let g16;
        let mut p = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
        let mut b = func.builder();
        b.arg(&mut p);
        b.arg(&cm);
        b.arg(&cv);
        b.arg(&am);
        b.arg(&av);
        if src.dtype() == DType::BF16 {
            g16 = src.as_cuda_slice::<half::bf16>()?.slice(s0..s1);
            b.arg(&g16);
        } else {
            g32 = src.as_cuda_slice::<f32>()?.slice(s0..s1);
            b.arg(&g32);
        }
        b.arg(&n);
        b.arg(&tables);
        b.arg(&c.beta1);
        b.arg(&c.one_minus_beta1);
        b.arg(&c.beta2);
        b.arg(&c.one_minus_beta2);
        b.arg(&c.grad_scale);
        b.arg(&c.decay);
        b.arg(&c.step_size);
        b.arg(&c.bc2_sqrt);
        b.arg(&c.eps);
        // SAFETY: arguments as the kernel's signature; n values in p, g and the codes, one
        // absmax per 256 of them, 1022 table entries (all checked above); blockDim 256 as the
        // kernel's block of values. The state's buffers are the optimizer's own, distinct from
        // p and g (checked in optim.rs, which made them).
        unsafe { b.launch(crate::ops::grid_stride(n, BLOCK as u32)) }.w()?;
        Ok(())
    }
}
