//! Random test data and the kernel tables, shared by the kernel test binaries
//! (`kernels.rs`, `kernels_n.rs`).

use ds4_quant::simd::{self, Kernels};
use half::f16;
use rand::Rng;
use rand::rngs::StdRng;

/// The kernel tables of every instruction set this CPU can run (always includes scalar).
pub fn tables() -> Vec<&'static Kernels> {
    simd::supported()
        .into_iter()
        .map(|isa| Kernels::for_isa(isa).expect("supported() lists runnable sets only"))
        .collect()
}

/// A finite f16 scale of either sign, spread over many binades (including tiny ones).
pub fn scale(rng: &mut StdRng) -> f16 {
    let mag = 10f32.powf(rng.random_range(-6.0..1.0));
    f16::from_f32(if rng.random::<bool>() { mag } else { -mag })
}

/// `n` blocks of random bytes (callers overwrite the scale fields with [`scale`]).
pub fn random_blocks<B: bytemuck::Pod>(rng: &mut StdRng, n: usize) -> Vec<B> {
    let mut bytes = vec![0u8; n * size_of::<B>()];
    rng.fill(&mut bytes[..]);
    bytemuck::pod_collect_to_vec(&bytes)
}

/// `n` activations in `[-1, 1)` with occasional large outliers, as in real activations.
pub fn random_f32(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if rng.random_range(0..50) == 0 {
                v * 40.0
            } else {
                v
            }
        })
        .collect()
}
