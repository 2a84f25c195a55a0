//! The parameter store of a model (named candle variables in a fixed order) and seeded weight
//! initialisation.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::rng::Rng;

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

/// Draws initial weights from our seeded generator (candle cannot seed its own on the CPU).
pub struct Init<'a> {
    pub rng: &'a mut Rng,
    pub device: Device,
    pub dtype: DType,
    /// At most this many values in all (`None`: no bound). A model built to receive a file's weights
    /// gets the file's count, so that a config describing a larger model fails before allocating it.
    pub budget: Option<usize>,
}

impl Init<'_> {
    /// Takes `shape`'s values out of the budget.
    fn spend(&mut self, shape: &candle_core::Shape) -> Result<()> {
        if let Some(left) = self.budget.as_mut() {
            let n = shape.elem_count();
            if n > *left {
                return Err(Error::Data(format!(
                    "the config describes a larger model than its weights hold (a {shape:?} tensor \
                     is {} values more than what is left): the weights come from another architecture",
                    n - *left
                )));
            }
            *left -= n;
        }
        Ok(())
    }

    pub fn uniform<S: Into<candle_core::Shape>>(&mut self, shape: S, bound: f64) -> Result<Tensor> {
        let shape = shape.into();
        self.spend(&shape)?;
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
        self.spend(&shape)?;
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
        let shape = shape.into();
        self.spend(&shape)?;
        Ok(Tensor::full(value, shape, &self.device)?.to_dtype(self.dtype)?)
    }
}
