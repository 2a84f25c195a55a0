//! Our own seeded random number generator.
//!
//! candle cannot seed its CPU generator, so every random draw the library makes (initial weights, noise,
//! times, minibatches) comes from this ChaCha8 stream. Its state is three numbers, saved in checkpoints,
//! so a resumed run continues the exact stream.

use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// A seeded, resumable random stream.
#[derive(Debug, Clone)]
pub struct Rng {
    inner: ChaCha8Rng,
    seed: u64,
}

/// The saved position of an [`Rng`] (word position as a decimal string: JSON has no u128).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub stream: u64,
    pub word_pos: String,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self {
            inner: ChaCha8Rng::seed_from_u64(seed),
            seed,
        }
    }

    /// An independent stream derived from this seed (for example one for data, one for noise).
    pub fn fork(&self, stream: u64) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(self.seed);
        inner.set_stream(stream);
        Self {
            inner,
            seed: self.seed,
        }
    }

    pub fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    pub fn from_state(state: &RngState) -> Option<Self> {
        let mut inner = ChaCha8Rng::seed_from_u64(state.seed);
        inner.set_stream(state.stream);
        inner.set_word_pos(state.word_pos.parse().ok()?);
        Some(Self {
            inner,
            seed: state.seed,
        })
    }

    /// Uniform on [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.inner.random::<f64>()
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.inner)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        self.inner.random_range(0..n)
    }

    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }

    pub fn uniform_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = Rng::new(7).fork(3);
        a.normal_vec(11);
        let saved = a.state();
        let x = a.normal_vec(5);
        let mut b = Rng::from_state(&saved).unwrap();
        assert_eq!(x, b.normal_vec(5));
    }

    #[test]
    fn forks_differ() {
        let r = Rng::new(1);
        assert_ne!(r.fork(1).next_u64(), r.fork(2).next_u64());
    }
}
