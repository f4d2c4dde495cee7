//! `x @ w^T + b` as one graph node with a written backward.
//!
//! The candle chain (`matmul(w.t())` + `broadcast_add(b)`) records three extra nodes: its
//! backward sums the bias gradient with candle's generic strided reduce, and computes the
//! weight gradient as `x^T @ g` (`[in, out]`) that reaches the weight as a transposed view,
//! which every later reader (gradient norm, optimizer) must copy. Here the forward is candle's
//! own gemm call plus an in-place bias add (the same arithmetic, so the same values), and the
//! backward writes `dx = g @ w`, `dw = g^T @ x` straight in the weight's `[out, in]` layout, and
//! `db` as column sums in row order (the order candle's reduce uses).

use super::{f32_slice, par_items};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout};
use candle_core::{Result, Shape, Tensor};

/// `x @ w^T + b` for `x: [..., in]`, `w: [out, in]`, `b: [out]`.
///
/// One op (non-contiguous inputs are copied first) for f32 or bf16 on the CPU or CUDA
/// without a bias, and for f32 with a bias on the CPU with its kernels on: its backward
/// writes the weight's gradient in the weight's layout, where the chain's reaches it as a
/// transposed view that is copied before the gradient's cast to f32 and every later use.
/// Anything else falls back to [`linear_chain`].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let cpu_f32 = super::fusable_f32;
    let device_op = |t: &Tensor| {
        t.dtype() == x.dtype()
            && matches!(t.dtype(), DType::F32 | DType::BF16)
            && (t.device().is_cpu() || t.device().is_cuda())
            && t.device().same_device(x.device())
    };
    let fusable = x.rank() >= 1
        && w.rank() == 2
        && match b {
            // The bias is added inside the CPU f32 kernel only.
            Some(b) => cpu_f32(x) && cpu_f32(w) && cpu_f32(b) && b.dims() == [w.dims()[0]],
            None => device_op(x) && device_op(w),
        };
    if !fusable {
        return linear_chain(x, w, b);
    }
    let (dims, in_f, rows) = split_rows(x)?;
    let x2 = x.reshape((rows, in_f))?.contiguous()?;
    let w = w.contiguous()?;
    let y = match b {
        Some(b) => x2.apply_op3(&w, &b.contiguous()?, Linear)?,
        None => x2.apply_op2(&w, Linear)?,
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(out)
}

/// The plain candle-op formulation (what `model::layers::linear` was): reference and fallback.
pub fn linear_chain(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (dims, in_f, rows) = split_rows(x)?;
    let y = x.reshape((rows, in_f))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(out)
}

/// `x`'s dims, its last dim and the product of the others.
fn split_rows(x: &Tensor) -> Result<(Vec<usize>, usize, usize)> {
    let dims = x.dims().to_vec();
    let Some(&in_f) = dims.last() else {
        bail!("linear: expected at least one dim, got a scalar");
    };
    let rows = dims[..dims.len() - 1].iter().product();
    Ok((dims, in_f, rows))
}

struct Linear;

impl Linear {
    /// `x @ w^T` through candle's own CPU matmul (same gemm call as `x.matmul(&w.t())`), plus
    /// `b` added row by row in place.
    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "linear-fused";
        let ((rows, in_f), (out_f, w_in)) = (x.1.shape().dims2()?, w.1.shape().dims2()?);
        if in_f != w_in {
            bail!("{name}: input has {in_f} features, weight expects {w_in}");
        }
        let wt = w.1.transpose(0, 1)?;
        let mut y = x.0.matmul(w.0, (1, rows, out_f, in_f), x.1, &wt)?;
        if let Some((bs, bl)) = b {
            let b = f32_slice(name, "bias", bs, bl)?;
            let CpuStorage::F32(y) = &mut y else {
                bail!("{name}: expected an f32 product");
            };
            if b.len() != out_f || y.len() != rows * out_f {
                bail!("{name}: bias of {} for {out_f} outputs", b.len());
            }
            for row in y.chunks_exact_mut(out_f.max(1)) {
                for (v, &bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
        Ok((y, Shape::from((rows, out_f))))
    }

    /// Gradients of the inputs that take part in the graph.
    fn grads(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        // Detached operands: the results are gradients, not nodes of a second-order graph.
        let dx = match x.track_op() {
            true => Some(g.matmul(&w.detach())?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(g.t()?.matmul(&x.detach())?),
            false => None,
        };
        let db = match b {
            Some(b) if b.track_op() => Some(g.apply_op1_no_bwd(&ColumnSums)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    /// cuBLAS through candle's storage matmul, the call `x.matmul(&w.t())` makes.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((rows, in_f), (out_f, w_in)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if in_f != w_in {
            bail!("linear-fused: input has {in_f} features, weight expects {w_in}");
        }
        let y = s1.matmul(s2, (1, rows, out_f, in_f), l1, &l2.transpose(0, 1)?)?;
        Ok((y, Shape::from((rows, out_f))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::grads(x, w, None, grad_res)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear-fused"
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
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::grads(x, w, Some(b), grad_res)
    }
}

/// Column sums of a 2-D tensor `[rows, cols]` -> `[cols]`, in row order (candle's
/// `sum(0)` order) off the GPU; parallel over columns for f32 on the CPU (candle's dim-0
/// reduce is a single-threaded strided loop: ~230 ms on a 50272 x 768 embedding).
///
/// A half-precision tensor is summed in f32 (result f32), widened in blocks of rows so that no
/// f32 copy of all of it exists (a frozen bf16 LM head); each block is summed after the
/// running sum, so on the CPU the order and the value are those of its f32 copy.
///
/// An f32 tensor on a GPU is summed as a product with ones, in cuBLAS's order (the sums move
/// at f32 rounding): candle's dim-0 sum reads the columns with a stride, uncoalesced (~3 ms
/// for a Llama-1B head, whose sums a full fine-tune needs every step, by estimate), where a
/// product reads the rows at bandwidth.
pub fn column_sums(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cuda() && t.dtype() == DType::F32 && t.rank() == 2 {
        let ones = Tensor::ones((1, t.dim(0)?), DType::F32, t.device())?;
        return ones.matmul(&t.contiguous()?)?.squeeze(0);
    }
    if t.dtype() != DType::F32 && t.rank() == 2 {
        const BLOCK: usize = 8192;
        let (rows, cols) = t.dims2()?;
        let mut acc = Tensor::zeros((1, cols), DType::F32, t.device())?;
        for start in (0..rows).step_by(BLOCK) {
            let part = t.narrow(0, start, BLOCK.min(rows - start))?;
            let rows = Tensor::cat(&[acc, part.to_dtype(DType::F32)?], 0)?;
            acc = column_sums(&rows)?.unsqueeze(0)?;
        }
        return acc.squeeze(0);
    }
    if super::fusable_f32(t) && t.rank() == 2 {
        t.contiguous()?.apply_op1_no_bwd(&ColumnSums)
    } else {
        t.sum(0)
    }
}

struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(self.name(), "input", storage, layout)?;
        let (rows, cols) = layout.shape().dims2()?;
        let mut acc = vec![0f32; cols];
        par_items(&mut acc, 1, g.len(), |c0, run| {
            let n = run.len();
            for row in g.chunks_exact(cols.max(1)).take(rows) {
                for (a, &v) in run.iter_mut().zip(&row[c0..c0 + n]) {
                    *a += v;
                }
            }
        });
        Ok((CpuStorage::F32(acc), Shape::from(cols)))
    }
}
