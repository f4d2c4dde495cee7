//! 4-bit NormalFloat (NF4) weights as bitsandbytes makes them for QLoRA (arXiv 2305.14314):
//! the row-major weight cut into blocks of 64, each stored as 4-bit indices into the NF4 table
//! scaled by the block's largest magnitude (`absmax`); with double quantization the absmax
//! values are themselves quantized to 8 bits (blocks of 256, bitsandbytes' signed dynamic map)
//! around their mean, and kept so (0.52 bytes a weight instead of 0.56). The 4-bit step follows
//! bitsandbytes 0.50's CPU path value for value (`quantize_4bit` / `dequantize_4bit`), the
//! 8-bit step its CUDA kernel's nearest code (`quantize_blockwise` with `create_dynamic_map`),
//! so a run's dequantized weights are the ones TRL + PEFT train against.

use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// Elements per absmax block (bitsandbytes' `Params4bit` default).
pub const BLOCK: usize = 64;
/// absmax values per block of the double quantization (bitsandbytes' `quantize_4bit`).
const BLOCK2: usize = 256;

/// bitsandbytes' NF4 table (`get_4bit_type("nf4")`), ascending.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A quantized weight `[out_f, in_f]` on its device: two indices a byte (the even element in
/// the high nibble), and each 64-block's scale. Plain, `scales` holds the scales in f32.
/// Double-quantized, `packed` goes on after the indices with each scale's 8-bit code (from
/// byte `codes_at`), and `scales` holds the dynamic map (256 values), the mean and each
/// 256-block's range (`DQ_*` offsets): a scale is `map[code] × range + mean`.
#[derive(Clone)]
pub struct Nf4Weight {
    pub packed: Tensor,
    pub scales: Tensor,
    /// Where the scales' 8-bit codes start in `packed` (double quantization).
    pub codes_at: Option<usize>,
    pub out_f: usize,
    pub in_f: usize,
}

/// Offsets in a double-quantized weight's `scales`: the dynamic map, the mean, the ranges.
pub const DQ_MEAN: usize = 256;
pub const DQ_RANGES: usize = 257;

/// Rows `row0..row0 + rows` of a quantized weight (a fused projection's part shares the
/// whole weight's storage).
#[derive(Clone)]
pub struct Nf4Rows {
    pub weight: Arc<Nf4Weight>,
    pub row0: usize,
    pub rows: usize,
}

impl Nf4Rows {
    pub fn whole(weight: Nf4Weight) -> Self {
        let rows = weight.out_f;
        Nf4Rows {
            weight: Arc::new(weight),
            row0: 0,
            rows,
        }
    }

    pub fn in_f(&self) -> usize {
        self.weight.in_f
    }

    /// The first element of these rows in the weight's flat order.
    pub fn first_elem(&self) -> usize {
        self.row0 * self.weight.in_f
    }

    /// Rows `start..start + len` of these rows.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.rows {
            candle_core::bail!(
                "nf4: rows {start}..{} of a part with {} rows",
                start + len,
                self.rows
            );
        }
        Ok(Nf4Rows {
            weight: self.weight.clone(),
            row0: self.row0 + start,
            rows: len,
        })
    }

    /// The rows dequantized, `[rows, in_f]` in `dtype` (f32 products rounded once).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        crate::ops::nf4_dequantize(self, dtype)
    }
}

/// Quantizes `values` (a weight's elements, row-major) as bitsandbytes' `quantize_4bit(A,
/// blocksize=64, quant_type="nf4")`: the packed indices and each block's absmax.
pub fn quantize(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bounds: Vec<f32> = NF4.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    // torch.bucketize(right=False): the number of bounds below the value.
    let index = |s: f32| bounds.partition_point(|&b| b < s) as u8;
    let n = values.len();
    let full = n - n % BLOCK;
    let mut absmax = Vec::with_capacity(n.div_ceil(BLOCK));
    let mut idx = vec![0u8; n + n % 2];
    // Padding to an even count quantizes a 0.
    if n % 2 == 1 {
        idx[n] = index(0.0);
    }
    for (b, block) in values.chunks(BLOCK).enumerate() {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let out = &mut idx[b * BLOCK..b * BLOCK + block.len()];
        if b * BLOCK < full {
            // Full blocks scale by the reciprocal (of a zero block's 1e-38); the last, short
            // block divides, and keeps its clamped absmax.
            let r = 1.0 / am.max(1e-38);
            for (o, &v) in out.iter_mut().zip(block) {
                *o = index((v * r).clamp(-1.0, 1.0));
            }
            absmax.push(am);
        } else {
            let am = am.max(1e-38);
            for (o, &v) in out.iter_mut().zip(block) {
                *o = index((v / am).clamp(-1.0, 1.0));
            }
            absmax.push(am);
        }
    }
    let packed = idx.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// The element `i` of a packed weight, dequantized in f32.
pub fn dequantize_elem(packed: &[u8], absmax: &[f32], i: usize) -> f32 {
    let byte = packed[i / 2];
    let nib = if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0x0f
    };
    NF4[nib as usize] * absmax[i / BLOCK]
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: 8-bit codes with a dynamic exponent,
/// ascending, from -0.99297 to 1.
pub fn dynamic_map() -> Vec<f32> {
    crate::dynamic_map::dynamic_map(true)
}

/// A scale's double quantization: its 8-bit code, each 256-block's range, the mean.
pub struct DoubleQuantized {
    pub codes: Vec<u8>,
    pub ranges: Vec<f32>,
    pub mean: f32,
}

impl DoubleQuantized {
    /// The scales as bitsandbytes dequantizes them: `map[code] × range + mean`, in f32.
    pub fn scales(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| map[q as usize] * self.ranges[i / BLOCK2] + self.mean)
            .collect()
    }
}

/// Double quantization of 4-bit absmax values (bitsandbytes' `bnb_4bit_use_double_quant`:
/// `quantize_blockwise(absmax - mean, blocksize=256)`). Each deviation from the mean takes
/// the nearest code of the dynamic map over its 256-block's largest deviation, as
/// bitsandbytes' CUDA kernel picks it. Its CPU path looks codes up in a 65536-entry table
/// instead, which picks the neighbouring code when the deviation lies within 2^-15 of a
/// midpoint between codes (near 0, where codes are denser than that, always): such a scale
/// then differs by a whole code step. The mean is the f64 sum's, rounded once (torch's f32
/// reduction order depends on its threads).
pub fn double_quantize(absmax: &[f32]) -> DoubleQuantized {
    let code = dynamic_map();
    let sum: f64 = absmax.iter().map(|&v| v as f64).sum();
    let mean = (sum / absmax.len().max(1) as f64) as f32;
    let mut out = DoubleQuantized {
        codes: Vec::with_capacity(absmax.len()),
        ranges: Vec::with_capacity(absmax.len().div_ceil(BLOCK2)),
        mean,
    };
    for block in absmax.chunks(BLOCK2) {
        let centred: Vec<f32> = block.iter().map(|&v| v - mean).collect();
        let am = centred.iter().fold(0f32, |m, v| m.max(v.abs()));
        out.ranges.push(am);
        if am == 0.0 {
            // Every deviation is 0: the code for 0 (any code times a zero range is 0).
            let zero = nearest_code(&code, 0.0) as u8;
            out.codes.extend(block.iter().map(|_| zero));
            continue;
        }
        let r = 1.0 / am;
        for v in centred {
            out.codes
                .push(nearest_code(&code, (v * r).clamp(-1.0, 1.0)) as u8);
        }
    }
    out
}

/// The scales double quantization leaves (see [`double_quantize`]).
pub fn double_quantized(absmax: &[f32]) -> Vec<f32> {
    double_quantize(absmax).scales()
}

/// The index of the code nearest `x` (the lower of two equally near).
fn nearest_code(code: &[f32], x: f32) -> usize {
    let above = code.partition_point(|&c| c < x).min(code.len() - 1);
    match above.checked_sub(1) {
        Some(below) if (x - code[below]).abs() <= (code[above] - x).abs() => below,
        _ => above,
    }
}

/// Quantizes a weight `[out_f, in_f]` (any float dtype, any device) to NF4 on the host and
/// puts the result on `device`.
pub fn quantize_weight(w: &Tensor, double_quant: bool, device: &Device) -> Result<Nf4Weight> {
    let (out_f, in_f) = w.dims2()?;
    let values = w
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (mut packed, absmax) = quantize(&values);
    let (scales, codes_at) = match double_quant {
        false => (absmax, None),
        true => {
            let dq = double_quantize(&absmax);
            let at = packed.len();
            packed.extend_from_slice(&dq.codes);
            let mut table = dynamic_map();
            table.push(dq.mean);
            table.extend_from_slice(&dq.ranges);
            (table, Some(at))
        }
    };
    let (np, ns) = (packed.len(), scales.len());
    Ok(Nf4Weight {
        packed: Tensor::from_vec(packed, np, device)?,
        scales: Tensor::from_vec(scales, ns, device)?,
        codes_at,
        out_f,
        in_f,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_to_the_nearest_table_entry() {
        let values: Vec<f32> = (0..130)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (packed, absmax) = quantize(&values);
        assert_eq!((packed.len(), absmax.len()), (65, 3));
        for (i, &v) in values.iter().enumerate() {
            let got = dequantize_elem(&packed, &absmax, i);
            let am = absmax[i / BLOCK];
            let best = NF4
                .iter()
                .map(|c| (c * am - v).abs())
                .fold(f32::MAX, f32::min);
            assert!((got - v).abs() <= best + 1e-6 * am, "element {i}");
        }
    }

    #[test]
    fn the_dynamic_map_is_bitsandbytes_shape() {
        let m = dynamic_map();
        assert_eq!(m.len(), 256);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!((m[0] + 0.993).abs() < 1e-3);
        assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 1);
    }
}
