//! The corpus files: `corpus.json` (the mel front end, phone inventory, speakers, normalisation and one
//! record per utterance with its split) and `corpus.safetensors` (every utterance's log-mel frames and
//! frame phones, concatenated in record order).
//!
//! Training reads log-mels normalised by the training split's global mean and standard deviation, as
//! Voicebox does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::align::PhoneInventory;
use crate::audio::MelConfig;
use crate::checkpoint::tensor_bytes;
use crate::data::SequenceDataset;
use crate::error::{Error, Result};

/// The corpus format this build writes and reads.
pub const FORMAT: u32 = 1;

/// Which part of the corpus an utterance belongs to (split by sentence: no test sentence is trained on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

/// What an utterance says and who says it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UtteranceInfo {
    pub text: String,
    /// Index into [`CorpusMeta::speakers`].
    pub speaker: u32,
    /// The synthesiser's pitch (0-100) and rate (words per minute).
    pub pitch: u32,
    pub rate: u32,
    pub split: Split,
    /// Spectrogram frames.
    pub frames: usize,
}

/// One utterance: its record, log-mel frames (frame-major, `n_mels` values a frame) and frame phones.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    pub info: UtteranceInfo,
    pub log_mel: Vec<f32>,
    pub phones: Vec<u32>,
}

/// `corpus.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorpusMeta {
    pub format: u32,
    pub mel: MelConfig,
    pub phones: PhoneInventory,
    /// Speaker names (the synthesiser's voices).
    pub speakers: Vec<String>,
    /// Mean and standard deviation of the training split's log-mel values.
    pub mean: f64,
    pub std: f64,
    pub utterances: Vec<UtteranceInfo>,
}

/// A whole corpus in memory.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub meta: CorpusMeta,
    utterances: Vec<Utterance>,
}

impl Corpus {
    pub const META_FILE: &'static str = "corpus.json";
    pub const DATA_FILE: &'static str = "corpus.safetensors";
    /// The largest corpus files read.
    pub const MAX_META_BYTES: u64 = 1 << 28;
    pub const MAX_DATA_BYTES: u64 = 1 << 34;

    /// A corpus of these utterances; the normalisation is computed from the training split.
    pub fn new(
        mel: MelConfig,
        phones: PhoneInventory,
        speakers: Vec<String>,
        utterances: Vec<Utterance>,
    ) -> Result<Self> {
        let (mut sum, mut sq, mut count) = (0f64, 0f64, 0usize);
        for u in utterances.iter().filter(|u| u.info.split == Split::Train) {
            for &v in &u.log_mel {
                sum += v as f64;
                sq += (v as f64) * (v as f64);
            }
            count += u.log_mel.len();
        }
        if count == 0 {
            return Err(Error::Data(
                "a corpus needs at least one training utterance".into(),
            ));
        }
        let mean = sum / count as f64;
        let std = (sq / count as f64 - mean * mean).max(1e-12).sqrt();
        let meta = CorpusMeta {
            format: FORMAT,
            mel,
            phones,
            speakers,
            mean,
            std,
            utterances: utterances.iter().map(|u| u.info.clone()).collect(),
        };
        let corpus = Self { meta, utterances };
        corpus.validate()?;
        Ok(corpus)
    }

    /// Every record agrees with its frames, phones and speaker.
    fn validate(&self) -> Result<()> {
        let m = &self.meta;
        if m.format != FORMAT {
            return Err(Error::Data(format!(
                "corpus format {} is not the format {FORMAT} this build reads",
                m.format
            )));
        }
        m.mel.validate()?;
        let (bands, phones) = (m.mel.n_mels, m.phones.len());
        if !(m.std.is_finite() && m.std > 0.0 && m.mean.is_finite()) {
            return Err(Error::Data(format!(
                "the corpus normalisation (mean {}, std {}) is unusable",
                m.mean, m.std
            )));
        }
        for (i, u) in self.utterances.iter().enumerate() {
            let info = &u.info;
            if info.frames == 0
                || u.phones.len() != info.frames
                || u.log_mel.len() != info.frames * bands
            {
                return Err(Error::Data(format!(
                    "utterance {i} has {} frames on record but {} phones and {} log-mel values",
                    info.frames,
                    u.phones.len(),
                    u.log_mel.len()
                )));
            }
            if info.speaker as usize >= m.speakers.len() {
                return Err(Error::Data(format!(
                    "utterance {i} names speaker {}, but the corpus has {}",
                    info.speaker,
                    m.speakers.len()
                )));
            }
            if let Some(&p) = u.phones.iter().find(|&&p| p as usize >= phones) {
                return Err(Error::Data(format!(
                    "utterance {i} has phone {p}, outside the {phones} phones"
                )));
            }
            if u.log_mel.iter().any(|v| !v.is_finite()) {
                return Err(Error::Data(format!(
                    "utterance {i} holds a log-mel value that is not finite"
                )));
            }
        }
        Ok(())
    }

    pub fn utterances(&self) -> &[Utterance] {
        &self.utterances
    }

    /// The two files, by name, as bytes.
    pub fn files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let meta = serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| Error::Data(format!("cannot write the corpus record: {e}")))?;
        let (mut mel, mut phones) = (vec![], vec![]);
        for u in &self.utterances {
            mel.extend_from_slice(&u.log_mel);
            phones.extend_from_slice(&u.phones);
        }
        let frames = phones.len();
        let mut t = HashMap::new();
        let bands = self.meta.mel.n_mels;
        t.insert(
            "log_mel".to_string(),
            Tensor::from_vec(mel, (frames, bands), &Device::Cpu)?,
        );
        t.insert(
            "phones".to_string(),
            Tensor::from_vec(phones, frames, &Device::Cpu)?,
        );
        Ok(vec![
            (Self::META_FILE, meta),
            (Self::DATA_FILE, tensor_bytes(&t)?),
        ])
    }

    /// Reads a corpus folder written from [`Corpus::files`], checking every record.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str, max: u64| -> Result<Vec<u8>> {
            let path = dir.join(name);
            let what = |e: std::io::Error| {
                Error::Data(format!(
                    "cannot read the corpus file {}: {e}",
                    path.display()
                ))
            };
            let len = std::fs::metadata(&path).map_err(what)?.len();
            if len > max {
                return Err(Error::Data(format!(
                    "{} is {len} bytes, more than the {max} a corpus file may have",
                    path.display()
                )));
            }
            std::fs::read(&path).map_err(what)
        };
        let meta: CorpusMeta =
            serde_json::from_slice(&read(Self::META_FILE, Self::MAX_META_BYTES)?).map_err(|e| {
                Error::Data(format!(
                    "{} is not a corpus record: {e}",
                    dir.join(Self::META_FILE).display()
                ))
            })?;
        let data = read(Self::DATA_FILE, Self::MAX_DATA_BYTES)?;
        let tensors = candle_core::safetensors::load_buffer(&data, &Device::Cpu).map_err(|e| {
            Error::Data(format!(
                "{} is not a corpus data file: {e}",
                dir.join(Self::DATA_FILE).display()
            ))
        })?;
        let get = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| Error::Data(format!("the corpus data file has no '{name}' tensor")))
        };
        let bands = meta.mel.n_mels;
        let mel = get("log_mel")?.flatten_all()?.to_vec1::<f32>()?;
        let phones = get("phones")?.flatten_all()?.to_vec1::<u32>()?;
        let total: usize = meta.utterances.iter().map(|u| u.frames).sum();
        if phones.len() != total || mel.len() != total * bands {
            return Err(Error::Data(format!(
                "the corpus record lists {total} frames but the data file holds {} phones and {} \
                 log-mel values",
                phones.len(),
                mel.len()
            )));
        }
        let mut at = 0;
        let utterances = meta
            .utterances
            .iter()
            .map(|info| {
                let r = at..at + info.frames;
                at += info.frames;
                Utterance {
                    info: info.clone(),
                    log_mel: mel[r.start * bands..r.end * bands].to_vec(),
                    phones: phones[r].to_vec(),
                }
            })
            .collect();
        let corpus = Self { meta, utterances };
        corpus.validate()?;
        Ok(corpus)
    }

    /// The utterances of a split, in record order.
    pub fn of_split(&self, split: Split) -> impl Iterator<Item = &Utterance> {
        self.utterances
            .iter()
            .filter(move |u| u.info.split == split)
    }

    /// An utterance's log-mel normalised to (x - mean) / std, as models see it.
    pub fn normalised(&self, u: &Utterance) -> Vec<f32> {
        let (m, s) = (self.meta.mean as f32, self.meta.std as f32);
        u.log_mel.iter().map(|v| (v - m) / s).collect()
    }

    /// A split as training data: normalised log-mels ([`Corpus::normalised`]) and the frame phones.
    pub fn dataset(&self, split: Split) -> Result<SequenceDataset> {
        let (mut frames, mut phones) = (vec![], vec![]);
        for u in self.of_split(split) {
            frames.push(self.normalised(u));
            phones.push(u.phones.clone());
        }
        if frames.is_empty() {
            return Err(Error::Data(format!(
                "the corpus has no {split:?} utterances"
            )));
        }
        SequenceDataset::new(
            format!("speech ({split:?})").to_lowercase(),
            self.meta.mel.n_mels,
            self.meta.phones.len(),
            frames,
            phones,
        )
    }

    /// Normalised values back to log-mel: x std + mean.
    pub fn denormalise(&self, values: &[f32]) -> Vec<f32> {
        let (m, s) = (self.meta.mean as f32, self.meta.std as f32);
        values.iter().map(|v| v * s + m).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system's temporary folder.
    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fm-corpus-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn utterance(split: Split, frames: usize, value: f32) -> Utterance {
        Utterance {
            info: UtteranceInfo {
                text: "a test.".into(),
                speaker: 1,
                pitch: 50,
                rate: 170,
                split,
                frames,
            },
            log_mel: vec![value; frames * 4],
            phones: (0..frames).map(|j| (j % 3) as u32).collect(),
        }
    }

    fn corpus() -> Corpus {
        let mel = MelConfig {
            n_mels: 4,
            ..MelConfig::default()
        };
        let phones = PhoneInventory::from_names(vec!["_".into(), "a".into(), "b".into()]);
        let speakers = vec!["en+m1".into(), "en+f3".into()];
        let utts = vec![
            utterance(Split::Train, 3, -2.0),
            utterance(Split::Test, 2, 5.0),
            utterance(Split::Train, 5, -6.0),
        ];
        Corpus::new(mel, phones, speakers, utts).unwrap()
    }

    /// The normalisation comes from the training split only; files round-trip; a split loads as
    /// normalised sequences.
    #[test]
    fn corpus_files_round_trip_and_normalise_by_the_training_split() {
        let c = corpus();
        // Train values: 12 of -2 and 20 of -6: mean -4.5, std sqrt(3.75).
        assert!((c.meta.mean + 4.5).abs() < 1e-9);
        assert!((c.meta.std - 3.75f64.sqrt()).abs() < 1e-9);
        let dir = scratch("round-trip");
        for (name, bytes) in c.files().unwrap() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let back = Corpus::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back.meta, c.meta);
        assert_eq!(back.utterances(), c.utterances());
        let train = back.dataset(Split::Train).unwrap();
        assert_eq!(train.len(), 2);
        let (f, p) = train.sequence(1);
        assert_eq!(p, &[0, 1, 2, 0, 1]);
        let z = (-6.0 + 4.5) / 3.75f32.sqrt();
        assert!(f.iter().all(|v| (v - z).abs() < 1e-6));
        assert_eq!(back.dataset(Split::Test).unwrap().len(), 1);
        assert!((back.denormalise(&[z])[0] + 6.0).abs() < 1e-5);
    }

    #[test]
    fn inconsistent_corpora_are_refused() {
        let c = corpus();
        let dir = scratch("refused");
        let files = c.files().unwrap();
        std::fs::write(dir.join(Corpus::DATA_FILE), &files[1].1).unwrap();
        let write_meta = |meta: &CorpusMeta| {
            std::fs::write(
                dir.join(Corpus::META_FILE),
                serde_json::to_vec(meta).unwrap(),
            )
            .unwrap()
        };
        let mut meta = c.meta.clone();
        meta.utterances[0].frames = 4;
        write_meta(&meta);
        assert!(Corpus::load(&dir)
            .unwrap_err()
            .to_string()
            .contains("frames"));
        meta.utterances[0].frames = 3;
        meta.utterances[0].speaker = 7;
        write_meta(&meta);
        assert!(Corpus::load(&dir)
            .unwrap_err()
            .to_string()
            .contains("speaker"));
        std::fs::write(dir.join(Corpus::DATA_FILE), b"junk").unwrap();
        assert!(Corpus::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        let only_test = vec![utterance(Split::Test, 2, 1.0)];
        let mel = c.meta.mel.clone();
        assert!(Corpus::new(mel, c.meta.phones.clone(), vec!["x".into()], only_test).is_err());
    }
}
