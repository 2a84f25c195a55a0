//! Audio for speech models: the short-time Fourier transform, log-mel spectrograms, mel-to-waveform by
//! Griffin-Lim, and WAV files in and out.
//!
//! The defaults follow the HiFi-GAN / LJSpeech front end that most open mel-spectrogram models use:
//! 22,050 Hz audio, a 1,024-point FFT and Hann window, a hop of 256 samples (86 frames per second), 80 mel
//! bands from 0 to 8,000 Hz on the Slaney mel scale with Slaney area normalisation, magnitude (not power)
//! spectra and `ln(max(mel, 1e-5))` compression. Spectrograms are time-major: frame `f`, band `b` at
//! `values[f * n_mels + b]`, the layout a sequence model reads.

mod griffin_lim;
mod mel;
mod stft;
mod wav;

pub use griffin_lim::{griffin_lim, GriffinLimConfig};
pub use mel::{hz_to_mel, mel_filters, mel_to_hz, LogMel, MelConfig, MelSpectrogram, LOG_FLOOR};
pub use stft::{Complex32, Stft};
pub use wav::{read_wav, wav_bytes, write_wav, Wave};
