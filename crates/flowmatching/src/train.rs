//! Conditional flow matching training.
//!
//! One step (Lipman et al., Section 3): draw t ~ U[0, 1], data x1 and noise x0 ~ N(0, I), form
//! x_t = sigma_t x0 + alpha_t x1 on the chosen path, and take an AdamW step on
//!
//! ```text
//! L_CFM = E || v_theta(x_t, t) - (d_sigma_t x0 + d_alpha_t x1) ||^2
//! ```
//!
//! (mean over batch and dimensions). No ODE is solved during training. All randomness comes from the
//! run's seed: initial weights, data order, noise and times each have their own [`Rng`] stream.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig, Params, VelocityField};
use crate::optim::{clip_grad_norm, scheduled_lr, AdamW, AdamWConfig, Ema, LrDecay};
use crate::path::{AffinePath, Prediction};
use crate::rng::Rng;
use crate::scheduler::SchedulerConfig;

/// The checkpoint and config format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Optimisation settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Total optimizer steps.
    pub steps: u64,
    pub batch_size: usize,
    pub optimizer: AdamWConfig,
    /// Linear learning-rate warm-up over this many steps.
    pub warmup_steps: u64,
    /// Learning-rate decay after warm-up.
    #[serde(default)]
    pub lr_decay: LrDecay,
    /// Clip the global gradient norm to this value (None: no clipping).
    pub grad_clip: Option<f64>,
    /// EMA decay of the weights used for sampling.
    pub ema_decay: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 10_000,
            batch_size: 4096,
            optimizer: AdamWConfig::default(),
            warmup_steps: 0,
            lr_decay: LrDecay::Constant,
            grad_clip: Some(1.0),
            ema_decay: 0.999,
            seed: 0,
        }
    }
}

/// Everything that defines a run; stored whole in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub format_version: u32,
    pub model: ModelConfig,
    pub path: SchedulerConfig,
    /// What the network predicts (flow matching: velocity).
    pub prediction: Prediction,
    pub train: TrainConfig,
    /// Where the data came from (for the record).
    pub data: String,
}

impl RunConfig {
    pub fn validate(&self) -> Result<()> {
        if self.format_version > FORMAT_VERSION {
            return Err(Error::Config(format!(
                "format version {} is newer than this build understands ({FORMAT_VERSION}); upgrade flowmatching",
                self.format_version
            )));
        }
        let t = &self.train;
        if t.batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        t.optimizer.validate()?;
        if let Some(c) = t.grad_clip {
            if !(c > 0.0 && c.is_finite()) {
                return Err(Error::Config(format!(
                    "gradient clip must be positive, got {c}"
                )));
            }
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return Err(Error::Config(format!(
                "EMA decay must lie in [0, 1), got {}",
                t.ema_decay
            )));
        }
        self.path.build()?;
        Ok(())
    }
}

/// Owns the model, optimizer, EMA and random streams of one run.
#[derive(Debug)]
pub struct Trainer {
    config: RunConfig,
    model: Model,
    params: Params,
    path: AffinePath,
    opt: AdamW,
    ema: Ema,
    rng_data: Rng,
    rng_noise: Rng,
    step: u64,
    device: Device,
}

impl Trainer {
    /// A fresh run: weights drawn from the seed.
    pub fn new(config: RunConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let root = Rng::new(config.train.seed);
        let (model, params) = config.model.build(&mut root.fork(0), device, DType::F32)?;
        let opt = AdamW::new(&params, config.train.optimizer)?;
        let ema = Ema::new(&params, config.train.ema_decay)?;
        Ok(Self {
            path: AffinePath::from_config(&config.path)?,
            model,
            params,
            opt,
            ema,
            rng_data: root.fork(1),
            rng_noise: root.fork(2),
            step: 0,
            device: device.clone(),
            config,
        })
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn path(&self) -> &AffinePath {
        &self.path
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Changes the total number of steps (to extend a resumed run).
    pub fn set_total_steps(&mut self, steps: u64) {
        self.config.train.steps = steps;
    }

    /// The CFM loss for given noise, data and times (no update): mean squared error of the prediction
    /// against the path's target in the configured prediction form.
    pub fn loss(&self, x0: &Tensor, x1: &Tensor, t: &[f64]) -> Result<Tensor> {
        cfm_loss(&self.model, &self.path, self.config.prediction, x0, x1, t)
    }

    /// One optimizer step on a fresh minibatch; returns the loss before the update.
    pub fn step(&mut self, data: &dyn DataSource) -> Result<f64> {
        let dim = self.config.model.dim();
        if data.dim() != dim {
            return Err(Error::Data(format!(
                "the model is {dim}-dimensional but the data are {}-dimensional",
                data.dim()
            )));
        }
        let b = self.config.train.batch_size;
        let x1 = Tensor::from_vec(data.sample(&mut self.rng_data, b), (b, dim), &self.device)?;
        let x0 = Tensor::from_vec(self.rng_noise.normal_vec(b * dim), (b, dim), &self.device)?;
        let t = self.rng_noise.uniform_vec(b);
        let loss = self.loss(&x0, &x1, &t)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::NonFinite {
                step: self.step,
                what: "the loss".into(),
            });
        }
        let grads = loss.backward()?;
        let mut g = self
            .params
            .iter()
            .map(|(name, v)| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .ok_or_else(|| Error::Config(format!("no gradient for {name}")))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(max) = self.config.train.grad_clip {
            let norm = clip_grad_norm(&mut g, max)?;
            if !norm.is_finite() {
                return Err(Error::NonFinite {
                    step: self.step,
                    what: "the gradient norm".into(),
                });
            }
        }
        let c = &self.config.train;
        let lr = scheduled_lr(
            c.optimizer.lr,
            self.step,
            c.warmup_steps,
            c.steps,
            c.lr_decay,
        );
        self.opt.step(&self.params, &g, lr)?;
        self.ema.update(&self.params)?;
        self.step += 1;
        Ok(value)
    }

    /// A frozen copy of the model with the EMA weights (what sampling uses).
    pub fn ema_model(&self) -> Result<Model> {
        let (model, params) =
            self.config
                .model
                .build(&mut Rng::new(0), &self.device, DType::F32)?;
        for ((_, var), e) in params.iter().zip(&self.ema.values) {
            var.set(e)?;
        }
        Ok(model.frozen())
    }

    /// Every tensor of the run's state, named: `model.*`, `ema.*`, `adam.m.*`, `adam.v.*`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .snapshot()?
            .into_iter()
            .map(|(n, t)| (format!("model.{n}"), t))
            .collect();
        for ((name, _), e) in self.params.iter().zip(&self.ema.values) {
            out.push((format!("ema.{name}"), e.clone()));
        }
        out.extend(self.opt.state(&self.params));
        Ok(out)
    }

    /// The random streams' positions.
    pub fn rng_states(&self) -> (crate::rng::RngState, crate::rng::RngState) {
        (self.rng_data.state(), self.rng_noise.state())
    }

    /// Restores the state saved by [`Trainer::state_tensors`] and [`Trainer::rng_states`].
    pub fn restore(
        &mut self,
        step: u64,
        tensors: &std::collections::HashMap<String, Tensor>,
        rng_data: &crate::rng::RngState,
        rng_noise: &crate::rng::RngState,
    ) -> Result<()> {
        let get = |k: &str| {
            tensors
                .get(k)
                .cloned()
                .ok_or_else(|| Error::Data(format!("tensor '{k}' is missing")))
        };
        let prefixed = |p: &str| {
            tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(p).map(|n| (n.to_string(), v.clone())))
                .collect::<std::collections::HashMap<_, _>>()
        };
        self.params.load(&prefixed("model."))?;
        for (i, (name, _)) in self.params.iter().enumerate() {
            self.ema.values[i] = get(&format!("ema.{name}"))?;
        }
        self.opt.load_state(&self.params, &get, step)?;
        let bad = || Error::Data("the saved random-generator state is unreadable".into());
        self.rng_data = Rng::from_state(rng_data).ok_or_else(bad)?;
        self.rng_noise = Rng::from_state(rng_noise).ok_or_else(bad)?;
        self.step = step;
        Ok(())
    }
}

/// The (unweighted) CFM regression loss of `model` for given noise, data and per-row times.
pub fn cfm_loss(
    model: &dyn VelocityField,
    path: &AffinePath,
    prediction: Prediction,
    x0: &Tensor,
    x1: &Tensor,
    t: &[f64],
) -> Result<Tensor> {
    let s = path.sample(x0, x1, t)?;
    let target = match prediction {
        Prediction::Velocity => s.dx_t,
        Prediction::X1 => x1.clone(),
        Prediction::Epsilon => x0.clone(),
        other => path.from_velocity(other, &s.dx_t, &s.x_t, t)?,
    };
    let pred = model.forward(&s.x_t, &s.t)?;
    Ok((pred - target)?.sqr()?.mean_all()?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::{TensorDataset, Toy2d};
    use crate::model::{Activation, MlpConfig, TimeEmbedding};

    pub(crate) fn small_config(steps: u64) -> RunConfig {
        RunConfig {
            format_version: FORMAT_VERSION,
            model: ModelConfig::Mlp(MlpConfig {
                dim: 2,
                hidden: 32,
                depth: 2,
                time_embedding: TimeEmbedding::Input,
                activation: Activation::Silu,
            }),
            path: SchedulerConfig::CondOt { sigma_min: 1e-4 },
            prediction: Prediction::Velocity,
            train: TrainConfig {
                steps,
                batch_size: 64,
                warmup_steps: 5,
                ..Default::default()
            },
            data: "test".into(),
        }
    }

    #[test]
    fn same_seed_same_losses() {
        let run = || {
            let mut tr = Trainer::new(small_config(5), &Device::Cpu).unwrap();
            (0..5)
                .map(|_| tr.step(&Toy2d::Moons).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn loss_goes_down() {
        let mut tr = Trainer::new(small_config(300), &Device::Cpu).unwrap();
        let first: f64 = (0..20)
            .map(|_| tr.step(&Toy2d::EightGaussians).unwrap())
            .sum::<f64>()
            / 20.0;
        for _ in 0..260 {
            tr.step(&Toy2d::EightGaussians).unwrap();
        }
        let last: f64 = (0..20)
            .map(|_| tr.step(&Toy2d::EightGaussians).unwrap())
            .sum::<f64>()
            / 20.0;
        assert!(last < 0.8 * first, "{first} -> {last}");
    }

    #[test]
    fn non_finite_loss_stops_training() {
        let mut cfg = small_config(3);
        cfg.train.optimizer.lr = 1e30;
        cfg.train.grad_clip = None;
        let mut tr = Trainer::new(cfg, &Device::Cpu).unwrap();
        let data = TensorDataset::new(vec![1e30, 1e30, -1e30, 1e30], 2, "huge").unwrap();
        let err = (0..3)
            .find_map(|_| tr.step(&data).err())
            .expect("training should fail");
        assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut c = small_config(1);
        c.train.optimizer.lr = -1.0;
        assert!(Trainer::new(c, &Device::Cpu).is_err());
        let mut c = small_config(1);
        c.path = SchedulerConfig::CondOt { sigma_min: 1.5 };
        assert!(Trainer::new(c, &Device::Cpu).is_err());
        let mut c = small_config(1);
        c.format_version = FORMAT_VERSION + 1;
        assert!(Trainer::new(c, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("newer"));
    }
}
