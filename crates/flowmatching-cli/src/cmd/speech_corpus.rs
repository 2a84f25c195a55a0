//! `flowmatching speech-corpus`: a speech corpus synthesised on the machine with espeak-ng, with the
//! phone of every log-mel frame taken from the synthesiser's phone events.

use std::time::Instant;

use anyhow::{bail, Result};
use flowmatching::audio::{MelConfig, MelSpectrogram};
use flowmatching::rng::Rng;
use flowmatching::speech::{
    frame_phones, sentences, Corpus, PhoneInventory, Split, Utterance, UtteranceInfo,
};

use crate::cli::SpeechCorpusArgs;
use crate::espeak::{self, Espeak};
use crate::outputs::Outputs;
use crate::progress;

/// The speakers: espeak-ng's English voice with its male and female variants.
pub const VOICES: &[&str] = &[
    "en+m1", "en+f1", "en+m2", "en+f2", "en+m3", "en+f3", "en+m4", "en+f4", "en+m5", "en+f5",
    "en+m6", "en+m7",
];
/// The most utterances one corpus may have.
pub const MAX_UTTERANCES: usize = 200_000;
/// Pitch (0-100) and rate (words per minute) ranges drawn per utterance.
const PITCH: (u32, u32) = (30, 70);
const RATE: (u32, u32) = (140, 200);

pub fn run(a: &SpeechCorpusArgs) -> Result<()> {
    if !(2..=MAX_UTTERANCES).contains(&a.utterances) {
        bail!(
            "--utterances must be in 2..={MAX_UTTERANCES}, got {}",
            a.utterances
        );
    }
    if !(1..=VOICES.len()).contains(&a.speakers) {
        bail!(
            "--speakers must be in 1..={}, got {}",
            VOICES.len(),
            a.speakers
        );
    }
    if !(a.test_every >= 2 && a.test_every <= a.utterances) {
        bail!(
            "--test-every must be in 2..={}, got {}",
            a.utterances,
            a.test_every
        );
    }
    if a.wavs > a.utterances {
        bail!(
            "--wavs ({}) is more than --utterances ({})",
            a.wavs,
            a.utterances
        );
    }
    let mut outs = Outputs::new();
    let meta = a.out.join(Corpus::META_FILE);
    let data = a.out.join(Corpus::DATA_FILE);
    outs.declare(&meta, "--out")?;
    outs.declare(&data, "--out")?;
    let wav_paths: Vec<_> = (0..a.wavs)
        .map(|i| a.out.join("wav").join(format!("{i:05}.wav")))
        .collect();
    for p in &wav_paths {
        outs.declare(p, "--out")?;
    }
    let tts = Espeak::open()?;
    let mel_config = MelConfig {
        sample_rate: tts.sample_rate,
        ..MelConfig::default()
    };
    let mel = MelSpectrogram::new(mel_config.clone())?;
    let hop = mel_config.hop_length;
    eprintln!(
        "speech-corpus: {} utterances by {} voices of espeak-ng {} at {} Hz",
        a.utterances,
        a.speakers,
        espeak::version(&tts),
        tts.sample_rate
    );
    let texts = sentences(a.utterances, a.seed);
    let mut rng = Rng::new(a.seed).fork(1);
    let mut inventory = PhoneInventory::default();
    let mut utterances = Vec::with_capacity(a.utterances);
    let bar = progress::counter_bar(a.utterances as u64, "utterances");
    let start = Instant::now();
    let mut seconds_of_audio = 0.0;
    for (i, text) in texts.iter().enumerate() {
        let speaker = i % a.speakers;
        let pitch = PITCH.0 + rng.below((PITCH.1 - PITCH.0 + 1) as usize) as u32;
        let rate = RATE.0 + rng.below((RATE.1 - RATE.0 + 1) as usize) as u32;
        let s = tts.speak(text, VOICES[speaker], rate, pitch)?;
        let log_mel = mel.log_mel(&s.samples)?;
        let events: Vec<(usize, u32)> = s
            .phones
            .iter()
            .map(|(sample, name)| (*sample, inventory.id(name)))
            .collect();
        let phones = frame_phones(&events, log_mel.frames, hop);
        if let Some(p) = wav_paths.get(i) {
            outs.write(
                p,
                &flowmatching::audio::wav_bytes(&s.samples, tts.sample_rate)?,
            )?;
        }
        seconds_of_audio += s.samples.len() as f64 / tts.sample_rate as f64;
        let split = if i % a.test_every == 0 {
            Split::Test
        } else {
            Split::Train
        };
        utterances.push(Utterance {
            info: UtteranceInfo {
                text: text.clone(),
                speaker: speaker as u32,
                pitch,
                rate,
                split,
                frames: log_mel.frames,
            },
            log_mel: log_mel.values,
            phones,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let voices = VOICES[..a.speakers].iter().map(|v| v.to_string()).collect();
    let corpus = Corpus::new(mel_config, inventory, voices, utterances)?;
    for (name, bytes) in corpus.files()? {
        outs.write(&a.out.join(name), &bytes)?;
    }
    outs.commit()?;
    let test = corpus.of_split(Split::Test).count();
    println!(
        "{} utterances ({:.1} minutes of audio; {} train, {test} test sentences), {} phones, {} \
         speakers, in {:.0} s -> {}",
        a.utterances,
        seconds_of_audio / 60.0,
        a.utterances - test,
        corpus.meta.phones.len(),
        a.speakers,
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
