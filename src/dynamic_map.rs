//! bitsandbytes' dynamic 8-bit data type (`create_dynamic_map`): 256 codes whose exponent
//! shrinks as the fraction grows, dense near 0. It holds NF4's double-quantized scales
//! (signed) and the 8-bit optimizer's moments (signed for the first, unsigned for the second).

/// `create_dynamic_map(signed)` (7 exponent bits, 8 bits in all), ascending: signed from
/// -0.99297 to 1, unsigned from 0 to 1.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        // Signed codes spend a bit on the sign: half the fractions per exponent.
        let fractions = if signed { 1usize << i } else { 2usize << i };
        let means = linspace_means(fractions + 1);
        let scale = 10f64.powi(i - 6) as f32;
        data.extend(means.iter().map(|m| scale * m));
        if signed {
            data.extend(means.iter().map(|m| -(scale * m)));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// Midpoints of `torch.linspace(0.1, 1, steps, dtype=float32)`, as torch computes them (f32
/// step; the first half counted up from the start, the second down from the end, each point
/// one fused multiply-add).
fn linspace_means(steps: usize) -> Vec<f32> {
    let (start, end) = (0.1f32, 1.0f32);
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    let points: Vec<f32> = (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect();
    points.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// A code table with its f32 midpoints, for picking codes as bitsandbytes' torch kernel does
/// (`torch.bucketize` over the midpoints: the nearest code, a value on a midpoint taking the
/// lower one).
pub struct CodeMap {
    pub values: Vec<f32>,
    pub bounds: Vec<f32>,
    /// For each value of an f32's top 16 bits, the code of the least value they start: the
    /// search for a code begins there and passes at most a few midpoints.
    start: Vec<u8>,
}

impl CodeMap {
    pub fn new(values: Vec<f32>) -> Self {
        let bounds: Vec<f32> = values.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let start = (0..1u32 << 16)
            .map(|top| {
                // The bucket's least value: its lowest bit pattern when positive, its highest
                // when negative.
                let low = match top & 0x8000 {
                    0 => f32::from_bits(top << 16),
                    _ => f32::from_bits((top << 16) | 0xffff),
                };
                bounds.partition_point(|&b| b < low) as u8
            })
            .collect();
        CodeMap {
            values,
            bounds,
            start,
        }
    }

    /// The code of `x` (in [-1, 1] for a signed map, [0, 1] unsigned): the number of midpoints
    /// below it.
    pub fn code(&self, x: f32) -> u8 {
        if !x.is_finite() {
            return self.bounds.partition_point(|&b| b < x) as u8;
        }
        let mut c = self.start[(x.to_bits() >> 16) as usize] as usize;
        while c < self.bounds.len() && self.bounds[c] < x {
            c += 1;
        }
        c as u8
    }
}

#[cfg(test)]
mod tests {
    use super::{dynamic_map, CodeMap};

    #[test]
    fn maps_have_256_ascending_codes_from_their_ends() {
        for (signed, first) in [(true, -0.992_968_75f32), (false, 0.0)] {
            let m = dynamic_map(signed);
            assert_eq!(m.len(), 256);
            assert!(m.windows(2).all(|w| w[0] < w[1]), "signed {signed}");
            assert!((m[0] - first).abs() < 1e-6, "signed {signed}: {}", m[0]);
            assert_eq!(m[255], 1.0);
        }
        // The unsigned map's smallest nonzero code, as bitsandbytes 0.50 prints it.
        assert_eq!(dynamic_map(false)[1] as f64, 3.250_000_304_433_342_5e-7);
    }

    /// The lookup-started search gives the binary search's code for every value tried: each
    /// midpoint and its neighbours a few ulps away, a sweep of both maps' ranges, signed zeros,
    /// the ends, infinities and NaN.
    #[test]
    fn the_lookup_finds_the_binary_searchs_code() {
        for signed in [true, false] {
            let map = CodeMap::new(dynamic_map(signed));
            let slow = |x: f32| map.bounds.partition_point(|&b| b < x) as u8;
            let mut xs = vec![
                0.0f32,
                -0.0,
                1.0,
                -1.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
            ];
            for &b in &map.bounds {
                for k in -3i32..=3 {
                    xs.push(f32::from_bits((b.to_bits() as i32 + k) as u32));
                }
            }
            xs.extend((0..200_001).map(|i| i as f32 / 100_000.0 - 1.0));
            xs.extend((0..2_000).map(|i| 1e-9f32 * 1.01f32.powi(i)));
            for x in xs {
                assert_eq!(map.code(x), slow(x), "signed {signed}: {x:e}");
            }
        }
    }

    #[test]
    fn codes_are_the_nearest_with_midpoints_going_down() {
        let map = CodeMap::new(vec![-1.0, 0.0, 0.5, 1.0]);
        assert_eq!(map.code(-2.0), 0);
        assert_eq!(map.code(-0.5), 0); // on the midpoint: the lower code
        assert_eq!(map.code(-0.49), 1);
        assert_eq!(map.code(0.25), 1);
        assert_eq!(map.code(0.26), 2);
        assert_eq!(map.code(0.9), 3);
        assert_eq!(map.code(7.0), 3);
    }
}
