//! The short-time Fourier transform and its inverse by weighted overlap-add, centred frames with
//! reflection padding (librosa's `stft(..., center=True, pad_mode="reflect")` and `istft`).

use std::sync::Arc;

use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use crate::error::{Error, Result};

pub use realfft::num_complex::Complex32;

/// The longest FFT accepted (2^16 points): far beyond any speech front end, and a bound on what a
/// configuration can allocate.
const MAX_FFT: usize = 1 << 16;

/// A planned STFT: FFT size, hop, and the periodic Hann window of `win_length` samples centred in
/// `n_fft`, w[n] = 0.5 - 0.5 cos(2 pi n / win_length).
#[derive(Clone)]
pub struct Stft {
    n_fft: usize,
    hop: usize,
    window: Vec<f32>,
    forward: Arc<dyn RealToComplex<f32>>,
    inverse: Arc<dyn ComplexToReal<f32>>,
}

impl std::fmt::Debug for Stft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stft")
            .field("n_fft", &self.n_fft)
            .field("hop", &self.hop)
            .field(
                "win_length",
                &self.window.iter().filter(|w| **w != 0.0).count(),
            )
            .finish()
    }
}

impl Stft {
    /// Plans the transform. `n_fft` must be even and at most 65,536, `0 < win_length <= n_fft`,
    /// `0 < hop <= win_length`.
    pub fn new(n_fft: usize, hop: usize, win_length: usize) -> Result<Self> {
        if n_fft < 2 || !n_fft.is_multiple_of(2) || n_fft > MAX_FFT {
            return Err(Error::Config(format!(
                "n_fft must be an even number from 2 to {MAX_FFT}, got {n_fft}"
            )));
        }
        if win_length == 0 || win_length > n_fft {
            return Err(Error::Config(format!(
                "win_length must be from 1 to n_fft = {n_fft}, got {win_length}"
            )));
        }
        if hop == 0 || hop > win_length {
            return Err(Error::Config(format!(
                "hop_length must be from 1 to win_length = {win_length}, got {hop}"
            )));
        }
        let mut window = vec![0f32; n_fft];
        let offset = (n_fft - win_length) / 2;
        for n in 0..win_length {
            let phase = 2.0 * std::f64::consts::PI * n as f64 / win_length as f64;
            window[offset + n] = (0.5 - 0.5 * phase.cos()) as f32;
        }
        let mut planner = RealFftPlanner::<f32>::new();
        Ok(Stft {
            n_fft,
            hop,
            window,
            forward: planner.plan_fft_forward(n_fft),
            inverse: planner.plan_fft_inverse(n_fft),
        })
    }

    pub fn n_fft(&self) -> usize {
        self.n_fft
    }

    pub fn hop(&self) -> usize {
        self.hop
    }

    /// Frequency bins per frame, n_fft / 2 + 1.
    pub fn bins(&self) -> usize {
        self.n_fft / 2 + 1
    }

    /// Frames of a signal of `len` samples: 1 + len / hop (centred frames).
    pub fn frames(&self, len: usize) -> usize {
        1 + len / self.hop
    }

    /// The complex spectrum, frame-major (`frames(len) x bins()`): frame f is the FFT of the window
    /// times the padded signal from f * hop. The signal is padded by n_fft / 2 reflected samples on each
    /// side, so it must be longer than that.
    pub fn forward(&self, signal: &[f32]) -> Result<Vec<Complex32>> {
        let pad = self.n_fft / 2;
        if signal.len() <= pad {
            return Err(Error::Data(format!(
                "a signal of {} samples is too short for an STFT of {} points (needs more than {pad})",
                signal.len(),
                self.n_fft
            )));
        }
        if let Some(i) = signal.iter().position(|x| !x.is_finite()) {
            return Err(Error::Data(format!("audio sample {i} is not finite")));
        }
        let len = signal.len() as isize;
        let reflect = |j: isize| -> f32 {
            let k = if j < 0 {
                -j
            } else if j >= len {
                2 * (len - 1) - j
            } else {
                j
            };
            signal[k as usize]
        };
        let frames = self.frames(signal.len());
        let bins = self.bins();
        let mut out = vec![Complex32::new(0.0, 0.0); frames * bins];
        let mut buf = self.forward.make_input_vec();
        let mut scratch = self.forward.make_scratch_vec();
        for (f, spectrum) in out.chunks_exact_mut(bins).enumerate() {
            let start = (f * self.hop) as isize - pad as isize;
            for (k, b) in buf.iter_mut().enumerate() {
                *b = self.window[k] * reflect(start + k as isize);
            }
            self.forward
                .process_with_scratch(&mut buf, spectrum, &mut scratch)
                .map_err(|e| Error::Data(format!("FFT failed: {e}")))?;
        }
        Ok(out)
    }

    /// The signal of `length` samples whose STFT is closest to `spectrum` (`frames x bins()`) in the
    /// least-squares sense (Griffin and Lim 1984): windowed inverse FFTs overlap-added and divided by the
    /// summed squared window.
    pub fn inverse(&self, spectrum: &[Complex32], length: usize) -> Result<Vec<f32>> {
        let bins = self.bins();
        if spectrum.is_empty() || !spectrum.len().is_multiple_of(bins) {
            return Err(Error::Data(format!(
                "a spectrum of {} values is not a whole number of {bins}-bin frames",
                spectrum.len()
            )));
        }
        let frames = spectrum.len() / bins;
        let pad = self.n_fft / 2;
        let total = (frames - 1) * self.hop + self.n_fft;
        let mut signal = vec![0f32; total];
        let mut weight = vec![0f32; total];
        let mut frame = self.inverse.make_input_vec();
        let mut buf = self.inverse.make_output_vec();
        let mut scratch = self.inverse.make_scratch_vec();
        let scale = 1.0 / self.n_fft as f32;
        for (f, spec) in spectrum.chunks_exact(bins).enumerate() {
            frame.copy_from_slice(spec);
            // A real signal's spectrum has real DC and Nyquist bins.
            frame[0].im = 0.0;
            frame[bins - 1].im = 0.0;
            self.inverse
                .process_with_scratch(&mut frame, &mut buf, &mut scratch)
                .map_err(|e| Error::Data(format!("inverse FFT failed: {e}")))?;
            let start = f * self.hop;
            for (k, &x) in buf.iter().enumerate() {
                let w = self.window[k];
                signal[start + k] += x * scale * w;
                weight[start + k] += w * w;
            }
        }
        let tiny = f32::MIN_POSITIVE.sqrt();
        for (s, w) in signal.iter_mut().zip(&weight) {
            if *w > tiny {
                *s /= w;
            }
        }
        let mut out: Vec<f32> = signal.into_iter().skip(pad).take(length).collect();
        out.resize(length, 0.0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chirp(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let t = i as f32 / 8000.0;
                (2.0 * std::f32::consts::PI * (200.0 + 900.0 * t) * t).sin() * 0.5
            })
            .collect()
    }

    #[test]
    fn inverse_reconstructs_the_signal() {
        for (n_fft, hop, win) in [(64, 16, 64), (64, 16, 48), (32, 8, 32)] {
            let stft = Stft::new(n_fft, hop, win).unwrap();
            let x = chirp(500);
            let spec = stft.forward(&x).unwrap();
            assert_eq!(spec.len(), stft.frames(500) * stft.bins());
            let y = stft.inverse(&spec, x.len()).unwrap();
            let err = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err < 1e-5,
                "n_fft {n_fft} hop {hop} win {win}: max error {err}"
            );
        }
    }

    #[test]
    fn a_pure_tone_peaks_at_its_bin() {
        // 1 kHz at 8 kHz with a 64-point FFT: bin 8 (125 Hz per bin).
        let stft = Stft::new(64, 16, 64).unwrap();
        let x: Vec<f32> = (0..640)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 8000.0).cos())
            .collect();
        let spec = stft.forward(&x).unwrap();
        let mid = &spec[20 * stft.bins()..21 * stft.bins()];
        let peak = (0..stft.bins())
            .max_by(|&a, &b| mid[a].norm().total_cmp(&mid[b].norm()))
            .unwrap();
        assert_eq!(peak, 8);
        // A Hann window's gain: the peak is n_fft / 4 for a unit cosine.
        assert!((mid[8].norm() - 16.0).abs() < 1e-3, "{}", mid[8].norm());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(Stft::new(63, 16, 63).is_err());
        assert!(Stft::new(64, 0, 64).is_err());
        assert!(Stft::new(64, 16, 65).is_err());
        assert!(Stft::new(1 << 20, 16, 64).is_err());
        let stft = Stft::new(64, 16, 64).unwrap();
        assert!(stft.forward(&[0.0; 32]).is_err());
        assert!(stft.forward(&[f32::NAN; 100]).is_err());
        assert!(stft.inverse(&[Complex32::new(0.0, 0.0); 10], 10).is_err());
    }
}
