//! `speech-corpus` end to end: espeak-ng synthesis, frame phones, the corpus files and their checks.

mod common;

use common::{assert_clean_failure, run, tmpdir};
use flowmatching::audio::{read_wav, MelSpectrogram};
use flowmatching::speech::{Corpus, Split};

#[test]
fn a_small_corpus_is_synthesised_aligned_and_split() {
    let dir = tmpdir("speech-corpus");
    let out = dir.join("corpus");
    let o = run(&[
        "speech-corpus",
        "--out",
        out.to_str().unwrap(),
        "--utterances",
        "30",
        "--speakers",
        "4",
        "--wavs",
        "2",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let c = Corpus::load(&out).unwrap();
    assert_eq!(c.utterances().len(), 30);
    assert_eq!(c.meta.speakers.len(), 4);
    assert_eq!(c.of_split(Split::Test).count(), 3);
    assert!(c.meta.phones.len() > 20, "{:?}", c.meta.phones.names());
    let texts: std::collections::HashSet<&str> = c
        .utterances()
        .iter()
        .map(|u| u.info.text.as_str())
        .collect();
    assert_eq!(texts.len(), 30);

    // The frame phones are espeak-ng's own phoneme list for the text (`espeak-ng -q -x`), in order:
    // collapsed, silence dropped, they spell a subsequence covering most of it (a phone shorter than a
    // hop can fall between two frame centres).
    for u in &c.utterances()[..5] {
        let voice = &c.meta.speakers[u.info.speaker as usize];
        let out = std::process::Command::new("espeak-ng")
            .args(["-q", "-x", "-v", voice, &u.info.text])
            .output()
            .expect("espeak-ng is installed");
        let listed: String = String::from_utf8_lossy(&out.stdout)
            .chars()
            .filter(|ch| !matches!(ch, '\'' | ',' | ' ' | '\n' | '_'))
            .collect();
        let mut ours = String::new();
        let mut last = None;
        for &p in &u.phones {
            if Some(p) != last && p != 0 {
                ours.push_str(&c.meta.phones.names()[p as usize]);
            }
            last = Some(p);
        }
        let mut rest = listed.chars();
        assert!(
            ours.chars().all(|ch| rest.any(|l| l == ch)),
            "{ours} is not a subsequence of {listed}"
        );
        assert!(
            ours.len() as f64 > 0.8 * listed.len() as f64,
            "{ours} vs {listed}"
        );
    }

    // The stored log-mel is the one of the audio written beside it (16-bit rounding aside).
    let wave = read_wav(&out.join("wav").join("00001.wav")).unwrap();
    assert_eq!(wave.sample_rate, 22_050);
    let mel = MelSpectrogram::new(c.meta.mel.clone()).unwrap();
    let again = mel.log_mel(&wave.samples).unwrap();
    let u = &c.utterances()[1];
    assert_eq!(again.frames, u.info.frames);
    let diff: f32 = again
        .values
        .iter()
        .zip(&u.log_mel)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / u.log_mel.len() as f32;
    assert!(diff < 0.05, "mean |log-mel difference| {diff}");

    // Alignment: frames labelled silence are much quieter than frames labelled as phones.
    let (mut quiet, mut loud) = ((0f64, 0usize), (0f64, 0usize));
    let bands = c.meta.mel.n_mels;
    for u in c.utterances() {
        for (j, &p) in u.phones.iter().enumerate() {
            let e = u.log_mel[j * bands..(j + 1) * bands]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>()
                / bands as f64;
            let acc = if p == 0 { &mut quiet } else { &mut loud };
            acc.0 += e;
            acc.1 += 1;
        }
    }
    let (quiet, loud) = (quiet.0 / quiet.1 as f64, loud.0 / loud.1 as f64);
    assert!(loud > quiet + 2.0, "silence {quiet} vs phones {loud}");

    let train = c.dataset(Split::Train).unwrap();
    assert_eq!(train.len(), 27);

    // The transformer trains on it by masked CFM, checkpoints, and resumes.
    let data = format!("speech:{}", out.display());
    let run_dir = dir.join("run");
    let model = run_dir.to_str().unwrap();
    let small = [
        "--batch-size",
        "4",
        "--hidden",
        "32",
        "--depth",
        "2",
        "--heads",
        "2",
        "--max-frames",
        "64",
    ];
    let train = |steps: &str, extra: &[&str]| {
        let mut args = vec!["train", "--data", &data, "--out", model, "--steps", steps];
        args.extend(small);
        args.extend(extra);
        run(&args)
    };
    let o = train("6", &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("done: 6 steps"));
    let meta = std::fs::read_to_string(run_dir.join("checkpoint.json")).unwrap();
    assert!(meta.contains("\"transformer\""), "{meta}");
    let o = train("8", &["--resume"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("resuming from step 6 of 8"));

    // A span of a test utterance regenerated: WAVs of the right length, a spectrogram PNG, a record.
    let inf = dir.join("infill");
    let o = run(&[
        "infill",
        "--checkpoint",
        model,
        "--utterance",
        "0",
        "--span",
        "10-30",
        "--steps",
        "2",
        "--out",
        inf.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(inf.join("infill.json")).unwrap()).unwrap();
    assert_eq!(rec["span"], serde_json::json!([10, 30]));
    assert_eq!(rec["nfe"], 8, "midpoint, 2 steps, guided: 2 x 2 x 2");
    assert!(rec["mel_l1"].as_f64().unwrap() > 0.0);
    let frames = c.utterances()[0].info.frames;
    for f in ["infilled.wav", "original.wav"] {
        let w = read_wav(&inf.join(f)).unwrap();
        assert_eq!(w.samples.len(), (frames - 1) * 256);
    }
    let png = image::open(inf.join("infill.png")).unwrap();
    assert_eq!(png.width() as usize, 2 * frames);
    let bad_out = dir.join("bad-infill");
    let b = bad_out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--utterance", "30"], "utterance 30 does not exist"),
        (vec!["--utterance", "0", "--span", "5-100000"], "not inside"),
        (vec!["--utterance", "0", "--span", "9"], "START-END"),
        (
            vec!["--utterance", "0", "--solver", "dopri5"],
            "fixed number of steps",
        ),
    ] {
        let mut a = vec!["infill", "--checkpoint", model, "--out", b];
        a.extend(args);
        assert_clean_failure(&run(&a), needle);
    }
    let points = dir.join("points");
    let p = points.to_str().unwrap();
    assert!(run(&[
        "train",
        "--data",
        "moons",
        "--out",
        p,
        "--steps",
        "3",
        "--batch-size",
        "16"
    ])
    .status
    .success());
    assert_clean_failure(
        &run(&["infill", "--checkpoint", p, "--utterance", "0", "--out", b]),
        "not on speech",
    );
    assert!(!bad_out.exists());

    let other = dir.join("other");
    let o = run(&[
        "train",
        "--data",
        &data,
        "--out",
        other.to_str().unwrap(),
        "--coupling",
        "ot",
    ]);
    assert_clean_failure(&o, "--coupling does not apply to speech data");
    let o = run(&[
        "train",
        "--data",
        &data,
        "--out",
        other.to_str().unwrap(),
        "--model",
        "unet",
    ]);
    assert_clean_failure(&o, "transformer");
    let o = run(&[
        "train",
        "--data",
        "speech:/nonexistent",
        "--out",
        other.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "corpus");
    assert!(!other.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_corpus_arguments_fail_cleanly_and_write_nothing() {
    let dir = tmpdir("speech-bad");
    let out = dir.join("corpus");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--utterances", "0"], "--utterances"),
        (vec!["--utterances", "999999999"], "--utterances"),
        (vec!["--speakers", "99"], "--speakers"),
        (vec!["--utterances", "40", "--wavs", "90"], "--wavs"),
        (vec!["--test-every", "1"], "--test-every"),
    ] {
        let mut a = vec!["speech-corpus", "--out", o];
        a.extend(args);
        assert_clean_failure(&run(&a), needle);
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
