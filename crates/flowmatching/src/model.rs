//! Velocity models: the [`VelocityField`] trait, a parameter store, and the MLP.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;
pub use crate::unet::{UNet, UNetConfig};

/// A time-dependent vector field v(x, t): anything a solver can integrate.
pub trait VelocityField {
    /// v(x, t) for x of shape (B, ...) and t of shape (B,) (t = 0 noise, t = 1 data).
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor>;

    /// v(x, t) and the Jacobian-vector products (dv/dx) u for each tangent u (shaped like x), if the field
    /// computes them itself (forward mode). `None`: callers fall back to autograd.
    fn jvp(
        &self,
        _x: &Tensor,
        _t: &Tensor,
        _tangents: &[Tensor],
    ) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        Ok(None)
    }

    /// Network evaluations per call of [`VelocityField::forward`] on a batch (2 for classifier-free
    /// guidance, which evaluates the conditional and the unconditional field together). Solvers count
    /// NFE with it.
    fn evals_per_call(&self) -> usize {
        1
    }
}

impl<F: VelocityField + ?Sized> VelocityField for &F {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        (**self).forward(x, t)
    }
    fn jvp(&self, x: &Tensor, t: &Tensor, u: &[Tensor]) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        (**self).jvp(x, t, u)
    }
    fn evals_per_call(&self) -> usize {
        (**self).evals_per_call()
    }
}

impl<F: VelocityField + ?Sized> VelocityField for Box<F> {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        (**self).forward(x, t)
    }
    fn jvp(&self, x: &Tensor, t: &Tensor, u: &[Tensor]) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        (**self).jvp(x, t, u)
    }
    fn evals_per_call(&self) -> usize {
        (**self).evals_per_call()
    }
}

/// The trainable parameters of a model, in a fixed order with stable names.
#[derive(Debug, Clone, Default)]
pub struct Params {
    entries: Vec<(String, Var)>,
}

impl Params {
    pub(crate) fn add(&mut self, name: String, value: Tensor) -> Result<Var> {
        let var = Var::from_tensor(&value)?;
        self.entries.push((name, var.clone()));
        Ok(var)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of scalar parameters.
    pub fn count(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// A snapshot of the current values (detached copies), by name.
    pub fn snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        self.entries
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?.detach())))
            .collect()
    }

    /// Sets every parameter from `values`, checking that the names and shapes match exactly.
    pub fn load(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.entries {
            let v = values.get(name).ok_or_else(|| {
                Error::Data(format!(
                    "parameter '{name}' is missing (was it saved by another architecture?)"
                ))
            })?;
            if v.dims() != var.dims() {
                return Err(Error::Data(format!(
                    "parameter '{name}' has shape {:?}, the model expects {:?} (another architecture?)",
                    v.dims(),
                    var.dims()
                )));
            }
            var.set(&v.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        if values.len() != self.entries.len() {
            return Err(Error::Data(format!(
                "{} tensors saved but the model has {} parameters (another architecture?)",
                values.len(),
                self.entries.len()
            )));
        }
        Ok(())
    }
}

/// A dense layer y = x W^T + b, initialised as PyTorch does: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
///
/// The weights are the tensors inside the [`Params`]' variables (same storage), so optimizer updates show
/// here; [`Linear::frozen`] makes a copy that records no gradients for them.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(
        params: &mut Params,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        init: &mut Init,
    ) -> Result<Self> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let weight = params.add(
            format!("{name}.weight"),
            init.uniform((fan_out, fan_in), bound)?,
        )?;
        let bias = params.add(format!("{name}.bias"), init.uniform(fan_out, bound)?)?;
        Ok(Self {
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
        })
    }

    /// The same layer with its weights as constants: no parameter gradients are recorded through it.
    pub fn frozen(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }
}

/// Draws initial weights from our seeded generator (candle cannot seed its own on the CPU).
pub struct Init<'a> {
    pub rng: &'a mut Rng,
    pub device: Device,
    pub dtype: DType,
}

impl Init<'_> {
    pub fn uniform<S: Into<candle_core::Shape>>(&mut self, shape: S, bound: f64) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| ((2.0 * self.rng.uniform() - 1.0) * bound) as f32)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?)
    }

    /// N(0, std^2) entries.
    pub fn normal<S: Into<candle_core::Shape>>(&mut self, shape: S, std: f64) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| (self.rng.normal() * std) as f32)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?)
    }

    /// Every entry equal to `value`.
    pub fn constant<S: Into<candle_core::Shape>>(
        &mut self,
        shape: S,
        value: f64,
    ) -> Result<Tensor> {
        Ok(Tensor::full(value, shape, &self.device)?.to_dtype(self.dtype)?)
    }
}

/// How the MLP sees time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimeEmbedding {
    /// t appended to x as one input feature.
    Input,
    /// [sin(1000 t f_k), cos(1000 t f_k)], f_k = 10000^(-k / (dim/2)), appended to x.
    Sinusoidal { dim: usize },
}

/// The hidden-layer nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// x sigmoid(x), also called swish.
    Silu,
    /// The self-normalising ELU of torchcfm's 2-D examples.
    Selu,
}

/// An MLP v(x, t): (dim + time features) -> hidden (x depth) -> dim.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Data dimension.
    pub dim: usize,
    /// Width of the hidden layers.
    pub hidden: usize,
    /// Number of hidden layers (each followed by the activation); the MLP has depth + 1 linear layers.
    pub depth: usize,
    pub time_embedding: TimeEmbedding,
    pub activation: Activation,
}

impl MlpConfig {
    /// flow_matching's 2-D example network shape (3-512x4-2, SiLU, t as an input feature) for `dim`.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            hidden: 512,
            depth: 4,
            time_embedding: TimeEmbedding::Input,
            activation: Activation::Silu,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || self.hidden == 0 || self.depth == 0 {
            return Err(Error::Config(format!(
                "MLP needs positive dim, hidden width and depth, got dim {}, hidden {}, depth {}",
                self.dim, self.hidden, self.depth
            )));
        }
        if let TimeEmbedding::Sinusoidal { dim } = self.time_embedding {
            if dim == 0 || dim % 2 != 0 {
                return Err(Error::Config(format!(
                    "sinusoidal time embedding needs an even positive size, got {dim}"
                )));
            }
        }
        Ok(())
    }

    fn time_features(&self) -> usize {
        match self.time_embedding {
            TimeEmbedding::Input => 1,
            TimeEmbedding::Sinusoidal { dim } => dim,
        }
    }
}

/// The MLP velocity model.
#[derive(Debug, Clone)]
pub struct Mlp {
    config: MlpConfig,
    layers: Vec<Linear>,
    freqs: Option<Tensor>,
}

impl Mlp {
    pub fn new(config: MlpConfig, params: &mut Params, init: &mut Init) -> Result<Self> {
        config.validate()?;
        let mut layers = vec![];
        let mut fan_in = config.dim + config.time_features();
        for i in 0..config.depth {
            layers.push(Linear::new(
                params,
                &format!("layers.{i}"),
                fan_in,
                config.hidden,
                init,
            )?);
            fan_in = config.hidden;
        }
        layers.push(Linear::new(
            params,
            &format!("layers.{}", config.depth),
            fan_in,
            config.dim,
            init,
        )?);
        let freqs = match config.time_embedding {
            TimeEmbedding::Input => None,
            TimeEmbedding::Sinusoidal { dim } => {
                let half = dim / 2;
                let f: Vec<f32> = (0..half)
                    .map(|k| 1000.0 * (-(10000f64.ln()) * k as f64 / half as f64).exp() as f32)
                    .collect();
                Some(Tensor::from_vec(f, (1, half), &init.device)?.to_dtype(init.dtype)?)
            }
        };
        Ok(Self {
            config,
            layers,
            freqs,
        })
    }

    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// A copy whose weights are constants (for sampling and likelihoods: gradients only w.r.t. inputs).
    pub fn frozen(&self) -> Self {
        Self {
            config: self.config,
            layers: self.layers.iter().map(Linear::frozen).collect(),
            freqs: self.freqs.clone(),
        }
    }

    /// The weights in [`Params`] order.
    pub fn tensors(&self) -> Vec<Tensor> {
        self.layers
            .iter()
            .flat_map(|l| [l.weight.clone(), l.bias.clone()])
            .collect()
    }

    fn embed_time(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.unsqueeze(1)?;
        Ok(match &self.freqs {
            None => t,
            Some(f) => {
                let arg = t.broadcast_mul(f)?;
                Tensor::cat(&[arg.sin()?, arg.cos()?], 1)?
            }
        })
    }
}

impl VelocityField for Mlp {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let shape = x.shape().clone();
        let x = x.flatten_from(1)?;
        if x.dim(1)? != self.config.dim {
            return Err(Error::Data(format!(
                "the model expects {}-dimensional data, got {}",
                self.config.dim,
                x.dim(1)?
            )));
        }
        let mut h = Tensor::cat(&[&x, &self.embed_time(&t.to_dtype(x.dtype())?)?], 1)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i < last {
                h = match self.config.activation {
                    Activation::Silu => h.silu()?,
                    Activation::Selu => {
                        (h.elu(1.673_263_242_354_377_3)? * 1.050_700_987_355_480_5)?
                    }
                };
            }
        }
        Ok(h.reshape(shape)?)
    }
}

/// A serialisable model description, as stored in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelConfig {
    Mlp(MlpConfig),
    #[serde(rename = "unet")]
    UNet(UNetConfig),
}

impl ModelConfig {
    /// Builds the model with fresh parameters drawn from `rng`.
    pub fn build(&self, rng: &mut Rng, device: &Device, dtype: DType) -> Result<(Model, Params)> {
        let mut params = Params::default();
        let mut init = Init {
            rng,
            device: device.clone(),
            dtype,
        };
        let model = match self {
            ModelConfig::Mlp(c) => Model::Mlp(Mlp::new(*c, &mut params, &mut init)?),
            ModelConfig::UNet(c) => Model::UNet(UNet::new(c.clone(), &mut params, &mut init)?),
        };
        Ok((model, params))
    }

    /// The data dimension the model works on.
    pub fn dim(&self) -> usize {
        match self {
            ModelConfig::Mlp(c) => c.dim,
            ModelConfig::UNet(c) => c.dim(),
        }
    }

    /// The largest model this build agrees to allocate (parameters).
    pub const MAX_PARAMS: u128 = 1 << 32;

    /// Checks the shape and that the model is not absurdly large (a corrupt or hostile config must not
    /// make the program try to allocate terabytes).
    pub fn validate(&self) -> Result<()> {
        let too_big = |n: u128| {
            Err(Error::Config(format!(
                "the model would have about {n} parameters, more than this build allows ({})",
                Self::MAX_PARAMS
            )))
        };
        match self {
            ModelConfig::Mlp(c) => {
                c.validate()?;
                let (d, h, k) = (c.dim as u128, c.hidden as u128, c.depth as u128);
                let n = (d + c.time_features() as u128 + 1) * h + k * (h + 1) * h + (h + 1) * d;
                if n > Self::MAX_PARAMS {
                    return too_big(n);
                }
            }
            ModelConfig::UNet(c) => {
                c.validate()?;
                let widest = c.channel_mults.iter().max().copied().unwrap_or(1) as u128;
                let ch = c.base_channels as u128 * widest;
                let blocks = (c.channel_mults.len() as u128) * (2 * c.res_blocks as u128 + 1) + 2;
                let n = blocks * 3 * 9 * ch * ch + (c.num_classes as u128 + 1) * 4 * ch;
                if n > Self::MAX_PARAMS || c.dim() as u128 > Self::MAX_PARAMS {
                    return too_big(n);
                }
            }
        }
        Ok(())
    }

    /// Classes the model is conditioned on (0: unconditional).
    pub fn num_classes(&self) -> usize {
        match self {
            ModelConfig::Mlp(_) => 0,
            ModelConfig::UNet(c) => c.num_classes,
        }
    }

    /// (channels, height, width) for image models.
    pub fn image_shape(&self) -> Option<[usize; 3]> {
        match self {
            ModelConfig::Mlp(_) => None,
            ModelConfig::UNet(c) => Some([c.channels, c.height, c.width]),
        }
    }
}

/// Any of the library's models.
#[derive(Debug, Clone)]
pub enum Model {
    Mlp(Mlp),
    /// An MLP evaluated by the fused CPU engine (inference only; see [`Model::frozen`]).
    FastMlp(crate::fastmlp::FastMlp),
    UNet(UNet),
}

impl Model {
    /// A copy for inference: weights as constants (no parameter gradients) and, for an MLP on the CPU,
    /// the fused engine. Sampling and likelihood computations use this.
    pub fn frozen(&self) -> Result<Model> {
        Ok(match self {
            Model::Mlp(m) if m.layers[0].weight.device().is_cpu() => Model::FastMlp(
                crate::fastmlp::FastMlp::from_tensors(*m.config(), &m.tensors())?,
            ),
            Model::Mlp(m) => Model::Mlp(m.frozen()),
            Model::FastMlp(m) => Model::FastMlp(m.clone()),
            Model::UNet(m) => Model::UNet(m.frozen()),
        })
    }

    /// Classes the model is conditioned on (0: unconditional; the null class is `num_classes`).
    pub fn num_classes(&self) -> usize {
        match self {
            Model::UNet(m) => m.config().num_classes,
            _ => 0,
        }
    }

    /// v(x, t | y): the class-conditional field for per-row labels (None: unconditional).
    pub fn forward_cond(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        match (self, labels) {
            (Model::UNet(m), _) => m.forward_cond(x, t, labels),
            (_, None) => self.forward(x, t),
            (_, Some(_)) => Err(Error::Config(
                "this model is not class-conditional; it takes no labels".into(),
            )),
        }
    }
}

/// A conditional model with its labels fixed: the field v(x, t | y) as a [`VelocityField`].
pub struct Labeled<'a> {
    pub model: &'a Model,
    pub labels: Tensor,
}

impl VelocityField for Labeled<'_> {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.model.forward_cond(x, t, Some(&self.labels))
    }
}

impl VelocityField for Model {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        match self {
            Model::Mlp(m) => m.forward(x, t),
            Model::FastMlp(m) => m.forward(x, t),
            Model::UNet(m) => m.forward_cond(x, t, None),
        }
    }

    fn jvp(&self, x: &Tensor, t: &Tensor, u: &[Tensor]) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        match self {
            Model::Mlp(m) => m.jvp(x, t, u),
            Model::FastMlp(m) => m.jvp(x, t, u),
            Model::UNet(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_shapes_and_parameter_count() {
        for te in [TimeEmbedding::Input, TimeEmbedding::Sinusoidal { dim: 8 }] {
            let cfg = MlpConfig {
                dim: 2,
                hidden: 16,
                depth: 3,
                time_embedding: te,
                activation: Activation::Silu,
            };
            let mut rng = Rng::new(0);
            let (m, p) = ModelConfig::Mlp(cfg)
                .build(&mut rng, &Device::Cpu, DType::F32)
                .unwrap();
            let tf = if te == TimeEmbedding::Input { 1 } else { 8 };
            assert_eq!(
                p.count(),
                (2 + tf) * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 2 + 2
            );
            let x = Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap();
            let t = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(m.forward(&x, &t).unwrap().dims(), &[5, 2]);
        }
    }

    #[test]
    fn same_seed_same_weights() {
        let cfg = ModelConfig::Mlp(MlpConfig::new(2));
        let a = cfg
            .build(&mut Rng::new(3), &Device::Cpu, DType::F32)
            .unwrap()
            .1;
        let b = cfg
            .build(&mut Rng::new(3), &Device::Cpu, DType::F32)
            .unwrap()
            .1;
        for ((_, x), (_, y)) in a.iter().zip(b.iter()) {
            let d: f32 = (x.as_tensor() - y.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0);
        }
    }

    #[test]
    fn load_rejects_other_architectures() {
        let small = ModelConfig::Mlp(MlpConfig {
            hidden: 8,
            ..MlpConfig::new(2)
        });
        let big = ModelConfig::Mlp(MlpConfig {
            hidden: 16,
            ..MlpConfig::new(2)
        });
        let a = small
            .build(&mut Rng::new(0), &Device::Cpu, DType::F32)
            .unwrap()
            .1;
        let b = big
            .build(&mut Rng::new(0), &Device::Cpu, DType::F32)
            .unwrap()
            .1;
        let saved: HashMap<String, Tensor> = a.snapshot().unwrap().into_iter().collect();
        assert!(b.load(&saved).is_err());
        assert!(a.load(&saved).is_ok());
    }
}
