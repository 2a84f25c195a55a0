//! WAV files: 16-bit PCM out (written atomically), 8/16/24/32-bit PCM or float in, mixed down to mono.

use std::io::Cursor;
use std::path::Path;

use crate::checkpoint::write_atomic;
use crate::error::{Error, Result};

/// The longest file read: one hour at 48 kHz, so that a corrupt header cannot ask for more memory.
const MAX_SAMPLES: u64 = 3600 * 48_000;

/// Mono audio in [-1, 1] and its sample rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Wave {
    pub sample_rate: u32,
    pub samples: Vec<f32>,
}

/// Writes `samples` as mono 16-bit PCM ([`wav_bytes`]); the file appears whole or not at all.
pub fn write_wav(path: &Path, samples: &[f32], sample_rate: u32) -> Result<()> {
    let bytes = wav_bytes(samples, sample_rate)
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// The bytes of a mono 16-bit PCM WAV file of `samples` (v = round(32768 x), clipped to the 16-bit
/// range).
pub fn wav_bytes(samples: &[f32], sample_rate: u32) -> Result<Vec<u8>> {
    if sample_rate == 0 {
        return Err(Error::Config(
            "a WAV file needs a sample rate above 0".into(),
        ));
    }
    if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
        return Err(Error::Data(format!("audio sample {i} is not finite")));
    }
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut bytes = Cursor::new(Vec::with_capacity(44 + 2 * samples.len()));
    let encode = |bytes: &mut Cursor<Vec<u8>>| -> hound::Result<()> {
        let mut writer = hound::WavWriter::new(bytes, spec)?;
        let mut pcm = writer.get_i16_writer(samples.len() as u32);
        for &x in samples {
            pcm.write_sample((x * 32768.0).round().clamp(-32768.0, 32767.0) as i16);
        }
        pcm.flush()?;
        writer.finalize()
    };
    encode(&mut bytes).map_err(|e| Error::Data(format!("cannot encode WAV: {e}")))?;
    Ok(bytes.into_inner())
}

/// Reads a WAV file as mono (channels averaged) f32 samples in [-1, 1].
pub fn read_wav(path: &Path) -> Result<Wave> {
    let bad =
        |e: hound::Error| Error::Data(format!("{}: not a readable WAV file: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = hound::WavReader::new(std::io::BufReader::new(file)).map_err(bad)?;
    let spec = reader.spec();
    let channels = spec.channels as usize;
    if channels == 0 {
        return Err(Error::Data(format!(
            "{}: a WAV file with no channels",
            path.display()
        )));
    }
    if reader.len() as u64 > MAX_SAMPLES * channels as u64 {
        return Err(Error::Data(format!(
            "{}: {} samples is more than this reader accepts ({MAX_SAMPLES} per channel)",
            path.display(),
            reader.len()
        )));
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<hound::Result<_>>()
            .map_err(bad)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<hound::Result<_>>()
                .map_err(bad)?
        }
    };
    let samples = interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    Ok(Wave {
        sample_rate: spec.sample_rate,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_within_half_a_quantisation_step() {
        let dir = std::env::temp_dir().join(format!("fm-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tone.wav");
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.05).sin() * 0.8).collect();
        write_wav(&path, &x, 16_000).unwrap();
        let wave = read_wav(&path).unwrap();
        assert_eq!(wave.sample_rate, 16_000);
        assert_eq!(wave.samples.len(), x.len());
        for (a, b) in x.iter().zip(&wave.samples) {
            assert!((a - b).abs() <= 0.5 / 32768.0 + 1e-7, "{a} {b}");
        }
        assert!(write_wav(&path, &[f32::NAN], 16_000).is_err());
        // The failed write left the earlier file as it was.
        assert_eq!(read_wav(&path).unwrap(), wave);
        std::fs::write(dir.join("junk.wav"), b"RIFF0000WAVEjunk").unwrap();
        assert!(matches!(
            read_wav(&dir.join("junk.wav")),
            Err(Error::Data(_))
        ));
        assert!(matches!(
            read_wav(&dir.join("missing.wav")),
            Err(Error::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
