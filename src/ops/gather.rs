//! Row gathers whose backward is a gather as well.
//!
//! candle's `index_select` backward is `index_add`, whose CUDA kernel walks the whole index
//! sequentially in each thread and runs one or two blocks for a `[rows, width]` gradient: 1-2 ms
//! per call on an H200, four calls per layer for the gathered attention. When every source row
//! is read by a few output rows only, the gradient is a short sum of gathers instead: the
//! `k`-th reader of each source row, read from the output gradient. On CUDA both ways are one
//! kernel of ours (`gather.cu`): whole rows copied in 16-byte units forward, the readers summed
//! in one pass backward, where candle's `index_select` copies an element at a time behind
//! three 64-bit divisions and the sum as candle ops took a copy of the gradient, K gathers and
//! K - 1 additions.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};

/// Gathers rows `index[j]` of a `[src_rows, ..]` tensor into output row `j`.
#[derive(Clone)]
pub struct RowGather {
    index: Tensor,
    readers: Readers,
}

/// Each source row's live readers, for the backward pass.
#[derive(Clone)]
struct Readers {
    /// `[count * src_rows]` u32: entry `k * src_rows + r` is the output row of source row
    /// `r`'s `k`-th live reader, or the number of output rows when it has fewer.
    inverse: Tensor,
    /// The most live readers of any source row (0: no gradient reaches the source).
    count: usize,
    src_rows: usize,
}

impl RowGather {
    /// `live(j)` says whether output row `j` can receive a nonzero gradient: rows that cannot
    /// (padded slots whose results are masked out or never read) are left out of the backward
    /// pass, so a padded slot repeating a row adds no reader to it. Their gradient must be
    /// exactly zero for the result to equal `index_select`'s backward.
    pub fn new(
        index: Vec<u32>,
        live: impl Fn(usize) -> bool,
        src_rows: usize,
        device: &Device,
    ) -> Result<Self> {
        let n = index.len();
        if u32::try_from(n).is_err() {
            bail!("RowGather: {n} output rows do not fit a u32 index");
        }
        let mut readers: Vec<Vec<u32>> = vec![Vec::new(); src_rows];
        for (j, &r) in index.iter().enumerate() {
            let Some(list) = readers.get_mut(r as usize) else {
                bail!("RowGather: index {r} out of range for {src_rows} rows");
            };
            if live(j) {
                list.push(j as u32);
            }
        }
        let count = readers.iter().map(Vec::len).max().unwrap_or(0);
        let mut inverse = Vec::with_capacity(count * src_rows);
        for k in 0..count {
            inverse.extend(
                readers
                    .iter()
                    .map(|list| list.get(k).copied().unwrap_or(n as u32)),
            );
        }
        Ok(RowGather {
            index: Tensor::from_vec(index, n, device)?,
            readers: Readers {
                inverse: Tensor::from_vec(inverse, count * src_rows, device)?,
                count,
                src_rows,
            },
        })
    }

    /// `x[index]` along dim 0.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(0)? != self.readers.src_rows {
            bail!(
                "RowGather: {} source rows expected, got {:?}",
                self.readers.src_rows,
                x.shape()
            );
        }
        x.apply_op2(
            &self.index,
            GatherOp {
                readers: self.readers.clone(),
            },
        )
    }
}

/// Whether this op's CUDA kernels take `t` (else candle's ops do, as on `ORPO_CUDA_KERNELS=0`).
fn cuda_kernel_for(t: &Tensor) -> bool {
    t.device().is_cuda() && super::cuda_kernels()
}

struct GatherOp {
    readers: Readers,
}

fn gathered_shape(l: &Layout, ids: &Layout) -> Shape {
    let mut dims = l.shape().dims().to_vec();
    dims[0] = ids.shape().elem_count();
    Shape::from(dims)
}

impl CustomOp2 for GatherOp {
    fn name(&self) -> &'static str {
        "row-gather"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ids: &CpuStorage,
        ids_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((s.index_select(ids, l, ids_l, 0)?, gathered_shape(l, ids_l)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ids: &candle_core::CudaStorage,
        ids_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = if super::cuda_kernels() {
            cuda::gather_rows(s, l, ids, ids_l)?
        } else {
            None
        };
        let out = match out {
            Some(out) => out,
            None => s.index_select(ids, l, ids_l, 0)?,
        };
        Ok((out, gathered_shape(l, ids_l)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _index: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let r = &self.readers;
        if r.count == 0 || grad.elem_count() == 0 {
            return Ok((Some(x.zeros_like()?), None));
        }
        let sum = if grad.device().is_cpu() || cuda_kernel_for(grad) {
            grad.contiguous()?
                .apply_op2_no_bwd(&r.inverse, &GatherSumOp(r.clone()))?
        } else {
            gather_sum_chain(grad, r)?
        };
        Ok((Some(sum), None))
    }
}

/// The backward as candle ops: the gradient with one zero row appended (the readers' index for
/// "none"), gathered once per reader rank and added up.
fn gather_sum_chain(grad: &Tensor, r: &Readers) -> Result<Tensor> {
    let mut zero_dims = grad.dims().to_vec();
    zero_dims[0] = 1;
    let zero = Tensor::zeros(zero_dims, grad.dtype(), grad.device())?;
    let ext = Tensor::cat(&[grad, &zero], 0)?;
    let rank = |k: usize| r.inverse.narrow(0, k * r.src_rows, r.src_rows);
    let mut sum = ext.index_select(&rank(0)?, 0)?;
    for k in 1..r.count {
        sum = (sum + ext.index_select(&rank(k)?, 0)?)?;
    }
    Ok(sum)
}

/// `out[r] = Σ_k grad[inverse[k * src_rows + r]]` over the ranks `k`, an entry equal to the
/// gradient's row count adding nothing; f32 inside, stored in the gradient's dtype (f32 or
/// bf16). Equal to [`gather_sum_chain`] in f32, and in bf16 for up to two readers.
struct GatherSumOp(Readers);

impl GatherSumOp {
    /// Rows of the gradient and elements a row, checked against the index.
    fn dims(&self, grad: &Layout, inverse: &Layout) -> Result<(usize, usize)> {
        let rows = grad.shape().dims().first().copied().unwrap_or(0);
        let width = grad.shape().elem_count().checked_div(rows).unwrap_or(0);
        if inverse.shape().elem_count() != self.0.count * self.0.src_rows {
            bail!("row-gather-sum: readers' index of {:?}", inverse.shape());
        }
        Ok((rows, width))
    }

    fn shape(&self, grad: &Layout) -> Shape {
        let mut dims = grad.shape().dims().to_vec();
        dims[0] = self.0.src_rows;
        Shape::from(dims)
    }
}

impl CustomOp2 for GatherSumOp {
    fn name(&self) -> &'static str {
        "row-gather-sum"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        inv: &CpuStorage,
        inv_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = self.dims(gl, inv_l)?;
        let (Some((ga, gb)), Some((ia, ib)), CpuStorage::U32(inv)) =
            (gl.contiguous_offsets(), inv_l.contiguous_offsets(), inv)
        else {
            bail!("row-gather-sum: contiguous gradient and u32 index expected");
        };
        let (inv, r) = (&inv[ia..ib], &self.0);
        let out = match g {
            CpuStorage::F32(g) => {
                CpuStorage::F32(sum_readers(&g[ga..gb], inv, r, (rows, width), |v| v, |v| v))
            }
            CpuStorage::BF16(g) => CpuStorage::BF16(sum_readers(
                &g[ga..gb],
                inv,
                r,
                (rows, width),
                half::bf16::to_f32,
                half::bf16::from_f32,
            )),
            other => bail!(
                "row-gather-sum: f32 or bf16 expected, got {:?}",
                other.dtype()
            ),
        };
        Ok((out, self.shape(gl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        inv: &candle_core::CudaStorage,
        inv_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(gl, inv_l)?;
        let out = cuda::gather_sum(&self.0, dims, (g, gl), (inv, inv_l))?;
        Ok((out, self.shape(gl)))
    }
}

/// The CPU's [`GatherSumOp`]: source rows in parallel, each rank's reader added in order.
fn sum_readers<T: Copy + Default + Send + Sync>(
    grad: &[T],
    inv: &[u32],
    r: &Readers,
    (rows, width): (usize, usize),
    to_f32: impl Fn(T) -> f32 + Sync,
    from_f32: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); r.src_rows * width];
    let work = (r.count + 1) * out.len();
    super::par_items(&mut out, width.max(1), work, |first, chunk| {
        let mut acc = vec![0f32; width];
        for (i, row) in chunk.chunks_mut(width.max(1)).enumerate() {
            acc.fill(0.0);
            for k in 0..r.count {
                let j = inv[k * r.src_rows + first + i] as usize;
                if j < rows {
                    for (a, &v) in acc.iter_mut().zip(&grad[j * width..(j + 1) * width]) {
                        *a += to_f32(v);
                    }
                }
            }
            for (o, &a) in row.iter_mut().zip(&acc) {
                *o = from_f32(a);
            }
        }
    });
    out
}

#[cfg(feature = "cuda")]
pub(super) mod cuda {
    use super::Readers;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, DType, Layout, Result};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gather.ptx"));
    const MODULE: &str = "orpo_gather";
    /// The kernels index in u32 and step a grid stride past the last element.
    const MAX_ELEMS: usize = 1 << 31;

    /// `src[ids]` along dim 0, or `None` where the kernel does not apply (a strided source,
    /// another dtype, empty or too large), for candle's `index_select` to do.
    pub fn gather_rows(
        s: &CudaStorage,
        l: &Layout,
        ids: &CudaStorage,
        ids_l: &Layout,
    ) -> Result<Option<CudaStorage>> {
        match s.dtype() {
            DType::F32 => typed::<f32>(s, l, ids, ids_l),
            DType::BF16 => typed::<bf16>(s, l, ids, ids_l),
            _ => Ok(None),
        }
    }

    fn typed<T: CudaDType + DeviceRepr>(
        s: &CudaStorage,
        l: &Layout,
        ids: &CudaStorage,
        ids_l: &Layout,
    ) -> Result<Option<CudaStorage>> {
        let (Some((a, b)), Some(src_rows)) = (l.contiguous_offsets(), l.dims().first()) else {
            return Ok(None);
        };
        let rows = ids_l.shape().elem_count();
        let width = (b - a).checked_div(*src_rows).unwrap_or(0);
        let row_bytes = width * std::mem::size_of::<T>();
        if rows * width == 0 || rows * row_bytes / 2 >= MAX_ELEMS {
            return Ok(None);
        }
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let src = s.as_cuda_slice::<T>()?.slice(a..b);
        let idx = crate::ops::cuda_view::<u32>("row-gather", ids, ids_l)?;
        // SAFETY: every element is written by the kernel when it runs; else dropped unread.
        let out = unsafe { dev.alloc::<T>(rows * width)? };
        // The widest unit dividing the row and both ends' addresses (allocations are aligned
        // far more coarsely than 16 bytes, views at an offset may not be).
        let ends = {
            let (sp, _read) = src.device_ptr(&stream);
            let (op, _write) = out.device_ptr(&stream);
            sp | op
        };
        let Some(unit) = [16usize, 8, 4, 2]
            .into_iter()
            .find(|&u| row_bytes.is_multiple_of(u) && ends.is_multiple_of(u as u64))
        else {
            return Ok(None);
        };
        let units = row_bytes / unit;
        let total = rows * units;
        let name = format!("gather_rows_u{}", unit * 8);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let (rows, units) = (rows as u32, units as u32);
        let mut bld = func.builder();
        bld.arg(&src);
        bld.arg(&idx);
        bld.arg(&out);
        bld.arg(&rows);
        bld.arg(&units);
        // SAFETY: arguments as the kernel's signature (src, idx, out, rows, units); the indices
        // were checked against the source's rows when the gather was built.
        unsafe { bld.launch(crate::ops::grid_stride(total, 256)) }.w()?;
        Ok(Some(T::wrap_cuda_slice(out, dev)))
    }

    /// The readers' sum of `grad` (`[grad_rows, width]`, f32 or bf16).
    pub(super) fn gather_sum(
        r: &Readers,
        (grad_rows, width): (usize, usize),
        (g, gl): (&CudaStorage, &Layout),
        (inv, inv_l): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        match g.dtype() {
            DType::F32 => sum_typed::<f32>(
                "gather_sum_f32",
                r,
                (grad_rows, width),
                (g, gl),
                (inv, inv_l),
            ),
            DType::BF16 => sum_typed::<bf16>(
                "gather_sum_bf16",
                r,
                (grad_rows, width),
                (g, gl),
                (inv, inv_l),
            ),
            other => bail!("row-gather-sum (CUDA): f32 or bf16 expected, got {other:?}"),
        }
    }

    fn sum_typed<T: CudaDType + DeviceRepr>(
        name: &str,
        r: &Readers,
        (grad_rows, width): (usize, usize),
        (g, gl): (&CudaStorage, &Layout),
        (inv, inv_l): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let total = r.src_rows * width;
        if total >= MAX_ELEMS || grad_rows >= u32::MAX as usize {
            bail!("row-gather-sum (CUDA): {total} elements are more than its u32 indexing takes");
        }
        let dev = g.device().clone();
        let gv = crate::ops::cuda_view::<T>("row-gather-sum", g, gl)?;
        let iv = crate::ops::cuda_view::<u32>("row-gather-sum", inv, inv_l)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(total)? };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let args = [r.count, r.src_rows, width, grad_rows].map(|v| v as u32);
        let mut bld = func.builder();
        bld.arg(&gv);
        bld.arg(&iv);
        bld.arg(&out);
        for v in &args {
            bld.arg(v);
        }
        // SAFETY: arguments as the kernel's signature (grad, inv, out, readers, src_rows,
        // width, grad_rows); every index entry is a gradient row or `grad_rows` (RowGather::new).
        unsafe { bld.launch(crate::ops::grid_stride(total, 256)) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    /// The readers' sum as one op equals the candle-op chain (`ORPO_CUDA_KERNELS=0`'s path)
    /// bit for bit in f32 with three readers, and in bf16 with two; with three, bf16 is the
    /// f32 sum rounded once.
    #[test]
    fn readers_sum_matches_the_chain() -> Result<()> {
        let dev = Device::Cpu;
        // Source rows 0 and 3 have three readers, 1 one, 2 none; slot 6 is dead.
        let index = vec![0u32, 3, 0, 1, 3, 0, 1, 3];
        let gather = RowGather::new(index, |j| j != 6, 4, &dev)?;
        let r = &gather.readers;
        assert_eq!(r.count, 3);
        let grad = Tensor::randn(0f32, 1.0, (8, 5), &dev)?;
        let sum = |g: &Tensor| g.apply_op2_no_bwd(&r.inverse, &GatherSumOp(r.clone()));
        let got = sum(&grad)?.to_vec2::<f32>()?;
        assert_eq!(got, gather_sum_chain(&grad, r)?.to_vec2::<f32>()?);
        assert_eq!(got[2], vec![0f32; 5]);
        let g = grad.to_vec2::<f32>()?;
        assert_eq!(got[1], g[3]);

        let gb = grad.to_dtype(DType::BF16)?;
        let got_b = sum(&gb)?;
        let once = sum(&gb.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?;
        assert_eq!(
            got_b.to_vec2::<half::bf16>()?,
            once.to_vec2::<half::bf16>()?
        );
        let two = RowGather::new(vec![0u32, 1, 0, 1, 2], |_| true, 3, &dev)?;
        let gb = gb.narrow(0, 0, 5)?;
        let r2 = &two.readers;
        let got2 = gb.apply_op2_no_bwd(&r2.inverse, &GatherSumOp(r2.clone()))?;
        assert_eq!(
            got2.to_vec2::<half::bf16>()?,
            gather_sum_chain(&gb, r2)?.to_vec2::<half::bf16>()?
        );
        Ok(())
    }

    /// Values and gradients as `index_select`'s, with rows read twice, rows never read, and
    /// padded slots (not live) whose gradient is zero.
    #[test]
    fn matches_index_select_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 3), &dev)?)?;
        // Slots 5 and 6 pad (repeat row 4); row 2 is read twice, row 5 never.
        let index = vec![0u32, 2, 1, 2, 4, 4, 4];
        let live = |j: usize| j < 5;
        let gather = RowGather::new(index.clone(), live, 6, &dev)?;
        // Padded slots' weights are zero, as their gradients are in the attention.
        let w = Tensor::new(&[1f32, 2., 3., 4., 5., 0., 0.], &dev)?.unsqueeze(1)?;
        let w = w.broadcast_as((7, 3))?.contiguous()?;
        let y = gather.apply(x.as_tensor())?;
        let ids = Tensor::new(index.as_slice(), &dev)?;
        let y_ref = x.as_tensor().index_select(&ids, 0)?;
        assert_eq!(y.to_vec2::<f32>()?, y_ref.to_vec2::<f32>()?);
        let g = (y * &w)?.sum_all()?.backward()?;
        let g_ref = (&y_ref * &w)?.sum_all()?.backward()?;
        let got = g.get(x.as_tensor()).expect("gradient").to_vec2::<f32>()?;
        let want = g_ref
            .get(x.as_tensor())
            .expect("gradient")
            .to_vec2::<f32>()?;
        assert_eq!(got, want);
        assert_eq!(got[2], vec![6f32; 3]); // read by slots 1 and 3
        assert_eq!(got[5], vec![0f32; 3]);
        Ok(())
    }
}
