//! Row gathers whose backward is a gather as well.
//!
//! candle's `index_select` backward is `index_add`, whose CUDA kernel walks the whole index
//! sequentially in each thread and runs one or two blocks for a `[rows, width]` gradient: 1-2 ms
//! per call on an H200, four calls per layer for the gathered attention. When every source row
//! is read by a few output rows only, the gradient is a short sum of gathers instead: the
//! `k`-th reader of each source row, read from the output gradient with one zero row appended.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};

/// Gathers rows `index[j]` of a `[src_rows, ..]` tensor into output row `j`.
#[derive(Clone)]
pub struct RowGather {
    index: Tensor,
    /// `inverse[k][r]`: the output row of source row `r`'s `k`-th live reader, or the number of
    /// output rows (the appended zero row) when it has fewer.
    inverse: Vec<Tensor>,
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
        let mut readers: Vec<Vec<u32>> = vec![Vec::new(); src_rows];
        for (j, &r) in index.iter().enumerate() {
            let Some(list) = readers.get_mut(r as usize) else {
                bail!("RowGather: index {r} out of range for {src_rows} rows");
            };
            if live(j) {
                list.push(j as u32);
            }
        }
        let most = readers.iter().map(Vec::len).max().unwrap_or(0);
        let inverse = (0..most)
            .map(|k| {
                let inv: Vec<u32> = readers
                    .iter()
                    .map(|list| list.get(k).copied().unwrap_or(n as u32))
                    .collect();
                Tensor::from_vec(inv, src_rows, device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RowGather {
            index: Tensor::from_vec(index, n, device)?,
            inverse,
            src_rows,
        })
    }

    /// `x[index]` along dim 0.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(0)? != self.src_rows {
            bail!(
                "RowGather: {} source rows expected, got {:?}",
                self.src_rows,
                x.shape()
            );
        }
        x.apply_op2(
            &self.index,
            GatherOp {
                inverse: self.inverse.clone(),
            },
        )
    }
}

struct GatherOp {
    inverse: Vec<Tensor>,
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
        Ok((s.index_select(ids, l, ids_l, 0)?, gathered_shape(l, ids_l)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _index: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.inverse.is_empty() {
            return Ok((Some(x.zeros_like()?), None));
        }
        let mut zero_dims = grad.dims().to_vec();
        zero_dims[0] = 1;
        let zero = Tensor::zeros(zero_dims, grad.dtype(), grad.device())?;
        let ext = Tensor::cat(&[grad, &zero], 0)?;
        let mut sum = ext.index_select(&self.inverse[0], 0)?;
        for inv in &self.inverse[1..] {
            sum = (sum + ext.index_select(inv, 0)?)?;
        }
        Ok((Some(sum), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

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
