//! Rotary position embedding (transformers' rotate-half layout) as one op with a written
//! backward.
//!
//! For `x: [b, t, h, d]` and half tables `cos`, `sin`: `[t, d/2]`, pair `i` of every head at
//! position `t` turns by that position's angle:
//! `(x_i, x_{i+d/2}) -> (x_i c - x_{i+d/2} s, x_i s + x_{i+d/2} c)`, which is
//! `x * cos + rotate_half(x) * sin` with the tables' halves repeated. A rotation's backward is
//! the rotation by the opposite angle (`sin` negated), so the op keeps nothing for backward but
//! the tables, where the chain of candle ops it replaces (narrow, neg, cat, two broadcast
//! products, a sum: six kernels forward, more backward) keeps a rotated copy of `x`.
//!
//! CPU: the loop here; CUDA: candle's `rope_thd` kernel (what candle-nn's `rope_thd` runs), the
//! same arithmetic. Both f32; other dtypes and devices take [`rotary_chain`].

use super::f32_slice;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// `x` `[b, t, h, d]` rotated by the half tables `cos`, `sin` `[t, r/2]`, `r <= d` even: only
/// the leading `r` dims of each head turn when `r < d` (partial rotary, Phi-3/4).
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, d) = x.dims4()?;
    let (ct, half) = cos.dims2()?;
    if sin.dims() != cos.dims() || ct != t || 2 * half > d {
        bail!(
            "rotary: tables {:?}/{:?} do not fit {:?}",
            cos.shape(),
            sin.shape(),
            x.shape()
        );
    }
    if 2 * half < d {
        let turned = rotary(&x.narrow(D::Minus1, 0, 2 * half)?, cos, sin)?;
        return Tensor::cat(&[&turned, &x.narrow(D::Minus1, 2 * half, d - 2 * half)?], 3);
    }
    let same = |t: &Tensor| t.dtype() == DType::F32 && t.device().same_device(x.device());
    let device_op = (x.device().is_cpu() || x.device().is_cuda()) && same(x) && same(cos);
    if !device_op || sin.dtype() != DType::F32 {
        return rotary_chain(x, cos, sin);
    }
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rotary)
}

/// The plain candle-op formulation (what `layers::apply_rope` was): reference and fallback.
pub fn rotary_chain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = cos.dim(D::Minus1)?;
    if 2 * half < d {
        let turned = rotary_chain(&x.narrow(D::Minus1, 0, 2 * half)?, cos, sin)?;
        return Tensor::cat(&[&turned, &x.narrow(D::Minus1, 2 * half, d - 2 * half)?], 3);
    }
    // [t, d/2] -> [t, 1, d]: the same table for every head, halves repeated.
    let full = |t: &Tensor| Tensor::cat(&[t, t], D::Minus1)?.unsqueeze(1);
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&full(cos)?)? + rotated.broadcast_mul(&full(sin)?)?
}

struct Rotary;

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
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
        let x = f32_slice(name, "input", s1, l1)?;
        let cos = f32_slice(name, "cos", s2, l2)?;
        let sin = f32_slice(name, "sin", s3, l3)?;
        let (_, t, h, d) = l1.shape().dims4()?;
        let half = d / 2;
        if cos.len() != t * half || sin.len() != t * half {
            bail!("{name}: tables of {} for {t} positions of {d}", cos.len());
        }
        let mut y = vec![0f32; x.len()];
        let work = y.len();
        // One item per position of a sequence: its heads share the position's table row.
        super::par_items(&mut y, h * d, work, |item0, out| {
            let src = &x[item0 * h * d..item0 * h * d + out.len()];
            for (k, (xs, ys)) in src
                .chunks_exact(h * d)
                .zip(out.chunks_exact_mut(h * d))
                .enumerate()
            {
                let p = (item0 + k) % t;
                let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                for (xh, yh) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
                    let (x1, x2) = xh.split_at(half);
                    let (y1, y2) = yh.split_at_mut(half);
                    for i in 0..half {
                        y1[i] = x1[i] * c[i] - x2[i] * s[i];
                        y2[i] = x1[i] * s[i] + x2[i] * c[i];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
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
        cuda::rotary((s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The transposed rotation: the same op with the opposite angle.
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, &sin.neg()?, &Rotary)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{kernels, WrapErr};
    use candle_core::{bail, CudaStorage, Layout, Result, Shape};

    fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
        crate::ops::cuda_view("rotary", s, l)
    }

    /// candle's `rope_thd_f32` kernel: one thread per rotated pair, tables `[t, d/2]` shared
    /// by the batch (`stride_b` 0).
    pub fn rotary(
        (x, xl): (&CudaStorage, &Layout),
        (c, cl): (&CudaStorage, &Layout),
        (s, sl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (b, t, h, d) = xl.shape().dims4()?;
        let el = b * t * h * d;
        if el / 2 > i32::MAX as usize {
            bail!("rotary (CUDA): {el} elements exceed the kernel's int index");
        }
        let (src, cos, sin) = (view(x, xl)?, view(c, cl)?, view(s, sl)?);
        let func = dev.get_or_load_func("rope_thd_f32", &kernels::REDUCE)?;
        // SAFETY: every element is written by the kernel.
        let dst = unsafe { dev.alloc::<f32>(el)? };
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&cos);
        builder.arg(&sin);
        builder.arg(&dst);
        let dims = [b as u32, t as u32, h as u32, d as u32, 0u32];
        for v in &dims {
            builder.arg(v);
        }
        let cfg = LaunchConfig::for_num_elems((el / 2) as u32);
        // SAFETY: arguments as the kernel's signature (src, cos, sin, dst, b, t, h, d, stride_b).
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients as the chain's, full and partial rotary.
    #[test]
    fn matches_the_chain_of_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (d, r) in [(8, 8), (10, 4)] {
            let (b, t, h) = (2, 5, 3);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h, d), &dev)?)?;
            let ang = Tensor::randn(0f32, 2.0, (t, r / 2), &dev)?;
            let (cos, sin) = ((ang.cos()? * 1.2)?, (ang.sin()? * 1.2)?);
            let w = Tensor::randn(0f32, 1.0, (b, t, h, d), &dev)?;
            let y = rotary(x.as_tensor(), &cos, &sin)?;
            let want = rotary_chain(x.as_tensor(), &cos, &sin)?;
            let diff = (&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "values differ by {diff}");
            let g = (y * &w)?.sum_all()?.backward()?;
            let g_want = (want * &w)?.sum_all()?.backward()?;
            let (got, want) = (
                g.get(x.as_tensor()).unwrap(),
                g_want.get(x.as_tensor()).unwrap(),
            );
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "gradients differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn mismatched_tables_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev)?;
        let t = Tensor::zeros((3, 4), DType::F32, &dev)?;
        assert!(rotary(&x, &t, &t).is_err());
        let wide = Tensor::zeros((4, 5), DType::F32, &dev)?;
        assert!(rotary(&x, &wide, &wide).is_err());
        Ok(())
    }
}
