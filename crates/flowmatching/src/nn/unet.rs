//! A U-Net velocity model for images (Ho et al. 2020's architecture, as in the flow-matching paper's image runs).
//!
//! ```text
//! emb = MLP(sinusoid(1000 t)) + E[y]            (E has num_classes + 1 rows; the last is the null class)
//! h   = conv_in(x)
//! down: per level, `res_blocks` x ResBlock(h, emb) [+ attention], then a stride-2 conv (not at the last)
//! mid : ResBlock, attention, ResBlock
//! up  : per level, (res_blocks + 1) x ResBlock(cat(h, skip), emb) [+ attention], then nearest x2 + conv
//! v   = conv_out(SiLU(GroupNorm(h)))
//! ResBlock(h, emb) = skip(h) + conv(SiLU(GN(conv(SiLU(GN(h))) + W SiLU(emb))))
//! ```
//!
//! The model works on flat rows (B, C*H*W) like every other velocity field in the crate and reshapes
//! internally. Weights live in a name -> tensor map whose tensors share storage with the [`Params`].

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::layers::{softmax_last, time_frequencies, Builder, Weights};
use crate::cpu::upsample::upsample2x;
use crate::error::{Error, Result};
use crate::params::{Init, Params};

/// The U-Net's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Image channels, height and width.
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Channels of the first level; level i has `base_channels * channel_mults[i]`.
    pub base_channels: usize,
    pub channel_mults: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more, for the extra skip).
    pub res_blocks: usize,
    /// Spatial sizes (height) at which self-attention follows each residual block.
    pub attention_resolutions: Vec<usize>,
    /// Attention heads (each level's channels must divide by it).
    pub heads: usize,
    /// GroupNorm groups (every level's channels must divide by it).
    pub groups: usize,
    /// Number of classes for conditioning (0: unconditional). Class `num_classes` is the null class.
    pub num_classes: usize,
}

impl UNetConfig {
    /// The preset for the GPU: 64-128-128 channels over 28-14-7, attention at 14 and 7.
    pub fn small(channels: usize, height: usize, width: usize, num_classes: usize) -> Self {
        Self {
            channels,
            height,
            width,
            base_channels: 64,
            channel_mults: vec![1, 2, 2],
            res_blocks: 2,
            attention_resolutions: vec![height / 2, height / 4],
            heads: 4,
            groups: 32,
            num_classes,
        }
    }

    /// A preset the CPU trains in minutes: 32-64-64 channels, one block per level, attention at the bottom.
    pub fn tiny(channels: usize, height: usize, width: usize, num_classes: usize) -> Self {
        Self {
            channels,
            height,
            width,
            base_channels: 32,
            channel_mults: vec![1, 2, 2],
            res_blocks: 1,
            attention_resolutions: vec![height / 4],
            heads: 1,
            groups: 8,
            num_classes,
        }
    }

    pub fn dim(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn emb_dim(&self) -> usize {
        4 * self.base_channels
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("U-Net: {m}")));
        if self.channels == 0 || self.height == 0 || self.width == 0 {
            return bad(format!(
                "image shape {}x{}x{} must be positive",
                self.channels, self.height, self.width
            ));
        }
        if self.base_channels == 0 || self.channel_mults.is_empty() || self.res_blocks == 0 {
            return bad(
                "base channels, channel multipliers and res blocks must be positive".into(),
            );
        }
        if self.channel_mults.len() > 8 || self.res_blocks > 64 {
            return bad(format!(
                "at most 8 levels and 64 res blocks per level, got {} and {}",
                self.channel_mults.len(),
                self.res_blocks
            ));
        }
        let size = [self.channels, self.height, self.width, self.base_channels]
            .into_iter()
            .chain(self.channel_mults.iter().copied())
            .try_fold(1usize, |a, v| a.checked_mul(v));
        if size.is_none_or(|s| s > 1 << 40) {
            return bad("image shape or channel counts are too large".into());
        }
        let down = 1usize << (self.channel_mults.len() - 1);
        if !self.height.is_multiple_of(down) || !self.width.is_multiple_of(down) {
            return bad(format!(
                "{} levels halve the image {} times, so height and width must divide by {down}, got {}x{}",
                self.channel_mults.len(),
                self.channel_mults.len() - 1,
                self.height,
                self.width
            ));
        }
        if self.groups == 0 || self.heads == 0 {
            return bad("groups and heads must be positive".into());
        }
        for &m in &self.channel_mults {
            let c = m * self.base_channels;
            if c == 0 || !c.is_multiple_of(self.groups) || !c.is_multiple_of(self.heads) {
                return bad(format!(
                    "level channels {c} must be positive and divide by groups {} and heads {}",
                    self.groups, self.heads
                ));
            }
        }
        if !self.base_channels.is_multiple_of(self.groups) || !self.base_channels.is_multiple_of(2)
        {
            return bad(format!(
                "base channels {} must be even and divide by groups {}",
                self.base_channels, self.groups
            ));
        }
        Ok(())
    }
}

/// The U-Net velocity model (see the module docs).
#[derive(Debug, Clone)]
pub struct UNet {
    config: UNetConfig,
    w: Weights,
    freqs: Tensor,
}

/// The block layout shared by building and the forward pass, so the two cannot disagree.
#[derive(Debug, Clone, PartialEq)]
enum Block {
    Res {
        name: String,
        c_in: usize,
        c_out: usize,
    },
    Attn {
        name: String,
        c: usize,
    },
    Down {
        name: String,
        c: usize,
    },
    Up {
        name: String,
        c: usize,
    },
    /// Pushes the current activation on the skip stack (down path).
    Save,
    /// Pops a skip activation and concatenates it on the channels (up path).
    Concat,
}

fn layout(cfg: &UNetConfig) -> Vec<Block> {
    let mut blocks = vec![Block::Save];
    let chans: Vec<usize> = cfg
        .channel_mults
        .iter()
        .map(|m| m * cfg.base_channels)
        .collect();
    let levels = chans.len();
    let mut skips = vec![cfg.base_channels];
    let mut c = cfg.base_channels;
    let mut res = cfg.height;
    for (i, &co) in chans.iter().enumerate() {
        for r in 0..cfg.res_blocks {
            let name = format!("down.{i}.{r}");
            blocks.push(Block::Res {
                name: name.clone(),
                c_in: c,
                c_out: co,
            });
            c = co;
            if cfg.attention_resolutions.contains(&res) {
                blocks.push(Block::Attn {
                    name: format!("{name}.attn"),
                    c,
                });
            }
            blocks.push(Block::Save);
            skips.push(c);
        }
        if i + 1 < levels {
            blocks.push(Block::Down {
                name: format!("down.{i}.downsample"),
                c,
            });
            blocks.push(Block::Save);
            skips.push(c);
            res /= 2;
        }
    }
    blocks.push(Block::Res {
        name: "mid.0".into(),
        c_in: c,
        c_out: c,
    });
    blocks.push(Block::Attn {
        name: "mid.attn".into(),
        c,
    });
    blocks.push(Block::Res {
        name: "mid.1".into(),
        c_in: c,
        c_out: c,
    });
    for (i, &co) in chans.iter().enumerate().rev() {
        for r in 0..=cfg.res_blocks {
            let name = format!("up.{i}.{r}");
            let skip = skips.pop().expect("one skip per saved activation");
            blocks.push(Block::Concat);
            blocks.push(Block::Res {
                name: name.clone(),
                c_in: c + skip,
                c_out: co,
            });
            c = co;
            if cfg.attention_resolutions.contains(&res) {
                blocks.push(Block::Attn {
                    name: format!("{name}.attn"),
                    c,
                });
            }
        }
        if i > 0 {
            blocks.push(Block::Up {
                name: format!("up.{i}.upsample"),
                c,
            });
            res *= 2;
        }
    }
    blocks
}

impl UNet {
    pub fn new(config: UNetConfig, params: &mut Params, init: &mut Init) -> Result<Self> {
        config.validate()?;
        let (base, emb) = (config.base_channels, config.emb_dim());
        let freqs = time_frequencies(base / 2, &init.device, init.dtype)?;
        let mut b = Builder::new(params, init);
        b.linear("time.0", base, emb)?;
        b.linear("time.1", emb, emb)?;
        if config.num_classes > 0 {
            let table = b.init.normal((config.num_classes + 1, emb), 1.0)?;
            b.put("class_embedding".into(), table)?;
        }
        b.conv("conv_in", config.channels, base, 3)?;
        for block in layout(&config) {
            match block {
                Block::Res { name, c_in, c_out } => b.res_block(&name, c_in, c_out, emb)?,
                Block::Attn { name, c } => b.attention(&name, c)?,
                Block::Down { name, c } | Block::Up { name, c } => b.conv(&name, c, c, 3)?,
                Block::Save | Block::Concat => {}
            }
        }
        b.norm("out.norm", base)?;
        b.conv("out.conv", base, config.channels, 3)?;
        let w = b.finish();
        Ok(Self { config, w, freqs })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn device(&self) -> candle_core::Device {
        self.freqs.device().clone()
    }

    /// A copy whose weights are constants (no parameter gradients are recorded).
    pub fn frozen(&self) -> Self {
        Self {
            config: self.config.clone(),
            w: self.w.frozen(),
            freqs: self.freqs.clone(),
        }
    }

    /// Runs the convolutions' matrix products, forward and backward, in `precision` where this CPU has
    /// the units for it (bf16 inputs, f32 accumulation; AVX-512 BF16); returns the precision in force.
    /// Weights, GroupNorm, attention and the element-wise work stay f32.
    pub fn set_precision(
        &mut self,
        precision: crate::precision::Precision,
    ) -> crate::precision::Precision {
        self.w.set_precision(precision)
    }

    /// The precision in force (see [`UNet::set_precision`]).
    pub fn precision(&self) -> crate::precision::Precision {
        self.w.precision()
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.w.get(name)
    }

    fn linear(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        self.w.linear(name, x)
    }

    fn conv(&self, name: &str, x: &Tensor, stride: usize) -> Result<Tensor> {
        self.w.conv(name, x, stride)
    }

    fn norm(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        self.w.group_norm(name, x, self.config.groups)
    }

    fn norm_silu(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        self.w.group_norm_silu(name, x, self.config.groups)
    }

    fn res_block(&self, name: &str, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let h = self.norm_silu(&format!("{name}.norm1"), x)?;
        let e = self.linear(&format!("{name}.emb"), &emb.silu()?)?;
        let h = self.w.conv_plus(&format!("{name}.conv1"), &h, 1, &e)?;
        let h = self.norm_silu(&format!("{name}.norm2"), &h)?;
        let h = self.conv(&format!("{name}.conv2"), &h, 1)?;
        let skip = if self.w.contains(&format!("{name}.skip.weight")) {
            self.conv(&format!("{name}.skip"), x, 1)?
        } else {
            x.clone()
        };
        Ok((h + skip)?)
    }

    /// Multi-head self-attention over the H*W positions, with a residual connection.
    fn attention(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (heads, l) = (self.config.heads, h * w);
        let d = c / heads;
        let hn = self.norm(&format!("{name}.norm"), x)?;
        let tokens = hn.reshape((n, c, l))?.transpose(1, 2)?.contiguous()?;
        let qkv = self.linear(&format!("{name}.qkv"), &tokens)?; // (n, l, 3c)
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * c, c)?
                .reshape((n, l, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let att = softmax_last(&scores)?;
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((n, l, c))?;
        let out = self.linear(&format!("{name}.proj"), &out)?;
        Ok((x + out.transpose(1, 2)?.reshape((n, c, h, w))?)?)
    }

    fn embedding(&self, t: &Tensor, labels: Option<&Tensor>, n: usize) -> Result<Tensor> {
        let e = self.w.time_embedding("time", t, &self.freqs)?;
        if self.config.num_classes == 0 {
            return Ok(e);
        }
        let ids = match labels {
            Some(l) => {
                if l.dims() != [n] {
                    return Err(Error::Data(format!(
                        "expected {n} labels, got shape {:?}",
                        l.dims()
                    )));
                }
                l.to_dtype(DType::U32)?.contiguous()?
            }
            None => Tensor::full(self.config.num_classes as u32, n, t.device())?.contiguous()?,
        };
        let table = self.get("class_embedding")?;
        Ok((e + table.index_select(&ids, 0)?)?)
    }

    /// v(x, t | y) on flat rows; `labels` None (or the null class) means unconditional.
    pub fn forward_cond(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let cfg = &self.config;
        let shape = x.shape().clone();
        let n = x.dim(0)?;
        if x.elem_count() != n * cfg.dim() {
            return Err(Error::Data(format!(
                "the U-Net expects images of {}x{}x{} = {} values, got shape {:?}",
                cfg.channels,
                cfg.height,
                cfg.width,
                cfg.dim(),
                shape.dims()
            )));
        }
        let img = x.reshape((n, cfg.channels, cfg.height, cfg.width))?;
        let emb = self.embedding(&t.to_dtype(x.dtype())?, labels, n)?;
        let mut h = self.conv("conv_in", &img, 1)?;
        let mut skips = vec![];
        for block in layout(cfg) {
            h = match block {
                Block::Save => {
                    skips.push(h.clone());
                    h
                }
                Block::Concat => {
                    let s = skips.pop().expect("layout pairs every Concat with a Save");
                    Tensor::cat(&[&h, &s], 1)?
                }
                Block::Res { name, .. } => self.res_block(&name, &h, &emb)?,
                Block::Attn { name, .. } => self.attention(&name, &h)?,
                Block::Down { name, .. } => self.conv(&name, &h, 2)?,
                Block::Up { name, .. } => self.conv(&name, &upsample2x(&h)?, 1)?,
            };
        }
        let h = self.norm_silu("out.norm", &h)?;
        Ok(self.conv("out.conv", &h, 1)?.reshape(shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::VelocityField;
    use crate::nn::ModelConfig;
    use crate::rng::Rng;
    use crate::testing::max_abs_diff;
    use candle_core::Device;

    fn tiny() -> UNetConfig {
        UNetConfig {
            channels: 1,
            height: 8,
            width: 8,
            base_channels: 8,
            channel_mults: vec![1, 2],
            res_blocks: 1,
            attention_resolutions: vec![4],
            heads: 2,
            groups: 4,
            num_classes: 3,
        }
    }

    #[test]
    fn shapes_skips_and_labels() {
        let cfg = ModelConfig::UNet(tiny());
        let (m, p) = cfg
            .build(&mut Rng::new(0), &Device::Cpu, DType::F32)
            .unwrap();
        assert!(p.count() > 1000);
        let x = Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.1f32, 0.3, 0.5, 0.7, 0.9], &Device::Cpu).unwrap();
        let crate::nn::Model::UNet(u) = &m else {
            panic!("a U-Net")
        };
        let labels = Tensor::new(&[0u32, 1, 2, 0, 1], &Device::Cpu).unwrap();
        let vc = u.forward_cond(&x, &t, Some(&labels)).unwrap();
        let vu = m.forward(&x, &t).unwrap();
        assert_eq!(vc.dims(), &[5, 64]);
        // The class changes the output; the null class is what `forward` uses.
        let d = max_abs_diff(&vc, &vu);
        assert!(d > 1e-4);
        let null = Tensor::new(&[3u32; 5], &Device::Cpu).unwrap();
        let vn = u.forward_cond(&x, &t, Some(&null)).unwrap();
        let d = max_abs_diff(&vn, &vu);
        assert_eq!(d, 0.0);
        // Each row depends on its own input only (no mixing across the batch, e.g. in GroupNorm).
        let one = u
            .forward_cond(
                &x.narrow(0, 2, 1).unwrap(),
                &t.narrow(0, 2, 1).unwrap(),
                Some(&labels.narrow(0, 2, 1).unwrap()),
            )
            .unwrap();
        let d = max_abs_diff(&one, &vc.narrow(0, 2, 1).unwrap());
        assert!(d < 1e-5, "{d}");
        assert!(u
            .forward_cond(&x.narrow(1, 0, 63).unwrap(), &t, None)
            .is_err());
    }

    #[test]
    fn invalid_shapes_are_rejected() {
        let mut c = tiny();
        c.height = 7;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("divide by 2"));
        let mut c = tiny();
        c.groups = 3;
        assert!(c.validate().is_err());
        let mut c = tiny();
        c.channel_mults = vec![1; 70];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at most 8 levels"));
        let mut c = tiny();
        c.height = usize::MAX / 2;
        assert!(c.validate().is_err());
        assert!(UNetConfig::small(1, 28, 28, 10).validate().is_ok());
        assert!(UNetConfig::tiny(1, 28, 28, 10).validate().is_ok());
    }

    /// Autograd through convolutions (incl. stride 2), GroupNorm, attention and upsampling matches
    /// central finite differences of the loss in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let cfg = ModelConfig::UNet(tiny());
        let (m, p) = cfg
            .build(&mut Rng::new(1), &Device::Cpu, DType::F64)
            .unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 64), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.2f64, 0.8], &Device::Cpu).unwrap();
        let loss = |m: &crate::nn::Model| -> Tensor {
            m.forward(&x, &t).unwrap().sqr().unwrap().sum_all().unwrap()
        };
        let pick = |name: &str| {
            name.contains("conv")
                || name.contains("downsample")
                || name.contains("qkv")
                || name.contains("norm")
        };
        let checked = crate::testing::check_gradients(&p, || loss(&m), pick, 1e-5);
        assert!(checked > 10);
    }
}
