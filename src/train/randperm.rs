//! `torch.randperm(n, generator=g)` on a CPU generator after `g.manual_seed(seed)`: the order
//! transformers' Trainer draws an epoch's pairs in (accelerate's `SeedableRandomSampler` seeds
//! the generator with `seed + epoch` and takes one `randperm`), reproduced so that a shuffled
//! run trains on TRL's batches.

/// torch's CPU engine (`at::mt19937`): the standard 32-bit Mersenne Twister, seeded with the
/// low 32 bits of the seed.
struct Mt19937 {
    state: [u32; N],
    next: usize,
}

const N: usize = 624;
const M: usize = 397;

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 { state, next: N }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next == N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `CPUGeneratorImpl::random64`: two draws, the first the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// A permutation of `0..n` as `torch.randperm(n, generator=torch.Generator().manual_seed(seed))`
/// returns it (ATen's `randperm_cpu`).
pub fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Mt19937::new(seed);
    let mut r: Vec<usize> = (0..n).collect();
    if (n as u64) < (u32::MAX / 20) as u64 {
        // A forward Fisher-Yates with a 32-bit draw modulo the remaining length.
        for i in 0..n.saturating_sub(1) {
            let z = rng.next_u32() as usize % (n - i);
            r.swap(i, z + i);
        }
    } else {
        // torch's inside-out variant with 64-bit draws, for n near 2^32 (checked against torch
        // once at n = 214,748,365, too large for a test).
        for i in 0..n {
            let z = (rng.next_u64() % (i as u64 + 1)) as usize;
            r[i] = r[z];
            r[z] = i;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_the_standard_mersenne_twister() {
        // std::mt19937 with its default seed 5489 gives 4123659995 as its 10000th draw.
        let mut rng = Mt19937::new(5489);
        let tenth_thousand = (0..10_000).map(|_| rng.next_u32()).last();
        assert_eq!(tenth_thousand, Some(4_123_659_995));
    }

    #[test]
    fn permutations_are_torchs() {
        // torch 2.15: torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        assert_eq!(torch_randperm(10, 42), [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]);
        assert_eq!(torch_randperm(10, 43), [8, 4, 9, 0, 5, 1, 6, 7, 2, 3]);
        assert_eq!(torch_randperm(7, 5), [1, 0, 4, 2, 6, 5, 3]);
        assert_eq!(torch_randperm(1, 0), [0]);
        assert!(torch_randperm(0, 0).is_empty());
        // Longer ones by their ends and a checksum, Σ (i+1)·p[i] mod 2^61-1; a seed above 2^32
        // keeps its low 32 bits.
        for (n, seed, head, tail, sum) in [
            (64, 42, [38, 24, 48, 63, 10], [9, 15, 25], 64_970),
            (
                2000,
                7,
                [1615, 344, 801, 1337, 739],
                [848, 1640, 1571],
                1_998_104_126,
            ),
            (
                100_000,
                (1 << 32) + 7,
                [41615, 23657, 92717, 16389, 28607],
                [52301, 18202, 73623],
                250_095_304_457_815,
            ),
        ] {
            let p = torch_randperm(n, seed);
            assert_eq!(p[..5], head, "n {n}");
            assert_eq!(p[n - 3..], tail, "n {n}");
            let sum_of: u128 = p
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as u128 + 1) * v as u128)
                .sum();
            assert_eq!(sum_of % ((1 << 61) - 1), sum, "n {n}");
        }
    }
}
