//! Named weights and the layers built from them (dense, convolution, GroupNorm), shared by the U-Net
//! and the evaluation classifier.
//!
//! A [`Builder`] registers each parameter in the run's [`Params`] (fixed order, stable names) and keeps
//! a tensor sharing its storage, so optimizer updates are seen by the forward pass; [`Weights::frozen`]
//! makes a copy that records no parameter gradients.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{Init, Params};

/// Weights by name, with the layer operations that use them.
#[derive(Debug, Clone, Default)]
pub struct Weights(HashMap<String, Tensor>);

impl Weights {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.0
            .get(name)
            .ok_or_else(|| Error::Config(format!("weight '{name}' is missing")))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The same weights as constants.
    pub fn frozen(&self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.detach()))
                .collect(),
        )
    }

    /// y = x W^T + b over the last dimension.
    pub fn linear(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        let b = self.get(&format!("{name}.bias"))?;
        Ok(x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?)
    }

    /// A k x k convolution with "same" padding (k odd) and the given stride, plus bias.
    pub fn conv(&self, name: &str, x: &Tensor, stride: usize) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        let b = self.get(&format!("{name}.bias"))?;
        let pad = w.dim(2)? / 2;
        let y = x.conv2d(w, pad, stride, 1, 1)?;
        Ok(y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?)
    }

    /// GroupNorm (eps 1e-5): each group of channels normalised over (its channels, H, W), then a
    /// per-channel affine map.
    pub fn group_norm(&self, name: &str, x: &Tensor, groups: usize) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let xg = x.reshape((n, groups, (c / groups) * h * w))?;
        let mean = xg.mean_keepdim(2)?;
        let centred = xg.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(2)?;
        let normed = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let weight = self.get(&format!("{name}.weight"))?.reshape((1, c, 1, 1))?;
        let bias = self.get(&format!("{name}.bias"))?.reshape((1, c, 1, 1))?;
        Ok(normed
            .reshape((n, c, h, w))?
            .broadcast_mul(&weight)?
            .broadcast_add(&bias)?)
    }
}

/// Registers the parameters in a fixed order while building.
pub struct Builder<'a, 'b> {
    params: &'a mut Params,
    pub init: &'a mut Init<'b>,
    w: HashMap<String, Tensor>,
}

impl<'a, 'b> Builder<'a, 'b> {
    pub fn new(params: &'a mut Params, init: &'a mut Init<'b>) -> Self {
        Self {
            params,
            init,
            w: HashMap::new(),
        }
    }

    pub fn finish(self) -> Weights {
        Weights(self.w)
    }

    pub fn put(&mut self, name: String, value: Tensor) -> Result<()> {
        let var = self.params.add(name.clone(), value)?;
        self.w.insert(name, var.as_tensor().clone());
        Ok(())
    }

    /// PyTorch's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub fn linear(&mut self, name: &str, fan_in: usize, fan_out: usize) -> Result<()> {
        let b = 1.0 / (fan_in as f64).sqrt();
        let w = self.init.uniform((fan_out, fan_in), b)?;
        self.put(format!("{name}.weight"), w)?;
        let bias = self.init.uniform(fan_out, b)?;
        self.put(format!("{name}.bias"), bias)
    }

    pub fn conv(&mut self, name: &str, c_in: usize, c_out: usize, k: usize) -> Result<()> {
        let b = 1.0 / ((c_in * k * k) as f64).sqrt();
        let w = self.init.uniform((c_out, c_in, k, k), b)?;
        self.put(format!("{name}.weight"), w)?;
        let bias = self.init.uniform(c_out, b)?;
        self.put(format!("{name}.bias"), bias)
    }

    pub fn norm(&mut self, name: &str, c: usize) -> Result<()> {
        let ones = self.init.constant(c, 1.0)?;
        self.put(format!("{name}.weight"), ones)?;
        let zeros = self.init.constant(c, 0.0)?;
        self.put(format!("{name}.bias"), zeros)
    }

    pub fn res_block(&mut self, name: &str, c_in: usize, c_out: usize, emb: usize) -> Result<()> {
        self.norm(&format!("{name}.norm1"), c_in)?;
        self.conv(&format!("{name}.conv1"), c_in, c_out, 3)?;
        self.linear(&format!("{name}.emb"), emb, c_out)?;
        self.norm(&format!("{name}.norm2"), c_out)?;
        self.conv(&format!("{name}.conv2"), c_out, c_out, 3)?;
        if c_in != c_out {
            self.conv(&format!("{name}.skip"), c_in, c_out, 1)?;
        }
        Ok(())
    }

    pub fn attention(&mut self, name: &str, c: usize) -> Result<()> {
        self.norm(&format!("{name}.norm"), c)?;
        self.linear(&format!("{name}.qkv"), c, 3 * c)?;
        self.linear(&format!("{name}.proj"), c, c)
    }
}
