//! ReLU as one op with a written backward.
//!
//! candle's `relu` backward builds `x.ge(zeros_like(x)).to_dtype().mul(g)`: three `[rows, cols]`
//! temporaries (zeros, u8 mask, f32 mask) and four passes. This does one pass each way, with
//! candle's semantics: `y = max(x, 0)`, `dx = g * (x >= 0 ? 1 : 0)`.

use super::{f32_slice, par_items, simd_fn};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// `max(x, 0)` element-wise. f32 on the CPU uses the fused op (a non-contiguous input is
/// copied first); anything else is candle's `relu`.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !super::fusable_f32(x) {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

struct Relu;

/// Elements per work item of [`par_items`] (the ops are element-wise).
const ITEM: usize = 4096;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), "input", storage, layout)?;
        let mut y = vec![0f32; x.len()];
        par_items(&mut y, ITEM, x.len(), |i0, out| {
            relu_fwd(&x[i0 * ITEM..i0 * ITEM + out.len()], out);
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &ReluBwd)?))
    }
}

/// `(x, g) -> g * (x >= 0)`.
struct ReluBwd;

impl CustomOp2 for ReluBwd {
    fn name(&self) -> &'static str {
        "relu-fused-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), "input", s1, l1)?;
        let g = f32_slice(self.name(), "gradient", s2, l2)?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "{}: shape mismatch {:?} vs {:?}",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let mut dx = vec![0f32; x.len()];
        par_items(&mut dx, ITEM, x.len(), |i0, out| {
            let r = i0 * ITEM..i0 * ITEM + out.len();
            relu_bwd(&x[r.clone()], &g[r], out);
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

simd_fn! {
    fn relu_fwd(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x.max(0.0);
        }
    }
}

simd_fn! {
    fn relu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            // The multiply (not a select) keeps candle's results for inf/NaN gradients.
            *d = g * if x >= 0.0 { 1.0 } else { 0.0 };
        }
    }
}
