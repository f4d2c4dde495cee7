//! A trainable f32 weight's bf16 copy (for bf16 products) whose gradient stays bf16.
//!
//! `w.to_dtype(BF16)` hands the copy's bf16 gradient back widened to f32: a weight-sized pass
//! (2 bytes read, 4 written an element), then 4-byte reads by the gradient norm and AdamW, and
//! an f32 gradient held until the update. The widened values are the bf16 ones exactly, so the
//! gradient can stay bf16 until the readers widen it themselves (the norm's and AdamW's
//! kernels on CUDA; the CPU's update widens first): the same numbers, 10 bytes an element less
//! traffic and half the gradient's memory. Contributions that meet are added in the weight's
//! own dtype (the vendored candle's `accumulate`, [`add_grads`] for ours), as they were.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static NARROW_GRADS: AtomicBool = AtomicBool::new(true);

/// Off, [`bf16_copy`] is a plain cast (its gradient widened to f32 in backward), for tests
/// that hold the two to the same results.
pub fn set_narrow_weight_grads(on: bool) {
    NARROW_GRADS.store(on, Ordering::Relaxed);
}

/// `w` in bf16. For an f32 `Var` its gradient comes back in bf16 (see the module docs);
/// anything else is a plain cast.
pub fn bf16_copy(w: &Tensor) -> Result<Tensor> {
    match w.dtype() {
        DType::BF16 => Ok(w.clone()),
        DType::F32 if w.is_variable() && NARROW_GRADS.load(Ordering::Relaxed) => {
            w.apply_op1(Bf16Copy)
        }
        _ => w.to_dtype(DType::BF16),
    }
}

/// `prev + g`, two contributions to the gradient of a tensor of `dtype`, added in `dtype`
/// (either may be a narrower copy's gradient from [`bf16_copy`]).
pub fn add_grads(prev: &Tensor, g: &Tensor, dtype: DType) -> Result<Tensor> {
    if prev.dtype() == dtype && g.dtype() == dtype {
        prev.add(g)
    } else {
        prev.to_dtype(dtype)?.add(&g.to_dtype(dtype)?)
    }
}

struct Bf16Copy;

impl CustomOp1 for Bf16Copy {
    fn name(&self) -> &'static str {
        "bf16-copy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((s.to_dtype(l, DType::BF16)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((s.to_dtype(l, DType::BF16)?, l.shape().clone()))
    }

    fn bwd(&self, _w: &Tensor, _copy: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The copy's values are the cast's; the weight's gradient is the cast's, kept in bf16
    /// (its widening gives the cast's f32 gradient exactly), and two uses add in f32.
    #[test]
    fn gradient_stays_bf16_with_the_casts_values() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev)?)?;
        let x = Tensor::randn(0f32, 1.0, (5, 3), &dev)?.to_dtype(DType::BF16)?;
        let y = Tensor::randn(0f32, 1.0, (2, 3), &dev)?.to_dtype(DType::BF16)?;
        let loss = |wb: &Tensor| -> Result<Tensor> {
            let a = x.matmul(&wb.t()?)?.to_dtype(DType::F32)?.sqr()?.sum_all()?;
            let b = y.matmul(&wb.t()?)?.to_dtype(DType::F32)?.sum_all()?;
            a + b
        };
        let copy = bf16_copy(w.as_tensor())?;
        let cast = w.as_tensor().to_dtype(DType::BF16)?;
        assert_eq!(copy.to_vec2::<half::bf16>()?, cast.to_vec2::<half::bf16>()?);
        let g = loss(&copy)?.backward()?;
        let g = g.get(w.as_tensor()).expect("gradient");
        assert_eq!(g.dtype(), DType::BF16);
        let want = loss(&cast)?.backward()?;
        let want = want.get(w.as_tensor()).expect("gradient");
        assert_eq!(
            g.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            want.to_vec2::<f32>()?
        );

        // A weight used through two copies: its contributions add in f32, as two casts' do.
        let (c1, c2) = (bf16_copy(w.as_tensor())?, bf16_copy(w.as_tensor())?);
        let two = (loss(&c1)? + loss(&c2)?)?.backward()?;
        let two = two.get(w.as_tensor()).expect("gradient");
        let (k1, k2) = (
            w.as_tensor().to_dtype(DType::BF16)?,
            w.as_tensor().to_dtype(DType::BF16)?,
        );
        let want2 = (loss(&k1)? + loss(&k2)?)?.backward()?;
        let want2 = want2.get(w.as_tensor()).expect("gradient");
        assert_eq!(two.dtype(), DType::F32);
        assert_eq!(two.to_vec2::<f32>()?, want2.to_vec2::<f32>()?);
        Ok(())
    }
}
