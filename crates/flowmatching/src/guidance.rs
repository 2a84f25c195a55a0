//! Classifier-free guidance (Ho & Salimans 2022) for class-conditional velocity models.
//!
//! ```text
//! v_w(x, t | y) = v(x, t | null) + w (v(x, t | y) - v(x, t | null))
//! ```
//!
//! **Convention.** w = 0 is the unconditional model, w = 1 the plain conditional model, w > 1 pushes
//! samples further towards the class. Some papers and libraries write the same mixture as
//! (1 + w') v(x | y) - w' v(x | null); the two agree when w = 1 + w' (their w' = 0 is our w = 1).
//!
//! For w other than 0 and 1 both fields are evaluated in one batched forward pass of 2B rows, which
//! counts as 2 NFE per solver call; at w = 0 or w = 1 only the field needed is evaluated (1 NFE).
//! Training makes the unconditional field available by replacing labels with the null class at random
//! (label dropout, the training option `label_dropout`).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::nn::Model;

/// The guided field for fixed per-row labels.
#[derive(Debug)]
pub struct Guided<'a> {
    model: &'a Model,
    labels: Tensor,
    null: Tensor,
    w: f64,
    /// Guidance applies for t in [lo, hi] only; elsewhere the plain conditional field (Kynkaanniemi et
    /// al. 2024, "Applying guidance in a limited interval improves sample and distribution quality
    /// in diffusion models").
    interval: Option<(f64, f64)>,
}

impl<'a> Guided<'a> {
    /// `labels` holds one class per row of the states that will be integrated.
    pub fn new(model: &'a Model, labels: &[u32], w: f64) -> Result<Self> {
        let k = model.num_classes();
        if k == 0 {
            return Err(Error::Config(
                "guidance needs a class-conditional model; this one was trained without labels"
                    .into(),
            ));
        }
        if !w.is_finite() {
            return Err(Error::Config(format!(
                "guidance weight must be finite, got {w}"
            )));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= k) {
            return Err(Error::Config(format!(
                "class {bad} does not exist: the model knows classes 0..{}",
                k - 1
            )));
        }
        let device = model_device(model)?;
        Ok(Self {
            model,
            labels: Tensor::from_slice(labels, labels.len(), &device)?,
            null: Tensor::full(k as u32, labels.len(), &device)?,
            w,
            interval: None,
        })
    }

    /// Guidance only for t in [lo, hi] (0 <= lo <= hi <= 1, t = 0 noise); the conditional field
    /// (w = 1) at other times, at 1 NFE per call.
    pub fn with_interval(mut self, lo: f64, hi: f64) -> Result<Self> {
        if !(0.0 <= lo && lo <= hi && hi <= 1.0) {
            return Err(Error::Config(format!(
                "the guidance interval must satisfy 0 <= lo <= hi <= 1, got [{lo}, {hi}]"
            )));
        }
        self.interval = Some((lo, hi));
        Ok(self)
    }

    /// The weight in force at time t.
    fn weight_at(&self, t: f64) -> f64 {
        match self.interval {
            Some((lo, hi)) if t < lo || t > hi => 1.0,
            _ => self.w,
        }
    }

    pub fn weight(&self) -> f64 {
        self.w
    }
}

fn model_device(model: &Model) -> Result<candle_core::Device> {
    // A forward pass on zero rows would do, but every model keeps its weights on one device.
    match model {
        Model::UNet(u) => Ok(u.device()),
        Model::Transformer(m) => Ok(m.device()),
        _ => Ok(candle_core::Device::Cpu),
    }
}

impl VelocityField for Guided<'_> {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        if n != self.labels.dim(0)? {
            return Err(Error::Data(format!(
                "guided sampling has {} labels for {n} states (per-sample step control drops rows; use the batch norm)",
                self.labels.dim(0)?
            )));
        }
        let w = match self.interval {
            None => self.w,
            Some(_) => {
                let tv: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
                let first = self.weight_at(tv.first().copied().unwrap_or(0.0));
                if tv.iter().any(|&s| self.weight_at(s) != first) {
                    return Err(Error::Config(
                        "a guidance interval needs one time per call (constant steps, or the batch \
                         error norm)"
                            .into(),
                    ));
                }
                first
            }
        };
        if w == 0.0 {
            return self.model.forward_cond(x, t, Some(&self.null));
        }
        if w == 1.0 {
            return self.model.forward_cond(x, t, Some(&self.labels));
        }
        let x2 = Tensor::cat(&[x, x], 0)?;
        let t2 = Tensor::cat(&[t, t], 0)?;
        let l2 = Tensor::cat(&[&self.labels, &self.null], 0)?.to_dtype(DType::U32)?;
        let v = self.model.forward_cond(&x2, &t2, Some(&l2))?;
        let (vc, vu) = (v.narrow(0, 0, n)?, v.narrow(0, n, n)?);
        Ok((&vu + ((vc - &vu)? * w)?)?)
    }

    fn evals_per_call(&self, t: &[f64]) -> usize {
        let w = self.weight_at(t.first().copied().unwrap_or(0.0));
        if w == 0.0 || w == 1.0 {
            1
        } else {
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{ModelConfig, UNetConfig};
    use crate::rng::Rng;
    use crate::solver::{integrate, Midpoint};
    use candle_core::Device;

    fn model() -> Model {
        let cfg = UNetConfig {
            channels: 1,
            height: 4,
            width: 4,
            base_channels: 4,
            channel_mults: vec![1],
            res_blocks: 1,
            attention_resolutions: vec![],
            heads: 1,
            groups: 2,
            num_classes: 2,
        };
        ModelConfig::UNet(cfg)
            .build(&mut Rng::new(0), &Device::Cpu, DType::F32)
            .unwrap()
            .0
    }

    use crate::testing::max_abs_diff as max_diff;

    /// The batched mixture equals v_u + w (v_c - v_u) from two separate passes, and w = 0 / 1 give the
    /// unconditional / conditional fields.
    #[test]
    fn mixture_matches_separate_passes() {
        let m = model();
        let x = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.1f32, 0.5, 0.9], &Device::Cpu).unwrap();
        let labels = [0u32, 1, 1];
        let lt = Tensor::new(&labels, &Device::Cpu).unwrap();
        let vc = m.forward_cond(&x, &t, Some(&lt)).unwrap();
        let vu = m.forward(&x, &t).unwrap();
        for w in [0.0, 1.0, 2.5] {
            let g = Guided::new(&m, &labels, w).unwrap();
            let want = (&vu + ((&vc - &vu).unwrap() * w).unwrap()).unwrap();
            assert!(
                max_diff(&g.forward(&x, &t).unwrap(), &want) < 1e-5,
                "w = {w}"
            );
        }
    }

    #[test]
    fn guided_solves_count_two_evaluations_per_call() {
        let m = model();
        let x0 = Tensor::randn(0f32, 1.0, (2, 16), &Device::Cpu).unwrap();
        let nfe = |w: f64| {
            let g = Guided::new(&m, &[0, 1], w).unwrap();
            integrate(&g, &Midpoint, &x0, 0.0, 1.0, 4, false)
                .unwrap()
                .stats
                .nfe
        };
        assert_eq!(nfe(2.0), 16);
        assert_eq!(nfe(1.0), 8);
    }

    /// With an interval, the field is the guided mixture for t inside it and the conditional field
    /// outside, and only the calls inside cost 2 NFE.
    #[test]
    fn guidance_interval_guides_only_inside() {
        let m = model();
        let x = Tensor::randn(0f32, 1.0, (2, 16), &Device::Cpu).unwrap();
        let labels = [0u32, 1];
        let lt = Tensor::new(&labels, &Device::Cpu).unwrap();
        let g = Guided::new(&m, &labels, 3.0)
            .unwrap()
            .with_interval(0.3, 0.7)
            .unwrap();
        let plain = Guided::new(&m, &labels, 3.0).unwrap();
        for (tv, inside) in [(0.1f32, false), (0.5, true), (0.9, false)] {
            let t = Tensor::new(&[tv, tv], &Device::Cpu).unwrap();
            let want = if inside {
                plain.forward(&x, &t).unwrap()
            } else {
                m.forward_cond(&x, &t, Some(&lt)).unwrap()
            };
            assert!(
                max_diff(&g.forward(&x, &t).unwrap(), &want) < 1e-6,
                "t = {tv}"
            );
        }
        // Midpoint, 10 steps: evaluations at t = k/10 and k/10 + 1/20; those in [0.3, 0.7] are
        // 0.3, 0.35, ..., 0.7: 9 of the 20 calls guided.
        let x0 = Tensor::randn(0f32, 1.0, (2, 16), &Device::Cpu).unwrap();
        let s = integrate(&g, &Midpoint, &x0, 0.0, 1.0, 10, false).unwrap();
        assert_eq!(s.stats.nfe, 20 + 9);
        assert!(Guided::new(&m, &labels, 3.0)
            .unwrap()
            .with_interval(0.8, 0.2)
            .is_err());
        let mixed = Tensor::new(&[0.1f32, 0.5], &Device::Cpu).unwrap();
        assert!(g.forward(&x, &mixed).is_err(), "rows at different times");
    }

    #[test]
    fn bad_guidance_is_explained() {
        let m = model();
        assert!(Guided::new(&m, &[2], 1.0)
            .unwrap_err()
            .to_string()
            .contains("class 2"));
        let mlp = ModelConfig::Mlp(crate::nn::MlpConfig::new(2))
            .build(&mut Rng::new(0), &Device::Cpu, DType::F32)
            .unwrap()
            .0;
        assert!(Guided::new(&mlp, &[0], 2.0)
            .unwrap_err()
            .to_string()
            .contains("class-conditional"));
    }
}
