//! Gradient checkpointing: run a block without keeping its activations, recompute it in backward.
//!
//! candle records an op whenever an input tracks a `Var`, and has neither a no-grad mode nor
//! checkpointing. [`checkpoint`] runs the block on detached inputs (nothing recorded), then wraps
//! the result in a custom op whose only graph arguments are `x` (and a `Var` anchor when `x` does
//! not track), so the block's intermediates are freed as soon as the forward returns. In backward
//! the op re-runs the block with live parameters and backprops through that one block.
//!
//! The inner backward cannot hand parameter gradients to the outer `GradStore` (a custom op only
//! returns gradients for its own arguments), so they go to a [`SideGrads`] that the caller merges
//! after `backward()`.

use crate::ops::add_grads;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, DType, Layout, MetalStorage, Result, Shape, Storage,
    Tensor, TensorId, Var,
};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

thread_local! {
    static RECOMPUTING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is rerunning a checkpointed block (inside its backward). Blocks rerun
/// there one at a time, so a finer checkpoint inside one (see `layers::attention`) only adds
/// work.
pub fn recomputing() -> bool {
    RECOMPUTING.with(Cell::get)
}

/// Marks this thread as recomputing until dropped (then restores the previous state).
struct Recomputing(bool);

impl Recomputing {
    fn enter() -> Self {
        Recomputing(RECOMPUTING.with(|r| r.replace(true)))
    }
}

impl Drop for Recomputing {
    fn drop(&mut self) {
        RECOMPUTING.with(|r| r.set(self.0));
    }
}

/// What a checkpointed block needs: run itself on an input, either with live parameters (graph
/// recorded) or with detached copies (no graph), and name its trainable `Var`s.
pub trait Block: Send + Sync {
    /// `live == false` should use `.detach()`ed parameters so that nothing is recorded; this is
    /// only an optimisation (a recorded graph is dropped right after the forward anyway).
    fn forward(&self, x: &Tensor, live: bool) -> Result<Tensor>;
    /// The trainable parameters the block uses; only these receive gradients.
    fn vars(&self) -> Vec<Var>;
}

/// A block over a packed stream held as real rows (differentiated) and padding rows (forward
/// only: their outputs are detached and no real row attends to them).
pub trait RowsBlock: Send + Sync {
    /// Outputs for real rows `x` and, when given, padding rows `pad`; `live` as in `Block`.
    fn forward_rows(
        &self,
        x: &Tensor,
        pad: Option<&Tensor>,
        live: bool,
    ) -> Result<(Tensor, Option<Tensor>)>;
    fn vars(&self) -> Vec<Var>;
}

/// A `RowsBlock` as a `Block` on the real rows: the padding rows ride along in the first
/// forward (handed in and out through the slots) and are gone by the recomputation.
struct CarryPad<B> {
    block: B,
    pad_in: Mutex<Option<Tensor>>,
    pad_out: Mutex<Option<Tensor>>,
}

impl<B: RowsBlock> Block for CarryPad<B> {
    fn forward(&self, x: &Tensor, live: bool) -> Result<Tensor> {
        let pad = self
            .pad_in
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (y, pad) = self.block.forward_rows(x, pad.as_ref(), live)?;
        *self.pad_out.lock().unwrap_or_else(PoisonError::into_inner) = pad;
        Ok(y)
    }

    fn vars(&self) -> Vec<Var> {
        self.block.vars()
    }
}

/// [`checkpoint`] of `block` on the real rows `x` only: the padding rows `pad` pass through
/// the block in the forward, outside the graph, so only `x` is kept for backward and the
/// recomputation runs the real rows alone (padding can be most rows of a batch).
pub fn checkpoint_rows<B: RowsBlock + 'static>(
    x: &Tensor,
    pad: Option<Tensor>,
    block: B,
    side: &SideGrads,
) -> Result<(Tensor, Option<Tensor>)> {
    let carry = Arc::new(CarryPad {
        block,
        pad_in: Mutex::new(pad),
        pad_out: Mutex::new(None),
    });
    let y = checkpoint(x, carry.clone(), side)?;
    let pad = carry
        .pad_out
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    Ok((y, pad))
}

/// Parameter gradients computed inside recomputations, accumulated by `TensorId`, each with
/// its parameter's dtype (a gradient may be kept narrower, see `ops::bf16_copy`).
#[derive(Clone, Default)]
pub struct SideGrads(Arc<Mutex<HashMap<TensorId, (Tensor, DType)>>>);

impl SideGrads {
    fn lock(&self) -> MutexGuard<'_, HashMap<TensorId, (Tensor, DType)>> {
        // A panic elsewhere cannot leave the map half-updated (each entry is replaced whole).
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, v: &Var, grad: &Tensor) -> Result<()> {
        let mut map = self.lock();
        let sum = match map.get(&v.id()) {
            Some((prev, _)) => add_grads(prev, grad, v.dtype())?,
            None => grad.clone(),
        };
        map.insert(v.id(), (sum, v.dtype()));
        Ok(())
    }

    /// Whether nothing is pending (e.g. already merged).
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Adds the collected gradients to `grads` (inserting where absent) and clears `self`.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.lock());
        for (id, (g, dtype)) in pending {
            let sum = match grads.get_id(id) {
                Some(prev) => add_grads(prev, &g, dtype)?,
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(())
    }
}

/// `y = block(x)` with no graph inside the block; backward recomputes the block, returns `d/dx`
/// to the outer graph and adds the parameter gradients to `side`. Keeps `y`'s dtype.
pub fn checkpoint(x: &Tensor, block: Arc<dyn Block>, side: &SideGrads) -> Result<Tensor> {
    let y = block.forward(&x.detach(), false)?;
    let x_tracks = x.track_op();
    // The op node is only recorded (and visited by backward) when an argument leads to a `Var`.
    // A constant `x` would lose the parameter gradients, so anchor the node on a parameter.
    let anchor = if x_tracks {
        x.clone()
    } else {
        match block.vars().first() {
            Some(v) => v.as_tensor().clone(),
            None => return Ok(y.detach()), // nothing to differentiate
        }
    };
    // Own an exact copy of y's data now; the op hands it out in its forward, so the graph holds
    // only `x` (not `y` as well) and y's intermediates die with this function.
    let storage = {
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(s) => Storage::Cpu(strided_copy(s, l)?),
            Storage::Cuda(s) => Storage::Cuda(strided_copy(s, l)?),
            Storage::Metal(s) => Storage::Metal(strided_copy(s, l)?),
        }
    };
    let op = CheckpointOp {
        block,
        side: side.clone(),
        x_tracks,
        shape: y.shape().clone(),
        y: Mutex::new(Some(storage)),
    };
    x.apply_op2_arc(&anchor, Arc::new(Box::new(op)))
}

/// A contiguous copy of a strided view, on any backend.
fn strided_copy<S>(s: &S, l: &Layout) -> Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: `copy_strided_src` writes every element of the fresh buffer before it is read.
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

struct CheckpointOp {
    block: Arc<dyn Block>,
    side: SideGrads,
    x_tracks: bool,
    shape: Shape,
    /// y's data until the (single) forward moves it into the result tensor.
    y: Mutex<Option<Storage>>,
}

impl CheckpointOp {
    fn take_y(&self) -> Result<Storage> {
        let y = self.y.lock().unwrap_or_else(PoisonError::into_inner).take();
        match y {
            Some(y) => Ok(y),
            None => bail!("checkpoint op forward called twice"),
        }
    }
}

impl CustomOp2 for CheckpointOp {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    // The arguments' storages are ignored: the value was computed (detached) before the op.
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match self.take_y()? {
            Storage::Cpu(s) => Ok((s, self.shape.clone())),
            _ => bail!("checkpoint: block output is not on the cpu"),
        }
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match self.take_y()? {
            Storage::Cuda(s) => Ok((s, self.shape.clone())),
            _ => bail!("checkpoint: block output is not on the cuda device"),
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        match self.take_y()? {
            Storage::Metal(s) => Ok((s, self.shape.clone())),
            _ => bail!("checkpoint: block output is not on the metal device"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _recomputing = Recomputing::enter();
        // A fresh Var copy of x is the leaf for d/dx; a constant x needs no gradient.
        let xv = if self.x_tracks {
            Some(Var::from_tensor(&x.detach())?)
        } else {
            None
        };
        let input = xv
            .as_ref()
            .map_or_else(|| x.detach(), |v| v.as_tensor().clone());
        let y = self.block.forward(&input, true)?;
        // The vector-Jacobian product the outer graph asks for: backward seeded with `grad`.
        let g = y.backward_with_grad(grad)?;
        for v in self.block.vars() {
            if let Some(gv) = g.get(v.as_tensor()) {
                self.side.add(&v, gv)?;
            }
        }
        let dx = xv.and_then(|v| g.get(v.as_tensor()).cloned());
        Ok((dx, None))
    }
}
