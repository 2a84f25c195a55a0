//! Masked CFM training of the sequence transformer (Voicebox): minibatches of cropped, padded
//! sequences with drawn spans to fill in, and the optimizer step on [`crate::infill::masked_cfm_loss`].

use candle_core::{Device, Tensor};

use super::{candle_update, Engine, Trainer};
use crate::data::SequenceDataset;
use crate::error::{Error, Result};
use crate::infill::{masked_cfm_loss, InfillBatch, SpanMasking};
use crate::nn::Model;
use crate::rng::Rng;

/// `b` sequences drawn with replacement, each cropped at random to at most `max_frames`, padded to the
/// longest (zero frames, the null phone), with a mask drawn by `masking` from `rng_mask`.
pub fn draw_infill_batch(
    data: &SequenceDataset,
    b: usize,
    max_frames: usize,
    masking: &SpanMasking,
    rng_data: &mut Rng,
    rng_mask: &mut Rng,
    device: &Device,
) -> Result<InfillBatch> {
    let f = data.frame_dim();
    let picks: Vec<(usize, usize, usize)> = (0..b)
        .map(|_| {
            let i = rng_data.below(data.len());
            let len = data.sequence(i).1.len();
            let keep = len.min(max_frames);
            let start = rng_data.below(len - keep + 1);
            (i, start, keep)
        })
        .collect();
    let frames = picks.iter().map(|p| p.2).max().unwrap_or(1);
    let null = data.num_phones() as u32;
    let (mut x1, mut phones) = (vec![0f32; b * frames * f], vec![null; b * frames]);
    let (mut mask, mut lengths, mut unconditional) = (vec![0f32; b * frames], vec![], vec![]);
    for (s, &(i, start, keep)) in picks.iter().enumerate() {
        let (seq, ph) = data.sequence(i);
        x1[s * frames * f..(s * frames + keep) * f]
            .copy_from_slice(&seq[start * f..(start + keep) * f]);
        phones[s * frames..s * frames + keep].copy_from_slice(&ph[start..start + keep]);
        let m = masking.draw(rng_mask, keep);
        mask[s * frames + m.start..s * frames + m.end].fill(1.0);
        lengths.push(keep);
        unconditional.push(m.unconditional);
    }
    Ok(InfillBatch {
        x1: Tensor::from_vec(x1, (b, frames, f), device)?,
        mask: Tensor::from_vec(mask, (b, frames), device)?,
        phones: (data.num_phones() > 0).then_some(Tensor::from_vec(phones, (b, frames), device)?),
        lengths,
        unconditional,
    })
}

impl Trainer {
    /// One optimizer step of masked CFM on a fresh minibatch of sequences; returns the loss before the
    /// update. The model must be a transformer whose frames and phones match the data's.
    pub fn step_sequences(&mut self, data: &SequenceDataset) -> Result<f64> {
        let Model::Transformer(model) = &self.model else {
            return Err(Error::Config(
                "sequence data need a transformer model".into(),
            ));
        };
        let cfg = *model.config();
        if data.frame_dim() != cfg.frame_dim || data.num_phones() != cfg.num_phones {
            return Err(Error::Data(format!(
                "the transformer takes {}-value frames and {} phones but the data {} do not match",
                cfg.frame_dim,
                cfg.num_phones,
                data.describe()
            )));
        }
        let c = self.config.train;
        c.masking.validate()?;
        let b = c.batch_size;
        let crop = c.crop_frames.unwrap_or(cfg.max_frames).min(cfg.max_frames);
        if crop == 0 {
            return Err(Error::Config(
                "the crop length must be at least 1 frame".into(),
            ));
        }
        let batch = draw_infill_batch(
            data,
            b,
            crop,
            &c.masking,
            &mut self.rng_data,
            &mut self.rng_noise,
            &self.device,
        )?;
        let (_, frames, f) = batch.x1.dims3()?;
        let x0 = Tensor::from_vec(
            self.rng_noise.normal_vec(b * frames * f),
            (b, frames, f),
            &self.device,
        )?;
        let t = c.time_sampling.sample(&mut self.rng_noise, b);
        let weights = self.config.weighting.weights(&self.config.path, &t)?;
        let loss = masked_cfm_loss(
            model,
            &self.path,
            self.config.prediction,
            &x0,
            &t,
            &batch,
            weights.as_deref(),
        )?;
        let lr = self.learning_rate();
        let Engine::Candle { opt, ema } = &mut self.engine else {
            return Err(Error::Config("the fused engine trains MLPs only".into()));
        };
        let value = candle_update(&self.params, opt, ema, &loss, c, self.step, lr)?;
        self.step += 1;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infill::InfillField;
    use crate::nn::{ModelConfig, TransformerConfig};
    use crate::objective::Weighting;
    use crate::path::{Prediction, SchedulerConfig};
    use crate::solver::{integrate, SolverKind};
    use crate::train::{RunConfig, TrainConfig, FORMAT_VERSION};

    /// Sequences of 6-14 frames, each frame its phone's fixed vector plus noise.
    fn data() -> SequenceDataset {
        let table = [[1.5f32, 0.0], [-1.0, 1.0], [0.0, -1.5]];
        let mut rng = Rng::new(4);
        let (mut frames, mut phones) = (vec![], vec![]);
        for _ in 0..64 {
            let len = 6 + rng.below(9);
            let p: Vec<u32> = (0..len).map(|_| rng.below(3) as u32).collect();
            frames.push(
                p.iter()
                    .flat_map(|&id| table[id as usize].map(|v| v + 0.05 * rng.normal() as f32))
                    .collect(),
            );
            phones.push(p);
        }
        SequenceDataset::new("phones", 2, 3, frames, phones).unwrap()
    }

    fn config(steps: u64) -> RunConfig {
        RunConfig {
            format_version: FORMAT_VERSION,
            model: ModelConfig::Transformer(TransformerConfig {
                frame_dim: 2,
                context_dim: 2,
                num_phones: 3,
                phone_dim: 4,
                width: 16,
                depth: 2,
                heads: 2,
                ffn_dim: 32,
                skips: true,
                max_frames: 10,
            }),
            path: SchedulerConfig::CondOt { sigma_min: 1e-4 },
            prediction: Prediction::Velocity,
            weighting: Weighting::Uniform,
            train: TrainConfig {
                steps,
                batch_size: 32,
                warmup_steps: 20,
                optimizer: crate::optim::AdamWConfig {
                    lr: 3e-3,
                    ..Default::default()
                },
                ema_decay: 0.0,
                ..Default::default()
            },
            data: "phones".into(),
            source: None,
        }
    }

    /// Crops respect `max_frames`, padding carries the null phone and no mask, and every row has a
    /// masked frame inside its length.
    #[test]
    fn batches_are_cropped_padded_and_masked() {
        let d = data();
        let (mut a, mut b) = (Rng::new(1), Rng::new(2));
        let batch = draw_infill_batch(
            &d,
            16,
            10,
            &SpanMasking::default(),
            &mut a,
            &mut b,
            &Device::Cpu,
        )
        .unwrap();
        let (n, frames, _) = batch.x1.dims3().unwrap();
        assert_eq!(n, 16);
        assert!(frames <= 10);
        let mask = batch.mask.to_vec2::<f32>().unwrap();
        let phones = batch.phones.unwrap().to_vec2::<u32>().unwrap();
        for s in 0..n {
            let len = batch.lengths[s];
            assert!(mask[s][..len].contains(&1.0));
            assert!(mask[s][len..].iter().all(|&m| m == 0.0));
            assert!(phones[s][len..].iter().all(|&p| p == 3));
            assert!(phones[s][..len].iter().all(|&p| p < 3));
        }
    }

    /// The trainer's masked CFM steps are reproducible from the seed, lower the loss, and give a model
    /// that fills a span from its phones and context (the unconditional field, which sees neither,
    /// cannot); an MLP config is refused.
    #[test]
    fn the_trainer_learns_to_infill() {
        let d = data();
        let run = |steps| {
            let mut tr = Trainer::new(config(steps), &Device::Cpu).unwrap();
            let losses: Vec<f64> = (0..steps).map(|_| tr.step_sequences(&d).unwrap()).collect();
            (tr, losses)
        };
        assert_eq!(run(5).1, run(5).1);
        let (tr, losses) = run(300);
        let head = losses[..20].iter().sum::<f64>() / 20.0;
        let tail = losses[280..].iter().sum::<f64>() / 20.0;
        assert!(tail < 0.5 * head, "loss {head} -> {tail}");
        let Model::Transformer(m) = tr.ema_model().unwrap() else {
            panic!("a transformer")
        };
        let (mut a, mut b) = (Rng::new(8), Rng::new(9));
        let masking = SpanMasking {
            p_whole: 0.0,
            p_uncond: 0.0,
            ..Default::default()
        };
        let test = draw_infill_batch(&d, 32, 10, &masking, &mut a, &mut b, &Device::Cpu).unwrap();
        let (_, frames, f) = test.x1.dims3().unwrap();
        let x0 = Tensor::from_vec(
            Rng::new(3).normal_vec(32 * frames * f),
            (32, frames, f),
            &Device::Cpu,
        )
        .unwrap();
        let rms = |w: f64| -> f32 {
            let field = InfillField::new(&m, &test, w).unwrap();
            let start = field.initial(&x0, &test).unwrap();
            let solver = SolverKind::Midpoint.solver();
            let x = integrate(&field, solver.as_ref(), &start, 0.0, 1.0, 8, false)
                .unwrap()
                .x;
            let sq = ((x - &test.x1).unwrap().sqr().unwrap().sum(2).unwrap() * &test.mask).unwrap();
            let n: f32 = test.mask.sum_all().unwrap().to_scalar().unwrap();
            (sq.sum_all().unwrap().to_scalar::<f32>().unwrap() / n).sqrt()
        };
        // The phone vectors are ~2.3 apart: a frame filled from the wrong phone costs more than 1.
        let (cond, uncond) = (rms(1.0), rms(0.0));
        assert!(cond < 0.4, "conditional infill RMS error {cond}");
        assert!(
            uncond > 3.0 * cond,
            "unconditional {uncond} vs conditional {cond}"
        );

        let mut mlp = config(1);
        mlp.model = ModelConfig::Mlp(crate::nn::MlpConfig::new(2));
        let mut tr = Trainer::new(mlp, &Device::Cpu).unwrap();
        assert!(tr
            .step_sequences(&d)
            .unwrap_err()
            .to_string()
            .contains("transformer"));
    }
}
