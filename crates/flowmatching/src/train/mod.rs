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
use crate::field::VelocityField;
use crate::infill::SpanMasking;
use crate::nn::{Labeled, Model, ModelConfig};
use crate::params::Params;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::nn::MlpEngine;
use crate::objective::Weighting;
use crate::optim::{
    clip_flat, ema_decay_at, ema_update, flatten, scheduled_lr, AdamW, AdamWConfig, Ema, FlatAdamW,
    LrDecay,
};
use crate::path::SchedulerConfig;
use crate::path::{AffinePath, Prediction};
use crate::precision::Precision;
use crate::rng::Rng;
use crate::timesteps::TimeSampling;

mod sequence;

pub use sequence::draw_infill_batch;

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
    /// EMA decay of the weights used for sampling (0: no averaging, sampling uses the raw weights).
    pub ema_decay: f64,
    pub seed: u64,
    /// Class-conditional models: probability of replacing a label with the null class during training,
    /// so one network also learns the unconditional field that classifier-free guidance needs.
    #[serde(default)]
    pub label_dropout: f64,
    /// How noise (or source) samples are paired with data samples in a minibatch.
    #[serde(default)]
    pub coupling: crate::coupling::Coupling,
    /// The distribution of the training times t (uniform in checkpoints written before it existed).
    #[serde(default, skip_serializing_if = "is_uniform")]
    pub time_sampling: TimeSampling,
    /// Sequence models: how the spans to fill in are drawn (masked CFM, see [`crate::infill`]).
    #[serde(default, skip_serializing_if = "is_default_masking")]
    pub masking: SpanMasking,
    /// Sequence models: longer sequences are cropped at random to this many frames (None: the model's
    /// longest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_frames: Option<usize>,
    /// The matrix products' arithmetic (weights, optimizer state and the loss stay f32); f32 in
    /// checkpoints written before it existed. bf16 runs the MLP engine's products on AVX-512 BF16.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
}

fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

fn is_uniform(t: &TimeSampling) -> bool {
    *t == TimeSampling::Uniform
}

fn is_default_masking(m: &SpanMasking) -> bool {
    *m == SpanMasking::default()
}

impl TrainConfig {
    /// The recipe of the demo and the studies: AdamW at `lr` (default betas, no weight decay),
    /// `warmup_steps` of linear warm-up then cosine decay to 0, clipping at 1, EMA 0.999, no label
    /// dropout, independent pairs.
    pub fn cosine(steps: u64, batch_size: usize, lr: f64, warmup_steps: u64, seed: u64) -> Self {
        Self {
            steps,
            batch_size,
            optimizer: AdamWConfig {
                lr,
                ..Default::default()
            },
            warmup_steps,
            lr_decay: LrDecay::Cosine,
            grad_clip: Some(1.0),
            ema_decay: 0.999,
            seed,
            label_dropout: 0.0,
            coupling: crate::coupling::Coupling::Independent,
            time_sampling: TimeSampling::Uniform,
            masking: SpanMasking::default(),
            crop_frames: None,
            precision: Precision::F32,
        }
    }
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
            label_dropout: 0.1,
            coupling: crate::coupling::Coupling::Independent,
            time_sampling: TimeSampling::Uniform,
            masking: SpanMasking::default(),
            crop_frames: None,
            precision: Precision::F32,
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
    /// The loss weight lambda(t) (flow matching: uniform).
    #[serde(default)]
    pub weighting: Weighting,
    pub train: TrainConfig,
    /// Where the data came from (for the record).
    pub data: String,
    /// The source distribution x0 is drawn from, when it is not N(0, I) (for the record).
    #[serde(default)]
    pub source: Option<String>,
}

impl RunConfig {
    /// A run of `model` on a path, prediction and loss weighting (as [`Objective::parts`] gives them)
    /// with `train`, on the data named `data`, from N(0, I).
    ///
    /// [`Objective::parts`]: crate::objective::Objective::parts
    pub fn new(
        model: ModelConfig,
        (path, prediction, weighting): (SchedulerConfig, Prediction, Weighting),
        train: TrainConfig,
        data: impl Into<String>,
    ) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            model,
            path,
            prediction,
            weighting,
            train,
            data: data.into(),
            source: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.format_version > FORMAT_VERSION {
            return Err(Error::Config(format!(
                "format version {} is newer than this build understands ({FORMAT_VERSION}); upgrade flowmatching",
                self.format_version
            )));
        }
        let t = &self.train;
        if t.steps == 0 {
            return Err(Error::Config(
                "training needs at least 1 step (--steps)".into(),
            ));
        }
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
        self.model.validate()?;
        t.coupling.validate()?;
        t.time_sampling.validate()?;
        if !(0.0..=1.0).contains(&t.label_dropout) {
            return Err(Error::Config(format!(
                "label dropout must lie in [0, 1], got {}",
                t.label_dropout
            )));
        }
        self.path.build()?;
        self.weighting.weights(&self.path, &[0.5])?;
        Ok(())
    }
}

/// Which implementation computes the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// The fused CPU MLP engine where it applies (an MLP on the CPU), candle otherwise.
    #[default]
    Auto,
    /// candle's autograd, always.
    Candle,
}

/// The state that the training step updates, in one of two representations.
#[derive(Debug)]
enum Engine {
    /// Parameters in the candle variables, autograd gradients.
    Candle { opt: AdamW, ema: Ema },
    /// Flat buffers of the fused MLP engine; the candle variables are refreshed on demand.
    Fast {
        mlp: Box<MlpEngine>,
        opt: FlatAdamW,
        ema: Vec<f32>,
        synced: AtomicBool,
    },
}

/// The error of a step whose `what` is not finite, with advice that fits the run's settings.
fn diverged(c: TrainConfig, step: u64, what: &str) -> Error {
    let lr = c.optimizer.lr;
    let advice = match c.grad_clip {
        Some(max) => format!(
            "lower the learning rate (now {lr:e}); gradient clipping is already on (norm {max})"
        ),
        None => format!(
            "lower the learning rate (now {lr:e}) or clip the gradient norm (--grad-clip 1)"
        ),
    };
    let advice = if step <= 1 {
        format!("{advice}, and check that the data are of a reasonable scale")
    } else {
        advice
    };
    Error::NonFinite {
        step,
        what: what.into(),
        advice,
    }
}

/// Owns the model, optimizer, EMA and random streams of one run.
#[derive(Debug)]
pub struct Trainer {
    config: RunConfig,
    model: Model,
    params: Params,
    path: AffinePath,
    engine: Engine,
    rng_data: Rng,
    rng_noise: Rng,
    step: u64,
    device: Device,
}

impl Trainer {
    /// A fresh run: weights drawn from the seed; the fastest engine that applies.
    pub fn new(config: RunConfig, device: &Device) -> Result<Self> {
        Self::with_engine(config, device, EngineKind::Auto)
    }

    /// A fresh run on a chosen engine.
    pub fn with_engine(config: RunConfig, device: &Device, kind: EngineKind) -> Result<Self> {
        config.validate()?;
        let root = Rng::new(config.train.seed);
        let (mut model, params) = config.model.build(&mut root.fork(0), device, DType::F32)?;
        // The U-Net's CPU convolutions run in the configured precision under candle's autograd.
        let cpu_unet = matches!(config.model, ModelConfig::UNet(_)) && device.is_cpu();
        if cpu_unet {
            model.set_precision(config.train.precision);
        }
        let engine = match (&config.model, kind, device.is_cpu()) {
            (ModelConfig::Mlp(cfg), EngineKind::Auto, true) => {
                config.train.optimizer.validate()?;
                let mut mlp = MlpEngine::new(*cfg, &params)?;
                mlp.set_precision(config.train.precision);
                let n = mlp.num_params();
                Engine::Fast {
                    opt: FlatAdamW::new(n, config.train.optimizer),
                    ema: mlp.params.clone(),
                    mlp: Box::new(mlp),
                    synced: AtomicBool::new(true),
                }
            }
            _ if config.train.precision != Precision::F32 && !cpu_unet => {
                return Err(Error::Config(format!(
                    "{} training runs the matrix products of the MLP engine and of the U-Net's \
                     convolutions, on the CPU; this model trains in f32",
                    config.train.precision.name()
                )))
            }
            _ => Engine::Candle {
                opt: AdamW::new(&params, config.train.optimizer)?,
                ema: Ema::new(&params, config.train.ema_decay)?,
            },
        };
        Ok(Self {
            path: AffinePath::from_config(&config.path)?,
            model,
            params,
            engine,
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

    /// Which engine runs the steps.
    pub fn engine(&self) -> EngineKind {
        match self.engine {
            Engine::Candle { .. } => EngineKind::Candle,
            Engine::Fast { .. } => EngineKind::Auto,
        }
    }

    /// The matrix products' arithmetic in force: the configured precision where this CPU runs it
    /// (bf16 configured on a CPU without AVX-512 BF16 trains in f32).
    pub fn precision(&self) -> Precision {
        match &self.engine {
            Engine::Fast { mlp, .. } => mlp.precision(),
            Engine::Candle { .. } => self.model.precision(),
        }
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Copies the fast engine's parameters into the candle variables if they changed.
    fn sync(&self) -> Result<()> {
        if let Engine::Fast { mlp, synced, .. } = &self.engine {
            if !synced.swap(true, Ordering::SeqCst) {
                mlp.store(&mlp.params, &self.params)?;
            }
        }
        Ok(())
    }

    /// The model with the current (raw) weights; it shares storage with the trainer's parameters.
    pub fn model(&self) -> &Model {
        self.sync()
            .expect("copying parameters between buffers of the same shapes");
        &self.model
    }

    pub fn params(&self) -> &Params {
        self.sync()
            .expect("copying parameters between buffers of the same shapes");
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

    /// The learning rate of the next step: warm-up, then the configured decay.
    fn learning_rate(&self) -> f64 {
        let c = &self.config.train;
        scheduled_lr(
            c.optimizer.lr,
            self.step,
            c.warmup_steps,
            c.steps,
            c.lr_decay,
        )
    }

    /// The CFM loss for given noise, data and times (no update): mean squared error of the prediction
    /// against the path's target in the configured prediction form.
    pub fn loss(&self, x0: &Tensor, x1: &Tensor, t: &[f64]) -> Result<Tensor> {
        let w = self.config.weighting.weights(&self.config.path, t)?;
        cfm_loss(
            self.model(),
            &self.path,
            self.config.prediction,
            x0,
            x1,
            t,
            w.as_deref(),
        )
    }

    /// One optimizer step on a fresh minibatch; returns the loss before the update.
    pub fn step(&mut self, data: &dyn DataSource) -> Result<f64> {
        self.step_from(data, None)
    }

    /// Refuses data, a source or labels that do not fit the model.
    fn check_inputs(&self, data: &dyn DataSource, source: Option<&dyn DataSource>) -> Result<()> {
        let dim = self.config.model.dim();
        if let Some(s) = source {
            if s.dim() != dim {
                return Err(Error::Data(format!(
                    "the source {} is {}-dimensional but the model is {dim}-dimensional",
                    s.describe(),
                    s.dim()
                )));
            }
        }
        if data.dim() != dim {
            return Err(Error::Data(format!(
                "the model is {dim}-dimensional but the data are {}-dimensional",
                data.dim()
            )));
        }
        let classes = self.config.model.num_classes();
        if classes > 0 && data.num_classes() != classes {
            return Err(Error::Data(format!(
                "the model is conditioned on {classes} classes but the data {} have {}",
                data.describe(),
                if data.num_classes() == 0 {
                    "no labels".to_string()
                } else {
                    format!("{} classes", data.num_classes())
                }
            )));
        }
        let coupling = self.config.train.coupling;
        if classes > 0 && coupling != crate::coupling::Coupling::Independent {
            return Err(Error::Config(
                "couplings other than independent are not available for class-conditional training"
                    .into(),
            ));
        }
        Ok(())
    }

    /// One batch: (x0, x1) paired by the coupling (or the data's own pairs), labels with the null class
    /// dropped in at the label-dropout rate, and times from the configured time sampling.
    #[allow(clippy::type_complexity)]
    fn draw_batch(
        &mut self,
        data: &dyn DataSource,
        source: Option<&dyn DataSource>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<u32>, Vec<f64>)> {
        let dim = self.config.model.dim();
        let b = self.config.train.batch_size;
        let classes = self.config.model.num_classes();
        let coupling = self.config.train.coupling;
        let times = self.config.train.time_sampling;
        let (x0, x1, mut labels, t) = match data.sample_pairs(&mut self.rng_data, b) {
            Some((x0, x1)) => {
                let t = times.sample(&mut self.rng_noise, b);
                (x0, x1, vec![], t)
            }
            None => {
                let (x1, labels) = data.sample_labeled(&mut self.rng_data, b);
                let x0 = match source {
                    Some(s) => s.sample(&mut self.rng_noise, b),
                    None => self.rng_noise.normal_vec(b * dim),
                };
                let t = times.sample(&mut self.rng_noise, b);
                let (x0, x1) = coupling.pair(x0, x1, dim, &mut self.rng_noise)?;
                (x0, x1, labels, t)
            }
        };
        if classes > 0 {
            let p = self.config.train.label_dropout;
            for l in labels.iter_mut() {
                if self.rng_noise.uniform() < p {
                    *l = classes as u32;
                }
            }
        }
        Ok((x0, x1, labels, t))
    }

    /// One step with x0 drawn from `source` instead of N(0, I) (data sets that yield fixed pairs, such as
    /// reflow's, bring their own x0). The configured coupling pairs x0 with x1 before the path is built.
    pub fn step_from(
        &mut self,
        data: &dyn DataSource,
        source: Option<&dyn DataSource>,
    ) -> Result<f64> {
        self.check_inputs(data, source)?;
        let dim = self.config.model.dim();
        let b = self.config.train.batch_size;
        let classes = self.config.model.num_classes();
        let (x0, x1, labels, t) = self.draw_batch(data, source)?;
        let weights = self.config.weighting.weights(&self.config.path, &t)?;
        let c = self.config.train;
        let lr = self.learning_rate();
        let step = self.step;
        let value = match &mut self.engine {
            Engine::Candle { opt, ema } => {
                let x1 = Tensor::from_vec(x1, (b, dim), &self.device)?;
                let x0 = Tensor::from_vec(x0, (b, dim), &self.device)?;
                let labeled;
                let field: &dyn VelocityField = if classes > 0 {
                    labeled = Labeled {
                        model: &self.model,
                        labels: Tensor::from_vec(labels, b, &self.device)?,
                    };
                    &labeled
                } else {
                    &self.model
                };
                let loss = cfm_loss(
                    field,
                    &self.path,
                    self.config.prediction,
                    &x0,
                    &x1,
                    &t,
                    weights.as_deref(),
                )?;
                candle_update(&self.params, opt, ema, &loss, c, step, lr)?
            }
            Engine::Fast {
                mlp,
                opt,
                ema,
                synced,
            } => {
                let (xt, target) = self
                    .path
                    .sample_rows(&x0, &x1, &t, dim, self.config.prediction);
                let tf: Vec<f32> = t.iter().map(|&t| t as f32).collect();
                mlp.forward_train(&xt, &tf);
                let w32: Option<Vec<f32>> = weights
                    .as_ref()
                    .map(|w| w.iter().map(|&w| w as f32).collect());
                let value = mlp.mse_backward(&target, w32.as_deref());
                if !value.is_finite() {
                    return Err(diverged(c, step, "the loss"));
                }
                let norm = match c.grad_clip {
                    Some(max) => mlp.clip(max),
                    None => 0.0,
                };
                if !norm.is_finite() {
                    return Err(diverged(c, step, "the gradient norm"));
                }
                let mlp = &mut **mlp;
                opt.step(&mut mlp.params, &mlp.grads, lr);
                if c.ema_decay > 0.0 {
                    ema_update(ema, &mlp.params, ema_decay_at(c.ema_decay, step));
                }
                synced.store(false, Ordering::SeqCst);
                value
            }
        };
        self.step += 1;
        Ok(value)
    }

    /// A frozen copy of the model with the EMA weights (what sampling uses).
    pub fn ema_model(&self) -> Result<Model> {
        let (model, params) =
            self.config
                .model
                .build(&mut Rng::new(0), &self.device, DType::F32)?;
        for ((_, var), e) in params.iter().zip(self.ema_values()?) {
            var.set(&e)?;
        }
        model.frozen()
    }

    /// The averaged weights (the weights themselves when averaging is off).
    fn ema_values(&self) -> Result<Vec<Tensor>> {
        if self.config.train.ema_decay == 0.0 {
            return self
                .params()
                .vars()
                .map(|v| Ok(v.as_tensor().copy()?.detach()))
                .collect();
        }
        match &self.engine {
            Engine::Candle { ema, .. } => ema.values(&self.params),
            Engine::Fast { ema, .. } => split(ema, &self.params),
        }
    }

    /// Every tensor of the run's state, named: `model.*`, `ema.*`, `adam.m.*`, `adam.v.*`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .params()
            .snapshot()?
            .into_iter()
            .map(|(n, t)| (format!("model.{n}"), t))
            .collect();
        for ((name, _), e) in self.params.iter().zip(self.ema_values()?) {
            out.push((format!("ema.{name}"), e));
        }
        match &self.engine {
            Engine::Candle { opt, .. } => out.extend(opt.state(&self.params)?),
            Engine::Fast { opt, .. } => {
                let (m, v) = (split(&opt.m, &self.params)?, split(&opt.v, &self.params)?);
                for (((name, _), m), v) in self.params.iter().zip(m).zip(v) {
                    out.push((format!("adam.m.{name}"), m));
                    out.push((format!("adam.v.{name}"), v));
                }
            }
        }
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
        let named = |prefix: &str| -> Result<Vec<Tensor>> {
            self.params
                .iter()
                .map(|(name, _)| get(&format!("{prefix}{name}")))
                .collect()
        };
        let ema_values = named("ema.")?;
        match &mut self.engine {
            Engine::Candle { opt, ema } => {
                ema.set_values(&ema_values)?;
                opt.load_state(&self.params, &get, step)?;
            }
            Engine::Fast {
                mlp,
                opt,
                ema,
                synced,
            } => {
                mlp.load(&self.params)?;
                *ema = concat(&ema_values)?;
                opt.m = concat(&named("adam.m.")?)?;
                opt.v = concat(&named("adam.v.")?)?;
                opt.steps = step;
                synced.store(true, Ordering::SeqCst);
                if ema.len() != mlp.num_params()
                    || opt.m.len() != ema.len()
                    || opt.v.len() != ema.len()
                {
                    return Err(Error::Data(
                        "the saved optimizer state does not match the model".into(),
                    ));
                }
            }
        }
        let bad = || Error::Data("the saved random-generator state is unreadable".into());
        self.rng_data = Rng::from_state(rng_data).ok_or_else(bad)?;
        self.rng_noise = Rng::from_state(rng_noise).ok_or_else(bad)?;
        self.step = step;
        Ok(())
    }
}

/// Flat values cut into tensors shaped like `params` (in their order).
/// The update of the candle engine: backpropagates `loss`, clips the gradient, takes the AdamW step and
/// updates the EMA; returns the loss value. Stops with a clear error on a non-finite loss or gradient.
fn candle_update(
    params: &Params,
    opt: &mut AdamW,
    ema: &mut Ema,
    loss: &Tensor,
    c: TrainConfig,
    step: u64,
    lr: f64,
) -> Result<f64> {
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !value.is_finite() {
        return Err(diverged(c, step, "the loss"));
    }
    let grads = loss.backward()?;
    let g = params
        .iter()
        .map(|(name, v)| {
            grads
                .get(v.as_tensor())
                .ok_or_else(|| Error::Config(format!("no gradient for {name}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut g = flatten(g)?;
    if let Some(max) = c.grad_clip {
        if !clip_flat(&mut g, max)?.is_finite() {
            return Err(diverged(c, step, "the gradient norm"));
        }
    }
    let theta = opt.step_flat(params, &g, lr)?;
    if c.ema_decay > 0.0 {
        ema.update_flat(&theta, step)?;
    }
    Ok(value)
}

fn split(flat: &[f32], params: &Params) -> Result<Vec<Tensor>> {
    let mut off = 0;
    params
        .vars()
        .map(|v| {
            let n = v.elem_count();
            let t = Tensor::from_slice(&flat[off..off + n], v.shape(), v.device())?;
            off += n;
            Ok(t)
        })
        .collect()
}

/// Tensors flattened and joined into one f32 vector.
fn concat(tensors: &[Tensor]) -> Result<Vec<f32>> {
    let mut out = vec![];
    for t in tensors {
        out.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The regression loss of `model` for given noise, data and per-row times: mean over rows of
/// lambda(t_i) times the mean squared error of row i (lambda = 1 when `weights` is None).
pub fn cfm_loss(
    model: &dyn VelocityField,
    path: &AffinePath,
    prediction: Prediction,
    x0: &Tensor,
    x1: &Tensor,
    t: &[f64],
    weights: Option<&[f64]>,
) -> Result<Tensor> {
    let s = path.sample(x0, x1, t)?;
    let target = path.regression_target(prediction, x0, x1, &s, t)?;
    let pred = model.forward(&s.x_t, &s.t)?;
    let sq = (pred - target)?.sqr()?;
    match weights {
        None => Ok(sq.mean_all()?),
        Some(w) => {
            let per_row = sq.flatten_from(1)?.mean(1)?;
            let w = Tensor::from_iter(w.iter().copied(), per_row.device())?
                .to_dtype(per_row.dtype())?;
            Ok((per_row * w)?.mean_all()?)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::{TensorDataset, Toy2d};
    use crate::nn::{Activation, MlpConfig, TimeEmbedding};

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
            weighting: Weighting::Uniform,
            train: TrainConfig {
                steps,
                batch_size: 64,
                warmup_steps: 5,
                ..Default::default()
            },
            data: "test".into(),
            source: None,
        }
    }

    /// bf16 products train checkerboard as well as f32 for the same steps and seed: the share of
    /// samples inside the squares within 0.01 (samples drawn in f32 from both models alike).
    #[test]
    fn bf16_training_reaches_the_quality_of_f32() {
        if !crate::precision::cpu_units().bf16_matmul() {
            eprintln!("no AVX-512 BF16 on this CPU: bf16 falls back to f32, nothing to compare");
            return;
        }
        let run = |precision| {
            let model = ModelConfig::Mlp(MlpConfig::silu(2, 128, 4));
            let parts = (
                SchedulerConfig::CondOt { sigma_min: 0.0 },
                Prediction::Velocity,
                Weighting::Uniform,
            );
            let train = TrainConfig {
                precision,
                ..TrainConfig::cosine(1500, 1024, 3e-3, 100, 7)
            };
            let cfg = RunConfig::new(model, parts, train, "checkerboard");
            let mut trainer = Trainer::new(cfg, &Device::Cpu).unwrap();
            assert_eq!(trainer.precision(), precision);
            let mut loss = 0.0;
            while trainer.step_count() < 1500 {
                loss = trainer.step(&Toy2d::Checkerboard).unwrap();
            }
            let model = trainer.ema_model().unwrap();
            let x0 = Rng::new(3).normal_vec(2 * 20_000);
            let opts = crate::solver::SolveOptions::constant(20);
            let kind = crate::solver::SolverKind::Midpoint;
            let (x, _) =
                crate::sample::transport(&model, trainer.config(), x0, kind, &opts).unwrap();
            let support = crate::eval::metrics::checkerboard_support(&x).in_support_fraction;
            (support, loss)
        };
        let (f32_support, f32_loss) = run(Precision::F32);
        let (bf16_support, bf16_loss) = run(Precision::Bf16);
        eprintln!("in-support fraction: f32 {f32_support}, bf16 {bf16_support}; loss {f32_loss} vs {bf16_loss}");
        assert!(f32_support > 0.8, "f32 {f32_support}");
        assert!(
            (bf16_support - f32_support).abs() < 0.01,
            "in-support fraction bf16 {bf16_support} vs f32 {f32_support}"
        );
        assert!(
            (bf16_loss - f32_loss).abs() < 0.1 * f32_loss,
            "{bf16_loss} vs {f32_loss}"
        );
    }

    /// A U-Net trained with bf16 convolution products follows the f32 run's loss curve (same seed, same
    /// batches): in every window of steps the two mean losses differ by less than the window's own
    /// noise (twice the standard error of the f32 losses in it), and both curves fall.
    #[test]
    fn bf16_unet_loss_curve_is_within_noise_of_f32() {
        if !crate::precision::cpu_units().bf16_matmul() {
            eprintln!("no AVX-512 BF16 on this CPU: bf16 falls back to f32, nothing to compare");
            return;
        }
        // 8x8 images of a bright 3x3 square at a random place on a dark background.
        let mut rng = Rng::new(11);
        let mut images = vec![-1f32; 256 * 64];
        for image in images.chunks_mut(64) {
            let (r, c) = (rng.below(6), rng.below(6));
            for i in 0..9 {
                image[(r + i / 3) * 8 + c + i % 3] = 1.0;
            }
        }
        let data = TensorDataset::new(images, 64, "squares").unwrap();
        let (steps, window) = (240, 40);
        let run = |precision| {
            let model = ModelConfig::UNet(crate::nn::UNetConfig {
                channels: 1,
                height: 8,
                width: 8,
                base_channels: 16,
                channel_mults: vec![1, 2],
                res_blocks: 1,
                attention_resolutions: vec![4],
                heads: 2,
                groups: 4,
                num_classes: 0,
            });
            let parts = (
                SchedulerConfig::CondOt { sigma_min: 0.0 },
                Prediction::Velocity,
                Weighting::Uniform,
            );
            let train = TrainConfig {
                precision,
                ..TrainConfig::cosine(steps, 32, 2e-3, 20, 5)
            };
            let mut trainer =
                Trainer::new(RunConfig::new(model, parts, train, "squares"), &Device::Cpu).unwrap();
            assert_eq!(trainer.precision(), precision);
            (0..steps)
                .map(|_| trainer.step(&data).unwrap())
                .collect::<Vec<f64>>()
        };
        let (f32_losses, bf16_losses) = (run(Precision::F32), run(Precision::Bf16));
        assert_ne!(f32_losses, bf16_losses, "bf16 changed nothing: did it run?");
        let stats = |w: &[f64]| {
            let mean = w.iter().sum::<f64>() / w.len() as f64;
            let var = w.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (w.len() - 1) as f64;
            (mean, (var / w.len() as f64).sqrt())
        };
        let windows = f32_losses.chunks(window).zip(bf16_losses.chunks(window));
        let means: Vec<_> = windows
            .map(|(a, b)| {
                let ((fa, se), (fb, _)) = (stats(a), stats(b));
                eprintln!("window mean loss: f32 {fa:.4} bf16 {fb:.4} (standard error {se:.4})");
                assert!(
                    (fa - fb).abs() < 2.0 * se,
                    "f32 {fa} vs bf16 {fb}, noise {se}"
                );
                (fa, fb)
            })
            .collect();
        let (first, last) = (means[0], means[means.len() - 1]);
        assert!(
            last.0 < 0.8 * first.0 && last.1 < 0.8 * first.1,
            "{means:?}"
        );
    }

    /// bf16 is refused where it would not run (models other than the MLP engine) rather than ignored.
    #[test]
    fn bf16_is_refused_for_the_candle_engine() {
        let mut cfg = small_config(2);
        cfg.train.precision = Precision::Bf16;
        let e = Trainer::with_engine(cfg, &Device::Cpu, EngineKind::Candle)
            .unwrap_err()
            .to_string();
        assert!(e.contains("MLP engine"), "{e}");
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

    /// The fused engine and candle's autograd train the same run to the same losses (up to rounding).
    #[test]
    fn engines_agree() {
        let mut cfg = small_config(30);
        cfg.train.optimizer.weight_decay = 0.01;
        cfg.train.grad_clip = Some(0.5);
        cfg.train.ema_decay = 0.9;
        let mut fast = Trainer::with_engine(cfg.clone(), &Device::Cpu, EngineKind::Auto).unwrap();
        let mut slow = Trainer::with_engine(cfg, &Device::Cpu, EngineKind::Candle).unwrap();
        assert_eq!(fast.engine(), EngineKind::Auto);
        assert_eq!(slow.engine(), EngineKind::Candle);
        for i in 0..30 {
            let (a, b) = (
                fast.step(&Toy2d::Moons).unwrap(),
                slow.step(&Toy2d::Moons).unwrap(),
            );
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "step {i}: {a} vs {b}"
            );
        }
        for (n, d) in crate::testing::state_differences(&fast, &slow) {
            assert!(d < 1e-3, "{n}: {d}");
        }
    }

    /// Both engines agree for every objective of the ablation (weights, noise and score targets).
    #[test]
    fn engines_agree_on_every_objective() {
        for obj in crate::objective::Objective::ALL {
            let (path, prediction, weighting) = obj.parts();
            let cfg = RunConfig {
                path,
                prediction,
                weighting,
                ..small_config(5)
            };
            let mut fast =
                Trainer::with_engine(cfg.clone(), &Device::Cpu, EngineKind::Auto).unwrap();
            let mut slow = Trainer::with_engine(cfg, &Device::Cpu, EngineKind::Candle).unwrap();
            for _ in 0..5 {
                let (a, b) = (
                    fast.step(&Toy2d::Moons).unwrap(),
                    slow.step(&Toy2d::Moons).unwrap(),
                );
                assert!(
                    (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                    "{}: {a} vs {b}",
                    obj.name()
                );
            }
        }
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

    /// A source distribution and exact OT coupling train on both engines alike; fixed pairs bypass both.
    #[test]
    fn source_coupling_and_pairs() {
        let mut cfg = small_config(5);
        cfg.train.coupling = crate::coupling::Coupling::Ot;
        let mut fast = Trainer::with_engine(cfg.clone(), &Device::Cpu, EngineKind::Auto).unwrap();
        let mut slow = Trainer::with_engine(cfg, &Device::Cpu, EngineKind::Candle).unwrap();
        for _ in 0..5 {
            let a = fast
                .step_from(&Toy2d::Moons, Some(&Toy2d::EightGaussians))
                .unwrap();
            let b = slow
                .step_from(&Toy2d::Moons, Some(&Toy2d::EightGaussians))
                .unwrap();
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // Pairs (x0, x0 + 1): the OT-path target is exactly x1 - x0 = 1, so a model can reach zero loss.
        let x0: Vec<f32> = crate::rng::Rng::new(3).normal_vec(200);
        let x1: Vec<f32> = x0.iter().map(|v| v + 1.0).collect();
        let pairs = crate::data::PairedDataset::new(x0, x1, 2, "shift").unwrap();
        let mut cfg = small_config(400);
        cfg.path = SchedulerConfig::CondOt { sigma_min: 0.0 };
        let mut tr = Trainer::new(cfg, &Device::Cpu).unwrap();
        let losses: Vec<f64> = (0..400).map(|_| tr.step(&pairs).unwrap()).collect();
        assert!(
            losses[399] < 0.01 * losses[0],
            "{} -> {}",
            losses[0],
            losses[399]
        );
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
