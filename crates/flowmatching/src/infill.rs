//! Masked conditional flow matching for sequence infilling (Voicebox, Le et al. 2023, section 3).
//!
//! A sequence x1 (T frames of F features) is split by a binary mask m (1: to generate) into what is
//! known, the context x_ctx = (1 - m) x1, and what is to be filled in. The network sees x_t on the
//! path from noise x0 to x1, the context and the frame-aligned phones, and regresses the path's target
//! on the masked frames only:
//!
//! ```text
//! L = E_{t, m, x0, x1} || m (v(x_t, x_ctx, phones, t) - u_t(x_t | x1)) ||^2 / (F sum m)
//! ```
//!
//! During training ([`SpanMasking`]) the mask is one contiguous span of 70-100% of each utterance, or
//! with probability `p_whole` the whole utterance (no context: synthesis from phones alone); with
//! probability `p_uncond` both context and phones are dropped, so that the same model gives the
//! unconditional field for classifier-free guidance.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::nn::{SequenceCondition, Transformer};
use crate::path::{AffinePath, Prediction};
use crate::rng::Rng;

/// How training masks are drawn.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpanMasking {
    /// The masked span is a fraction in [min_fraction, max_fraction] of the utterance's frames.
    pub min_fraction: f64,
    pub max_fraction: f64,
    /// Probability that the whole utterance is masked (Voicebox's p_drop, 0.3).
    pub p_whole: f64,
    /// Probability that context and phones are both dropped (Voicebox's p_uncond, 0.2).
    pub p_uncond: f64,
}

impl Default for SpanMasking {
    /// Voicebox's values (sections 3.2 and 5.1).
    fn default() -> Self {
        Self {
            min_fraction: 0.7,
            max_fraction: 1.0,
            p_whole: 0.3,
            p_uncond: 0.2,
        }
    }
}

/// One training example's mask: the masked frames `start..end` and whether its conditions are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrawnMask {
    pub start: usize,
    pub end: usize,
    pub unconditional: bool,
}

impl SpanMasking {
    pub fn validate(&self) -> Result<()> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !(unit(self.min_fraction) && unit(self.max_fraction))
            || self.min_fraction > self.max_fraction
            || self.min_fraction <= 0.0
        {
            return Err(Error::Config(format!(
                "the masked fraction range must satisfy 0 < min <= max <= 1, got {}..{}",
                self.min_fraction, self.max_fraction
            )));
        }
        for (name, p) in [("p_whole", self.p_whole), ("p_uncond", self.p_uncond)] {
            if !unit(p) {
                return Err(Error::Config(format!(
                    "{name} must be a probability, got {p}"
                )));
            }
        }
        Ok(())
    }

    /// Draws the mask of an utterance of `len` frames (at least one frame is masked).
    pub fn draw(&self, rng: &mut Rng, len: usize) -> DrawnMask {
        let unconditional = rng.uniform() < self.p_uncond;
        if rng.uniform() < self.p_whole {
            return DrawnMask {
                start: 0,
                end: len,
                unconditional,
            };
        }
        let f = self.min_fraction + (self.max_fraction - self.min_fraction) * rng.uniform();
        let span = ((f * len as f64).round() as usize).clamp(1, len);
        let start = rng.below(len - span + 1);
        DrawnMask {
            start,
            end: start + span,
            unconditional,
        }
    }
}

/// A batch of sequences to infill: data, masks and conditions, padded to the longest sequence.
#[derive(Debug, Clone)]
pub struct InfillBatch {
    /// (N, T, F) the sequences (x1 in training; in sampling only the context frames are read).
    pub x1: Tensor,
    /// (N, T) 1 on the frames to generate, 0 on the context and on padding.
    pub mask: Tensor,
    /// (N, T) phone ids (u32), or None for a model without phones.
    pub phones: Option<Tensor>,
    /// Valid frames of each sequence.
    pub lengths: Vec<usize>,
    /// Rows whose context and phones are dropped (the unconditional field).
    pub unconditional: Vec<bool>,
}

impl InfillBatch {
    /// The model's conditions: x_ctx = (1 - m) x1 (zero for unconditional rows), the phones (the null
    /// phone for unconditional rows) and the lengths.
    pub fn condition(&self, model: &Transformer) -> Result<SequenceCondition> {
        let (n, frames, _) = self.x1.dims3()?;
        if self.mask.dims() != [n, frames] || self.lengths.len() != n {
            return Err(Error::Data(format!(
                "an infill batch of {n} sequences of {frames} frames needs a ({n}, {frames}) mask and \
                 {n} lengths, got {:?} and {}",
                self.mask.dims(),
                self.lengths.len()
            )));
        }
        if self.unconditional.len() != n {
            return Err(Error::Data(format!(
                "expected {n} unconditional flags, got {}",
                self.unconditional.len()
            )));
        }
        let dev = self.x1.device();
        let keep = keep_rows(&self.unconditional, dev, self.x1.dtype())?;
        let known = (1.0 - &self.mask.to_dtype(self.x1.dtype())?)?;
        let context = self
            .x1
            .broadcast_mul(&known.broadcast_mul(&keep.unsqueeze(1)?)?.unsqueeze(2)?)?;
        let cfg = model.config();
        let phones = match &self.phones {
            Some(p) if cfg.num_phones > 0 => {
                let null = Tensor::full(cfg.num_phones as u32, (n, frames), dev)?;
                let drop = Tensor::from_iter(self.unconditional.iter().map(|&u| u as u8), dev)?
                    .reshape((n, 1))?
                    .broadcast_as((n, frames))?;
                Some(drop.where_cond(&null, &p.to_dtype(DType::U32)?)?)
            }
            Some(_) => return Err(Error::Config("this model takes no phones".into())),
            None => None,
        };
        Ok(SequenceCondition {
            context: (cfg.context_dim > 0).then_some(context),
            phones,
            lengths: Some(self.lengths.clone()),
        })
    }
}

/// 1 for the rows that keep their conditions, 0 for the unconditional ones, shape (N,).
fn keep_rows(unconditional: &[bool], device: &Device, dtype: DType) -> Result<Tensor> {
    let v: Vec<f32> = unconditional
        .iter()
        .map(|&u| if u { 0.0 } else { 1.0 })
        .collect();
    Ok(Tensor::from_vec(v, unconditional.len(), device)?.to_dtype(dtype)?)
}

/// The masked CFM loss: per row, the squared error of the prediction against the path's target in
/// `prediction` form, summed over the masked frames and divided by F times their number; then the
/// mean over rows of lambda(t_i) times that (lambda = 1 when `weights` is None).
pub fn masked_cfm_loss(
    model: &Transformer,
    path: &AffinePath,
    prediction: Prediction,
    x0: &Tensor,
    t: &[f64],
    batch: &InfillBatch,
    weights: Option<&[f64]>,
) -> Result<Tensor> {
    let x1 = &batch.x1;
    let s = path.sample(x0, x1, t)?;
    let target = path.regression_target(prediction, x0, x1, &s, t)?;
    let cond = batch.condition(model)?;
    let pred = model.forward_seq(&s.x_t, &s.t, &cond)?;
    let (_, _, f) = x1.dims3()?;
    let mask = batch.mask.to_dtype(x1.dtype())?;
    let count = (mask.sum(1)? * f as f64)?;
    if count.min_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? <= 0.0 {
        return Err(Error::Data(
            "every sequence of an infill batch needs at least one masked frame".into(),
        ));
    }
    let sq = (pred - target)?.sqr()?.sum(2)?;
    let per_row = (sq * &mask)?.sum(1)?.div(&count)?;
    match weights {
        None => Ok(per_row.mean_all()?),
        Some(w) => {
            let w = Tensor::from_iter(w.iter().copied(), per_row.device())?
                .to_dtype(per_row.dtype())?;
            Ok((per_row * w)?.mean_all()?)
        }
    }
}

/// The field that fills in a batch's masked frames: v(x, t | context, phones), guided by weight w
/// (w = 1 the conditional field, w = 0 the unconditional one; otherwise both in one batched pass, 2
/// NFE per call; see [`crate::guidance`]). Frames outside the mask have zero velocity, so the context
/// is never changed by the solve when it starts from [`InfillField::initial`].
pub struct InfillField<'a> {
    model: &'a Transformer,
    cond: SequenceCondition,
    uncond: SequenceCondition,
    mask: Tensor,
    w: f64,
}

impl<'a> InfillField<'a> {
    pub fn new(model: &'a Transformer, batch: &InfillBatch, w: f64) -> Result<Self> {
        if !w.is_finite() {
            return Err(Error::Config(format!(
                "guidance weight must be finite, got {w}"
            )));
        }
        let n = batch.lengths.len();
        let mut conditional = batch.clone();
        conditional.unconditional = vec![false; n];
        let mut unconditional = batch.clone();
        unconditional.unconditional = vec![true; n];
        Ok(Self {
            model,
            cond: conditional.condition(model)?,
            uncond: unconditional.condition(model)?,
            mask: batch.mask.to_dtype(batch.x1.dtype())?.unsqueeze(2)?,
            w,
        })
    }

    /// The starting state: noise x0 on the masked frames, the context on the others.
    pub fn initial(&self, x0: &Tensor, batch: &InfillBatch) -> Result<Tensor> {
        let keep = (1.0 - &self.mask)?;
        Ok((x0.broadcast_mul(&self.mask)? + batch.x1.broadcast_mul(&keep)?)?)
    }

    fn both(&self) -> Result<SequenceCondition> {
        let cat = |a: &Option<Tensor>, b: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match (a, b) {
                (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
                _ => None,
            })
        };
        let lengths = self
            .cond
            .lengths
            .as_ref()
            .map(|l| [l.clone(), l.clone()].concat());
        Ok(SequenceCondition {
            context: cat(&self.cond.context, &self.uncond.context)?,
            phones: cat(&self.cond.phones, &self.uncond.phones)?,
            lengths,
        })
    }
}

impl VelocityField for InfillField<'_> {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let v = if self.w == 1.0 {
            self.model.forward_seq(x, t, &self.cond)?
        } else if self.w == 0.0 {
            self.model.forward_seq(x, t, &self.uncond)?
        } else {
            let n = x.dim(0)?;
            let both = self.model.forward_seq(
                &Tensor::cat(&[x, x], 0)?,
                &Tensor::cat(&[t, t], 0)?,
                &self.both()?,
            )?;
            let (vc, vu) = (both.narrow(0, 0, n)?, both.narrow(0, n, n)?);
            (&vu + ((vc - &vu)? * self.w)?)?
        };
        Ok(v.broadcast_mul(&self.mask)?)
    }

    fn evals_per_call(&self, _t: &[f64]) -> usize {
        if self.w == 0.0 || self.w == 1.0 {
            1
        } else {
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::TransformerConfig;
    use crate::params::{Init, Params};
    use crate::path::SchedulerConfig;
    use crate::testing::max_abs_diff;

    fn model(frame_dim: usize, phones: usize, seed: u64) -> (Transformer, Params) {
        let cfg = TransformerConfig {
            frame_dim,
            context_dim: frame_dim,
            num_phones: phones,
            phone_dim: 4,
            width: 16,
            depth: 2,
            heads: 2,
            ffn_dim: 32,
            skips: true,
            max_frames: 64,
        };
        let mut params = Params::default();
        let mut rng = Rng::new(seed);
        let mut init = Init {
            rng: &mut rng,
            device: Device::Cpu,
            dtype: DType::F32,
            budget: None,
        };
        (
            Transformer::new(cfg, &mut params, &mut init).unwrap(),
            params,
        )
    }

    /// The drawn masks follow the configured probabilities and span fractions (binomial and range
    /// checks over 20,000 draws).
    #[test]
    fn span_masks_follow_the_configuration() {
        let m = SpanMasking::default();
        m.validate().unwrap();
        let mut rng = Rng::new(1);
        let (n, len) = (20_000, 200);
        let (mut whole, mut uncond, mut fractions) = (0usize, 0usize, vec![]);
        for _ in 0..n {
            let d = m.draw(&mut rng, len);
            assert!(d.start < d.end && d.end <= len);
            uncond += d.unconditional as usize;
            if d.start == 0 && d.end == len {
                whole += 1;
            } else {
                fractions.push((d.end - d.start) as f64 / len as f64);
            }
        }
        // Spans of the full length also come from fractions near 1: about 1/60 of the rest.
        let p_whole = whole as f64 / n as f64;
        let expect = 0.3 + 0.7 * (0.5 / len as f64) / 0.3;
        assert!(
            (p_whole - expect).abs() < 4.0 * (expect * (1.0 - expect) / n as f64).sqrt(),
            "{p_whole}"
        );
        let p_uncond = uncond as f64 / n as f64;
        assert!(
            (p_uncond - 0.2).abs() < 4.0 * (0.16 / n as f64).sqrt(),
            "{p_uncond}"
        );
        assert!(fractions.iter().all(|&f| (0.695..=1.0).contains(&f)));
        let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
        assert!((mean - 0.85).abs() < 0.005, "{mean}");
        let bad = SpanMasking {
            min_fraction: 0.9,
            max_fraction: 0.5,
            ..m
        };
        assert!(bad.validate().is_err());
        assert!(SpanMasking { p_uncond: 1.5, ..m }.validate().is_err());
    }

    fn batch(rng: &mut Rng) -> InfillBatch {
        let (n, frames, f) = (3, 6, 2);
        let x1 =
            Tensor::from_vec(rng.normal_vec(n * frames * f), (n, frames, f), &Device::Cpu).unwrap();
        let mut mask = vec![0f32; n * frames];
        for (s, (a, b)) in [(1, 4), (0, 6), (2, 3)].iter().enumerate() {
            for j in *a..*b {
                mask[s * frames + j] = 1.0;
            }
        }
        let phones: Vec<u32> = (0..n * frames).map(|i| (i % 4) as u32).collect();
        InfillBatch {
            x1,
            mask: Tensor::from_vec(mask, (n, frames), &Device::Cpu).unwrap(),
            phones: Some(Tensor::from_vec(phones, (n, frames), &Device::Cpu).unwrap()),
            lengths: vec![6, 6, 4],
            unconditional: vec![false, true, false],
        }
    }

    /// The loss is the masked frames' mean squared error against the OT target x1 - (1 - sigma_min) x0,
    /// computed here by loops over the model's own prediction.
    #[test]
    fn the_loss_counts_only_masked_frames() {
        let (m, _) = model(2, 4, 0);
        let mut rng = Rng::new(2);
        let b = batch(&mut rng);
        let x0 = Tensor::from_vec(rng.normal_vec(36), (3, 6, 2), &Device::Cpu).unwrap();
        let t = [0.2, 0.5, 0.9];
        let sigma_min = 1e-4;
        let path = AffinePath::from_config(&SchedulerConfig::CondOt { sigma_min }).unwrap();
        let loss: f32 = masked_cfm_loss(&m, &path, Prediction::Velocity, &x0, &t, &b, None)
            .unwrap()
            .to_scalar()
            .unwrap();
        let s = path.sample(&x0, &b.x1, &t).unwrap();
        let pred = m
            .forward_seq(&s.x_t, &s.t, &b.condition(&m).unwrap())
            .unwrap();
        let (p, x0v, x1v) = (
            pred.to_vec3::<f32>().unwrap(),
            x0.to_vec3::<f32>().unwrap(),
            b.x1.to_vec3::<f32>().unwrap(),
        );
        let mask = b.mask.to_vec2::<f32>().unwrap();
        let mut want = 0.0;
        for s in 0..3 {
            let (mut sum, mut count) = (0.0, 0.0);
            for j in 0..6 {
                if mask[s][j] == 1.0 {
                    for c in 0..2 {
                        let u = x1v[s][j][c] as f64 - (1.0 - sigma_min) * x0v[s][j][c] as f64;
                        sum += (p[s][j][c] as f64 - u).powi(2);
                        count += 1.0;
                    }
                }
            }
            want += sum / count / 3.0;
        }
        assert!((loss as f64 - want).abs() < 1e-5 * want, "{loss} vs {want}");
    }

    /// The context reaches the model only where the mask is 0 and only for conditional rows; the
    /// phones of unconditional rows are the null phone.
    #[test]
    fn conditions_hide_the_masked_frames_and_drop_unconditional_rows() {
        let (m, _) = model(2, 4, 0);
        let b = batch(&mut Rng::new(3));
        let c = b.condition(&m).unwrap();
        let ctx = c.context.unwrap().to_vec3::<f32>().unwrap();
        let x1 = b.x1.to_vec3::<f32>().unwrap();
        let mask = b.mask.to_vec2::<f32>().unwrap();
        for s in 0..3 {
            for j in 0..6 {
                let keep = mask[s][j] == 0.0 && !b.unconditional[s];
                for k in 0..2 {
                    assert_eq!(ctx[s][j][k], if keep { x1[s][j][k] } else { 0.0 });
                }
            }
        }
        let phones = c.phones.unwrap().to_vec2::<u32>().unwrap();
        assert!(phones[1].iter().all(|&p| p == 4));
        assert_eq!(phones[0][1], 1);
    }

    /// The guided field is v_u + w (v_c - v_u) from one batched pass, zero off the mask, 2 NFE a call.
    #[test]
    fn guidance_mixes_the_two_fields_on_the_masked_frames() {
        let (m, _) = model(2, 4, 1);
        let b = batch(&mut Rng::new(4));
        let x = Tensor::from_vec(Rng::new(5).normal_vec(36), (3, 6, 2), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.3f32, 0.6, 0.1], &Device::Cpu).unwrap();
        let vc = InfillField::new(&m, &b, 1.0).unwrap();
        let vu = InfillField::new(&m, &b, 0.0).unwrap();
        let g = InfillField::new(&m, &b, 1.7).unwrap();
        assert_eq!(
            (vc.evals_per_call(&[0.5]), g.evals_per_call(&[0.5])),
            (1, 2)
        );
        let (c, u) = (vc.forward(&x, &t).unwrap(), vu.forward(&x, &t).unwrap());
        let want = (&u + ((&c - &u).unwrap() * 1.7).unwrap()).unwrap();
        assert!(max_abs_diff(&g.forward(&x, &t).unwrap(), &want) < 1e-5);
        let off = (c.broadcast_mul(&(1.0 - b.mask.unsqueeze(2).unwrap()).unwrap())).unwrap();
        assert_eq!(
            off.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!(InfillField::new(&m, &b, f64::NAN).is_err());
    }
}
