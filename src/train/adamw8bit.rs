//! bitsandbytes' 8-bit AdamW (transformers' `optim = "adamw_bnb_8bit"`): both moments kept as
//! 8-bit codes of bitsandbytes' dynamic maps (signed for the first moment, unsigned for the
//! second) in blocks of 256 values with one f32 absmax each — about 2 bytes an element
//! instead of 8. Each update dequantizes a block, steps it in f32 as AdamW does, and
//! requantizes it over its new absmax (`_optimizer_update_8bit_blockwise`). Codes are picked
//! as bitsandbytes' CUDA kernels and its torch kernel pick them: the nearest.

use super::optim::Coefs;
use crate::dynamic_map::{dynamic_map, CodeMap};
use std::sync::OnceLock;

/// Values per absmax (bitsandbytes' optimizer blocksize).
pub const BLOCK: usize = 256;
/// bitsandbytes' `min_8bit_size`: smaller tensors keep f32 moments.
pub const MIN_8BIT_SIZE: usize = 4096;

/// The first moment's codes (signed) and the second's (unsigned).
pub fn maps() -> &'static (CodeMap, CodeMap) {
    static MAPS: OnceLock<(CodeMap, CodeMap)> = OnceLock::new();
    MAPS.get_or_init(|| {
        (
            CodeMap::new(dynamic_map(true)),
            CodeMap::new(dynamic_map(false)),
        )
    })
}

/// One moment of one tensor: a code per element, an absmax per block of [`BLOCK`].
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
}

impl Quantized {
    /// bitsandbytes' fresh state: codes and absmax zero (every value 0).
    pub fn zeros(n: usize) -> Self {
        Quantized {
            codes: vec![0; n],
            absmax: vec![0.0; n.div_ceil(BLOCK)],
        }
    }

    /// Quantizes `values` over `map` (bitsandbytes' `quantize_blockwise`, blocksize 256).
    pub fn quantize(values: &[f32], map: &CodeMap) -> Self {
        let mut q = Quantized::zeros(values.len());
        for ((v, c), a) in values
            .chunks(BLOCK)
            .zip(q.codes.chunks_mut(BLOCK))
            .zip(q.absmax.iter_mut())
        {
            *a = quantize_block(v, map, c);
        }
        q
    }

    pub fn dequantize(&self, map: &CodeMap) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map.values[c as usize] * self.absmax[i / BLOCK])
            .collect()
    }
}

/// Codes for one block of values into `codes`; returns the absmax to store. As bitsandbytes'
/// torch kernel: a full block scaled by the reciprocal of its absmax, a short last block
/// divided by it (and its stored absmax kept at least 1e-38), each clamped to [-1, 1].
fn quantize_block(values: &[f32], map: &CodeMap, codes: &mut [u8]) -> f32 {
    let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = absmax.max(1e-38);
    if values.len() == BLOCK {
        let r = 1.0 / scale;
        for (c, &v) in codes.iter_mut().zip(values) {
            *c = map.code((v * r).clamp(-1.0, 1.0));
        }
        absmax
    } else {
        for (c, &v) in codes.iter_mut().zip(values) {
            *c = map.code((v / scale).clamp(-1.0, 1.0));
        }
        scale
    }
}

/// One block's update: `p` and `g` its values, the moments its codes and absmax.
fn update_block(
    p: &mut [f32],
    g: &[f32],
    (cm, am): (&mut [u8], &mut f32),
    (cv, av): (&mut [u8], &mut f32),
    c: Coefs,
) {
    let (sm, sv) = maps();
    let mut m = [0f32; BLOCK];
    let mut v = [0f32; BLOCK];
    for i in 0..p.len() {
        let gi = g[i] * c.grad_scale;
        let mi = c.beta1 * (sm.values[cm[i] as usize] * *am) + c.one_minus_beta1 * gi;
        let vi = c.beta2 * (sv.values[cv[i] as usize] * *av) + c.one_minus_beta2 * gi * gi;
        let denom = vi.sqrt() / c.bc2_sqrt + c.eps;
        p[i] = p[i] * c.decay - c.step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
    let n = p.len();
    *am = quantize_block(&m[..n], sm, cm);
    *av = quantize_block(&v[..n], sv, cv);
}

/// The update of one tensor on the host: blocks in parallel, each as [`update_block`].
pub(super) fn update(p: &mut [f32], g: &[f32], m: &mut Quantized, v: &mut Quantized, c: Coefs) {
    let threads = candle_core::utils::get_num_threads().max(1);
    let blocks_per_chunk = p.len().div_ceil(BLOCK).div_ceil(threads).max(64);
    let chunk = blocks_per_chunk * BLOCK;
    std::thread::scope(|s| {
        for (((((pc, gc), mc), vc), amc), avc) in p
            .chunks_mut(chunk)
            .zip(g.chunks(chunk))
            .zip(m.codes.chunks_mut(chunk))
            .zip(v.codes.chunks_mut(chunk))
            .zip(m.absmax.chunks_mut(blocks_per_chunk))
            .zip(v.absmax.chunks_mut(blocks_per_chunk))
        {
            s.spawn(move || {
                for (((((pb, gb), mb), vb), a1), a2) in pc
                    .chunks_mut(BLOCK)
                    .zip(gc.chunks(BLOCK))
                    .zip(mc.chunks_mut(BLOCK))
                    .zip(vc.chunks_mut(BLOCK))
                    .zip(amc.iter_mut())
                    .zip(avc.iter_mut())
                {
                    update_block(pb, gb, (mb, a1), (vb, a2), c);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coefs() -> Coefs {
        Coefs {
            beta1: 0.9,
            beta2: 0.999,
            one_minus_beta1: 0.1,
            one_minus_beta2: 0.001,
            decay: 1.0,
            step_size: 1e-2,
            bc2_sqrt: 1.0,
            eps: 1e-8,
            grad_scale: 1.0,
        }
    }

    /// The parallel update equals the block-by-block one, over many chunks and a short block.
    #[test]
    fn parallel_update_equals_the_sequential_one() {
        let n = 70 * BLOCK * 4 + 37;
        let p0: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729 % 997) as f32 - 498.0) * 1e-4)
            .collect();
        let (mut p1, mut m1, mut v1) = (p0.clone(), Quantized::zeros(n), Quantized::zeros(n));
        for _ in 0..2 {
            update(&mut p1, &g, &mut m1, &mut v1, coefs());
        }
        let (mut p2, mut m2, mut v2) = (p0.clone(), Quantized::zeros(n), Quantized::zeros(n));
        for _ in 0..2 {
            for (b, (pb, gb)) in p2.chunks_mut(BLOCK).zip(g.chunks(BLOCK)).enumerate() {
                let r = b * BLOCK..(b * BLOCK + pb.len());
                update_block(
                    pb,
                    gb,
                    (&mut m2.codes[r.clone()], &mut m2.absmax[b]),
                    (&mut v2.codes[r], &mut v2.absmax[b]),
                    coefs(),
                );
            }
        }
        assert_eq!(p1, p2);
        assert_eq!((m1, v1), (m2, v2));
        assert_ne!(p1, p0);
    }

    /// Quantizing then dequantizing keeps each value within half its map's step of it, and a
    /// zero block stays zero.
    #[test]
    fn round_trip_stays_within_a_code_step() {
        let (sm, _) = maps();
        let mut x: Vec<f32> = (0..600)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0)
            .collect();
        x[256..512].iter_mut().for_each(|v| *v = 0.0);
        let q = Quantized::quantize(&x, sm);
        assert_eq!(q.absmax[1], 0.0);
        let back = q.dequantize(sm);
        for (a, b) in x.iter().zip(&back) {
            // The signed map's widest step near 1 is ~0.0105; its lowest code is -0.99297.
            assert!((a - b).abs() <= 0.0071, "{a} vs {b}");
        }
        assert!(back[256..512].iter().all(|&v| v == 0.0));
    }
}
