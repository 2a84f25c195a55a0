//! A transformer velocity field for sequences of frames (N, T, F), after Voicebox (Le et al. 2023,
//! section 3.3).
//!
//! Each frame's input [x_t, context, phone embedding] is projected to the model width and the time
//! embedding is added. Pre-norm blocks follow: multi-head self-attention whose scores carry symmetric
//! ALiBi biases -m_h |i - j| (Press et al. 2022, with slopes m_h = 2^(-8 h / H)) and a key-padding
//! mask for batches of unequal length, then a GELU MLP, each with a residual connection. As in Voicebox
//! the stack is a U: block i of the second half takes [h, input of block L - 1 - i] through a linear
//! map. A final LayerNorm and linear map give each frame's velocity; padded frames get zero.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::layers::{softmax_last, time_frequencies, Builder, Weights};
use crate::error::{Error, Result};
use crate::params::{Init, Params};

/// The transformer's shape (what checkpoints store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformerConfig {
    /// Features per frame of x (80 mel bins for speech).
    pub frame_dim: usize,
    /// Conditioning features per frame joined to the input (the unmasked audio; 0: none).
    pub context_dim: usize,
    /// Phone vocabulary size (0: no phones); the id `num_phones` is the null phone of unconditional
    /// training.
    pub num_phones: usize,
    /// Width of the phone embedding.
    pub phone_dim: usize,
    /// Model width.
    pub width: usize,
    /// Number of blocks L.
    pub depth: usize,
    pub heads: usize,
    /// Hidden width of each block's MLP.
    pub ffn_dim: usize,
    /// Voicebox's U-Net-style skips between the first and second half of the stack.
    pub skips: bool,
    /// The longest sequence accepted (bounds the T x T attention scores).
    pub max_frames: usize,
}

impl TransformerConfig {
    /// Largest width, MLP width and sequence length accepted.
    pub const MAX_WIDTH: usize = 1 << 16;
    pub const MAX_DEPTH: usize = 256;
    pub const MAX_FRAMES: usize = 1 << 16;

    /// A small speech model: 80-bin frames with an 80-bin context and `num_phones` phones.
    pub fn speech(num_phones: usize, width: usize, depth: usize, heads: usize) -> Self {
        Self {
            frame_dim: 80,
            context_dim: 80,
            num_phones,
            phone_dim: 64.min(width),
            width,
            depth,
            heads,
            ffn_dim: 4 * width,
            skips: true,
            max_frames: 4096,
        }
    }

    /// Features per frame fed to the input projection.
    pub fn input_dim(&self) -> usize {
        let phones = if self.num_phones > 0 {
            self.phone_dim
        } else {
            0
        };
        self.frame_dim + self.context_dim + phones
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("transformer: {what}")));
        for (name, v, max) in [
            ("frame_dim", self.frame_dim, Self::MAX_WIDTH),
            ("width", self.width, Self::MAX_WIDTH),
            ("ffn_dim", self.ffn_dim, Self::MAX_WIDTH),
            ("depth", self.depth, Self::MAX_DEPTH),
            ("heads", self.heads, Self::MAX_WIDTH),
            ("max_frames", self.max_frames, Self::MAX_FRAMES),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} must be in 1..={max}, got {v}"));
            }
        }
        for (name, v) in [
            ("context_dim", self.context_dim),
            ("num_phones", self.num_phones),
            ("phone_dim", self.phone_dim),
        ] {
            if v > Self::MAX_WIDTH {
                return bad(format!(
                    "{name} must be at most {}, got {v}",
                    Self::MAX_WIDTH
                ));
            }
        }
        if self.num_phones > 0 && self.phone_dim == 0 {
            return bad("phones need a phone_dim of at least 1".into());
        }
        if !self.width.is_multiple_of(self.heads) || !(self.width / self.heads).is_multiple_of(2) {
            return bad(format!(
                "width {} must split into {} heads of an even size",
                self.width, self.heads
            ));
        }
        Ok(())
    }

    /// Whether block i takes a skip from the input of block L - 1 - i.
    fn takes_skip(&self, i: usize) -> bool {
        self.skips && self.depth - 1 - i < i
    }

    /// Whether the input of block i is kept for a later skip.
    fn gives_skip(&self, i: usize) -> bool {
        self.skips && i < self.depth - 1 - i
    }

    /// The exact parameter count, saturating, from the config alone.
    pub fn params(&self) -> u128 {
        let lin = |i: usize, o: usize| (i as u128 + 1).saturating_mul(o as u128);
        let (w, f) = (self.width, self.ffn_dim);
        let block = lin(w, 3 * w)
            .saturating_add(lin(w, w))
            .saturating_add(lin(w, f))
            .saturating_add(lin(f, w))
            .saturating_add(4 * w as u128);
        let skips = (0..self.depth.min(Self::MAX_DEPTH))
            .filter(|&i| self.takes_skip(i))
            .count() as u128;
        let phones = if self.num_phones > 0 {
            (self.num_phones as u128 + 1).saturating_mul(self.phone_dim as u128)
        } else {
            0
        };
        lin(self.input_dim(), w)
            .saturating_add(lin(w, w).saturating_mul(2))
            .saturating_add(phones)
            .saturating_add(block.saturating_mul(self.depth as u128))
            .saturating_add(lin(2 * w, w).saturating_mul(skips))
            .saturating_add(2 * w as u128)
            .saturating_add(lin(w, self.frame_dim))
    }
}

/// What a sequence is conditioned on, beside x_t and t.
#[derive(Debug, Clone, Default)]
pub struct SequenceCondition {
    /// (N, T, context_dim): the known frames, zero where they are to be generated. None: all zero
    /// (unconditional).
    pub context: Option<Tensor>,
    /// (N, T) phone ids (u32), `num_phones` for none. None: all the null phone.
    pub phones: Option<Tensor>,
    /// Valid frames of each sequence (the rest is padding). None: every frame is valid.
    pub lengths: Option<Vec<usize>>,
}

/// The transformer velocity model (see the module docs).
#[derive(Debug, Clone)]
pub struct Transformer {
    config: TransformerConfig,
    w: Weights,
    freqs: Tensor,
}

impl Transformer {
    pub fn new(config: TransformerConfig, params: &mut Params, init: &mut Init) -> Result<Self> {
        config.validate()?;
        let w = config.width;
        let freqs = time_frequencies(w / 2, &init.device, init.dtype)?;
        let mut b = Builder::new(params, init);
        b.linear("time.0", w, w)?;
        b.linear("time.1", w, w)?;
        if config.num_phones > 0 {
            let table = b
                .init
                .normal((config.num_phones + 1, config.phone_dim), 1.0)?;
            b.put("phone_embedding".into(), table)?;
        }
        b.linear("input", config.input_dim(), w)?;
        for i in 0..config.depth {
            if config.takes_skip(i) {
                b.linear(&format!("block.{i}.skip"), 2 * w, w)?;
            }
            b.norm(&format!("block.{i}.norm1"), w)?;
            b.linear(&format!("block.{i}.qkv"), w, 3 * w)?;
            b.linear(&format!("block.{i}.proj"), w, w)?;
            b.norm(&format!("block.{i}.norm2"), w)?;
            b.linear(&format!("block.{i}.ffn.0"), w, config.ffn_dim)?;
            b.linear(&format!("block.{i}.ffn.1"), config.ffn_dim, w)?;
        }
        b.norm("out.norm", w)?;
        b.linear("out", w, config.frame_dim)?;
        Ok(Self {
            config,
            w: b.finish(),
            freqs,
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.freqs.device().clone()
    }

    /// A copy whose weights are constants (no parameter gradients are recorded).
    pub fn frozen(&self) -> Self {
        Self {
            config: self.config,
            w: self.w.frozen(),
            freqs: self.freqs.clone(),
        }
    }

    /// v(x_t, t | condition) for x (N, T, frame_dim) and t (N,).
    pub fn forward_seq(&self, x: &Tensor, t: &Tensor, cond: &SequenceCondition) -> Result<Tensor> {
        let cfg = &self.config;
        let (n, frames, f) = x.dims3().map_err(|_| {
            Error::Data(format!(
                "the transformer expects (sequences, frames, {}) values, got shape {:?}",
                cfg.frame_dim,
                x.dims()
            ))
        })?;
        if f != cfg.frame_dim {
            return Err(Error::Data(format!(
                "the transformer expects {} features per frame, got {f}",
                cfg.frame_dim
            )));
        }
        if frames == 0 || frames > cfg.max_frames {
            return Err(Error::Data(format!(
                "sequences must have 1..={} frames, got {frames}",
                cfg.max_frames
            )));
        }
        let valid = frame_mask(cond.lengths.as_deref(), n, frames, x.device(), x.dtype())?;
        let h = self.input(x, t, cond, n, frames)?;
        let bias = self.attention_bias(valid.as_ref(), n, frames, x.dtype())?;
        let mut h = h;
        let mut saved = Vec::new();
        for i in 0..cfg.depth {
            if cfg.takes_skip(i) {
                let s: Tensor = saved.pop().expect("one saved input per skip");
                h = self
                    .w
                    .linear(&format!("block.{i}.skip"), &Tensor::cat(&[&h, &s], 2)?)?;
            }
            if cfg.gives_skip(i) {
                saved.push(h.clone());
            }
            h = self.block(i, &h, &bias)?;
        }
        let out = self.w.linear("out", &self.w.layer_norm("out.norm", &h)?)?;
        Ok(match valid {
            Some(v) => out.broadcast_mul(&v.unsqueeze(2)?)?,
            None => out,
        })
    }

    /// The projected input [x_t, context, phone embedding] W + b, plus the time embedding.
    fn input(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &SequenceCondition,
        n: usize,
        frames: usize,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let mut parts = vec![x.clone()];
        if cfg.context_dim > 0 {
            parts.push(match &cond.context {
                Some(c) => {
                    if c.dims() != [n, frames, cfg.context_dim] {
                        return Err(Error::Data(format!(
                            "expected a context of shape [{n}, {frames}, {}], got {:?}",
                            cfg.context_dim,
                            c.dims()
                        )));
                    }
                    c.to_dtype(x.dtype())?
                }
                None => Tensor::zeros((n, frames, cfg.context_dim), x.dtype(), x.device())?,
            });
        } else if cond.context.is_some() {
            return Err(Error::Config("this transformer takes no context".into()));
        }
        if cfg.num_phones > 0 {
            let ids = match &cond.phones {
                Some(p) => {
                    if p.dims() != [n, frames] {
                        return Err(Error::Data(format!(
                            "expected phones of shape [{n}, {frames}], got {:?}",
                            p.dims()
                        )));
                    }
                    let p = p.to_dtype(DType::U32)?;
                    let top: u32 = p.max_all()?.to_scalar()?;
                    if top as usize > cfg.num_phones {
                        return Err(Error::Data(format!(
                            "phone id {top} is outside the vocabulary of {} phones",
                            cfg.num_phones
                        )));
                    }
                    p.flatten_all()?
                }
                None => Tensor::full(cfg.num_phones as u32, n * frames, x.device())?,
            };
            let table = self.w.get("phone_embedding")?;
            let emb = table.index_select(&ids.contiguous()?, 0)?;
            parts.push(emb.reshape((n, frames, cfg.phone_dim))?);
        } else if cond.phones.is_some() {
            return Err(Error::Config("this transformer takes no phones".into()));
        }
        let h = self.w.linear("input", &Tensor::cat(&parts, 2)?)?;
        let t = t.to_dtype(x.dtype())?;
        if t.dims() != [n] {
            return Err(Error::Data(format!(
                "expected {n} times, got shape {:?}",
                t.dims()
            )));
        }
        let e = self.w.time_embedding("time", &t, &self.freqs)?;
        Ok(h.broadcast_add(&e.unsqueeze(1)?)?)
    }

    /// ALiBi's -m_h |i - j| (1, H, T, T), plus -1e9 on padded keys ((N, H, T, T) when any are padded).
    fn attention_bias(
        &self,
        valid: Option<&Tensor>,
        n: usize,
        frames: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let heads = self.config.heads;
        let mut v = Vec::with_capacity(heads * frames * frames);
        for h in 0..heads {
            let m = alibi_slope(h, heads);
            for i in 0..frames {
                v.extend((0..frames).map(|j| -(m * i.abs_diff(j) as f64) as f32));
            }
        }
        let dev = self.freqs.device();
        let alibi = Tensor::from_vec(v, (1, heads, frames, frames), dev)?.to_dtype(dtype)?;
        Ok(match valid {
            None => alibi,
            Some(valid) => {
                let pad = ((valid - 1.0)? * 1e9)?.reshape((n, 1, 1, frames))?;
                alibi.broadcast_add(&pad)?
            }
        })
    }

    /// One pre-norm block: h + Attn(LN(h)), then h + MLP(LN(h)).
    fn block(&self, i: usize, h: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (n, frames, c) = h.dims3()?;
        let heads = self.config.heads;
        let d = c / heads;
        let a = self.w.layer_norm(&format!("block.{i}.norm1"), h)?;
        let qkv = self.w.linear(&format!("block.{i}.qkv"), &a)?;
        let split = |k: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, k * c, c)?
                .reshape((n, frames, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let att = softmax_last(&scores.broadcast_add(bias)?)?;
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((n, frames, c))?;
        let h = (h + self.w.linear(&format!("block.{i}.proj"), &out)?)?;
        let m = self.w.layer_norm(&format!("block.{i}.norm2"), &h)?;
        let m = self.w.linear(&format!("block.{i}.ffn.0"), &m)?.gelu()?;
        Ok((&h + self.w.linear(&format!("block.{i}.ffn.1"), &m)?)?)
    }
}

/// ALiBi's slope of head h of H: m_h = 2^(-8 (h + 1) / H).
pub fn alibi_slope(h: usize, heads: usize) -> f64 {
    (2f64).powf(-8.0 * (h + 1) as f64 / heads as f64)
}

/// 1 on the valid frames of each sequence, 0 on its padding (N, T); None when there is no padding.
fn frame_mask(
    lengths: Option<&[usize]>,
    n: usize,
    frames: usize,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let Some(lengths) = lengths else {
        return Ok(None);
    };
    if lengths.len() != n {
        return Err(Error::Data(format!(
            "expected {n} sequence lengths, got {}",
            lengths.len()
        )));
    }
    if let Some(&bad) = lengths.iter().find(|&&l| l == 0 || l > frames) {
        return Err(Error::Data(format!(
            "a sequence length must be in 1..={frames}, got {bad}"
        )));
    }
    if lengths.iter().all(|&l| l == frames) {
        return Ok(None);
    }
    let v: Vec<f32> = lengths
        .iter()
        .flat_map(|&l| (0..frames).map(move |j| if j < l { 1.0 } else { 0.0 }))
        .collect();
    Ok(Some(
        Tensor::from_vec(v, (n, frames), device)?.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn tiny() -> TransformerConfig {
        TransformerConfig {
            frame_dim: 3,
            context_dim: 3,
            num_phones: 4,
            phone_dim: 2,
            width: 8,
            depth: 3,
            heads: 2,
            ffn_dim: 12,
            skips: true,
            max_frames: 16,
        }
    }

    fn build(cfg: TransformerConfig, dtype: DType) -> (Transformer, Params) {
        let mut params = Params::default();
        let mut rng = Rng::new(7);
        let mut init = Init {
            rng: &mut rng,
            device: Device::Cpu,
            dtype,
            budget: None,
        };
        let m = Transformer::new(cfg, &mut params, &mut init).unwrap();
        (m, params)
    }

    /// The same model written as plain f64 loops over one unpadded sequence: the reference the
    /// tensor code is checked against.
    struct Reference<'a>(&'a Transformer);

    impl Reference<'_> {
        fn w(&self, name: &str) -> Vec<f64> {
            let t = self.0.w.get(name).unwrap();
            t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        }

        fn linear(&self, name: &str, x: &[f64]) -> Vec<f64> {
            let (w, b) = (
                self.w(&format!("{name}.weight")),
                self.w(&format!("{name}.bias")),
            );
            b.iter()
                .enumerate()
                .map(|(o, bo)| bo + (0..x.len()).map(|i| w[o * x.len() + i] * x[i]).sum::<f64>())
                .collect()
        }

        fn layer_norm(&self, name: &str, x: &[f64]) -> Vec<f64> {
            let (g, b) = (
                self.w(&format!("{name}.weight")),
                self.w(&format!("{name}.bias")),
            );
            let n = x.len() as f64;
            let mean = x.iter().sum::<f64>() / n;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let s = (var + 1e-5).sqrt();
            (0..x.len())
                .map(|i| (x[i] - mean) / s * g[i] + b[i])
                .collect()
        }

        fn gelu(x: f64) -> f64 {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh())
        }

        /// v for one sequence: frames x[j] (F), context[j], phone ids, time t.
        fn forward(
            &self,
            x: &[Vec<f64>],
            ctx: &[Vec<f64>],
            phones: &[usize],
            t: f64,
        ) -> Vec<Vec<f64>> {
            let cfg = self.0.config;
            let (w, heads) = (cfg.width, cfg.heads);
            let half = w / 2;
            let mut feat: Vec<f64> = (0..half)
                .map(|k| (t * 1000.0 * (-(10000f64.ln()) * k as f64 / half as f64).exp()).sin())
                .collect();
            feat.extend(
                (0..half).map(|k| {
                    (t * 1000.0 * (-(10000f64.ln()) * k as f64 / half as f64).exp()).cos()
                }),
            );
            let e: Vec<f64> = self
                .linear("time.0", &feat)
                .iter()
                .map(|v| v / (1.0 + (-v).exp()))
                .collect();
            let e = self.linear("time.1", &e);
            let table = self.w("phone_embedding");
            let mut h: Vec<Vec<f64>> = (0..x.len())
                .map(|j| {
                    let mut input = x[j].clone();
                    input.extend(&ctx[j]);
                    let p = phones[j];
                    input.extend(&table[p * cfg.phone_dim..(p + 1) * cfg.phone_dim]);
                    let mut y = self.linear("input", &input);
                    y.iter_mut().zip(&e).for_each(|(a, b)| *a += b);
                    y
                })
                .collect();
            let mut saved = vec![];
            for i in 0..cfg.depth {
                if cfg.takes_skip(i) {
                    let s: Vec<Vec<f64>> = saved.pop().unwrap();
                    h = h
                        .iter()
                        .zip(&s)
                        .map(|(a, b)| {
                            self.linear(
                                &format!("block.{i}.skip"),
                                &[a.clone(), b.clone()].concat(),
                            )
                        })
                        .collect();
                }
                if cfg.gives_skip(i) {
                    saved.push(h.clone());
                }
                let a: Vec<Vec<f64>> = h
                    .iter()
                    .map(|v| self.layer_norm(&format!("block.{i}.norm1"), v))
                    .collect();
                let qkv: Vec<Vec<f64>> = a
                    .iter()
                    .map(|v| self.linear(&format!("block.{i}.qkv"), v))
                    .collect();
                let d = w / heads;
                let mut att = vec![vec![0.0; w]; x.len()];
                for hd in 0..heads {
                    let m = alibi_slope(hd, heads);
                    for qi in 0..x.len() {
                        let s: Vec<f64> = (0..x.len())
                            .map(|kj| {
                                let dot: f64 = (0..d)
                                    .map(|c| qkv[qi][hd * d + c] * qkv[kj][w + hd * d + c])
                                    .sum();
                                dot / (d as f64).sqrt() - m * qi.abs_diff(kj) as f64
                            })
                            .collect();
                        let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                        let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                        for (kj, sv) in s.iter().enumerate() {
                            let p = (sv - mx).exp() / z;
                            for c in 0..d {
                                att[qi][hd * d + c] += p * qkv[kj][2 * w + hd * d + c];
                            }
                        }
                    }
                }
                for j in 0..x.len() {
                    let o = self.linear(&format!("block.{i}.proj"), &att[j]);
                    h[j].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                    let m = self.layer_norm(&format!("block.{i}.norm2"), &h[j]);
                    let f: Vec<f64> = self
                        .linear(&format!("block.{i}.ffn.0"), &m)
                        .into_iter()
                        .map(Self::gelu)
                        .collect();
                    let o = self.linear(&format!("block.{i}.ffn.1"), &f);
                    h[j].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                }
            }
            h.iter()
                .map(|v| self.linear("out", &self.layer_norm("out.norm", v)))
                .collect()
        }
    }

    fn randn(rng: &mut Rng, shape: (usize, usize, usize)) -> Tensor {
        let v: Vec<f64> = (0..shape.0 * shape.1 * shape.2)
            .map(|_| rng.normal())
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn rows(t: &Tensor, n: usize, len: usize) -> Vec<Vec<f64>> {
        let v = t.get(n).unwrap().to_vec2::<f64>().unwrap();
        v[..len].to_vec()
    }

    /// A batch of two sequences of unequal length (5 and 3 frames, the second padded with junk) gives,
    /// on each sequence's valid frames, the loops' output for that sequence alone, and zero on padding:
    /// the ALiBi biases, the key-padding mask, the skips, LayerNorm and GELU all agree.
    #[test]
    fn forward_matches_the_reference_loops_and_ignores_padding() {
        let (m, _) = build(tiny(), DType::F64);
        let mut rng = Rng::new(3);
        let (n, frames) = (2, 5);
        let x = randn(&mut rng, (n, frames, 3));
        let ctx = randn(&mut rng, (n, frames, 3));
        let ids: Vec<u32> = vec![0, 1, 2, 3, 4, 2, 0, 4, 1, 3];
        let phones = Tensor::from_vec(ids.clone(), (n, frames), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.3f64, 0.9], &Device::Cpu).unwrap();
        let lengths = vec![5, 3];
        let cond = SequenceCondition {
            context: Some(ctx.clone()),
            phones: Some(phones),
            lengths: Some(lengths.clone()),
        };
        let out = m.forward_seq(&x, &t, &cond).unwrap();
        let r = Reference(&m);
        for (s, &len) in lengths.iter().enumerate() {
            let ph: Vec<usize> = ids[s * frames..s * frames + len]
                .iter()
                .map(|&p| p as usize)
                .collect();
            let want = r.forward(&rows(&x, s, len), &rows(&ctx, s, len), &ph, [0.3, 0.9][s]);
            let got = rows(&out, s, frames);
            for j in 0..frames {
                for c in 0..3 {
                    let w = if j < len { want[j][c] } else { 0.0 };
                    assert!(
                        (got[j][c] - w).abs() < 1e-10,
                        "seq {s} frame {j}: {} vs {w}",
                        got[j][c]
                    );
                }
            }
        }
    }

    #[test]
    fn parameter_count_is_exact() {
        for (depth, skips) in [(1, true), (3, true), (4, true), (4, false)] {
            let cfg = TransformerConfig {
                depth,
                skips,
                ..tiny()
            };
            let (_, p) = build(cfg, DType::F32);
            assert_eq!(
                p.count() as u128,
                cfg.params(),
                "depth {depth} skips {skips}"
            );
        }
        let mut huge = tiny();
        huge.width = usize::MAX;
        assert!(huge.validate().is_err());
        let mut odd = tiny();
        odd.heads = 3;
        assert!(odd.validate().unwrap_err().to_string().contains("heads"));
    }

    /// Autograd through attention, LayerNorm, GELU, the skips and the embeddings matches central
    /// finite differences in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let (m, p) = build(tiny(), DType::F64);
        let mut rng = Rng::new(5);
        let x = randn(&mut rng, (2, 4, 3));
        let r = randn(&mut rng, (2, 4, 3));
        let t = Tensor::new(&[0.2f64, 0.7], &Device::Cpu).unwrap();
        let cond = SequenceCondition {
            context: Some(randn(&mut rng, (2, 4, 3))),
            phones: Some(Tensor::new(&[[0u32, 1, 2, 3], [4, 4, 1, 0]], &Device::Cpu).unwrap()),
            lengths: Some(vec![4, 2]),
        };
        let loss = || -> Tensor {
            let out = m.forward_seq(&x, &t, &cond).unwrap();
            (out * &r).unwrap().sum_all().unwrap()
        };
        let checked = crate::testing::check_gradients(&p, loss, |_| true, 1e-6);
        assert_eq!(checked, p.len());
    }

    #[test]
    fn bad_inputs_are_refused() {
        let (m, _) = build(tiny(), DType::F32);
        let x = Tensor::zeros((2, 4, 3), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let none = SequenceCondition::default();
        assert!(m.forward_seq(&x, &t, &none).is_ok());
        let wide = Tensor::zeros((2, 4, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(m.forward_seq(&wide, &t, &none).is_err());
        let long = Tensor::zeros((1, 17, 3), DType::F32, &Device::Cpu).unwrap();
        let t1 = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        assert!(m
            .forward_seq(&long, &t1, &none)
            .unwrap_err()
            .to_string()
            .contains("frames"));
        let phones = Tensor::full(5u32, (2, 4), &Device::Cpu).unwrap();
        let bad = SequenceCondition {
            phones: Some(phones),
            ..Default::default()
        };
        assert!(m
            .forward_seq(&x, &t, &bad)
            .unwrap_err()
            .to_string()
            .contains("vocabulary"));
        let lengths = SequenceCondition {
            lengths: Some(vec![4, 0]),
            ..Default::default()
        };
        assert!(m.forward_seq(&x, &t, &lengths).is_err());
    }
}
