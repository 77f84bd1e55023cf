//! SplitMix64, the one seedable generator behind every random model this crate builds (the
//! embedded demo and the synthetic benchmark models).
//!
//! Deliberately tiny and dependency-free: weights must be reproducible from a seed on every
//! platform, and a model's bytes must not change when a crates.io generator changes.

/// SplitMix64 (Steele, Lea and Flood 2014): one 64-bit state, well mixed output.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 bits.
    pub(crate) fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[-1, 1)` with 24 bits.
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Approximately standard normal: the centred sum of four uniforms, rescaled to unit
    /// variance (Irwin-Hall). Cheap, and the exact distribution does not matter here.
    pub(crate) fn normal(&mut self) -> f32 {
        let s = self.uniform() + self.uniform() + self.uniform() + self.uniform();
        (s - 2.0) * 3.0f32.sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_determinism() {
        let mut a = SplitMix(7);
        let mut b = SplitMix(7);
        for _ in 0..1000 {
            let (u, v) = (a.uniform(), a.unit());
            assert!((0.0..1.0).contains(&u) && (-1.0..1.0).contains(&v));
            assert_eq!(u, b.uniform());
            assert_eq!(v, b.unit());
        }
    }
}
