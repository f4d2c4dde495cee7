//! The global gradient norm (logged as `grad_norm`, and what clipping scales by), reduced in
//! f64 in a fixed order so that it does not depend on thread count or device transfers.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use std::collections::HashMap;

/// Sum of squares read straight from host memory (f32 CPU tensors with the kernels on).
fn host_sum_sq(t: &Tensor) -> Option<f64> {
    // A gradient kept in bf16 (ops::bf16_copy) widens exactly.
    let t = match t.dtype() {
        DType::BF16 if crate::ops::fused_kernels() && t.device().is_cpu() => {
            t.to_dtype(DType::F32).ok()?
        }
        _ => t.clone(),
    };
    if !crate::ops::fusable_f32(&t) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) => Some(sum_sq_f32(&data[a..b])),
        _ => None,
    }
}

/// `sum(x^2)` in f64 over fixed 64K-element blocks summed in order, so the value does not
/// depend on the thread count; blocks run in parallel.
fn sum_sq_f32(x: &[f32]) -> f64 {
    const BLOCK: usize = 1 << 16;
    let mut partial = vec![0f64; x.len().div_ceil(BLOCK)];
    crate::ops::par_items(&mut partial, 1, x.len(), |first, out| {
        for (k, p) in out.iter_mut().enumerate() {
            let start = (first + k) * BLOCK;
            let block = &x[start..(start + BLOCK).min(x.len())];
            // Four lanes: independent dependency chains for the f64 adds.
            let mut acc = [0f64; 4];
            let mut quads = block.chunks_exact(4);
            for q in &mut quads {
                for j in 0..4 {
                    acc[j] += (q[j] as f64) * (q[j] as f64);
                }
            }
            let tail: f64 = quads
                .remainder()
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum();
            *p = acc.iter().sum::<f64>() + tail;
        }
    });
    partial.iter().sum()
}

/// The global L2 norm of all gradients (what is logged as `grad_norm`).
pub fn global_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    // A fixed order keeps the f64 sum, and so the logged value, identical across runs.
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let mut total = 0.0f64;
    // Off the host, each tensor's sum of squares stays on its device and all of them come
    // back in one transfer (one synchronisation per step, not one per tensor).
    let mut on_device = Vec::new();
    for name in names {
        let g = &grads[name];
        match host_sum_sq(g) {
            Some(s) => total += s,
            None => on_device.push(device_sum_sq(g)?),
        }
    }
    if !on_device.is_empty() {
        let sums: Vec<f64> = Tensor::cat(&on_device, 0)?.to_vec1()?;
        total += sums.iter().sum::<f64>();
    }
    Ok(total.sqrt())
}

/// A tensor's sum of squares as f64 partial sums (a vector), left on its device.
fn device_sum_sq(g: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if g.device().is_cuda()
        && crate::ops::cuda_kernels()
        && matches!(g.dtype(), DType::F32 | DType::BF16)
        && g.is_contiguous()
        && g.elem_count() > 0
    {
        return super::sum_sq_cuda::partial_sums(g);
    }
    // In two stages: a reduction to one value runs as one GPU block, ~0.8 ms for a
    // 16M-element weight on an H200; per row first, every row is a block of its own.
    let sq = g.to_dtype(DType::F32)?.sqr()?;
    let sum = if g.rank() < 2 {
        sq.sum_all()?
    } else {
        sq.flatten_to(g.rank() - 2)?.sum(1)?.sum_all()?
    };
    sum.to_dtype(DType::F64)?.reshape(1)
}

/// torch's clip_grad_norm_ coefficient: gradients are scaled by this (at most 1).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::sum_sq_f32;

    /// The blocked, parallel sum of squares agrees with the plain f64 sum (several blocks plus
    /// a ragged tail), and an empty slice gives 0.
    #[test]
    fn blocked_sum_of_squares_matches_the_plain_sum() {
        let x: Vec<f32> = (0..200_003)
            .map(|i| ((i * 37 % 1001) as f32 - 500.0) * 1e-3)
            .collect();
        let plain: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let blocked = sum_sq_f32(&x);
        assert!(
            (blocked - plain).abs() <= 1e-12 * plain,
            "{blocked} vs {plain}"
        );
        assert_eq!(sum_sq_f32(&[]), 0.0);
    }
}
