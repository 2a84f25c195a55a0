//! Mutation fuzzing of every parser that reads user files, on stable Rust (cargo-fuzz needs nightly,
//! which this project's machines cannot install).
//!
//! Each target starts from valid seed inputs and applies random mutations (bit flips, interesting bytes,
//! truncation, splicing, duplication, random insertions); every input goes through the parser inside
//! `catch_unwind`. A parser may reject an input, never panic or abort. A panicking input is written to
//! `fuzz-findings/<target>-<n>.bin` and the test fails. Inputs that once crashed are kept in
//! `regressions()` and replayed first.
//!
//! `cargo test -p flowmatching-cli fuzz_` runs each target for FUZZ_SECONDS (default 2: a smoke in CI);
//! `scripts/fuzz.sh` runs them for 10 minutes each and prints the number of inputs tried.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use flowmatching::rng::Rng;

/// Runs `parse` on mutations of `seeds` for the configured time; returns the number of inputs tried.
pub fn fuzz(
    target: &str,
    seeds: &[Vec<u8>],
    regressions: &[Vec<u8>],
    parse: impl Fn(&[u8]),
) -> u64 {
    let secs: f64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let mut rng = Rng::new(
        std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    );
    let run = |input: &[u8]| catch_unwind(AssertUnwindSafe(|| parse(input))).is_ok();
    for (i, r) in regressions.iter().enumerate() {
        assert!(run(r), "{target}: regression input {i} panics again");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut corpus: Vec<Vec<u8>> = seeds.to_vec();
    let mut tried = 0u64;
    let mut findings = 0;
    while Instant::now() < deadline {
        let parent = &corpus[rng.below(corpus.len())];
        let other = &corpus[rng.below(corpus.len())];
        let input = mutate(parent, other, &mut rng);
        tried += 1;
        if !run(&input) {
            findings += 1;
            let dir = std::path::Path::new("fuzz-findings");
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::write(dir.join(format!("{target}-{findings}.bin")), &input);
        }
        // Keep a few mutants as new parents, so mutations compound.
        if corpus.len() < 256 && rng.below(64) == 0 {
            corpus.push(input);
        }
    }
    eprintln!("fuzz {target}: {tried} inputs in {secs} s, {findings} panics");
    assert_eq!(
        findings, 0,
        "{target}: {findings} panicking inputs saved in fuzz-findings/"
    );
    tried
}

/// One to four stacked random mutations of `a` (possibly spliced with `b`).
fn mutate(a: &[u8], b: &[u8], rng: &mut Rng) -> Vec<u8> {
    const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, b'0', b'9', b'-', b',', b'"'];
    let mut v = a.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = v.len();
        match rng.below(8) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if n > 0 => v.truncate(rng.below(n)),
            3 => {
                let i = rng.below(n + 1);
                let extra: Vec<u8> = (0..1 + rng.below(8))
                    .map(|_| rng.below(256) as u8)
                    .collect();
                v.splice(i..i, extra);
            }
            4 if n > 1 => {
                let (i, j) = (rng.below(n), rng.below(n));
                let (lo, hi) = (i.min(j), i.max(j));
                let chunk = v[lo..hi].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            5 if !b.is_empty() => {
                let cut_a = rng.below(n + 1);
                let cut_b = rng.below(b.len());
                v.truncate(cut_a);
                v.extend_from_slice(&b[cut_b..]);
            }
            6 if n >= 4 => {
                // A large little- or big-endian number somewhere (sizes, dimensions, lengths).
                let i = rng.below(n - 3);
                let big = [0xff, 0xff, 0xff, 0x7f];
                v[i..i + 4].copy_from_slice(&big);
            }
            _ if n > 0 => {
                let i = rng.below(n);
                v.remove(i);
            }
            _ => v.push(rng.below(256) as u8),
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{images, io};

    fn npy_seed(shape: &[usize], descr: &str, bytes_per: usize) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let tuple = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}")
            .into_bytes();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(b' ');
        }
        h.push(b'\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend((h.len() as u16).to_le_bytes());
        v.extend(h);
        let n: usize = shape.iter().product();
        v.extend((0..n * bytes_per).map(|i| (i * 37 % 251) as u8));
        v
    }

    #[test]
    fn fuzz_npy() {
        let seeds = vec![
            npy_seed(&[3, 2], "<f4", 4),
            npy_seed(&[2, 2, 2], "<f8", 8),
            npy_seed(&[2, 1, 2, 2], "|u1", 1),
            npy_seed(&[4], "<i4", 4),
        ];
        fuzz("npy", &seeds, &[], |b| {
            let _ = io::parse_npy(b, "fuzz.npy");
        });
    }

    #[test]
    fn fuzz_idx() {
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        img.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        let lab = vec![0, 0, 8, 1, 0, 0, 0, 2, 3, 9];
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
            e.write_all(&img).unwrap();
            e.finish().unwrap()
        };
        fuzz("idx", &[img, lab, gz], &[], |b| {
            let _ = images::parse_idx(b, "fuzz-idx");
        });
    }

    #[test]
    fn fuzz_csv() {
        // The dialects: a header line, comments, separators, a UTF-8 byte-order mark, quoted numbers
        // (double and single), CRLF line ends.
        let seeds = vec![
            b"x,y\n1,2\n3,4.5\n-1e3, 7\n".to_vec(),
            b"# comment\n1;2;3\n4;5;6\n".to_vec(),
            b"1\t2\n3\t4\nnan\tinf\n".to_vec(),
            b"\xef\xbb\xbfx,y\r\n1,2\r\n3,4\r\n".to_vec(),
            b"\"x\",\"y\"\n\"1.5\",\"-2\"\n'3';'4e-3'\n".to_vec(),
        ];
        fuzz("csv", &seeds, &[], |b| {
            let text = String::from_utf8_lossy(b);
            let _ = io::parse_csv(&text, "fuzz.csv");
        });
    }

    fn config_seed() -> Vec<u8> {
        let cfg = flowmatching::train::RunConfig {
            format_version: flowmatching::train::FORMAT_VERSION,
            model: flowmatching::nn::ModelConfig::UNet(flowmatching::nn::UNetConfig::tiny(
                1, 8, 8, 3,
            )),
            path: flowmatching::path::SchedulerConfig::default_vp(),
            prediction: flowmatching::path::Prediction::Velocity,
            weighting: flowmatching::objective::Weighting::Uniform,
            train: Default::default(),
            data: "x".into(),
            source: None,
        };
        serde_json::to_vec_pretty(&cfg).unwrap()
    }

    #[test]
    fn fuzz_config_json() {
        let mlp = br#"{"format_version":1,"model":{"kind":"mlp","dim":2,"hidden":8,"depth":2,"time_embedding":{"kind":"input"},"activation":"silu"},"path":{"kind":"cond_ot","sigma_min":0.0001},"prediction":"velocity","train":{"steps":10,"batch_size":4,"optimizer":{"lr":0.001,"beta1":0.9,"beta2":0.999,"eps":1e-8,"weight_decay":0.0},"warmup_steps":0,"grad_clip":1.0,"ema_decay":0.9,"seed":0},"data":"moons"}"#.to_vec();
        // Found by hand after a fuzz run: 70 U-Net levels overflowed a shift before validation.
        let mut deep: serde_json::Value = serde_json::from_slice(&config_seed()).unwrap();
        deep["model"]["channel_mults"] = serde_json::json!(vec![1; 70]);
        let deep = serde_json::to_vec(&deep).unwrap();
        assert!(
            serde_json::from_slice::<flowmatching::train::RunConfig>(&deep)
                .unwrap()
                .validate()
                .is_err()
        );
        fuzz("config-json", &[mlp, config_seed()], &[deep], |b| {
            if let Ok(c) = serde_json::from_slice::<flowmatching::train::RunConfig>(b) {
                let _ = c.validate();
            }
        });
    }

    /// Values a hand edit of checkpoint.json might leave in a field.
    fn edit_values() -> Vec<serde_json::Value> {
        use serde_json::json;
        vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(3),
            json!(40_000),
            json!(1_000_000_000u64),
            json!(u64::MAX),
            json!(1e300),
            json!(-1e-300),
            json!(0.5),
            json!("x"),
            json!(null),
            json!(true),
            json!([]),
            json!([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
            json!({}),
        ]
    }

    /// JSON pointers of every leaf of `v`.
    fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    leaves(x, format!("{at}/{k}"), out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    leaves(x, format!("{at}/{i}"), out);
                }
            }
            _ => out.push(at),
        }
    }

    /// Hand edits of a real checkpoint's checkpoint.json (its config's numbers, names and lists set to
    /// odd values), then loading it with its unchanged tensor file and building the model and the
    /// trainer: every edit is refused or loads, and none makes the loader allocate more than the
    /// tensor file holds. Each input's bytes choose the edits: (leaf, value) byte pairs.
    #[test]
    fn fuzz_checkpoint_edits() {
        use flowmatching::checkpoint::{Checkpoint, META_FILE};
        let cpu = candle_core::Device::Cpu;
        let mut parts = vec![];
        for cfg in [
            serde_json::from_slice::<flowmatching::train::RunConfig>(&config_seed()).unwrap(),
            flowmatching::train::RunConfig::new(
                flowmatching::nn::ModelConfig::Mlp(flowmatching::nn::MlpConfig::silu(2, 16, 2)),
                Default::default(),
                Default::default(),
                "moons",
            ),
        ] {
            let dir = std::env::temp_dir().join(format!("fm-fuzz-edit-{}", std::process::id()));
            let tr = flowmatching::train::Trainer::new(cfg, &cpu).unwrap();
            flowmatching::checkpoint::save(&tr, &dir, None).unwrap();
            let meta = std::fs::read(dir.join(META_FILE)).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&meta).unwrap();
            let weights = std::fs::read(dir.join(value["weights_file"].as_str().unwrap())).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let mut at = vec![];
            leaves(&value["config"], "/config".into(), &mut at);
            parts.push((value, weights, at));
        }
        let values = edit_values();
        let seeds: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i, i * 31, i * 7 + 1]).collect();
        fuzz("checkpoint-edits", &seeds, &[], |b| {
            let Some((&which, edits)) = b.split_first() else {
                return;
            };
            let (value, weights, at) = &parts[which as usize % parts.len()];
            let mut v = value.clone();
            for e in edits.chunks_exact(2) {
                let leaf = &at[e[0] as usize % at.len()];
                if let Some(x) = v.pointer_mut(leaf) {
                    *x = values[e[1] as usize % values.len()].clone();
                }
            }
            let bytes = serde_json::to_vec(&v).unwrap();
            let dir = std::path::Path::new("fuzz-checkpoint");
            if let Ok(ck) = Checkpoint::from_bytes(&bytes, weights, dir, &cpu) {
                let _ = ck.model(&cpu, true);
                let _ = ck.into_trainer(&cpu);
            }
        });
    }

    #[test]
    fn fuzz_checkpoint() {
        let dir = std::env::temp_dir().join(format!("fm-fuzz-ck-{}", std::process::id()));
        let mut cfg: flowmatching::train::RunConfig =
            serde_json::from_slice(&config_seed()).unwrap();
        cfg.train.batch_size = 2;
        let tr = flowmatching::train::Trainer::new(cfg, &candle_core::Device::Cpu).unwrap();
        flowmatching::checkpoint::save(&tr, &dir, Some(1.0)).unwrap();
        let meta = std::fs::read(dir.join(flowmatching::checkpoint::META_FILE)).unwrap();
        let weights = std::fs::read(dir.join("weights-00000000.safetensors")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        // The first byte picks the part: checkpoint.json or the tensor file's safetensors framing.
        let seeds = vec![
            [&[0u8][..], &meta].concat(),
            [&[1u8][..], &weights[..weights.len().min(4096)]].concat(),
        ];
        fuzz("checkpoint", &seeds, &[], |b| {
            let Some((&which, rest)) = b.split_first() else {
                return;
            };
            if which % 2 == 0 {
                let _ = flowmatching::checkpoint::CheckpointMeta::parse(rest);
            } else {
                let _ = candle_core::safetensors::load_buffer(rest, &candle_core::Device::Cpu);
            }
        });
    }
}
