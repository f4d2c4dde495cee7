//! AdamW's update on CUDA with the kernels of `adamw.cu` (compiled by `build.rs`): three
//! passes over the flat f32 parameter, moments and gradient, in place.

use super::optim::Coefs;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CpuStorage, CudaStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
const MODULE: &str = "orpo_adamw";

/// Updates `p` and its moments `m`, `v` (all f32, contiguous, on one CUDA device) from `g`.
pub fn update(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, c: Coefs) -> Result<()> {
    if p.elem_count() == 0 {
        return Ok(()); // nothing to update, and a launch of no block is an error
    }
    let g = g.contiguous()?;
    m.inplace_op2(
        &g,
        &Moment {
            kernel: "adamw_moment1",
            beta: c.beta1,
            one_minus_beta: c.one_minus_beta1,
            grad_scale: c.grad_scale,
        },
    )?;
    v.inplace_op2(
        &g,
        &Moment {
            kernel: "adamw_moment2",
            beta: c.beta2,
            one_minus_beta: c.one_minus_beta2,
            grad_scale: c.grad_scale,
        },
    )?;
    p.inplace_op3(m, v, &Param(c))
}

fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("adamw (CUDA): the {what} must be contiguous"),
    }
}

/// `m = beta * m + (1 - beta) * g'` (or `g'²`), `g' = g * grad_scale`.
struct Moment {
    kernel: &'static str,
    beta: f32,
    one_minus_beta: f32,
    grad_scale: f32,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("adamw-moment runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let ((d0, d1), (s0, s1)) = (offsets(dst_l, "moment")?, offsets(src_l, "gradient")?);
        if d1 - d0 != s1 - s0 {
            bail!("adamw (CUDA): moment and gradient sizes differ");
        }
        let n = d1 - d0;
        let func = dst
            .device
            .clone()
            .get_or_load_custom_func(self.kernel, MODULE, PTX)?;
        let g = src.as_cuda_slice::<f32>()?.slice(s0..s1);
        let mut m = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
        let mut b = func.builder();
        b.arg(&mut m);
        b.arg(&g);
        b.arg(&n);
        b.arg(&self.beta);
        b.arg(&self.one_minus_beta);
        b.arg(&self.grad_scale);
        // SAFETY: arguments as the kernel's signature; n elements in each buffer.
        unsafe { b.launch(crate::ops::grid_stride(n, 1024)) }.w()?;
        Ok(())
    }
}

/// `p = p * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps)`.
struct Param(Coefs);

impl InplaceOp3 for Param {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("adamw-param runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        m: &CudaStorage,
        m_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<()> {
        let (d0, d1) = offsets(dst_l, "parameter")?;
        let ((m0, m1), (v0, v1)) = (offsets(m_l, "moment")?, offsets(v_l, "moment")?);
        let n = d1 - d0;
        if m1 - m0 != n || v1 - v0 != n {
            bail!("adamw (CUDA): parameter and moment sizes differ");
        }
        let c = self.0;
        let func = dst
            .device
            .clone()
            .get_or_load_custom_func("adamw_param", MODULE, PTX)?;
        let m = m.as_cuda_slice::<f32>()?.slice(m0..m1);
        let v = v.as_cuda_slice::<f32>()?.slice(v0..v1);
        let mut p = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
        let mut b = func.builder();
        b.arg(&mut p);
        b.arg(&m);
        b.arg(&v);
        b.arg(&n);
        b.arg(&c.decay);
        b.arg(&c.step_size);
        b.arg(&c.bc2_sqrt);
        b.arg(&c.eps);
        // SAFETY: arguments as the kernel's signature; n elements in each buffer.
        unsafe { b.launch(crate::ops::grid_stride(n, 1024)) }.w()?;
        Ok(())
    }
}
