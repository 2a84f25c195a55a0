//! A small image classifier for evaluation: class accuracy of generated samples and the features that
//! the Frechet distance ([`crate::eval::frechet::frechet_distance`]) compares.
//!
//! ```text
//! conv3x3(C -> 32), ReLU, maxpool 2 -> conv3x3(32 -> 64), ReLU, maxpool 2 -> dense(-> 128), ReLU = features
//! logits = dense(features -> classes)
//! ```
//!
//! Trained with cross-entropy and AdamW. Its weights and shape are saved together in one safetensors file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::frechet::GaussianStats;
use crate::error::{Error, Result};
use crate::nn::layers::{Builder, Weights};
use crate::optim::{AdamW, AdamWConfig, LrDecay};
use crate::params::{Init, Params};
use crate::rng::Rng;

/// Penultimate feature width.
pub const FEATURES: usize = 128;

/// The classifier's input shape and classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassifierConfig {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub num_classes: usize,
}

impl ClassifierConfig {
    fn validate(&self) -> Result<()> {
        if self.channels == 0 || self.height < 4 || self.width < 4 || self.num_classes < 2 {
            return Err(Error::Config(format!(
                "classifier needs images of at least 4x4 and 2 classes, got {self:?}"
            )));
        }
        Ok(())
    }

    fn flat(&self) -> usize {
        64 * (self.height / 4) * (self.width / 4)
    }

    fn dim(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// The trained network.
#[derive(Debug, Clone)]
pub struct Classifier {
    config: ClassifierConfig,
    w: Weights,
}

impl Classifier {
    /// Fresh weights (PyTorch's default initialisation) from `rng`.
    pub fn new(config: ClassifierConfig, rng: &mut Rng, device: &Device) -> Result<(Self, Params)> {
        config.validate()?;
        let mut params = Params::default();
        let mut init = Init {
            rng,
            device: device.clone(),
            dtype: DType::F32,
            budget: None,
        };
        let mut b = Builder::new(&mut params, &mut init);
        b.conv("conv1", config.channels, 32, 3)?;
        b.conv("conv2", 32, 64, 3)?;
        b.linear("fc", config.flat(), FEATURES)?;
        b.linear("head", FEATURES, config.num_classes)?;
        let w = b.finish();
        Ok((Self { config, w }, params))
    }

    pub fn config(&self) -> ClassifierConfig {
        self.config
    }

    /// Penultimate features of flat image rows (B, C*H*W).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.config;
        let n = x.dim(0)?;
        if x.elem_count() != n * c.dim() {
            return Err(Error::Data(format!(
                "the classifier expects {}x{}x{} images, got shape {:?}",
                c.channels,
                c.height,
                c.width,
                x.dims()
            )));
        }
        let h = x.reshape((n, c.channels, c.height, c.width))?;
        let h = self.w.conv("conv1", &h, 1)?.relu()?.max_pool2d(2)?;
        let h = self.w.conv("conv2", &h, 1)?.relu()?.max_pool2d(2)?;
        // Crop to a multiple of 4 was done by the pooling (floor); flatten.
        let h = h.flatten_from(1)?;
        Ok(self.w.linear("fc", &h)?.relu()?)
    }

    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.w.linear("head", &self.features(x)?)
    }

    /// Features of many rows, `batch` at a time, as a flat (n x FEATURES) vector.
    pub fn features_of(&self, rows: &[f32], batch: usize, device: &Device) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.len() / self.config.dim() * FEATURES);
        for chunk in rows.chunks(batch.max(1) * self.config.dim()) {
            let n = chunk.len() / self.config.dim();
            let x = Tensor::from_slice(chunk, (n, self.config.dim()), device)?;
            out.extend(self.features(&x)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// The Gaussian statistics of the features of many rows (500 at a time): what the Frechet distance
    /// compares.
    pub fn feature_stats(&self, rows: &[f32], device: &Device) -> Result<GaussianStats> {
        GaussianStats::of(&self.features_of(rows, 500, device)?, FEATURES)
    }

    /// Predicted classes of many rows.
    pub fn predict(&self, rows: &[f32], batch: usize, device: &Device) -> Result<Vec<u32>> {
        let mut out = vec![];
        for chunk in rows.chunks(batch.max(1) * self.config.dim()) {
            let n = chunk.len() / self.config.dim();
            let x = Tensor::from_slice(chunk, (n, self.config.dim()), device)?;
            out.extend(self.logits(&x)?.argmax(1)?.to_vec1::<u32>()?);
        }
        Ok(out)
    }

    /// Fraction of rows whose predicted class is their label.
    pub fn accuracy(&self, rows: &[f32], labels: &[u32], device: &Device) -> Result<f64> {
        let pred = self.predict(rows, 1000, device)?;
        if pred.len() != labels.len() || labels.is_empty() {
            return Err(Error::Data(format!(
                "{} images but {} labels",
                pred.len(),
                labels.len()
            )));
        }
        let hits = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
        Ok(hits as f64 / labels.len() as f64)
    }

    /// Saves weights and shape in one safetensors file (the shape as the tensor `config`), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::checkpoint::write_atomic(path, &self.to_bytes()?)
    }

    /// The file [`Classifier::save`] writes, as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let c = self.config;
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for name in ["conv1", "conv2", "fc", "head"] {
            for p in ["weight", "bias"] {
                let k = format!("{name}.{p}");
                t.insert(k.clone(), self.w.get(&k)?.to_device(&Device::Cpu)?);
            }
        }
        let shape = [c.channels, c.height, c.width, c.num_classes].map(|v| v as u32);
        t.insert("config".into(), Tensor::new(&shape, &Device::Cpu)?);
        crate::checkpoint::tensor_bytes(&t)
    }

    /// Loads a file written by [`Classifier::save`].
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bad = |m: String| Error::Data(format!("{}: {m}", path.display()));
        let t = candle_core::safetensors::load(path, device)
            .map_err(|e| bad(format!("not a readable classifier file ({e})")))?;
        let shape: Vec<u32> = t
            .get("config")
            .ok_or_else(|| bad("no 'config' tensor: not a flowmatching classifier".into()))?
            .to_vec1()?;
        let [channels, height, width, num_classes] = shape[..] else {
            return Err(bad(format!("config holds {shape:?}")));
        };
        let config = ClassifierConfig {
            channels: channels as usize,
            height: height as usize,
            width: width as usize,
            num_classes: num_classes as usize,
        };
        let (model, params) = Self::new(config, &mut Rng::new(0), device)?;
        params.load(
            &t.into_iter()
                .filter(|(k, _)| k != "config")
                .collect::<HashMap<_, _>>(),
        )?;
        Ok(model)
    }
}

/// Mean cross-entropy of logits (B, K) against labels (B,).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Training settings.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierTraining {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for ClassifierTraining {
    fn default() -> Self {
        Self {
            epochs: 4,
            batch_size: 128,
            lr: 1e-3,
            seed: 0,
        }
    }
}

/// Trains a classifier on labelled flat image rows; `on_step(step, total, loss)` reports progress.
pub fn train_classifier(
    config: ClassifierConfig,
    rows: &[f32],
    labels: &[u32],
    s: ClassifierTraining,
    device: &Device,
    mut on_step: impl FnMut(usize, usize, f64),
) -> Result<Classifier> {
    let dim = config.dim();
    let n = labels.len();
    if n == 0 || rows.len() != n * dim {
        return Err(Error::Data(format!(
            "{} values do not form {n} images of {dim}",
            rows.len()
        )));
    }
    if s.epochs == 0 || s.batch_size == 0 {
        return Err(Error::Config(
            "epochs and batch size must be positive".into(),
        ));
    }
    let root = Rng::new(s.seed);
    let (model, params) = Classifier::new(config, &mut root.fork(0), device)?;
    let mut opt = AdamW::new(
        &params,
        AdamWConfig {
            lr: s.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = root.fork(1);
    let per_epoch = n.div_ceil(s.batch_size);
    let total = per_epoch * s.epochs;
    let mut step = 0;
    for _ in 0..s.epochs {
        // A fresh permutation each epoch (Fisher-Yates).
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for idx in order.chunks(s.batch_size) {
            let mut x = Vec::with_capacity(idx.len() * dim);
            let y: Vec<u32> = idx.iter().map(|&i| labels[i]).collect();
            for &i in idx {
                x.extend_from_slice(&rows[i * dim..(i + 1) * dim]);
            }
            let x = Tensor::from_vec(x, (idx.len(), dim), device)?;
            let y = Tensor::from_vec(y, idx.len(), device)?;
            let loss = cross_entropy(&model.logits(&x)?, &y)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(Error::NonFinite {
                    step: step as u64,
                    what: "the classifier loss".into(),
                    advice: "lower the learning rate (--lr)".into(),
                });
            }
            let grads = loss.backward()?;
            let g = params
                .vars()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .cloned()
                        .ok_or_else(|| Error::Config("a classifier weight got no gradient".into()))
                })
                .collect::<Result<Vec<_>>>()?;
            let lr =
                crate::optim::scheduled_lr(s.lr, step as u64, 0, total as u64, LrDecay::Cosine);
            opt.step(&params, &g, lr)?;
            step += 1;
            on_step(step, total, value);
        }
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes of 8x8 images (a bright left or right half, plus noise) are separated after a short
    /// training, and the saved file loads back to the same predictions.
    #[test]
    fn learns_a_separable_problem_and_round_trips() {
        let mut rng = Rng::new(0);
        let (n, dim) = (256, 64);
        let mut rows = vec![];
        let mut labels = vec![];
        for i in 0..n {
            let l = (i % 2) as u32;
            for _y in 0..8 {
                for x in 0..8 {
                    let on = (x < 4) == (l == 0);
                    rows.push(if on { 0.8 } else { -0.8 } + 0.3 * rng.normal() as f32);
                }
            }
            labels.push(l);
        }
        let cfg = ClassifierConfig {
            channels: 1,
            height: 8,
            width: 8,
            num_classes: 2,
        };
        let s = ClassifierTraining {
            epochs: 3,
            batch_size: 32,
            lr: 3e-3,
            seed: 1,
        };
        let clf = train_classifier(cfg, &rows, &labels, s, &Device::Cpu, |_, _, _| {}).unwrap();
        let acc = clf.accuracy(&rows, &labels, &Device::Cpu).unwrap();
        assert!(acc > 0.95, "{acc}");
        let p = std::env::temp_dir().join(format!("fm-clf-{}.safetensors", std::process::id()));
        clf.save(&p).unwrap();
        let back = Classifier::load(&p, &Device::Cpu).unwrap();
        assert_eq!(back.config(), cfg);
        assert_eq!(
            back.predict(&rows, 100, &Device::Cpu).unwrap(),
            clf.predict(&rows, 100, &Device::Cpu).unwrap()
        );
        assert_eq!(
            clf.features_of(&rows[..dim * 3], 2, &Device::Cpu)
                .unwrap()
                .len(),
            3 * FEATURES
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let got: f32 = cross_entropy(&logits, &labels)
            .unwrap()
            .to_scalar()
            .unwrap();
        let l0 = -(3.0f64 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln());
        let l1 = 3f64.ln();
        assert!((got as f64 - (l0 + l1) / 2.0).abs() < 1e-6);
    }
}
