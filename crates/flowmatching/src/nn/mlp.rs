//! The MLP velocity model: (dim + time features) -> hidden (x depth) -> dim, with SiLU or SELU.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::params::{Init, Params};

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

    /// A `dim` -> `hidden` (x `depth`) -> `dim` SiLU MLP with t as an input feature.
    pub fn silu(dim: usize, hidden: usize, depth: usize) -> Self {
        Self {
            hidden,
            depth,
            ..Self::new(dim)
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

    pub(crate) fn time_features(&self) -> usize {
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

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.layers[0].weight.device()
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
