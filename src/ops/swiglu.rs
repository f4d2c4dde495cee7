//! SwiGLU's product `silu(gate) * up` as one op with a written backward.
//!
//! The chain of candle ops (silu, a product, and under bf16 products the casts around them)
//! runs three passes forward and about ten backward (candle's silu backward alone is eight
//! ops), and keeps `silu(gate)` and f32 copies of the bf16 projections for backward. Here one
//! pass each way, f32 inside, the result in the inputs' dtype: under bf16 products the gate
//! and up projections stay the matmuls' bf16 outputs, and the result is what the down
//! projection takes. The arithmetic is candle's: `silu(g) = g / (1 + exp(-g))`, its derivative
//! `sigmoid(g) * (1 - silu(g)) + silu(g)`.
//!
//! CPU: the loop here; CUDA: `swiglu.cu` (compiled by `build.rs`), the same arithmetic. f32 or
//! bf16; anything else takes [`swiglu_chain`].

use super::{par_items, stored_as, widened_f32};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `silu(gate) * up`, element-wise, in the inputs' dtype (f32 or bf16, both the same shape);
/// inputs of two dtypes (a LoRA pair on one projection only) are taken in f32.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() != up.dtype() {
        return swiglu(&gate.to_dtype(DType::F32)?, &up.to_dtype(DType::F32)?);
    }
    let device_op = (gate.device().is_cpu() || (gate.device().is_cuda() && super::cuda_kernels()))
        && gate.device().same_device(up.device())
        && matches!(gate.dtype(), DType::F32 | DType::BF16)
        && gate.dtype() == up.dtype()
        && gate.shape() == up.shape();
    if !device_op {
        return swiglu_chain(gate, up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// The plain candle-op formulation: reference and fallback.
pub fn swiglu_chain(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Elements per work item of [`par_items`] (the op is element-wise).
const ITEM: usize = 4096;

#[inline(always)]
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (
            widened_f32(self.name(), s1, l1)?,
            widened_f32(self.name(), s2, l2)?,
        );
        if gate.len() != up.len() {
            bail!("{}: {:?} vs {:?}", self.name(), l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; gate.len()];
        par_items(&mut y, ITEM, gate.len(), |i0, out| {
            let at = i0 * ITEM;
            for (k, y) in out.iter_mut().enumerate() {
                *y = silu(gate[at + k]) * up[at + k];
            }
        });
        Ok((stored_as(y, s1.dtype()), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::launch("swiglu_fwd", &[(s1, l1), (s2, l2)], 1)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(gate.dtype())?.contiguous()?;
        // [dgate, dup] in one buffer; each half is a contiguous view.
        let both = gate.apply_op3_no_bwd(up, &g, &SwiGluBwd)?;
        let n = gate.elem_count();
        let half = |i: usize| both.narrow(0, i * n, n)?.reshape(gate.shape());
        Ok((Some(half(0)?), Some(half(1)?)))
    }
}

/// `(gate, up, g) -> [dgate, dup]` (flat, `2n` elements).
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
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
        let name = self.name();
        let (gate, up, grad) = (
            widened_f32(name, s1, l1)?,
            widened_f32(name, s2, l2)?,
            widened_f32(name, s3, l3)?,
        );
        let n = gate.len();
        if up.len() != n || grad.len() != n {
            bail!(
                "{name}: {:?}, {:?}, {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let mut d = vec![0f32; 2 * n];
        let (dgate, dup) = d.split_at_mut(n);
        par_items(dgate, ITEM, n, |i0, out| {
            let at = i0 * ITEM;
            for (k, d) in out.iter_mut().enumerate() {
                let (g, u, dy) = (gate[at + k], up[at + k], grad[at + k]);
                let (s, sig) = (silu(g), 1.0 / (1.0 + (-g).exp()));
                *d = dy * u * (sig * (1.0 - s) + s);
            }
        });
        par_items(dup, ITEM, n, |i0, out| {
            let at = i0 * ITEM;
            for (k, d) in out.iter_mut().enumerate() {
                *d = grad[at + k] * silu(gate[at + k]);
            }
        });
        Ok((stored_as(d, s1.dtype()), Shape::from(2 * n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::launch("swiglu_bwd", &[(s1, l1), (s2, l2), (s3, l3)], 2)?;
        Ok((out, Shape::from(2 * l1.shape().elem_count())))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, DType, Layout, Result};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    const MODULE: &str = "orpo_swiglu";

    /// Runs `{kernel}_{f32|bf16}` on `inputs` (same dtype and size `n`), writing `out_per_n * n`
    /// elements.
    pub fn launch(
        kernel: &str,
        inputs: &[(&CudaStorage, &Layout)],
        out_per_n: usize,
    ) -> Result<CudaStorage> {
        match inputs[0].0.dtype() {
            DType::F32 => typed::<f32>(&format!("{kernel}_f32"), inputs, out_per_n),
            DType::BF16 => typed::<bf16>(&format!("{kernel}_bf16"), inputs, out_per_n),
            other => bail!("swiglu (CUDA): f32 or bf16 expected, got {other:?}"),
        }
    }

    fn typed<T: CudaDType + DeviceRepr>(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        out_per_n: usize,
    ) -> Result<CudaStorage> {
        let dev = inputs[0].0.device().clone();
        let n = inputs[0].1.shape().elem_count();
        if inputs.iter().any(|(_, l)| l.shape().elem_count() != n) {
            bail!("swiglu (CUDA): inputs of different sizes");
        }
        let views = inputs
            .iter()
            .map(|(s, l)| crate::ops::cuda_view("swiglu", s, l))
            .collect::<Result<Vec<CudaView<'_, T>>>>()?;
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(out_per_n * n)? };
        let mut b = func.builder();
        for v in &views {
            b.arg(v);
        }
        b.arg(&out);
        b.arg(&n);
        // SAFETY: arguments as the kernel's signature (inputs, out, n); a grid-stride loop.
        unsafe { b.launch(crate::ops::grid_stride(n, 256)) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// f32: values and gradients as the chain's; bf16: the chain in f32 rounded once.
    #[test]
    fn matches_the_chain_of_ops() -> Result<()> {
        let dev = Device::Cpu;
        for n in [1usize, 7, 5000] {
            let gate = (Tensor::randn(0f32, 3.0, (n, 1), &dev)?).to_dtype(DType::BF16)?;
            let up = (Tensor::randn(0f32, 1.0, (n, 1), &dev)?).to_dtype(DType::BF16)?;
            let w = Tensor::randn(0f32, 1.0, (n, 1), &dev)?;
            for dtype in [DType::F32, DType::BF16] {
                let (g, u) = (
                    Var::from_tensor(&gate.to_dtype(dtype)?)?,
                    Var::from_tensor(&up.to_dtype(dtype)?)?,
                );
                let y = swiglu(g.as_tensor(), u.as_tensor())?;
                assert_eq!(y.dtype(), dtype);
                let grads = (y.to_dtype(DType::F32)? * &w)?.sum_all()?.backward()?;
                let (g32, u32) = (
                    Var::from_tensor(&gate.to_dtype(DType::F32)?)?,
                    Var::from_tensor(&up.to_dtype(DType::F32)?)?,
                );
                let want = swiglu_chain(g32.as_tensor(), u32.as_tensor())?;
                let want_grads = (&want * &w)?.sum_all()?.backward()?;
                let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
                    Ok((a.to_dtype(DType::F32)? - b)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f32>()?
                        / scale)
                };
                let tol = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
                let dy = diff(&y, &want)?;
                let dg = diff(
                    grads.get(g.as_tensor()).unwrap(),
                    want_grads.get(g32.as_tensor()).unwrap(),
                )?;
                let du = diff(
                    grads.get(u.as_tensor()).unwrap(),
                    want_grads.get(u32.as_tensor()).unwrap(),
                )?;
                assert!(
                    dy <= tol && dg <= tol && du <= tol,
                    "{dtype:?} n={n}: {dy} {dg} {du}"
                );
                if dtype == DType::F32 {
                    assert_eq!(dy, 0.0, "f32 values must be the chain's");
                }
            }
            // One projection in f32, the other bf16 (LoRA on one of them): taken in f32.
            let mixed = swiglu(&gate.to_dtype(DType::F32)?, &up)?;
            assert_eq!(mixed.dtype(), DType::F32);
            let want = swiglu_chain(&gate.to_dtype(DType::F32)?, &up.to_dtype(DType::F32)?)?;
            assert_eq!(mixed.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        }
        Ok(())
    }
}
