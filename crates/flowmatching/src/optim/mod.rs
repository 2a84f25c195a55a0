//! AdamW with decoupled weight decay, gradient-norm clipping, learning-rate warm-up and EMA.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::cpu::linalg::{for_each_chunk, host, with_slice};
use crate::error::{Error, Result};
use crate::params::Params;

/// AdamW hyper-parameters (PyTorch's defaults but for the learning rate).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr > 0.0
            && self.lr.is_finite()
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && self.weight_decay.is_finite();
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "AdamW needs lr > 0, betas in [0, 1), eps > 0 and weight decay >= 0, got {self:?}"
            )))
        }
    }
}

/// Tensors flattened and joined, in order, into one vector (detached).
///
/// The optimizer, clipping and EMA work on such flat vectors: a handful of large element-wise operations
/// instead of a dozen small ones per parameter tensor (on a GPU, each operation is a kernel launch).
pub fn flatten<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<Tensor> {
    let parts = tensors
        .into_iter()
        .map(|t| t.detach().flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// The flat vector of the parameters' current values.
pub fn flatten_params(params: &Params) -> Result<Tensor> {
    flatten(params.vars().map(|v| v.as_tensor()))
}

/// Writes a flat vector of values into the parameters.
fn set_params(params: &Params, theta: &Tensor) -> Result<()> {
    for (var, value) in params.vars().zip(unflatten(theta, params)?) {
        var.set(&value)?;
    }
    Ok(())
}

/// Splits a flat vector back into tensors shaped like the parameters (views, no copies).
pub fn unflatten(flat: &Tensor, params: &Params) -> Result<Vec<Tensor>> {
    if flat.elem_count() != params.count() {
        return Err(Error::Config(format!(
            "a flat vector of {} values does not match {} parameters",
            flat.elem_count(),
            params.count()
        )));
    }
    let mut off = 0;
    params
        .vars()
        .map(|v| {
            let n = v.elem_count();
            let t = flat.narrow(0, off, n)?.reshape(v.shape())?;
            off += n;
            Ok(t)
        })
        .collect()
}

/// AdamW (Loshchilov and Hutter): with g the gradient and k the step count,
///
/// ```text
/// m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
/// theta <- theta (1 - lr wd) - lr (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)
/// ```
///
/// The moments are kept as flat vectors over all parameters (see [`flatten`]).
pub struct AdamW {
    pub config: AdamWConfig,
    m: Tensor,
    v: Tensor,
    /// The moments as host vectors, updated in place by the fused CPU step; while set, they are the
    /// current moments and `m`, `v` are stale (see [`AdamW::moments`]).
    host: Option<(Vec<f32>, Vec<f32>)>,
    /// Number of updates taken (k above).
    pub steps: u64,
}

impl std::fmt::Debug for AdamW {
    /// The configuration and step count (not a million moment values).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("parameters", &self.m.elem_count())
            .field("moments_on_host", &self.host.is_some())
            .field("steps", &self.steps)
            .finish()
    }
}

impl AdamW {
    pub fn new(params: &Params, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let theta = flatten_params(params)?;
        Ok(Self {
            config,
            m: theta.zeros_like()?,
            v: theta.zeros_like()?,
            host: None,
            steps: 0,
        })
    }

    /// The current first and second moments as flat tensors.
    fn moments(&self) -> Result<(Tensor, Tensor)> {
        Ok(match &self.host {
            Some((m, v)) => {
                let dev = self.m.device();
                (
                    Tensor::from_slice(m, m.len(), dev)?,
                    Tensor::from_slice(v, v.len(), dev)?,
                )
            }
            None => (self.m.clone(), self.v.clone()),
        })
    }

    /// One update of every parameter with its gradient (same order as `params`) at learning rate `lr`.
    pub fn step(&mut self, params: &Params, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_flat(params, &flatten(grads)?, lr).map(|_| ())
    }

    /// [`AdamW::step`] with the gradients as one flat vector; returns the new flat parameter vector.
    pub fn step_flat(&mut self, params: &Params, g: &Tensor, lr: f64) -> Result<Tensor> {
        self.steps += 1;
        // Gradients from autograd carry the graph that made them (activations included); the
        // moments must not, or every step's graph would stay alive through them.
        let g = g.detach();
        if g.device().is_cpu() && g.dtype() == DType::F32 && self.m.dtype() == DType::F32 {
            self.step_host(params, &g, lr)
        } else {
            self.step_ops(params, &g, lr)
        }
    }

    /// Bias corrections 1 - b1^k and 1 - b2^k of the current step k.
    fn corrections(&self) -> (f64, f64) {
        let (c, k) = (self.config, self.steps as i32);
        (1.0 - c.beta1.powi(k), 1.0 - c.beta2.powi(k))
    }

    /// The update as candle operations (any device; on a GPU each is one kernel over the flat vector).
    fn step_ops(&mut self, params: &Params, g: &Tensor, lr: f64) -> Result<Tensor> {
        (self.m, self.v) = self.moments()?;
        self.host = None;
        let c = self.config;
        let (bc1, bc2) = self.corrections();
        self.m = (self.m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
        self.v = (self.v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
        let denom = self.v.affine(1.0 / bc2, 0.0)?.sqrt()?.affine(1.0, c.eps)?;
        let update = self.m.affine(lr / bc1, 0.0)?.div(&denom)?;
        let theta = flatten_params(params)?;
        let theta = if c.weight_decay > 0.0 {
            theta.affine(1.0 - lr * c.weight_decay, 0.0)?
        } else {
            theta
        };
        let theta = (theta - update)?;
        set_params(params, &theta)?;
        Ok(theta)
    }

    /// The same update on the CPU in f32 as one pass over (m, v, theta, g), chunks in parallel on
    /// candle's pool: the dozen candle operations above each allocate and sweep the whole vector, most
    /// of them on one thread. Same operations in the same order as [`AdamW::step_ops`], so the same bits.
    /// The moments stay in host vectors between steps, and the gradient is read in place.
    fn step_host(&mut self, params: &Params, g: &Tensor, lr: f64) -> Result<Tensor> {
        const CHUNK: usize = 1 << 15;
        let c = self.config;
        if self.host.is_none() {
            self.host = Some((host::<f32>(&self.m)?, host::<f32>(&self.v)?));
        }
        let Some((m, v)) = self.host.as_mut() else {
            unreachable!("set above")
        };
        let mut theta = Vec::with_capacity(m.len());
        for var in params.vars() {
            with_slice::<f32, _>(var.as_tensor(), |s| theta.extend_from_slice(s))?;
        }
        if theta.len() != m.len() || g.elem_count() != m.len() {
            return Err(Error::Config(format!(
                "{} gradient values and {} moments for {} parameters",
                g.elem_count(),
                m.len(),
                theta.len()
            )));
        }
        let update = AdamWUpdate::new(c, self.steps, lr);
        with_slice::<f32, _>(g, |g| {
            let mut parts: Vec<_> = theta
                .chunks_mut(CHUNK)
                .zip(m.chunks_mut(CHUNK))
                .zip(v.chunks_mut(CHUNK))
                .zip(g.chunks(CHUNK))
                .map(|(((th, m), v), g)| (th, m, v, g))
                .collect();
            for_each_chunk(&mut parts, 1, |_, part| {
                for (th, m, v, g) in part.iter_mut() {
                    update.apply(th, m, v, g);
                }
            });
        })?;
        let n = theta.len();
        let theta = Tensor::from_vec(theta, n, self.m.device())?;
        set_params(params, &theta)?;
        Ok(theta)
    }

    /// Moments for checkpoints, named `adam.m.<param>` and `adam.v.<param>`.
    pub fn state(&self, params: &Params) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        let (m, v) = self.moments()?;
        let (m, v) = (unflatten(&m, params)?, unflatten(&v, params)?);
        for ((name, _), (m, v)) in params.iter().zip(m.into_iter().zip(v)) {
            out.push((format!("adam.m.{name}"), m));
            out.push((format!("adam.v.{name}"), v));
        }
        Ok(out)
    }

    /// Restores the moments saved by [`AdamW::state`].
    pub fn load_state(
        &mut self,
        params: &Params,
        get: &dyn Fn(&str) -> Result<Tensor>,
        steps: u64,
    ) -> Result<()> {
        let named = |prefix: &str| -> Result<Vec<Tensor>> {
            params
                .iter()
                .map(|(name, var)| {
                    let t = get(&format!("{prefix}{name}"))?.to_dtype(var.dtype())?;
                    if t.shape() != var.shape() {
                        return Err(Error::Config(format!(
                            "{prefix}{name} has shape {:?}, the parameter {:?}",
                            t.dims(),
                            var.dims()
                        )));
                    }
                    Ok(t)
                })
                .collect()
        };
        self.m = flatten(&named("adam.m.")?)?;
        self.v = flatten(&named("adam.v.")?)?;
        self.host = None;
        self.steps = steps;
        Ok(())
    }
}

/// The AdamW update of one step on host f32 slices, with its coefficients computed once:
///
/// ```text
/// m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
/// theta <- theta (1 - lr wd) - (lr / (1 - b1^k)) m / (sqrt(v / (1 - b2^k)) + eps)
/// ```
///
/// The same operations in the same order as [`AdamW`]'s candle-op form, so the same bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWUpdate {
    b1: f32,
    b2: f32,
    a1: f32,
    a2: f32,
    inv_bc2: f32,
    step: f32,
    eps: f32,
    decay: Option<f32>,
}

impl AdamWUpdate {
    /// The coefficients of update number `k` (counted from 1) at learning rate `lr`.
    pub(crate) fn new(c: AdamWConfig, k: u64, lr: f64) -> Self {
        let k = k as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(k), 1.0 - c.beta2.powi(k));
        Self {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            a1: (1.0 - c.beta1) as f32,
            a2: (1.0 - c.beta2) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            step: (lr / bc1) as f32,
            eps: c.eps as f32,
            decay: (c.weight_decay > 0.0).then_some((1.0 - lr * c.weight_decay) as f32),
        }
    }

    /// Updates `theta`, `m` and `v` in place from the gradient `g` (all the same length).
    pub(crate) fn apply(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((th, m), v), &g) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            *m = *m * self.b1 + g * self.a1;
            *v = *v * self.b2 + g * g * self.a2;
            let denom = (*v * self.inv_bc2).sqrt() + self.eps;
            let update = *m * self.step / denom;
            let kept = match self.decay {
                Some(d) => *th * d,
                None => *th,
            };
            *th = kept - update;
        }
    }
}

/// AdamW moments for a parameter vector that lives on the host (the fused MLP engine's), with
/// [`AdamWUpdate`]'s update; large vectors are updated in parallel chunks.
#[derive(Debug, Clone)]
pub(crate) struct FlatAdamW {
    pub config: AdamWConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub steps: u64,
}

impl FlatAdamW {
    pub(crate) fn new(n: usize, config: AdamWConfig) -> Self {
        Self {
            config,
            m: vec![0.0; n],
            v: vec![0.0; n],
            steps: 0,
        }
    }

    pub(crate) fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        use rayon::prelude::*;
        /// Vectors shorter than this are updated on one thread.
        const PAR_MIN: usize = 1 << 15;
        const CHUNK: usize = 1 << 14;
        self.steps += 1;
        let update = AdamWUpdate::new(self.config, self.steps, lr);
        if params.len() >= PAR_MIN {
            params
                .par_chunks_mut(CHUNK)
                .zip(grads.par_chunks(CHUNK))
                .zip(self.m.par_chunks_mut(CHUNK))
                .zip(self.v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| update.apply(p, m, v, g));
        } else {
            update.apply(params, &mut self.m, &mut self.v, grads);
        }
    }
}

/// The decay of EMA update number `n` (counted from 0): min(decay, (1 + n) / (10 + n)), the warm-up of
/// TensorFlow's `ExponentialMovingAverage(num_updates=n)`. Without it an average with decay 0.999 still
/// holds 0.999^800 = 45% of the random initialisation after 800 steps; with it the initialisation's
/// weight after n updates is at most prod_k (1 + k) / (10 + k) = 9! n! / (n + 9)!, below 1e-12 at
/// n = 100.
pub fn ema_decay_at(decay: f64, n: u64) -> f64 {
    decay.min((1.0 + n as f64) / (10.0 + n as f64))
}

/// ema <- decay ema + (1 - decay) theta on host slices.
pub(crate) fn ema_update(ema: &mut [f32], theta: &[f32], decay: f64) {
    let (d, a) = (decay as f32, (1.0 - decay) as f32);
    ema.iter_mut()
        .zip(theta)
        .for_each(|(e, &p)| *e = *e * d + p * a);
}

/// Global L2 norm of all gradients (one value read back from the device).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    flat_norm(&flatten(grads)?)
}

/// L2 norm of a flat vector.
pub fn flat_norm(g: &Tensor) -> Result<f64> {
    Ok(g.sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        .sqrt())
}

/// Scales a flat gradient so that its norm is at most `max_norm` (PyTorch's clip_grad_norm_).
/// Returns the norm before clipping.
pub fn clip_flat(g: &mut Tensor, max_norm: f64) -> Result<f64> {
    let norm = flat_norm(g)?;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        *g = g.affine(scale, 0.0)?;
    }
    Ok(norm)
}

/// Linear warm-up: lr k / warmup for the first `warmup` steps (k counted from 1), then lr.
pub fn warmup_lr(lr: f64, step: u64, warmup: u64) -> f64 {
    if warmup == 0 || step >= warmup {
        lr
    } else {
        lr * (step + 1) as f64 / warmup as f64
    }
}

/// What the learning rate does after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrDecay {
    /// Stay at the base rate.
    #[default]
    Constant,
    /// Cosine from the base rate to 0 at the last step: lr (1 + cos(pi p)) / 2, p the post-warm-up progress.
    Cosine,
}

/// The learning rate at `step` (0-based) of `total`, with warm-up then the chosen decay.
pub fn scheduled_lr(lr: f64, step: u64, warmup: u64, total: u64, decay: LrDecay) -> f64 {
    if step < warmup {
        return warmup_lr(lr, step, warmup);
    }
    match decay {
        LrDecay::Constant => lr,
        LrDecay::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let p = ((step - warmup) as f64 / span).min(1.0);
            lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }
}

/// Exponential moving average of the weights: ema <- d_n ema + (1 - d_n) theta with the warmed-up decay
/// d_n of [`ema_decay_at`], kept as one flat vector over all parameters (see [`flatten`]).
#[derive(Debug, Clone)]
pub struct Ema {
    pub decay: f64,
    values: Tensor,
}

impl Ema {
    pub fn new(params: &Params, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::Config(format!(
                "EMA decay must lie in [0, 1), got {decay}"
            )));
        }
        Ok(Self {
            decay,
            values: flatten_params(params)?,
        })
    }

    /// Update number `n` (counted from 0), at decay [`ema_decay_at`]`(decay, n)`.
    pub fn update(&mut self, params: &Params, n: u64) -> Result<()> {
        self.update_flat(&flatten_params(params)?, n)
    }

    /// [`Ema::update`] from the flat parameter vector (as [`AdamW::step_flat`] returns it).
    pub fn update_flat(&mut self, theta: &Tensor, n: u64) -> Result<()> {
        let d = ema_decay_at(self.decay, n);
        self.values = (self.values.affine(d, 0.0)? + theta.detach().affine(1.0 - d, 0.0)?)?;
        Ok(())
    }

    /// The averaged weights, shaped like the parameters.
    pub fn values(&self, params: &Params) -> Result<Vec<Tensor>> {
        unflatten(&self.values, params)
    }

    /// Replaces the averaged weights (one tensor per parameter, in order).
    pub fn set_values(&mut self, values: &[Tensor]) -> Result<()> {
        let flat = flatten(values)?;
        if flat.elem_count() != self.values.elem_count() {
            return Err(Error::Config(format!(
                "EMA state has {} values, the model {}",
                flat.elem_count(),
                self.values.elem_count()
            )));
        }
        self.values = flat.to_dtype(self.values.dtype())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ema_warm_up_forgets_the_initialisation_in_short_runs() {
        assert_eq!(ema_decay_at(0.999, 0), 0.1);
        assert_eq!(ema_decay_at(0.999, 1_000_000), 0.999);
        // The initialisation's weight after n updates: the product of the decays.
        let share = |n: u64| (0..n).map(|k| ema_decay_at(0.999, k)).product::<f64>();
        assert!(share(100) < 1e-12, "{}", share(100));
        assert!((share(800) - 0.999f64.powi(800)).abs() > 0.4);
    }

    use super::*;
    use crate::nn::{MlpConfig, ModelConfig};
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    /// One AdamW step on a scalar against the formula evaluated by hand.
    #[test]
    fn adamw_matches_hand_computation() {
        let cfg = ModelConfig::Mlp(MlpConfig {
            hidden: 2,
            depth: 1,
            ..MlpConfig::new(1)
        });
        let (_, params) = cfg
            .build(&mut Rng::new(0), &Device::Cpu, DType::F64)
            .unwrap();
        let c = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(&params, c).unwrap();
        let before: Vec<Vec<f64>> = params
            .vars()
            .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let grads: Vec<Tensor> = params
            .vars()
            .map(|v| (v.ones_like().unwrap() * 0.5).unwrap())
            .collect();
        for _ in 0..2 {
            opt.step(&params, &grads, 0.1).unwrap();
        }
        for (v, b) in params.vars().zip(before) {
            let after: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for (a, mut x) in after.into_iter().zip(b) {
                let (mut m, mut s) = (0.0, 0.0);
                for k in 1..=2 {
                    m = 0.9 * m + 0.1 * 0.5;
                    s = 0.999 * s + 0.001 * 0.25;
                    let upd = 0.1 * (m / (1.0 - 0.9f64.powi(k)))
                        / ((s / (1.0 - 0.999f64.powi(k))).sqrt() + 1e-8);
                    x = x * (1.0 - 0.1 * 0.01) - upd;
                }
                assert!((a - x).abs() < 1e-12);
            }
        }
    }

    /// The fused f32 CPU update gives the same bits as the candle-op update, step after step, with weight
    /// decay, on a vector longer than one of its parallel chunks; the saved state matches too.
    #[test]
    fn host_update_matches_candle_ops() {
        let cfg = ModelConfig::Mlp(MlpConfig {
            hidden: 200,
            depth: 2,
            ..MlpConfig::new(2)
        });
        let build = || {
            cfg.build(&mut Rng::new(3), &Device::Cpu, DType::F32)
                .unwrap()
                .1
        };
        let (pa, pb) = (build(), build());
        assert!(pa.count() > 1 << 15);
        let c = AdamWConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let (mut a, mut b) = (AdamW::new(&pa, c).unwrap(), AdamW::new(&pb, c).unwrap());
        let mut rng = Rng::new(5);
        // a: the fused step, but for one candle-op step in the middle (the moments move between the two)
        for i in 0..5 {
            let g = Tensor::from_vec(rng.normal_vec(pa.count()), pa.count(), &Device::Cpu).unwrap();
            a.steps += 1;
            b.steps += 1;
            let ta = if i == 3 {
                a.step_ops(&pa, &g, 0.01).unwrap()
            } else {
                a.step_host(&pa, &g, 0.01).unwrap()
            };
            let tb = b.step_ops(&pb, &g, 0.01).unwrap();
            let (ta, tb): (Vec<f32>, Vec<f32>) = (ta.to_vec1().unwrap(), tb.to_vec1().unwrap());
            assert_eq!(ta, tb);
            let ((ma, va), (mb, vb)) = (a.moments().unwrap(), b.moments().unwrap());
            for (x, y) in [(ma, mb), (va, vb)] {
                let (x, y): (Vec<f32>, Vec<f32>) = (x.to_vec1().unwrap(), y.to_vec1().unwrap());
                assert_eq!(x, y);
            }
        }
        // and the parameters themselves were written
        let flat: Vec<f32> = flatten_params(&pa).unwrap().to_vec1().unwrap();
        let theta: Vec<f32> = flatten_params(&pb).unwrap().to_vec1().unwrap();
        assert_eq!(flat, theta);
        let (sa, sb) = (a.state(&pa).unwrap(), b.state(&pb).unwrap());
        for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
            assert_eq!(na, nb);
            let (ta, tb): (Vec<f32>, Vec<f32>) = (
                ta.flatten_all().unwrap().to_vec1().unwrap(),
                tb.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(ta, tb);
        }
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let parts = [
            Tensor::new(&[3.0f64], &Device::Cpu).unwrap(),
            Tensor::new(&[[4.0f64]], &Device::Cpu).unwrap(),
        ];
        assert!((grad_norm(&parts).unwrap() - 5.0).abs() < 1e-12);
        let mut g = flatten(&parts).unwrap();
        assert!((clip_flat(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-12);
        assert!((flat_norm(&g).unwrap() - 1.0).abs() < 1e-6);
        let mut small = g.clone();
        clip_flat(&mut small, 10.0).unwrap();
        assert_eq!(small.to_vec1::<f64>().unwrap(), g.to_vec1::<f64>().unwrap());
    }

    #[test]
    fn warmup_ramps_linearly() {
        assert_eq!(warmup_lr(1.0, 0, 4), 0.25);
        assert_eq!(warmup_lr(1.0, 3, 4), 1.0);
        assert_eq!(warmup_lr(1.0, 10, 4), 1.0);
        assert_eq!(warmup_lr(1.0, 0, 0), 1.0);
        assert_eq!(scheduled_lr(1.0, 2, 4, 100, LrDecay::Cosine), 0.75);
        assert_eq!(scheduled_lr(1.0, 4, 4, 104, LrDecay::Cosine), 1.0);
        assert!((scheduled_lr(1.0, 54, 4, 104, LrDecay::Cosine) - 0.5).abs() < 1e-12);
        assert!(scheduled_lr(1.0, 103, 4, 104, LrDecay::Cosine) < 1e-3);
        assert_eq!(scheduled_lr(1.0, 103, 4, 104, LrDecay::Constant), 1.0);
    }
}
