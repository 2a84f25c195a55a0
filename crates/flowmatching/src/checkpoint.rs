//! Checkpoints: a folder with `checkpoint.json` (full config, step, random-stream positions, the name and
//! CRC-32 of the tensor file) and `weights-<step>.safetensors` (weights, EMA weights, AdamW moments).
//!
//! Writes are atomic: each file goes to a temporary name, is flushed to disk and renamed, the tensor file
//! first and the JSON that points at it last, so a crash at any moment leaves the previous checkpoint
//! loadable. Older tensor files are removed only after the new JSON is in place.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::Model;
use crate::rng::RngState;
use crate::train::{RunConfig, Trainer};

/// Name of the metadata file inside a checkpoint folder.
pub const META_FILE: &str = "checkpoint.json";

/// The JSON half of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub config: RunConfig,
    pub step: u64,
    pub rng_data: RngState,
    pub rng_noise: RngState,
    /// Tensor file name, relative to the checkpoint folder.
    pub weights_file: String,
    /// CRC-32 of the tensor file's bytes.
    pub weights_crc32: u32,
    /// Last training loss, for the record.
    pub loss: Option<f64>,
}

impl CheckpointMeta {
    /// Parses and checks checkpoint.json: valid JSON of the right shape, a config this build accepts
    /// (version, ranges, model size), and a plain weights file name.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let meta: CheckpointMeta = serde_json::from_slice(bytes)
            .map_err(|e| format!("not a valid checkpoint file: {e}"))?;
        meta.config.validate().map_err(|e| e.to_string())?;
        if meta.weights_file.is_empty()
            || meta.weights_file.contains('/')
            || meta.weights_file.contains('\\')
        {
            return Err("weights_file must be a plain file name".into());
        }
        Ok(meta)
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename). Temporary files that earlier,
/// killed writes of the same file left behind are removed first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    remove_stale_temporaries(path);
    let tmp = temporary_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// The temporary name this process writes `path` under before renaming it: `.NAME.tmp-PID`, beside it.
pub fn temporary_path(path: &Path) -> PathBuf {
    path.with_file_name(format!("{}{}", temporary_prefix(path), std::process::id()))
}

/// `.NAME.tmp-`: the start of every temporary name of `path`.
fn temporary_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp-")
}

/// Removes the temporary files of `path` whose writing process no longer runs (killed by a signal, a
/// file-size limit or the OOM killer mid-write). Files of a process that still runs are left alone.
pub fn remove_stale_temporaries(path: &Path) {
    let prefix = temporary_prefix(path);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || !process_runs(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether process `pid` exists (from /proc; where there is none, every process is assumed to run, so
/// that nothing of a live writer is removed).
fn process_runs(pid: u32) -> bool {
    !Path::new("/proc/self").exists() || Path::new("/proc").join(pid.to_string()).exists()
}

/// Tensors as the bytes of a safetensors file (tensors in name order).
pub fn tensor_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut cpu: Vec<(&String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    cpu.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::tensor::serialize(cpu.iter().map(|(k, v)| (k.as_str(), v)), None).map_err(|e| {
        Error::Checkpoint {
            path: String::new(),
            reason: format!("cannot serialise tensors: {e}"),
        }
    })
}

/// Writes tensors as a safetensors file, atomically; returns the bytes written (for checksums).
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Vec<u8>> {
    let bytes = tensor_bytes(tensors)?;
    write_atomic(path, &bytes)?;
    Ok(bytes)
}

/// Saves the trainer's whole state into folder `dir` (created if needed).
pub fn save(trainer: &Trainer, dir: &Path, loss: Option<f64>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: HashMap<String, Tensor> = trainer.state_tensors()?.into_iter().collect();
    let weights_file = format!("weights-{:08}.safetensors", trainer.step_count());
    let bytes = save_tensors(&tensors, &dir.join(&weights_file))?;
    let (rng_data, rng_noise) = trainer.rng_states();
    let meta = CheckpointMeta {
        config: trainer.config().clone(),
        step: trainer.step_count(),
        rng_data,
        rng_noise,
        weights_file: weights_file.clone(),
        weights_crc32: crc32fast::hash(&bytes),
        loss,
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&dir.join(META_FILE), &json)?;
    // The new checkpoint is complete: older tensor files are now unreferenced.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale_weights = name.starts_with("weights-")
                && name.ends_with(".safetensors")
                && name != weights_file;
            // Temporary files of a process killed mid-save (ours are already renamed away).
            let stale_temporary = name.starts_with('.') && name.contains(".tmp-");
            if stale_weights || stale_temporary {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// A loaded checkpoint: metadata and tensors, verified.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
    pub dir: PathBuf,
}

impl Checkpoint {
    /// Loads from a checkpoint folder or its `checkpoint.json`, checking the CRC and the format version.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (dir, meta_path) = if path.is_dir() {
            (path.to_path_buf(), path.join(META_FILE))
        } else {
            (
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
                path.to_path_buf(),
            )
        };
        let bad = |p: &Path, reason: String| Error::Checkpoint {
            path: p.display().to_string(),
            reason,
        };
        let text = std::fs::read(&meta_path).map_err(|e| {
            bad(
                &meta_path,
                format!("cannot read it ({e}); a checkpoint is a folder holding {META_FILE}"),
            )
        })?;
        let meta = CheckpointMeta::parse(&text).map_err(|e| bad(&meta_path, e))?;
        let wpath = dir.join(&meta.weights_file);
        let bytes = std::fs::read(&wpath)
            .map_err(|e| bad(&wpath, format!("cannot read the tensor file: {e}")))?;
        Self::from_parts(meta, &bytes, &dir, device)
    }

    /// A checkpoint from checkpoint.json's bytes and its tensor file's bytes (`dir` names it in errors).
    pub fn from_bytes(meta: &[u8], weights: &[u8], dir: &Path, device: &Device) -> Result<Self> {
        let meta = CheckpointMeta::parse(meta).map_err(|reason| Error::Checkpoint {
            path: dir.join(META_FILE).display().to_string(),
            reason,
        })?;
        Self::from_parts(meta, weights, dir, device)
    }

    /// Verifies the tensor file's checksum against `meta` and reads its tensors.
    fn from_parts(meta: CheckpointMeta, bytes: &[u8], dir: &Path, device: &Device) -> Result<Self> {
        let wpath = dir.join(&meta.weights_file);
        let bad = |reason: String| Error::Checkpoint {
            path: wpath.display().to_string(),
            reason,
        };
        let crc = crc32fast::hash(bytes);
        if crc != meta.weights_crc32 {
            return Err(bad(format!(
                "checksum mismatch (file {crc:08x}, expected {:08x}): the file is truncated or corrupted",
                meta.weights_crc32
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| bad(format!("unreadable tensors: {e}")))?;
        Ok(Self {
            meta,
            tensors,
            dir: dir.to_path_buf(),
        })
    }

    /// Checks that the config describes the saved weights, allocating no more than the file holds.
    pub fn check_architecture(&self, device: &Device) -> Result<()> {
        self.model(device, false).map(|_| ())
    }

    /// A trainer positioned exactly where this checkpoint left off.
    pub fn into_trainer(self, device: &Device) -> Result<Trainer> {
        // Before a trainer (model, moments, EMA) is allocated for the config.
        self.check_architecture(device)?;
        let mut trainer = Trainer::new(self.meta.config.clone(), device)?;
        trainer
            .restore(
                self.meta.step,
                &self.tensors,
                &self.meta.rng_data,
                &self.meta.rng_noise,
            )
            .map_err(|e| Error::Checkpoint {
                path: self.dir.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(trainer)
    }

    /// The model (frozen, for inference) with the EMA weights (`ema = true`) or the raw weights.
    pub fn model(&self, device: &Device, ema: bool) -> Result<Model> {
        let prefix = if ema { "ema." } else { "model." };
        let values: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect();
        let saved: usize = values.values().map(Tensor::elem_count).sum();
        let in_folder = |e: Error| Error::Checkpoint {
            path: self.dir.display().to_string(),
            reason: e.to_string(),
        };
        let (model, params) = self
            .meta
            .config
            .model
            .build_within(
                &mut crate::rng::Rng::new(0),
                device,
                candle_core::DType::F32,
                Some(saved),
            )
            .map_err(in_folder)?;
        params.load(&values).map_err(in_folder)?;
        model.frozen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Toy2d;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fm-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Training N + M steps equals training N, saving, loading and training M more, bit for bit.
    #[test]
    fn resume_is_exact() {
        let cfg = crate::train::tests::small_config(8);
        let mut full = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
        let losses_full: Vec<f64> = (0..8).map(|_| full.step(&Toy2d::Moons).unwrap()).collect();

        let dir = tmpdir("resume");
        let mut first = Trainer::new(cfg, &Device::Cpu).unwrap();
        let mut losses: Vec<f64> = (0..5).map(|_| first.step(&Toy2d::Moons).unwrap()).collect();
        save(&first, &dir, None).unwrap();
        drop(first);
        let mut resumed = Checkpoint::load(&dir, &Device::Cpu)
            .unwrap()
            .into_trainer(&Device::Cpu)
            .unwrap();
        losses.extend((0..3).map(|_| resumed.step(&Toy2d::Moons).unwrap()));
        assert_eq!(losses, losses_full);
        for (n, d) in crate::testing::state_differences(&full, &resumed) {
            assert_eq!(d, 0.0, "{n}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corruption_is_detected() {
        let dir = tmpdir("corrupt");
        let mut tr = Trainer::new(crate::train::tests::small_config(2), &Device::Cpu).unwrap();
        tr.step(&Toy2d::Moons).unwrap();
        save(&tr, &dir, Some(1.0)).unwrap();
        tr.step(&Toy2d::Moons).unwrap();
        save(&tr, &dir, Some(1.0)).unwrap();
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(files.len(), 2, "old tensor files are cleaned up: {files:?}");
        let meta = Checkpoint::load(&dir, &Device::Cpu).unwrap().meta;
        let w = dir.join(&meta.weights_file);
        let mut bytes = std::fs::read(&w).unwrap();
        let k = bytes.len() / 2;
        bytes[k] ^= 0x10;
        std::fs::write(&w, &bytes).unwrap();
        let err = Checkpoint::load(&dir, &Device::Cpu).err().unwrap();
        assert!(err.to_string().contains("checksum"), "{err}");
        std::fs::write(&w, &bytes[..k]).unwrap();
        assert!(Checkpoint::load(&dir, &Device::Cpu).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
