//! NF4 weights in products: dequantization, and `x @ W^T` over a quantized `W` whose graph node
//! keeps only `x` (and the 4-bit weight it already shares), as bitsandbytes' `MatMul4Bit`
//! saves only the quantized state: the backward dequantizes `W` again for `dx = g @ W`. A
//! product through a dequantized tensor would keep each layer's full-width weight alive from
//! the forward to the backward, the memory QLoRA exists to save.

use crate::model::nf4::{Nf4Rows, BLOCK, DQ_MEAN, DQ_RANGES, NF4};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Rows of a quantized weight dequantized to `[rows, in_f]` in `dtype` (f32 or bf16: each
/// element `code × absmax` in f32, rounded once, as bitsandbytes' `dequantize_4bit`).
pub fn nf4_dequantize(w: &Nf4Rows, dtype: DType) -> Result<Tensor> {
    let op = Dequantize::new(w, dtype)?;
    w.weight.packed.apply_op2_no_bwd(&w.weight.scales, &op)
}

/// `x @ W^T` for `x: [..., in_f]` (f32 or bf16) and the quantized rows `W: [rows, in_f]`,
/// dequantized to `x`'s dtype for the product (bitsandbytes' compute dtype); no gradient for
/// `W`, which is frozen.
pub fn nf4_linear(x: &Tensor, w: &Nf4Rows) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_f = w.in_f();
    if dims.last() != Some(&in_f) {
        bail!("nf4 linear: input {dims:?}, weight expects {in_f} features");
    }
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let op = Product {
        deq: Dequantize::new(w, x.dtype())?,
        rows: w.clone(),
    };
    let x2 = x.reshape((rows, in_f))?.contiguous()?;
    let y = x2.apply_op3(&w.weight.packed, &w.weight.scales, op)?;
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.rows;
    y.reshape(out)
}

#[derive(Clone)]
struct Dequantize {
    first: usize,
    rows: usize,
    in_f: usize,
    dtype: DType,
    /// Double quantization: where the scales' codes start in the packed bytes.
    codes_at: Option<usize>,
}

impl Dequantize {
    fn new(w: &Nf4Rows, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            bail!("nf4: dequantizes to f32 or bf16, not {dtype:?}");
        }
        Ok(Dequantize {
            first: w.first_elem(),
            rows: w.rows,
            in_f: w.in_f(),
            dtype,
            codes_at: w.weight.codes_at,
        })
    }

    fn count(&self) -> usize {
        self.rows * self.in_f
    }

    fn shape(&self) -> Shape {
        Shape::from((self.rows, self.in_f))
    }

    fn check(&self, packed: &Layout, scales: &Layout) -> Result<()> {
        let end = self.first + self.count();
        let blocks = end.div_ceil(BLOCK);
        let (bytes, floats) = match self.codes_at {
            None => (end.div_ceil(2), blocks),
            Some(at) => (
                at.max(end.div_ceil(2)) + blocks,
                DQ_RANGES + blocks.div_ceil(256),
            ),
        };
        let (np, ns) = (packed.shape().elem_count(), scales.shape().elem_count());
        if np < bytes || ns < floats {
            bail!("nf4: rows beyond the quantized weight");
        }
        if packed.contiguous_offsets().is_none() || scales.contiguous_offsets().is_none() {
            bail!("nf4: the quantized weight must be contiguous");
        }
        Ok(())
    }

    fn cpu(
        &self,
        packed: (&CpuStorage, &Layout),
        scales: (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        self.check(packed.1, scales.1)?;
        let (CpuStorage::U8(p), CpuStorage::F32(a)) = (packed.0, scales.0) else {
            bail!("nf4: expected u8 indices and f32 scales");
        };
        let p = &p[packed.1.start_offset()..];
        let a = &a[scales.1.start_offset()..];
        // Each 64-block's scale, as bitsandbytes dequantizes it.
        let scale = |b: usize| match self.codes_at {
            None => a[b],
            Some(at) => a[p[at + b] as usize] * a[DQ_RANGES + b / 256] + a[DQ_MEAN],
        };
        let first = self.first;
        let value = |i: usize| {
            let e = first + i;
            let byte = p[e / 2];
            let nib = if e.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0f
            };
            NF4[nib as usize] * scale(e / BLOCK)
        };
        let n = self.count();
        Ok(match self.dtype {
            DType::BF16 => {
                let mut out = vec![half::bf16::ZERO; n];
                super::par_items(&mut out, self.in_f.max(1), n, |row0, run| {
                    let e0 = row0 * self.in_f;
                    for (k, o) in run.iter_mut().enumerate() {
                        *o = half::bf16::from_f32(value(e0 + k));
                    }
                });
                CpuStorage::BF16(out)
            }
            _ => {
                let mut out = vec![0f32; n];
                super::par_items(&mut out, self.in_f.max(1), n, |row0, run| {
                    let e0 = row0 * self.in_f;
                    for (k, o) in run.iter_mut().enumerate() {
                        *o = value(e0 + k);
                    }
                });
                CpuStorage::F32(out)
            }
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        packed: (&candle_core::CudaStorage, &Layout),
        scales: (&candle_core::CudaStorage, &Layout),
    ) -> Result<candle_core::CudaStorage> {
        self.check(packed.1, scales.1)?;
        cuda::dequantize(self, packed, scales)
    }
}

impl CustomOp2 for Dequantize {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((self.cpu((s1, l1), (s2, l2))?, self.shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.cuda((s1, l1), (s2, l2))?, self.shape()))
    }
}

struct Product {
    deq: Dequantize,
    rows: Nf4Rows,
}

impl Product {
    /// `(m, n, k)` of the product and the dequantized weight's layout read transposed, for an
    /// input of `dtype` laid out as `x`.
    fn dims(&self, dtype: DType, x: &Layout) -> Result<((usize, usize, usize), Layout)> {
        if dtype != self.deq.dtype {
            bail!(
                "nf4 linear: input {dtype:?}, weight dequantized to {:?}",
                self.deq.dtype
            );
        }
        let (m, k) = x.shape().dims2()?;
        if k != self.deq.in_f {
            bail!(
                "nf4 linear: input has {k} features, weight expects {}",
                self.deq.in_f
            );
        }
        let wt = Layout::contiguous(self.deq.shape()).transpose(0, 1)?;
        Ok(((m, self.deq.rows, k), wt))
    }
}

impl CustomOp3 for Product {
    fn name(&self) -> &'static str {
        "nf4-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        packed: &CpuStorage,
        lp: &Layout,
        scales: &CpuStorage,
        la: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((m, n, k), wt) = self.dims(x.dtype(), lx)?;
        let w = self.deq.cpu((packed, lp), (scales, la))?;
        let y = x.matmul(&w, (1, m, n, k), lx, &wt)?;
        Ok((y, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        packed: &candle_core::CudaStorage,
        lp: &Layout,
        scales: &candle_core::CudaStorage,
        la: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((m, n, k), wt) = self.dims(x.dtype(), lx)?;
        let w = self.deq.cuda((packed, lp), (scales, la))?;
        let y = x.matmul(&w, (1, m, n, k), lx, &wt)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _packed: &Tensor,
        _scales: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let w = nf4_dequantize(&self.rows, grad.dtype())?;
        Ok((Some(grad.contiguous()?.matmul(&w)?), None, None))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Dequantize;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
    const MODULE: &str = "orpo_nf4";

    pub fn dequantize(
        op: &Dequantize,
        packed: (&CudaStorage, &Layout),
        scales: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let kind = if op.codes_at.is_some() { "dq_" } else { "" };
        match op.dtype {
            DType::BF16 => typed::<bf16>(&format!("nf4_dequantize_{kind}bf16"), op, packed, scales),
            _ => typed::<f32>(&format!("nf4_dequantize_{kind}f32"), op, packed, scales),
        }
    }

    fn typed<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        name: &str,
        op: &Dequantize,
        packed: (&CudaStorage, &Layout),
        scales: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = packed.0.device().clone();
        let p = crate::ops::cuda_view::<u8>("nf4", packed.0, packed.1)?;
        let a = crate::ops::cuda_view::<f32>("nf4", scales.0, scales.1)?;
        let n = op.count();
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n.max(1))? };
        if n > 0 {
            let mut b = func.builder();
            b.arg(&p);
            b.arg(&a);
            b.arg(&out);
            b.arg(&op.first);
            b.arg(&n);
            let codes_at = op.codes_at.unwrap_or(0);
            if op.codes_at.is_some() {
                b.arg(&codes_at);
            }
            // SAFETY: arguments as the kernel's signature (packed, scales, out, first, n, and
            // for double quantization codes_at); a grid-stride loop over n.
            unsafe { b.launch(crate::ops::grid_stride(n, 256)) }.w()?;
        }
        Ok(T::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nf4::quantize_weight;
    use candle_core::{Device, Var};

    fn weight(out_f: usize, in_f: usize) -> Result<(Tensor, Nf4Rows)> {
        let w = Tensor::randn(0f32, 1.0, (out_f, in_f), &Device::Cpu)?;
        let q = Nf4Rows::whole(quantize_weight(&w, false, &Device::Cpu)?);
        Ok((w, q))
    }

    /// The product, its rows and its input gradient as the plain product over the
    /// dequantized weight; the weight gets no gradient.
    #[test]
    fn the_product_matches_the_dequantized_weight() -> Result<()> {
        // 50 features: blocks of 64 straddle rows.
        let (_, q) = weight(12, 50)?;
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, 3, 50), &Device::Cpu)?.to_dtype(dtype)?,
            )?;
            for part in [q.clone(), q.narrow(5, 4)?] {
                let w = part.dequantize(dtype)?;
                let want = x.as_tensor().broadcast_matmul(&w.t()?)?;
                let got = nf4_linear(x.as_tensor(), &part)?;
                let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                    .abs()?
                    .max_all()?;
                assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{dtype:?}");
                let g = Tensor::randn(0f32, 1.0, got.dims(), &Device::Cpu)?.to_dtype(dtype)?;
                let grads = (got.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?
                    .sum_all()?
                    .backward()?;
                let dx = grads.get(x.as_tensor()).expect("input gradient");
                let want_dx = g.reshape((6, part.rows))?.matmul(&w)?.reshape((2, 3, 50))?;
                let diff = (dx.to_dtype(DType::F32)? - want_dx.to_dtype(DType::F32)?)?
                    .abs()?
                    .max_all()?;
                assert!(diff.to_scalar::<f32>()? < 1e-2, "{dtype:?} dx");
            }
        }
        Ok(())
    }

    /// Kept double-quantized (8-bit codes, ranges, mean), a weight dequantizes to what its
    /// scales dequantized first give, bit for bit, in rows and whole, in 0.52 bytes a weight.
    #[test]
    fn double_quantized_scales_are_kept_in_8_bits() -> Result<()> {
        use crate::model::nf4::{double_quantized, quantize, Nf4Weight};
        // 70 rows of 100: 110 scale blocks over one 256-block; and 700 rows: several.
        for out_f in [70usize, 700] {
            let w = Tensor::randn(0f32, 1.0, (out_f, 100), &Device::Cpu)?;
            let q = quantize_weight(&w, true, &Device::Cpu)?;
            let n = out_f * 100;
            let blocks = n.div_ceil(BLOCK);
            assert_eq!(q.packed.dims1()?, n / 2 + blocks);
            assert_eq!(q.scales.dims1()?, DQ_RANGES + blocks.div_ceil(256));
            let (packed, absmax) = quantize(&w.flatten_all()?.to_vec1::<f32>()?);
            let plain = Nf4Weight {
                packed: Tensor::from_vec(packed, n / 2, &Device::Cpu)?,
                scales: Tensor::from_vec(double_quantized(&absmax), blocks, &Device::Cpu)?,
                codes_at: None,
                out_f,
                in_f: 100,
            };
            let (dq, plain) = (Nf4Rows::whole(q), Nf4Rows::whole(plain));
            for (a, b) in [
                (dq.clone(), plain.clone()),
                (dq.narrow(3, 40)?, plain.narrow(3, 40)?),
            ] {
                for dtype in [DType::F32, DType::BF16] {
                    let a = a.dequantize(dtype)?.to_dtype(DType::F32)?;
                    let b = b.dequantize(dtype)?.to_dtype(DType::F32)?;
                    assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rows_dequantize_as_the_whole_weight_narrowed() -> Result<()> {
        let (w, q) = weight(9, 40)?;
        let whole = q.dequantize(DType::F32)?;
        let part = q.narrow(3, 5)?.dequantize(DType::F32)?;
        let diff = (part - whole.narrow(0, 3, 5)?)?.abs()?.max_all()?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        // 4 bits: within a 15th of each block's scale of the weight.
        let err = (whole - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < scale * 0.2, "{err} vs {scale}");
        let bf = q.dequantize(DType::BF16)?.to_dtype(DType::F32)?;
        let want = q
            .dequantize(DType::F32)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        assert_eq!((bf - want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
