//! Mel filter banks and log-mel spectrograms (librosa's `filters.mel(htk=False, norm="slaney")` and
//! `feature.melspectrogram(power=1)`, then `ln(max(mel, 1e-5))`).

use serde::{Deserialize, Serialize};

use super::griffin_lim::{griffin_lim, GriffinLimConfig};
use super::stft::Stft;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The floor under mel magnitudes before the logarithm: log-mel values are at least ln(1e-5) = -11.51.
pub const LOG_FLOOR: f32 = 1e-5;

/// The most mel bands accepted.
const MAX_MELS: usize = 512;

/// The front end's settings. The default is the HiFi-GAN / LJSpeech one (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MelConfig {
    pub sample_rate: u32,
    pub n_fft: usize,
    pub hop_length: usize,
    pub win_length: usize,
    pub n_mels: usize,
    pub f_min: f32,
    pub f_max: f32,
}

impl Default for MelConfig {
    fn default() -> Self {
        MelConfig {
            sample_rate: 22_050,
            n_fft: 1024,
            hop_length: 256,
            win_length: 1024,
            n_mels: 80,
            f_min: 0.0,
            f_max: 8000.0,
        }
    }
}

/// The Slaney mel scale: 200/3 Hz per mel up to 1 kHz (mel 15), then 27 mels per factor 6.4.
const F_SP: f64 = 200.0 / 3.0;
const MIN_LOG_HZ: f64 = 1000.0;
const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP;

fn log_step() -> f64 {
    6.4f64.ln() / 27.0
}

/// Hz to mel on the Slaney scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above
/// (27 mels per factor 6.4).
pub fn hz_to_mel(hz: f64) -> f64 {
    if hz >= MIN_LOG_HZ {
        MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() / log_step()
    } else {
        hz / F_SP
    }
}

/// The inverse of [`hz_to_mel`].
pub fn mel_to_hz(mel: f64) -> f64 {
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HZ * ((mel - MIN_LOG_MEL) * log_step()).exp()
    } else {
        mel * F_SP
    }
}

/// The mel filter bank, `n_mels x (n_fft / 2 + 1)` row-major: triangles between n_mels + 2 points equally
/// spaced in mel from f_min to f_max, each scaled to unit area, 2 / (f_{i+2} - f_i) (Slaney
/// normalisation).
pub fn mel_filters(config: &MelConfig) -> Result<Vec<f32>> {
    config.validate()?;
    let bins = config.n_fft / 2 + 1;
    let sr = config.sample_rate as f64;
    let fft_hz: Vec<f64> = (0..bins)
        .map(|k| k as f64 * sr / config.n_fft as f64)
        .collect();
    let (lo, hi) = (
        hz_to_mel(config.f_min as f64),
        hz_to_mel(config.f_max as f64),
    );
    let points: Vec<f64> = (0..config.n_mels + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (config.n_mels + 1) as f64))
        .collect();
    let mut filters = vec![0f32; config.n_mels * bins];
    for (m, row) in filters.chunks_exact_mut(bins).enumerate() {
        let (left, centre, right) = (points[m], points[m + 1], points[m + 2]);
        let area = 2.0 / (right - left);
        for (w, &f) in row.iter_mut().zip(&fft_hz) {
            let rising = (f - left) / (centre - left);
            let falling = (right - f) / (right - centre);
            *w = (rising.min(falling).max(0.0) * area) as f32;
        }
    }
    Ok(filters)
}

impl MelConfig {
    /// Checks every size before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        if !(1000..=384_000).contains(&self.sample_rate) {
            return Err(Error::Config(format!(
                "sample_rate must be from 1,000 to 384,000 Hz, got {}",
                self.sample_rate
            )));
        }
        if self.n_mels == 0 || self.n_mels > MAX_MELS {
            return Err(Error::Config(format!(
                "n_mels must be from 1 to {MAX_MELS}, got {}",
                self.n_mels
            )));
        }
        let nyquist = self.sample_rate as f32 / 2.0;
        if !(self.f_min >= 0.0 && self.f_min < self.f_max && self.f_max <= nyquist) {
            return Err(Error::Config(format!(
                "the mel bands need 0 <= f_min < f_max <= {nyquist} Hz (half the sample rate), got \
                 f_min = {} and f_max = {}",
                self.f_min, self.f_max
            )));
        }
        // The FFT sizes are checked by Stft::new; a bank needs at least one bin per band to mean much,
        // which is the user's choice, not an error.
        Stft::new(self.n_fft, self.hop_length, self.win_length).map(|_| ())
    }
}

/// A log-mel spectrogram, time-major: `values[frame * n_mels + band]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    pub frames: usize,
    pub n_mels: usize,
    pub values: Vec<f32>,
}

/// The log-mel front end: STFT, magnitude, mel filter bank, `ln(max(., 1e-5))`.
#[derive(Debug, Clone)]
pub struct MelSpectrogram {
    config: MelConfig,
    stft: Stft,
    filters: Vec<f32>,
}

impl MelSpectrogram {
    pub fn new(config: MelConfig) -> Result<Self> {
        let filters = mel_filters(&config)?;
        let stft = Stft::new(config.n_fft, config.hop_length, config.win_length)?;
        Ok(MelSpectrogram {
            config,
            stft,
            filters,
        })
    }

    pub fn config(&self) -> &MelConfig {
        &self.config
    }

    pub fn stft(&self) -> &Stft {
        &self.stft
    }

    /// The filter bank, `n_mels x bins` row-major.
    pub fn filters(&self) -> &[f32] {
        &self.filters
    }

    /// Magnitude spectra, `frames x bins`.
    pub fn magnitudes(&self, signal: &[f32]) -> Result<Vec<f32>> {
        Ok(self
            .stft
            .forward(signal)?
            .iter()
            .map(|c| c.norm())
            .collect())
    }

    /// Mel magnitudes of magnitude spectra (`frames x bins` to `frames x n_mels`).
    pub fn mel_of_magnitudes(&self, magnitudes: &[f32]) -> Vec<f32> {
        let bins = self.stft.bins();
        let mut out = Vec::with_capacity(magnitudes.len() / bins * self.config.n_mels);
        for frame in magnitudes.chunks_exact(bins) {
            for row in self.filters.chunks_exact(bins) {
                out.push(row.iter().zip(frame).map(|(w, s)| w * s).sum());
            }
        }
        out
    }

    /// The log-mel spectrogram of a mono signal at the configured sample rate.
    pub fn log_mel(&self, signal: &[f32]) -> Result<LogMel> {
        let mel = self.mel_of_magnitudes(&self.magnitudes(signal)?);
        Ok(LogMel {
            frames: mel.len() / self.config.n_mels,
            n_mels: self.config.n_mels,
            values: mel.into_iter().map(|m| m.max(LOG_FLOOR).ln()).collect(),
        })
    }

    /// A waveform for a log-mel spectrogram, to listen to: magnitudes by [`Self::magnitudes_of_log_mel`]
    /// (100 updates), phases by fast Griffin-Lim ([`GriffinLimConfig::default`]); (frames - 1) * hop
    /// samples.
    pub fn waveform_of_log_mel(&self, log_mel: &LogMel, rng: &mut Rng) -> Result<Vec<f32>> {
        let magnitudes = self.magnitudes_of_log_mel(log_mel, 100)?;
        let length = log_mel.frames.saturating_sub(1).max(1) * self.stft.hop();
        griffin_lim(
            &self.stft,
            &magnitudes,
            length,
            GriffinLimConfig::default(),
            rng,
        )
    }

    /// Magnitude spectra (`frames x bins`) whose mel bands best match `log_mel`: the non-negative
    /// least-squares solution of M s = exp(log_mel) per frame, by `iterations` multiplicative updates
    /// (Lee and Seung 2001), s <- s * (M^T y) / (M^T M s). Bins no band covers stay zero.
    pub fn magnitudes_of_log_mel(&self, log_mel: &LogMel, iterations: usize) -> Result<Vec<f32>> {
        let (n_mels, bins) = (self.config.n_mels, self.stft.bins());
        if log_mel.n_mels != n_mels || log_mel.values.len() != log_mel.frames * n_mels {
            return Err(Error::Data(format!(
                "a log-mel spectrogram of {} bands and {} values does not fit this front end's {n_mels} \
                 bands",
                log_mel.n_mels,
                log_mel.values.len()
            )));
        }
        if let Some(i) = log_mel.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Data(format!("log-mel value {i} is not finite")));
        }
        let mut out = vec![0f32; log_mel.frames * bins];
        let mut mt_y = vec![0f32; bins];
        let mut ms = vec![0f32; n_mels];
        for (frame, s) in log_mel
            .values
            .chunks_exact(n_mels)
            .zip(out.chunks_exact_mut(bins))
        {
            let y: Vec<f32> = frame.iter().map(|v| v.exp()).collect();
            mt_y.iter_mut().for_each(|v| *v = 0.0);
            for (row, &ym) in self.filters.chunks_exact(bins).zip(&y) {
                for (acc, w) in mt_y.iter_mut().zip(row) {
                    *acc += w * ym;
                }
            }
            s.copy_from_slice(&mt_y);
            for _ in 0..iterations {
                for (m, row) in self.filters.chunks_exact(bins).enumerate() {
                    ms[m] = row.iter().zip(s.iter()).map(|(w, v)| w * v).sum();
                }
                for (k, v) in s.iter_mut().enumerate() {
                    let denominator: f32 = self
                        .filters
                        .chunks_exact(bins)
                        .zip(&ms)
                        .map(|(row, msm)| row[k] * msm)
                        .sum();
                    if denominator > 0.0 {
                        *v *= mt_y[k] / denominator;
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mel_scale_inverts_and_is_continuous_at_1_khz() {
        for hz in [0.0, 55.0, 440.0, 999.0, 1000.0, 1001.0, 4000.0, 11025.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 1e-9 * (1.0 + hz));
        }
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
        assert!((hz_to_mel(999.999) - hz_to_mel(1000.0)).abs() < 1e-4);
    }

    #[derive(serde::Deserialize)]
    struct Librosa {
        signal: Vec<f32>,
        log_mel: Vec<Vec<f32>>,
        small_filters: Vec<Vec<f32>>,
    }

    /// librosa 0.11's values (tests/fixtures/librosa_mel.json, made by make_librosa_mel.py).
    fn librosa() -> Librosa {
        serde_json::from_str(include_str!("../../tests/fixtures/librosa_mel.json")).unwrap()
    }

    #[test]
    fn log_mel_matches_librosa() {
        let reference = librosa();
        let mel = MelSpectrogram::new(MelConfig::default()).unwrap();
        let ours = mel.log_mel(&reference.signal).unwrap();
        assert_eq!((ours.frames, ours.n_mels), (reference.log_mel.len(), 80));
        let mut worst = 0f32;
        for (f, row) in reference.log_mel.iter().enumerate() {
            for (b, want) in row.iter().enumerate() {
                worst = worst.max((ours.values[f * 80 + b] - want).abs());
            }
        }
        assert!(worst < 1e-3, "largest log-mel difference {worst}");
    }

    #[test]
    fn filters_match_librosa() {
        let config = MelConfig {
            sample_rate: 8000,
            n_fft: 64,
            hop_length: 16,
            win_length: 64,
            n_mels: 8,
            f_min: 0.0,
            f_max: 4000.0,
        };
        let ours = mel_filters(&config).unwrap();
        let want: Vec<f32> = librosa().small_filters.concat();
        assert_eq!(ours.len(), want.len());
        for (a, b) in ours.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn filters_have_unit_area_in_hz() {
        // Slaney normalisation: each triangle's height is 2 / width, so its integral over Hz is 1; the
        // bins sample it every sr / n_fft Hz.
        let config = MelConfig {
            n_fft: 4096,
            hop_length: 1024,
            win_length: 4096,
            n_mels: 20,
            ..MelConfig::default()
        };
        let filters = mel_filters(&config).unwrap();
        let bin_hz = config.sample_rate as f32 / config.n_fft as f32;
        for row in filters.chunks_exact(config.n_fft / 2 + 1) {
            let area: f32 = row.iter().sum::<f32>() * bin_hz;
            assert!((area - 1.0).abs() < 0.02, "{area}");
        }
    }

    #[test]
    fn bad_configs_are_refused_before_allocating() {
        let bad = [
            MelConfig {
                sample_rate: 10,
                ..MelConfig::default()
            },
            MelConfig {
                n_mels: 0,
                ..MelConfig::default()
            },
            MelConfig {
                n_mels: 1 << 30,
                ..MelConfig::default()
            },
            MelConfig {
                f_max: 20_000.0,
                ..MelConfig::default()
            },
            MelConfig {
                f_min: 9000.0,
                ..MelConfig::default()
            },
            MelConfig {
                f_min: f32::NAN,
                ..MelConfig::default()
            },
            MelConfig {
                n_fft: 1 << 40,
                ..MelConfig::default()
            },
        ];
        for config in bad {
            assert!(MelSpectrogram::new(config.clone()).is_err(), "{config:?}");
        }
    }

    #[test]
    fn magnitudes_are_recovered_up_to_the_bank() {
        let mel = MelSpectrogram::new(MelConfig::default()).unwrap();
        let x: Vec<f32> = (0..4096)
            .map(|i| {
                let t = i as f32 / 22050.0;
                (2.0 * std::f32::consts::PI * 300.0 * t).sin()
                    + 0.3 * (2.0 * std::f32::consts::PI * 2500.0 * t).sin()
            })
            .collect();
        let target = mel.log_mel(&x).unwrap();
        let s = mel.magnitudes_of_log_mel(&target, 200).unwrap();
        let again = mel.mel_of_magnitudes(&s);
        let exact: Vec<f32> = target.values.iter().map(|v| v.exp()).collect();
        let err: f32 = again
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = exact.iter().map(|b| b * b).sum::<f32>().sqrt();
        assert!(err < 0.05 * norm, "relative error {}", err / norm);
        assert!(s.iter().all(|v| *v >= 0.0));
    }
}
