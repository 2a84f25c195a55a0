//! Phase reconstruction by fast Griffin-Lim (Griffin and Lim 1984; Perraudin, Balazs and Sondergaard
//! 2013): the waveform whose STFT magnitude matches a given one, so that every generated spectrogram can
//! be listened to without a neural vocoder.

use super::stft::{Complex32, Stft};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The most iterations accepted.
const MAX_ITERATIONS: usize = 10_000;

/// Iterations and momentum (librosa's defaults: 32 and 0.99).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GriffinLimConfig {
    pub iterations: usize,
    /// Fast Griffin-Lim's momentum alpha; 0 is the original algorithm.
    pub momentum: f32,
}

impl Default for GriffinLimConfig {
    fn default() -> Self {
        GriffinLimConfig {
            iterations: 32,
            momentum: 0.99,
        }
    }
}

/// A waveform of `length` samples whose STFT magnitude approximates `magnitudes` (`frames x bins`).
/// Starting from random phases c_0, each iteration projects onto consistent spectrograms and back onto
/// the given magnitude:
///   t_n = STFT(ISTFT(|S| e^{i angle c_{n-1}})),  c_n = t_n - alpha / (1 + alpha) * t_{n-1}.
pub fn griffin_lim(
    stft: &Stft,
    magnitudes: &[f32],
    length: usize,
    config: GriffinLimConfig,
    rng: &mut Rng,
) -> Result<Vec<f32>> {
    if config.iterations > MAX_ITERATIONS {
        return Err(Error::Config(format!(
            "Griffin-Lim iterations must be at most {MAX_ITERATIONS}, got {}",
            config.iterations
        )));
    }
    if !(0.0..1.0).contains(&config.momentum) {
        return Err(Error::Config(format!(
            "Griffin-Lim momentum must be in [0, 1), got {}",
            config.momentum
        )));
    }
    let bins = stft.bins();
    if magnitudes.is_empty() || !magnitudes.len().is_multiple_of(bins) {
        return Err(Error::Data(format!(
            "{} magnitudes are not a whole number of {bins}-bin frames",
            magnitudes.len()
        )));
    }
    if let Some(i) = magnitudes.iter().position(|m| !m.is_finite() || *m < 0.0) {
        return Err(Error::Data(format!(
            "magnitude {i} is {}, not a finite non-negative number",
            magnitudes[i]
        )));
    }
    let frames = magnitudes.len() / bins;
    // The signal must cover every frame for the round trip to keep the frame count.
    let inner = (frames - 1) * stft.hop();
    if length < inner.max(stft.n_fft() / 2 + 1) || length >= inner + stft.hop() {
        return Err(Error::Data(format!(
            "{frames} frames of hop {} belong to a signal of {} to {} samples, not {length}",
            stft.hop(),
            inner.max(stft.n_fft() / 2 + 1),
            inner + stft.hop() - 1
        )));
    }
    let mut angles: Vec<Complex32> = (0..magnitudes.len())
        .map(|_| {
            let phase = 2.0 * std::f32::consts::PI * rng.uniform() as f32;
            Complex32::new(phase.cos(), phase.sin())
        })
        .collect();
    let with_magnitude = |angles: &[Complex32]| -> Vec<Complex32> {
        angles.iter().zip(magnitudes).map(|(a, m)| a * *m).collect()
    };
    let factor = config.momentum / (1.0 + config.momentum);
    let mut previous = vec![Complex32::new(0.0, 0.0); magnitudes.len()];
    for _ in 0..config.iterations {
        let signal = stft.inverse(&with_magnitude(&angles), length)?;
        let rebuilt = stft.forward(&signal)?;
        for ((a, r), p) in angles.iter_mut().zip(&rebuilt).zip(&previous) {
            let c = r - p * factor;
            let norm = c.norm();
            *a = if norm > 1e-16 {
                c / norm
            } else {
                Complex32::new(1.0, 0.0)
            };
        }
        previous = rebuilt;
    }
    stft.inverse(&with_magnitude(&angles), length)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spectral convergence || |STFT(y)| - |S| || / || |S| ||.
    fn convergence(stft: &Stft, y: &[f32], magnitudes: &[f32]) -> f32 {
        let rebuilt = stft.forward(y).unwrap();
        let num: f32 = rebuilt
            .iter()
            .zip(magnitudes)
            .map(|(c, m)| (c.norm() - m).powi(2))
            .sum();
        let den: f32 = magnitudes.iter().map(|m| m * m).sum();
        (num / den).sqrt()
    }

    #[test]
    fn iterations_make_the_magnitude_consistent() {
        let stft = Stft::new(256, 64, 256).unwrap();
        let x: Vec<f32> = (0..4000)
            .map(|i| {
                let t = i as f32 / 16000.0;
                (2.0 * std::f32::consts::PI * (300.0 + 2000.0 * t) * t).sin()
            })
            .collect();
        let magnitudes: Vec<f32> = stft.forward(&x).unwrap().iter().map(|c| c.norm()).collect();
        let mut rng = Rng::new(0);
        let zero = GriffinLimConfig {
            iterations: 0,
            ..Default::default()
        };
        let random_phase = griffin_lim(&stft, &magnitudes, x.len(), zero, &mut rng).unwrap();
        let mut rng = Rng::new(0);
        let config = GriffinLimConfig {
            iterations: 60,
            ..Default::default()
        };
        let y = griffin_lim(&stft, &magnitudes, x.len(), config, &mut rng).unwrap();
        let (before, after) = (
            convergence(&stft, &random_phase, &magnitudes),
            convergence(&stft, &y, &magnitudes),
        );
        assert!(
            after < 0.1 && after < before / 4.0,
            "before {before}, after {after}"
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        let stft = Stft::new(64, 16, 64).unwrap();
        let mut rng = Rng::new(0);
        let good = vec![1.0; 33 * 11];
        let config = GriffinLimConfig::default();
        assert!(griffin_lim(&stft, &good, 160, config, &mut rng).is_ok());
        assert!(griffin_lim(&stft, &good, 500, config, &mut rng).is_err());
        assert!(griffin_lim(&stft, &good[..40], 160, config, &mut rng).is_err());
        let mut negative = good.clone();
        negative[3] = -1.0;
        assert!(griffin_lim(&stft, &negative, 160, config, &mut rng).is_err());
        let many = GriffinLimConfig {
            iterations: usize::MAX,
            ..config
        };
        assert!(griffin_lim(&stft, &good, 160, many, &mut rng).is_err());
    }
}
