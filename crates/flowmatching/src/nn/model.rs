//! [`ModelConfig`] (the serialisable model description of checkpoints) and [`Model`], any of the
//! library's velocity networks.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::fused::FastMlp;
use super::mlp::Mlp;
use super::transformer::{SequenceCondition, Transformer};
use super::unet::UNet;
use super::{MlpConfig, TransformerConfig, UNetConfig};
use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::params::{Init, Params};
use crate::rng::Rng;

/// A serialisable model description, as stored in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelConfig {
    Mlp(MlpConfig),
    #[serde(rename = "unet")]
    UNet(UNetConfig),
    Transformer(TransformerConfig),
}

impl ModelConfig {
    /// Builds the model with fresh parameters drawn from `rng`.
    pub fn build(&self, rng: &mut Rng, device: &Device, dtype: DType) -> Result<(Model, Params)> {
        self.build_within(rng, device, dtype, None)
    }

    /// [`ModelConfig::build`] that fails, before allocating more, once the parameters would exceed
    /// `max_values` values (the size of the weights about to be loaded into it).
    pub fn build_within(
        &self,
        rng: &mut Rng,
        device: &Device,
        dtype: DType,
        max_values: Option<usize>,
    ) -> Result<(Model, Params)> {
        let mut params = Params::default();
        let mut init = Init {
            rng,
            device: device.clone(),
            dtype,
            budget: max_values,
        };
        let model = match self {
            ModelConfig::Mlp(c) => Model::Mlp(Mlp::new(*c, &mut params, &mut init)?),
            ModelConfig::UNet(c) => Model::UNet(UNet::new(c.clone(), &mut params, &mut init)?),
            ModelConfig::Transformer(c) => {
                Model::Transformer(Transformer::new(*c, &mut params, &mut init)?)
            }
        };
        Ok((model, params))
    }

    /// The data dimension the model works on (for sequences: the features of one frame).
    pub fn dim(&self) -> usize {
        match self {
            ModelConfig::Mlp(c) => c.dim,
            ModelConfig::UNet(c) => c.dim(),
            ModelConfig::Transformer(c) => c.frame_dim,
        }
    }

    /// The largest model this build agrees to allocate (parameters).
    pub const MAX_PARAMS: u128 = 1 << 32;

    /// Checks the shape and that the model is not absurdly large (a corrupt or hostile config must not
    /// make the program try to allocate terabytes).
    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Mlp(c) => c.validate()?,
            ModelConfig::UNet(c) => c.validate()?,
            ModelConfig::Transformer(c) => c.validate()?,
        }
        let n = self.approx_params();
        if n > Self::MAX_PARAMS || self.dim() as u128 > Self::MAX_PARAMS {
            return Err(Error::Config(format!(
                "the model would have about {n} parameters, more than this build allows ({})",
                Self::MAX_PARAMS
            )));
        }
        Ok(())
    }

    /// The number of parameters: exact for the MLP, an upper estimate for the U-Net (every block at
    /// the widest level's width). Computed from the config alone, before anything is allocated.
    pub fn approx_params(&self) -> u128 {
        match self {
            // Saturating: a hostile config's sizes must give a huge count, not an overflow.
            ModelConfig::Mlp(c) => {
                let (d, h, k) = (c.dim as u128, c.hidden as u128, c.depth as u128);
                let tf = c.time_features() as u128;
                let first = (d + tf + 1).saturating_mul(h);
                let hidden = k.saturating_mul(h + 1).saturating_mul(h);
                first
                    .saturating_add(hidden)
                    .saturating_add((h + 1).saturating_mul(d))
            }
            ModelConfig::UNet(c) => {
                let widest = c.channel_mults.iter().max().copied().unwrap_or(1) as u128;
                let ch = (c.base_channels as u128).saturating_mul(widest);
                let blocks = (c.channel_mults.len() as u128)
                    .saturating_mul(2 * c.res_blocks as u128 + 1)
                    .saturating_add(2);
                let convs = blocks
                    .saturating_mul(27)
                    .saturating_mul(ch.saturating_mul(ch));
                convs.saturating_add((c.num_classes as u128 + 1).saturating_mul(4 * ch))
            }
            ModelConfig::Transformer(c) => c.params(),
        }
    }

    /// An estimate of the bytes one sample's forward pass without gradients keeps alive at its peak
    /// (the widest level's few live feature maps and its attention matrices). Measured peak resident
    /// memory of `sample` with the `tiny` U-Net at 28 x 28: 1.5 MB per sample; this gives 1.6 MB.
    pub fn inference_bytes_per_sample(&self) -> u128 {
        match self {
            ModelConfig::Mlp(c) => 4 * 4 * (c.hidden as u128 + c.dim as u128 + 32),
            ModelConfig::UNet(c) => {
                let mut peak = 0u128;
                for (l, &m) in c.channel_mults.iter().enumerate() {
                    let (h, w) = ((c.height >> l) as u128, (c.width >> l) as u128);
                    let mut level = 16 * (c.base_channels * m) as u128 * h * w;
                    if c.attention_resolutions.contains(&(c.height >> l)) {
                        level += 2 * c.heads as u128 * (h * w) * (h * w);
                    }
                    peak = peak.max(level);
                }
                4 * peak
            }
            // A sequence of the longest length: a few (T, width) activations and the scores.
            ModelConfig::Transformer(c) => {
                let (t, w) = (c.max_frames as u128, c.width.max(c.ffn_dim) as u128);
                4 * (8 * t * w + 3 * c.heads as u128 * t * t)
            }
        }
    }

    /// A generous estimate of the bytes one sample's forward and backward pass keeps alive (f32
    /// activations, their gradients and attention matrices), for bounding memory before a run
    /// allocates it. Inference needs less. Measured (peak resident memory of `train` against the
    /// batch, 28 x 28 images): `tiny` 7.5 MB per sample (estimate 11.9), `small` 50.7 MB (58.6).
    pub fn activation_bytes_per_sample(&self) -> u128 {
        match self {
            ModelConfig::Mlp(c) => {
                let width = (c.hidden as u128) * (c.depth as u128 + 1);
                4 * 6 * (width + c.dim as u128 + c.time_features() as u128)
            }
            ModelConfig::UNet(c) => {
                let blocks = 2 * c.res_blocks as u128 + 1;
                let mut total = 0u128;
                for (l, &m) in c.channel_mults.iter().enumerate() {
                    let (h, w) = ((c.height >> l) as u128, (c.width >> l) as u128);
                    let ch = (c.base_channels * m) as u128;
                    total += 2 * blocks * 12 * ch * h * w;
                    if c.attention_resolutions.contains(&(c.height >> l)) {
                        total += blocks * 6 * c.heads as u128 * (h * w) * (h * w);
                    }
                }
                4 * total
            }
            // Per block: about a dozen (T, width or ffn) activations and their gradients, and the
            // scores, softmax and their gradients, at the longest length.
            ModelConfig::Transformer(c) => {
                let (t, w) = (c.max_frames as u128, c.width.max(c.ffn_dim) as u128);
                let per_block = 24 * t * w + 6 * c.heads as u128 * t * t;
                4 * per_block.saturating_mul(c.depth as u128 + 1)
            }
        }
    }

    /// Classes the model is conditioned on (0: unconditional).
    pub fn num_classes(&self) -> usize {
        match self {
            ModelConfig::Mlp(_) | ModelConfig::Transformer(_) => 0,
            ModelConfig::UNet(c) => c.num_classes,
        }
    }

    /// (channels, height, width) for image models.
    pub fn image_shape(&self) -> Option<[usize; 3]> {
        match self {
            ModelConfig::Mlp(_) | ModelConfig::Transformer(_) => None,
            ModelConfig::UNet(c) => Some([c.channels, c.height, c.width]),
        }
    }
}

/// Any of the library's models.
#[derive(Debug, Clone)]
pub enum Model {
    Mlp(Mlp),
    /// An MLP evaluated by the fused CPU engine (inference only; see [`Model::frozen`]).
    FastMlp(FastMlp),
    UNet(UNet),
    /// The sequence transformer; as a [`VelocityField`] it takes (N, T, F) and no conditions (see
    /// the `infill` module for the conditional field).
    Transformer(Transformer),
}

impl Model {
    /// A copy for inference: weights as constants (no parameter gradients) and, for an MLP on the CPU,
    /// the fused engine. Sampling and likelihood computations use this.
    pub fn frozen(&self) -> Result<Model> {
        Ok(match self {
            Model::Mlp(m) if m.device().is_cpu() => {
                Model::FastMlp(FastMlp::from_tensors(*m.config(), &m.tensors())?)
            }
            Model::Mlp(m) => Model::Mlp(m.frozen()),
            Model::FastMlp(m) => Model::FastMlp(m.clone()),
            Model::UNet(m) => Model::UNet(m.frozen()),
            Model::Transformer(m) => Model::Transformer(m.frozen()),
        })
    }

    /// Runs the model in `precision` where the model and CPU support it and returns the precision in
    /// force: bf16 for the fused MLP engine's products and the U-Net's CPU convolutions on a CPU with
    /// AVX-512 BF16, f32 for everything else.
    pub fn set_precision(
        &mut self,
        precision: crate::precision::Precision,
    ) -> crate::precision::Precision {
        match self {
            Model::FastMlp(m) => m.set_precision(precision),
            Model::UNet(m) if m.device().is_cpu() => m.set_precision(precision),
            _ => crate::precision::Precision::F32,
        }
    }

    /// The precision in force (see [`Model::set_precision`]).
    pub fn precision(&self) -> crate::precision::Precision {
        match self {
            Model::FastMlp(m) => m.precision(),
            Model::UNet(m) => m.precision(),
            _ => crate::precision::Precision::F32,
        }
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
            Model::Transformer(m) => m.forward_seq(x, t, &SequenceCondition::default()),
        }
    }

    fn jvp(&self, x: &Tensor, t: &Tensor, u: &[Tensor]) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        match self {
            Model::Mlp(m) => m.jvp(x, t, u),
            Model::FastMlp(m) => m.jvp(x, t, u),
            Model::UNet(_) | Model::Transformer(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::nn::{Activation, TimeEmbedding};

    /// A hand-edited config with absurd sizes is refused by its parameter count, which saturates
    /// instead of overflowing (a fuzzed `hidden` of 2^64 - 1 once overflowed u128).
    #[test]
    fn huge_configs_are_refused_without_overflow() {
        for (hidden, depth) in [(usize::MAX, 4), (1 << 40, usize::MAX), (40_000, 3)] {
            let cfg = ModelConfig::Mlp(MlpConfig {
                dim: 2,
                hidden,
                depth,
                time_embedding: TimeEmbedding::Input,
                activation: Activation::Silu,
            });
            assert!(
                cfg.approx_params() > ModelConfig::MAX_PARAMS,
                "{hidden} {depth}"
            );
            assert!(cfg.validate().is_err());
        }
        let mut unet = crate::nn::UNetConfig::tiny(1, 8, 8, 0);
        unet.base_channels = usize::MAX;
        assert!(ModelConfig::UNet(unet).approx_params() > ModelConfig::MAX_PARAMS);
    }

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
