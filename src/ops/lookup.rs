//! Embedding lookups whose backward adds into the table's gradient in place.
//!
//! candle's `index_select` backward is `index_add`: a copy of the whole table-sized gradient
//! (the tied head's, 1 GB in f32 for Llama-1B) with the rows added, on CUDA by one thread per
//! column walking every id in order (two blocks for a 2,048-wide table). Here the ids are
//! grouped by value on the host when the lookup is built, and backward adds each distinct id's
//! rows, summed in order from zero, into the gradient the table has collected so far (a tied
//! head's) in place: one parallel pass over the rows read, no table-sized copy. The vendored
//! candle offers that gradient through `CustomOp1::bwd_add_into` when nothing else holds it;
//! without one, the rows are added into zeros. torch orders the sums the same way (its
//! embedding backward sums each id's rows into zeros, autograd then adds the head's).

use super::f32_slice;
use candle_core::{
    bail, CpuStorage, CustomOp1, DType, Device, InplaceOp2, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Rows `ids` of a `[rows, width]` table.
#[derive(Clone)]
pub struct TableLookup {
    ids: Tensor,
    max_id: Option<u32>,
    groups: Arc<Groups>,
}

/// The live ids grouped by value: distinct id `rows[u]` is read by the rows
/// `positions[offsets[u]..offsets[u + 1]]`, in order.
struct Groups {
    rows: Vec<u32>,
    offsets: Vec<u32>,
    positions: Vec<u32>,
    /// Rows looked up (the gradient's rows).
    looked_up: usize,
    /// The same three on a CUDA device, for the kernel.
    #[cfg(feature = "cuda")]
    on_device: Option<[Tensor; 3]>,
}

static ADDED_IN_PLACE: AtomicUsize = AtomicUsize::new(0);

impl TableLookup {
    /// `live(j)` says whether looked-up row `j` can receive a nonzero gradient: rows that
    /// cannot (padding whose results nothing differentiates through) are left out of the
    /// backward, and their gradient must be exactly zero for the result to be the full one.
    pub fn new(ids: &[u32], live: impl Fn(usize) -> bool, device: &Device) -> Result<Self> {
        if u32::try_from(ids.len()).is_err() {
            bail!("TableLookup: {} ids do not fit a u32 index", ids.len());
        }
        let mut order: Vec<u32> = (0..ids.len() as u32)
            .filter(|&j| live(j as usize))
            .collect();
        // Stable: each id's rows stay in position order.
        order.sort_by_key(|&j| ids[j as usize]);
        let (mut rows, mut offsets) = (Vec::new(), Vec::new());
        for (k, &j) in order.iter().enumerate() {
            let id = ids[j as usize];
            if rows.last() != Some(&id) {
                rows.push(id);
                offsets.push(k as u32);
            }
        }
        offsets.push(order.len() as u32);
        #[cfg(feature = "cuda")]
        let on_device = match device {
            Device::Cuda(_) => Some([
                Tensor::from_slice(&rows, rows.len(), device)?,
                Tensor::from_slice(&offsets, offsets.len(), device)?,
                Tensor::from_slice(&order, order.len(), device)?,
            ]),
            _ => None,
        };
        Ok(TableLookup {
            ids: Tensor::from_slice(ids, ids.len(), device)?,
            max_id: ids.iter().copied().max(),
            groups: Arc::new(Groups {
                rows,
                offsets,
                positions: order,
                looked_up: ids.len(),
                #[cfg(feature = "cuda")]
                on_device,
            }),
        })
    }

    /// The `[ids, width]` rows of `table`. A trainable f32 table takes this module's op (on
    /// the CPU, or on CUDA with the project's kernels on); anything else `index_select`.
    pub fn apply(&self, table: &Tensor) -> Result<Tensor> {
        let (rows, _) = table.dims2()?;
        if let Some(m) = self.max_id.filter(|&m| m as usize >= rows) {
            bail!("TableLookup: id {m} out of range for a table of {rows} rows");
        }
        let device_op =
            table.device().is_cpu() || (table.device().is_cuda() && super::cuda_kernels());
        if !(table.track_op() && table.dtype() == DType::F32 && device_op) {
            return table.index_select(&self.ids, 0);
        }
        table.contiguous()?.apply_op1(Lookup(self.clone()))
    }

    /// The `[n]` u32 ids on the lookup's device.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// How many backward passes so far added into an existing gradient in place (for tests).
    pub fn added_in_place() -> usize {
        ADDED_IN_PLACE.load(Ordering::Relaxed)
    }

    /// `dst[rows[u]] += Σ grad[positions[k]]` over each group, in place.
    fn add_rows(&self, dst: &Tensor, grad: &Tensor) -> Result<()> {
        dst.inplace_op2(&grad.contiguous()?, &RowsAdd(&self.groups))
    }
}

struct Lookup(TableLookup);

impl CustomOp1 for Lookup {
    fn name(&self) -> &'static str {
        "table-lookup"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let table = f32_slice(self.name(), "table", s, l)?;
        let width = l.dims()[1];
        let (ids_s, _) = self.0.ids.storage_and_layout();
        let Storage::Cpu(CpuStorage::U32(ids)) = &*ids_s else {
            bail!("table-lookup: CPU u32 ids expected");
        };
        let mut out = Vec::with_capacity(ids.len() * width);
        for &id in ids {
            let at = id as usize * width;
            out.extend_from_slice(&table[at..at + width]);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (ids_s, ids_l) = self.0.ids.storage_and_layout();
        let Storage::Cuda(ids) = &*ids_s else {
            bail!("table-lookup: ids on the table's CUDA device expected");
        };
        let out = match super::gather::cuda::gather_rows(s, l, ids, ids_l)? {
            Some(out) => out,
            None => s.index_select(ids, l, ids_l, 0)?,
        };
        Ok((out, Shape::from((ids_l.shape().elem_count(), l.dims()[1]))))
    }

    fn bwd(&self, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let sum = table.zeros_like()?;
        self.0.add_rows(&sum, grad)?;
        Ok(Some(sum))
    }

    fn bwd_add_into(
        &self,
        table: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
        sum_grad: &Tensor,
    ) -> Result<bool> {
        let fits = sum_grad.dtype() == DType::F32
            && grad.dtype() == DType::F32
            && sum_grad.shape() == table.shape()
            && sum_grad.is_contiguous();
        if fits {
            self.0.add_rows(sum_grad, grad)?;
            ADDED_IN_PLACE.fetch_add(1, Ordering::Relaxed);
        }
        Ok(fits)
    }
}

struct RowsAdd<'a>(&'a Groups);

impl RowsAdd<'_> {
    /// The destination's width, checked against the gradient's size.
    fn width(&self, dst_l: &Layout, grad_elems: usize) -> Result<usize> {
        let width = dst_l.dims().get(1).copied().unwrap_or(0);
        if dst_l.dims().len() != 2 || grad_elems != self.0.looked_up * width {
            bail!(
                "table-lookup backward: a gradient of {grad_elems} elements for {} rows of {:?}",
                self.0.looked_up,
                dst_l.shape()
            );
        }
        Ok(width)
    }
}

impl InplaceOp2 for RowsAdd<'_> {
    fn name(&self) -> &'static str {
        "table-lookup-add"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let grad = f32_slice(self.name(), "gradient", g, gl)?;
        let width = self.width(dst_l, grad.len())?;
        let (CpuStorage::F32(data), Some((a, b))) = (dst, dst_l.contiguous_offsets()) else {
            bail!("table-lookup-add: a contiguous f32 gradient table expected");
        };
        let dst = &mut data[a..b];
        let groups = self.0;
        let mut acc = vec![0f32; width];
        for (u, &row) in groups.rows.iter().enumerate() {
            acc.fill(0.0);
            let span = groups.offsets[u] as usize..groups.offsets[u + 1] as usize;
            for &p in &groups.positions[span] {
                let src = &grad[p as usize * width..(p as usize + 1) * width];
                acc.iter_mut().zip(src).for_each(|(a, s)| *a += s);
            }
            let out = &mut dst[row as usize * width..(row as usize + 1) * width];
            out.iter_mut().zip(&acc).for_each(|(o, a)| *o += a);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gather.ptx"));
        let grad = super::cuda_view::<f32>(self.name(), g, gl)?;
        let width = self.width(dst_l, grad.len())?;
        let Some((a, b)) = dst_l.contiguous_offsets() else {
            bail!("table-lookup-add (CUDA): a contiguous gradient table expected");
        };
        let unique = self.0.rows.len();
        let total = unique * width;
        if total == 0 {
            return Ok(());
        }
        if total >= 1 << 31 {
            bail!("table-lookup-add (CUDA): {total} elements are more than its u32 indexing takes");
        }
        let Some(on_device) = &self.0.on_device else {
            bail!("table-lookup-add (CUDA): the lookup was built for another device");
        };
        let views: Vec<_> = on_device.iter().map(|t| t.storage_and_layout()).collect();
        let cuda = |i: usize| -> Result<_> {
            let (s, l) = &views[i];
            let Storage::Cuda(s) = &**s else {
                bail!("table-lookup-add (CUDA): groups on the CPU");
            };
            super::cuda_view::<u32>("table-lookup-add", s, l)
        };
        let (rows, offsets, positions) = (cuda(0)?, cuda(1)?, cuda(2)?);
        let func =
            dst.device
                .clone()
                .get_or_load_custom_func("rows_add_f32", "orpo_gather", PTX)?;
        let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let (unique, width) = (unique as u32, width as u32);
        let mut bld = func.builder();
        bld.arg(&grad);
        bld.arg(&rows);
        bld.arg(&offsets);
        bld.arg(&positions);
        bld.arg(&mut out);
        bld.arg(&unique);
        bld.arg(&width);
        // SAFETY: arguments as the kernel's signature (grad, rows, offsets, positions, dst,
        // unique, width); rows are below the table's (checked by `apply`), positions below the
        // gradient's rows (`width`), and distinct rows are written by distinct threads.
        unsafe { bld.launch(super::grid_stride(total, 256)) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Forward equals `index_select`; backward equals `index_select`'s (live rows only), with
    /// a tied use of the table (a product, whose gradient arrives first) added in place, and
    /// alone (no gradient yet: added into zeros).
    #[test]
    fn lookup_matches_index_select_tied_and_alone() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, width) = (7, 5);
        let init: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let table = Var::from_vec(init, (rows, width), &dev)?;
        let ids = [3u32, 1, 3, 6, 0, 3, 1, 2];
        let dead = 4usize; // padding: its gradient is zeroed below
        let lookup = TableLookup::new(&ids, |j| j != dead, &dev)?;
        let idx = Tensor::from_slice(&ids, ids.len(), &dev)?;
        let w: Vec<f32> = (0..ids.len() * width)
            .map(|i| {
                if i / width == dead {
                    0.0
                } else {
                    (i % 7) as f32 * 0.25 - 0.6
                }
            })
            .collect();
        let w = Tensor::from_vec(w, (ids.len(), width), &dev)?;
        let x = Tensor::from_vec(
            (0..3 * width).map(|i| i as f32 * 0.1).collect(),
            (3, width),
            &dev,
        )?;
        let loss = |e: Tensor, tied: bool| -> Result<Tensor> {
            let mut l = (e * &w)?.sum_all()?;
            if tied {
                l = (l + x.matmul(&table.as_tensor().t()?)?.sqr()?.sum_all()?)?;
            }
            Ok(l)
        };
        for tied in [true, false] {
            let y = lookup.apply(table.as_tensor())?;
            let want_y = table.as_tensor().index_select(&idx, 0)?;
            assert_eq!(y.to_vec2::<f32>()?, want_y.to_vec2::<f32>()?);
            let before = TableLookup::added_in_place();
            let g = loss(y, tied)?.backward()?;
            // At least (other tests in this binary may add to the count meanwhile).
            assert!(TableLookup::added_in_place() >= before + usize::from(tied));
            let want = loss(want_y, tied)?.backward()?;
            let (g, want) = (
                g.get(table.as_tensor()).unwrap(),
                want.get(table.as_tensor()).unwrap(),
            );
            let diff = (g - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "tied {tied}: {diff}");
        }
        Ok(())
    }

    /// A gradient that another tensor's gradient shares (an addition hands both operands the
    /// same tensor) is not changed in place: the other keeps its own.
    #[test]
    fn a_shared_gradient_is_left_alone() -> Result<()> {
        let dev = Device::Cpu;
        let table = Var::from_vec(vec![0.5f32; 12], (4, 3), &dev)?;
        let other = Var::from_vec(vec![0.25f32; 12], (4, 3), &dev)?;
        let lookup = TableLookup::new(&[1, 1, 3], |_| true, &dev)?;
        let v = Tensor::arange(0f32, 12., &dev)?.reshape((4, 3))?;
        let e = lookup.apply(table.as_tensor())?.exp()?.sum_all()?;
        let sum = (table.as_tensor() + other.as_tensor())?;
        // Backward visits an addition's right operand first: the sum's gradient arrives first.
        let g = (e + (sum * &v)?.sum_all()?)?.backward()?;
        assert_eq!(
            g.get(other.as_tensor()).unwrap().to_vec2::<f32>()?,
            v.to_vec2::<f32>()?
        );
        let t = g.get(table.as_tensor()).unwrap().to_vec2::<f32>()?;
        let e1 = 0.5f32.exp();
        assert_eq!(t[1], vec![3.0 + 2.0 * e1, 4.0 + 2.0 * e1, 5.0 + 2.0 * e1]);
        assert_eq!(t[3][0], 9.0 + e1);
        Ok(())
    }

    /// A frozen table is a plain `index_select`; ids past the table are an error.
    #[test]
    fn frozen_tables_and_bad_ids() -> Result<()> {
        let dev = Device::Cpu;
        let table = Tensor::arange(0f32, 12., &dev)?.reshape((4, 3))?;
        let lookup = TableLookup::new(&[2, 0, 2], |_| true, &dev)?;
        let y = lookup.apply(&table)?;
        assert!(!y.track_op());
        assert_eq!(y.to_vec2::<f32>()?[0], vec![6.0, 7.0, 8.0]);
        let small = Tensor::zeros((2, 3), DType::F32, &dev)?;
        assert!(lookup.apply(&small).is_err());
        Ok(())
    }
}
