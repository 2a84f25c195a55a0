//! A fused CPU engine for the MLP: forward, backward and AdamW on flat f32 buffers.
//!
//! candle evaluates the MLP op by op, allocating every intermediate and walking an autograd graph; on a
//! CPU that overhead, not the matrix products, dominated our training step. This engine computes the same
//! function and the same gradients with one matrix product per layer and direction (the `gemm` crate,
//! AVX-512 where available), bias and activation fused into one pass over each activation, buffers reused
//! across steps, and AdamW, clipping and EMA as single loops over one flat parameter vector.
//!
//! Layout: row-major; layer l maps (B x fan_in) to (B x fan_out) with W_l (fan_out x fan_in) as in PyTorch.
//! Forward: z_l = h_{l-1} W_l^T + b_l, h_l = act(z_l). Backward with g_l = dL/dz_l:
//! dW_l = g_l^T h_{l-1}, db_l = sum_rows g_l, dL/dh_{l-1} = g_l W_l, g_{l-1} = dL/dh_{l-1} * act'(z_{l-1}).
//! SiLU keeps s = sigmoid(z) from the forward pass: silu'(z) = s + h (1 - s). SELU needs only h.
//!
//! [`MlpEngine`] trains; [`FastMlp`] is a frozen copy for inference (sampling, likelihoods): it keeps the
//! weights transposed in the layout the matrix kernel reads, and pushes forward-mode tangents through the
//! same product as the values (the rows [h; u_1; ...; u_k] times W^T), for exact divergences.

use candle_core::Tensor;
use gemm::Parallelism;
use rayon::prelude::*;

use super::mlp::{Activation, MlpConfig, TimeEmbedding};
use crate::cpu::linalg::{exp_f32, host, matmul_in, multiversion, View};
use crate::field::VelocityField;
use crate::params::Params;
use crate::precision::Precision;

const SELU_LAMBDA: f32 = 1.050_701;
const SELU_ALPHA: f32 = 1.673_263_2;

/// Rows per block in inference: activations of a block stay in cache and allocations small.
const INFER_ROWS: usize = 4096;
/// Rows per block when threads run whole blocks each (see [`FastMlp::predict_jvp`]).
const PAR_ROWS: usize = 1024;

thread_local! {
    /// Per-thread activation buffers of inference blocks (two layer buffers and act'(z)), kept across calls.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Elementwise work below this many values runs on one thread.
const PAR_MIN: usize = 1 << 15;

#[derive(Debug, Clone, Copy)]
struct Layer {
    fan_in: usize,
    fan_out: usize,
    /// Offsets of the weight and bias in the flat parameter vector.
    w: usize,
    b: usize,
}

/// Flat parameters, gradients, optimizer moments and reusable activation buffers of one MLP.
#[derive(Debug, Clone)]
pub struct MlpEngine {
    cfg: MlpConfig,
    layers: Vec<Layer>,
    /// Parameters in [`Params`] order: layers.0.weight, layers.0.bias, layers.1.weight, ...
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    freqs: Vec<f32>,
    /// Inputs of each layer (h_0 = [x, time features], h_1, ...), for the batch of the last forward.
    inputs: Vec<Vec<f32>>,
    /// sigmoid(z) of each hidden layer (SiLU only).
    sig: Vec<Vec<f32>>,
    out: Vec<f32>,
    grad_a: Vec<f32>,
    grad_b: Vec<f32>,
    batch: usize,
    threads: usize,
    /// The matrix products' arithmetic (resolved for this CPU).
    precision: Precision,
}

impl MlpEngine {
    /// An engine holding a copy of `params` (which must belong to an MLP of config `cfg`).
    pub fn new(cfg: MlpConfig, params: &Params) -> crate::Result<Self> {
        let mut e = Self::empty(cfg);
        e.load(params)?;
        Ok(e)
    }

    /// An engine with zero parameters, laid out for `cfg`.
    fn empty(cfg: MlpConfig) -> Self {
        let tf = match cfg.time_embedding {
            TimeEmbedding::Input => 1,
            TimeEmbedding::Sinusoidal { dim } => dim,
        };
        let mut layers = vec![];
        let mut fan_in = cfg.dim + tf;
        let mut off = 0;
        for l in 0..=cfg.depth {
            let fan_out = if l == cfg.depth { cfg.dim } else { cfg.hidden };
            layers.push(Layer {
                fan_in,
                fan_out,
                w: off,
                b: off + fan_in * fan_out,
            });
            off += fan_in * fan_out + fan_out;
            fan_in = fan_out;
        }
        let freqs = match cfg.time_embedding {
            TimeEmbedding::Input => vec![],
            TimeEmbedding::Sinusoidal { dim } => {
                let half = dim / 2;
                (0..half)
                    .map(|k| 1000.0 * (-(10000f64.ln()) * k as f64 / half as f64).exp() as f32)
                    .collect()
            }
        };
        Self {
            cfg,
            layers,
            params: vec![0.0; off],
            grads: vec![0.0; off],
            freqs,
            inputs: vec![],
            sig: vec![],
            out: vec![],
            grad_a: vec![],
            grad_b: vec![],
            batch: 0,
            threads: rayon::current_num_threads(),
            precision: Precision::F32,
        }
    }

    /// Runs the matrix products in `precision` where this CPU has the units for it (f32 otherwise);
    /// returns the precision in force.
    pub fn set_precision(&mut self, precision: Precision) -> Precision {
        self.precision = precision.on_this_cpu();
        self.precision
    }

    /// The matrix products' arithmetic.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Copies the values of `params` into the flat vector.
    pub fn load(&mut self, params: &Params) -> crate::Result<()> {
        self.load_tensors(params.iter().map(|(n, v)| (n, v.as_tensor())))
    }

    /// Copies named tensors (in [`Params`] order) into the flat vector.
    pub fn load_tensors<'a>(
        &mut self,
        tensors: impl Iterator<Item = (&'a str, &'a Tensor)>,
    ) -> crate::Result<()> {
        let mut off = 0;
        for (name, tensor) in tensors {
            let v: Vec<f32> = tensor
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?;
            if off + v.len() > self.params.len() {
                return Err(crate::Error::Config(format!(
                    "parameter {name} does not fit the MLP engine"
                )));
            }
            self.params[off..off + v.len()].copy_from_slice(&v);
            off += v.len();
        }
        if off != self.params.len() {
            return Err(crate::Error::Config(
                "the parameters do not match the MLP engine's layout".into(),
            ));
        }
        Ok(())
    }

    /// Writes the flat values back into `params` (same order and shapes).
    pub fn store(&self, values: &[f32], params: &Params) -> crate::Result<()> {
        let mut off = 0;
        for (_, var) in params.iter() {
            let n = var.elem_count();
            let t =
                candle_core::Tensor::from_slice(&values[off..off + n], var.shape(), var.device())?;
            var.set(&t.to_dtype(var.dtype())?)?;
            off += n;
        }
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    fn ensure(&mut self, batch: usize) {
        if self.batch == batch && !self.inputs.is_empty() {
            return;
        }
        self.batch = batch;
        self.inputs = self
            .layers
            .iter()
            .map(|l| vec![0.0; batch * l.fan_in])
            .collect();
        let hidden = self.cfg.depth;
        self.sig = match self.cfg.activation {
            Activation::Silu => (0..hidden)
                .map(|_| vec![0.0; batch * self.cfg.hidden])
                .collect(),
            Activation::Selu => vec![],
        };
        self.out = vec![0.0; batch * self.cfg.dim];
        let widest = self
            .layers
            .iter()
            .map(|l| l.fan_in.max(l.fan_out))
            .max()
            .unwrap_or(0);
        self.grad_a = vec![0.0; batch * widest];
        self.grad_b = vec![0.0; batch * widest];
    }

    /// Writes [x, time features] rows into `dst` (B x fan_in of the first layer).
    fn first_input(&self, x: &[f32], t: &[f32], dst: &mut [f32]) {
        let d = self.cfg.dim;
        let fi = self.layers[0].fan_in;
        for (i, row) in dst.chunks_exact_mut(fi).enumerate() {
            row[..d].copy_from_slice(&x[i * d..(i + 1) * d]);
            if self.freqs.is_empty() {
                row[d] = t[i];
            } else {
                let half = self.freqs.len();
                for (k, f) in self.freqs.iter().enumerate() {
                    let a = t[i] * f;
                    row[d + k] = a.sin();
                    row[d + half + k] = a.cos();
                }
            }
        }
    }

    fn par(&self, work: usize) -> Parallelism {
        if self.threads > 1 && work >= 1 << 22 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        }
    }

    /// z = h W^T + b for layer `l` into `dst` (B x fan_out).
    fn linear(&self, l: usize, h: &[f32], dst: &mut [f32], batch: usize) {
        let Layer {
            fan_in,
            fan_out,
            w,
            b,
        } = self.layers[l];
        let bias = &self.params[b..b + fan_out];
        for row in dst.chunks_exact_mut(fan_out) {
            row.copy_from_slice(bias);
        }
        let weights = &self.params[w..w + fan_in * fan_out];
        matmul_in(
            self.precision,
            dst,
            (batch, fan_out, fan_in),
            true,
            View::rows(h, fan_in),
            View::transposed(weights, fan_in),
            self.par(batch * fan_in * fan_out),
        );
    }

    /// Forward pass for training: keeps what the backward pass needs. Returns the output (B x dim).
    pub fn forward_train(&mut self, x: &[f32], t: &[f32]) -> &[f32] {
        let batch = t.len();
        self.ensure(batch);
        let mut inputs = std::mem::take(&mut self.inputs);
        let mut sig = std::mem::take(&mut self.sig);
        self.first_input(x, t, &mut inputs[0]);
        let last = self.layers.len() - 1;
        for l in 0..last {
            let (head, tail) = inputs.split_at_mut(l + 1);
            self.linear(l, &head[l], &mut tail[0], batch);
            match self.cfg.activation {
                Activation::Silu => silu_forward(&mut tail[0], &mut sig[l]),
                Activation::Selu => selu_forward(&mut tail[0]),
            }
        }
        let mut out = std::mem::take(&mut self.out);
        self.linear(last, &inputs[last], &mut out, batch);
        self.inputs = inputs;
        self.sig = sig;
        self.out = out;
        &self.out
    }

    /// Mean squared error of the last forward's output against `target`, each row weighted by `weights`
    /// if given (loss = mean_i w_i mean_j r_ij^2), and its gradient with respect to every parameter (into
    /// [`MlpEngine::grads`]). Returns the loss (accumulated in f64).
    pub fn mse_backward(&mut self, target: &[f32], weights: Option<&[f32]>) -> f64 {
        let batch = self.batch;
        let d = self.cfg.dim;
        let n = (batch * d) as f32;
        let mut loss = 0.0f64;
        let mut g = std::mem::take(&mut self.grad_a);
        let mut gp = std::mem::take(&mut self.grad_b);
        for (i, ((gi, &o), &y)) in g[..batch * d]
            .iter_mut()
            .zip(&self.out)
            .zip(target)
            .enumerate()
        {
            let w = weights.map_or(1.0, |w| w[i / d]);
            let r = o - y;
            loss += w as f64 * (r as f64) * (r as f64);
            *gi = 2.0 * w * r / n;
        }
        for l in (0..self.layers.len()).rev() {
            let Layer {
                fan_in,
                fan_out,
                w,
                b,
            } = self.layers[l];
            let h = &self.inputs[l];
            let gl = &g[..batch * fan_out];
            // db = column sums of g
            let db = &mut self.grads[b..b + fan_out];
            db.iter_mut().for_each(|v| *v = 0.0);
            for row in gl.chunks_exact(fan_out) {
                for (a, &v) in db.iter_mut().zip(row) {
                    *a += v;
                }
            }
            let par = self.par(batch * fan_in * fan_out);
            // dW (fan_out x fan_in) = g^T (fan_out x B) h (B x fan_in)
            let dw = &mut self.grads[w..w + fan_in * fan_out];
            matmul_in(
                self.precision,
                dw,
                (fan_out, fan_in, batch),
                false,
                View::transposed(gl, fan_out),
                View::rows(h, fan_in),
                par,
            );
            if l == 0 {
                break;
            }
            // dL/dh_{l-1} (B x fan_in) = g (B x fan_out) W (fan_out x fan_in)
            let weights = &self.params[w..w + fan_in * fan_out];
            matmul_in(
                self.precision,
                &mut gp,
                (batch, fan_in, fan_out),
                false,
                View::rows(gl, fan_out),
                View::rows(weights, fan_in),
                par,
            );
            let gprev = &mut gp[..batch * fan_in];
            match self.cfg.activation {
                Activation::Silu => silu_backward(gprev, &self.inputs[l], &self.sig[l - 1]),
                Activation::Selu => selu_backward(gprev, &self.inputs[l]),
            }
            std::mem::swap(&mut g, &mut gp);
        }
        self.grad_a = g;
        self.grad_b = gp;
        loss / n as f64
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        self.grads
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt()
    }

    /// PyTorch's clip_grad_norm_: scales the gradients to norm at most `max_norm`; returns the norm before.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        let scale = max_norm / (norm + 1e-6);
        if scale < 1.0 {
            let s = scale as f32;
            self.grads.iter_mut().for_each(|g| *g *= s);
        }
        norm
    }
}

/// A frozen MLP evaluated by the fused engine: what sampling and likelihoods use on the CPU.
#[derive(Debug, Clone)]
pub struct FastMlp {
    engine: MlpEngine,
    /// W_l^T of every layer (fan_in x fan_out, row-major) at the weight's offset in the flat vector: the
    /// layout the matrix kernel reads without repacking the weights on every call.
    weights_t: Vec<f32>,
}

impl FastMlp {
    /// Runs the products in `precision` where this CPU can (see [`MlpEngine::set_precision`]).
    pub fn set_precision(&mut self, precision: Precision) -> Precision {
        self.engine.set_precision(precision)
    }

    /// The precision in force.
    pub fn precision(&self) -> Precision {
        self.engine.precision()
    }

    /// From tensors in [`Params`] order (layers.0.weight, layers.0.bias, ...).
    pub fn from_tensors(cfg: MlpConfig, tensors: &[Tensor]) -> crate::Result<Self> {
        let mut engine = MlpEngine::empty(cfg);
        engine.load_tensors(tensors.iter().map(|t| ("mlp parameter", t)))?;
        Ok(Self::freeze(engine))
    }

    /// Freezes the engine's current parameters for inference.
    pub fn freeze(engine: MlpEngine) -> Self {
        let mut weights_t = vec![0.0; engine.params.len()];
        for l in &engine.layers {
            let w = &engine.params[l.w..l.w + l.fan_in * l.fan_out];
            let wt = &mut weights_t[l.w..l.w + l.fan_in * l.fan_out];
            for (o, row) in w.chunks_exact(l.fan_in).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    wt[i * l.fan_out + o] = v;
                }
            }
        }
        Self { engine, weights_t }
    }

    /// v(x, t) without keeping activations (inference): [`FastMlp::predict_jvp`] with no tangents.
    pub fn predict(&self, x: &[f32], t: &[f32]) -> Vec<f32> {
        self.predict_jvp(x, t, &[]).0
    }

    /// v(x, t) and the Jacobian-vector products J v(x, t) u_k for tangents `u_k` (each B x dim; time is
    /// held fixed), by forward-mode differentiation: u_0 = [u, 0], dz_l = u_{l-1} W_l^T,
    /// u_l = act'(z_l) * dz_l.
    ///
    /// Rows go in blocks so that activations stay small. With several threads and enough rows, each
    /// thread runs whole blocks of `PAR_ROWS` (1,024) rows on its own (single-threaded matrix products and
    /// activations), so its activations stay in its cache and no layer waits for the others; otherwise
    /// blocks of `INFER_ROWS` (4,096) rows run one after another with threaded products.
    pub fn predict_jvp(
        &self,
        x: &[f32],
        t: &[f32],
        tangents: &[Vec<f32>],
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let d = self.engine.cfg.dim;
        let parallel = self.engine.threads > 1 && t.len() >= 2 * PAR_ROWS;
        let rows = if parallel { PAR_ROWS } else { INFER_ROWS };
        let block = |b: usize| {
            let r = b * rows..((b + 1) * rows).min(t.len());
            let span = r.start * d..r.end * d;
            let tans: Vec<&[f32]> = tangents.iter().map(|u| &u[span.clone()]).collect();
            self.predict_jvp_block(&x[span], &t[r], &tans, parallel)
        };
        let n = t.len().div_ceil(rows);
        let blocks: Vec<(Vec<f32>, Vec<Vec<f32>>)> = if parallel {
            (0..n).into_par_iter().map(block).collect()
        } else {
            (0..n).map(block).collect()
        };
        let mut out = Vec::with_capacity(x.len());
        let mut jv = vec![Vec::with_capacity(x.len()); tangents.len()];
        for (o, js) in blocks {
            out.extend(o);
            for (acc, j) in jv.iter_mut().zip(js) {
                acc.extend(j);
            }
        }
        (out, jv)
    }

    /// One block of rows: v(x, t) and the tangents' JVPs (none for plain inference).
    ///
    /// The primal rows and the k tangents' rows are stacked into one ((1 + k) B x fan_in) matrix, so each
    /// layer is one matrix product: z = [h; u_1; ...; u_k] W^T. One pass per row then adds the bias,
    /// applies the activation and scales the tangents' rows by act'(z). Buffers come from a per-thread
    /// scratch kept across calls, so nothing is zeroed or freshly paged in.
    fn predict_jvp_block(
        &self,
        x: &[f32],
        t: &[f32],
        tangents: &[&[f32]],
        serial: bool,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let batch = t.len();
        let k = tangents.len();
        let d = self.engine.cfg.dim;
        let fi = self.engine.layers[0].fan_in;
        let stacked = (1 + k) * batch;
        let widest = self
            .engine
            .layers
            .iter()
            .map(|l| l.fan_in.max(l.fan_out))
            .max()
            .unwrap_or(0);
        // Taken out of the thread-local (not borrowed), so a nested call on this thread gets its own.
        let [mut cur, mut next, mut deriv] = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        for buf in [&mut cur, &mut next] {
            if buf.len() < stacked * widest {
                buf.resize(stacked * widest, 0.0);
            }
        }
        if deriv.len() < widest {
            deriv.resize(widest, 0.0);
        }
        self.engine.first_input(x, t, &mut cur[..batch * fi]);
        for (j, tan) in tangents.iter().enumerate() {
            let rows = cur[(1 + j) * batch * fi..(2 + j) * batch * fi].chunks_exact_mut(fi);
            for (row, u) in rows.zip(tan.chunks_exact(d)) {
                row[..d].copy_from_slice(u);
                row[d..].fill(0.0);
            }
        }
        for (l, layer) in self.engine.layers.iter().enumerate() {
            let (fan_in, fan_out) = (layer.fan_in, layer.fan_out);
            let par = if serial {
                Parallelism::None
            } else {
                self.engine.par(stacked * fan_in * fan_out)
            };
            let z = &mut next[..stacked * fan_out];
            matmul_in(
                self.engine.precision,
                z,
                (stacked, fan_out, fan_in),
                false,
                View::rows(&cur[..stacked * fan_in], fan_in),
                View::rows(
                    &self.weights_t[layer.w..layer.w + fan_in * fan_out],
                    fan_out,
                ),
                par,
            );
            let bias = &self.engine.params[layer.b..layer.b + fan_out];
            let (primal, tans) = z.split_at_mut(batch * fan_out);
            if l + 1 == self.engine.layers.len() {
                add_bias(primal, bias);
            } else {
                let act = self.engine.cfg.activation;
                act_jvp_rows(act, primal, tans, bias, &mut deriv[..fan_out]);
            }
            std::mem::swap(&mut cur, &mut next);
        }
        let out = cur[..batch * d].to_vec();
        let jv = cur[batch * d..stacked * d]
            .chunks_exact(batch * d)
            .map(<[f32]>::to_vec)
            .collect();
        SCRATCH.with(|s| *s.borrow_mut() = [cur, next, deriv]);
        (out, jv)
    }
}

impl VelocityField for FastMlp {
    fn forward(&self, x: &Tensor, t: &Tensor) -> crate::Result<Tensor> {
        let out = self.predict(&host(x)?, &host(t)?);
        Ok(Tensor::from_vec(out, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }

    fn jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        tangents: &[Tensor],
    ) -> crate::Result<Option<(Tensor, Vec<Tensor>)>> {
        let u = tangents
            .iter()
            .map(host::<f32>)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (out, jv) = self.predict_jvp(&host(x)?, &host(t)?, &u);
        let back = |v: Vec<f32>| -> crate::Result<Tensor> {
            Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
        };
        Ok(Some((
            back(out)?,
            jv.into_iter()
                .map(back)
                .collect::<crate::Result<Vec<_>>>()?,
        )))
    }
}

multiversion! {
    /// h = z sigmoid(z) in place; keeps s = sigmoid(z).
    fn silu_chunk(z: &mut [f32], s: &mut [f32]) {
        for (zi, si) in z.iter_mut().zip(s.iter_mut()) {
            let sg = 1.0 / (1.0 + exp_f32(-*zi));
            *si = sg;
            *zi *= sg;
        }
    }
}

multiversion! {
    /// g <- g (s + h (1 - s)): the SiLU derivative from the kept sigmoid and output.
    fn silu_back_chunk(g: &mut [f32], h: &[f32], s: &[f32]) {
        for ((gi, &hi), &si) in g.iter_mut().zip(h).zip(s) {
            *gi *= si + hi * (1.0 - si);
        }
    }
}

multiversion! {
    /// SELU in place.
    fn selu_chunk(z: &mut [f32]) {
        for zi in z.iter_mut() {
            let neg = SELU_LAMBDA * SELU_ALPHA * (exp_f32(zi.min(0.0)) - 1.0);
            *zi = if *zi > 0.0 { SELU_LAMBDA * *zi } else { neg };
        }
    }
}

multiversion! {
    /// g <- g selu'(z), from h = selu(z): lambda where h > 0, h + lambda alpha elsewhere.
    fn selu_back_chunk(g: &mut [f32], h: &[f32]) {
        for (gi, &hi) in g.iter_mut().zip(h) {
            *gi *= if hi > 0.0 { SELU_LAMBDA } else { hi + SELU_LAMBDA * SELU_ALPHA };
        }
    }
}

multiversion! {
    /// Bias, activation and forward-mode tangents of one hidden layer, row by row: z_r <- act(z_r + b)
    /// for each primal row r, and row r of every tangent (tangent j is `tans[j * z.len()..]`, laid out
    /// like z) scaled by act'(z_r + b), kept for the row in `d` (fan_out values, so it stays in L1).
    fn act_jvp_rows(act: Activation, z: &mut [f32], tans: &mut [f32], bias: &[f32], d: &mut [f32]) {
        let n = bias.len();
        let stride = z.len();
        for (r, zr) in z.chunks_exact_mut(n).enumerate() {
            let cells = zr.iter_mut().zip(d.iter_mut()).zip(bias);
            match act {
                Activation::Silu => cells.for_each(|((zi, di), &b)| {
                    let x = *zi + b;
                    let s = 1.0 / (1.0 + exp_f32(-x));
                    let h = x * s;
                    *zi = h;
                    *di = s + h * (1.0 - s);
                }),
                Activation::Selu => cells.for_each(|((zi, di), &b)| {
                    let x = *zi + b;
                    let e = exp_f32(x.min(0.0));
                    *zi = if x > 0.0 { SELU_LAMBDA * x } else { SELU_LAMBDA * SELU_ALPHA * (e - 1.0) };
                    *di = if x > 0.0 { SELU_LAMBDA } else { SELU_LAMBDA * SELU_ALPHA * e };
                }),
            }
            for tan in tans.chunks_exact_mut(stride) {
                let tr = &mut tan[r * n..(r + 1) * n];
                tr.iter_mut().zip(&*d).for_each(|(u, &g)| *u *= g);
            }
        }
    }
}

multiversion! {
    /// Per row: z <- z + b.
    fn add_bias(z: &mut [f32], bias: &[f32]) {
        for zr in z.chunks_exact_mut(bias.len()) {
            zr.iter_mut().zip(bias).for_each(|(zi, &b)| *zi += b);
        }
    }
}

const CHUNK: usize = 1 << 13;

fn silu_forward(z: &mut [f32], s: &mut [f32]) {
    let s = &mut s[..z.len()];
    if z.len() >= PAR_MIN {
        z.par_chunks_mut(CHUNK)
            .zip(s.par_chunks_mut(CHUNK))
            .for_each(|(z, s)| silu_chunk(z, s));
    } else {
        silu_chunk(z, s);
    }
}

fn silu_backward(g: &mut [f32], h: &[f32], s: &[f32]) {
    if g.len() >= PAR_MIN {
        g.par_chunks_mut(CHUNK)
            .zip(h.par_chunks(CHUNK))
            .zip(s.par_chunks(CHUNK))
            .for_each(|((g, h), s)| silu_back_chunk(g, h, s));
    } else {
        silu_back_chunk(g, h, s);
    }
}

fn selu_forward(z: &mut [f32]) {
    if z.len() >= PAR_MIN {
        z.par_chunks_mut(CHUNK).for_each(selu_chunk);
    } else {
        selu_chunk(z);
    }
}

fn selu_backward(g: &mut [f32], h: &[f32]) {
    if g.len() >= PAR_MIN {
        g.par_chunks_mut(CHUNK)
            .zip(h.par_chunks(CHUNK))
            .for_each(|(g, h)| selu_back_chunk(g, h));
    } else {
        selu_back_chunk(g, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ModelConfig;
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    /// Jacobian-vector products against central differences of the forward pass.
    #[test]
    fn jvp_matches_finite_differences() {
        for act in [Activation::Silu, Activation::Selu] {
            let cfg = MlpConfig {
                dim: 2,
                hidden: 16,
                depth: 2,
                time_embedding: TimeEmbedding::Input,
                activation: act,
            };
            let (_, params) = ModelConfig::Mlp(cfg)
                .build(&mut Rng::new(2), &Device::Cpu, DType::F32)
                .unwrap();
            let e = FastMlp::freeze(MlpEngine::new(cfg, &params).unwrap());
            let mut rng = Rng::new(3);
            let (x, u) = (rng.normal_vec(10), rng.normal_vec(10));
            let t = vec![0.3f32; 5];
            let (out, jv) = e.predict_jvp(&x, &t, std::slice::from_ref(&u));
            assert_eq!(out, e.predict(&x, &t));
            let h = 1e-3f32;
            let shifted = |sgn: f32| -> Vec<f32> {
                let xs: Vec<f32> = x.iter().zip(&u).map(|(a, b)| a + sgn * h * b).collect();
                e.predict(&xs, &t)
            };
            let (p, m) = (shifted(1.0), shifted(-1.0));
            for i in 0..10 {
                let fd = (p[i] - m[i]) / (2.0 * h);
                assert!(
                    (fd - jv[0][i]).abs() < 5e-3 * (1.0 + fd.abs()),
                    "{act:?}[{i}]: {} vs {fd}",
                    jv[0][i]
                );
            }
        }
    }

    /// Output and every gradient against candle's autograd on the same MLP and batch.
    #[test]
    fn matches_candle_autograd() {
        for (act, te) in [
            (Activation::Silu, TimeEmbedding::Input),
            (Activation::Selu, TimeEmbedding::Input),
            (Activation::Silu, TimeEmbedding::Sinusoidal { dim: 8 }),
        ] {
            let cfg = MlpConfig {
                dim: 3,
                hidden: 24,
                depth: 3,
                time_embedding: te,
                activation: act,
            };
            let (model, params) = ModelConfig::Mlp(cfg)
                .build(&mut Rng::new(4), &Device::Cpu, DType::F32)
                .unwrap();
            let mut rng = Rng::new(9);
            let b = 37;
            let x = rng.normal_vec(b * 3);
            let t: Vec<f32> = rng.uniform_vec(b).into_iter().map(|v| v as f32).collect();
            let y = rng.normal_vec(b * 3);
            let xt = Tensor::from_vec(x.clone(), (b, 3), &Device::Cpu).unwrap();
            let tt = Tensor::from_vec(t.clone(), b, &Device::Cpu).unwrap();
            let yt = Tensor::from_vec(y.clone(), (b, 3), &Device::Cpu).unwrap();
            let out = model.forward(&xt, &tt).unwrap();
            let loss = (&out - &yt).unwrap().sqr().unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();

            let mut e = MlpEngine::new(cfg, &params).unwrap();
            let fast_out = e.forward_train(&x, &t).to_vec();
            let fast_loss = e.mse_backward(&y, None);
            let ref_out: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
            for (a, r) in fast_out.iter().zip(&ref_out) {
                assert!((a - r).abs() < 1e-5, "{act:?}: output {a} vs {r}");
            }
            assert!((fast_loss - loss.to_scalar::<f32>().unwrap() as f64).abs() < 1e-5);
            let frozen = FastMlp::freeze(e.clone()).predict(&x, &t);
            for (a, r) in frozen.iter().zip(&fast_out) {
                assert!(
                    (a - r).abs() < 1e-5,
                    "{act:?}: inference {a} vs training {r}"
                );
            }
            let mut off = 0;
            for (name, var) in params.iter() {
                let g: Vec<f32> = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, r) in g.iter().enumerate() {
                    let a = e.grads[off + i];
                    assert!(
                        (a - r).abs() < 1e-5 + 1e-4 * r.abs(),
                        "{act:?} {name}[{i}]: {a} vs {r}"
                    );
                }
                off += g.len();
            }
        }
    }

    /// bf16 products: outputs, gradients and inference within bf16 rounding of the f32 engine's
    /// (relative RMS error about 2^-9 per product, a few times that through the layers), and not equal
    /// to them (the products did run in bf16).
    #[test]
    fn bf16_engine_stays_within_rounding_of_f32() {
        let cfg = MlpConfig::silu(2, 64, 3);
        let (_, params) = ModelConfig::Mlp(cfg)
            .build(&mut Rng::new(4), &Device::Cpu, DType::F32)
            .unwrap();
        let mut rng = Rng::new(9);
        let b = 300;
        let x = rng.normal_vec(b * 2);
        let t: Vec<f32> = rng.uniform_vec(b).into_iter().map(|v| v as f32).collect();
        let y = rng.normal_vec(b * 2);
        let mut f = MlpEngine::new(cfg, &params).unwrap();
        let mut h = f.clone();
        if h.set_precision(Precision::Bf16) != Precision::Bf16 {
            eprintln!("no AVX-512 BF16 on this CPU: bf16 runs f32");
            assert_eq!(h.precision(), Precision::F32);
            return;
        }
        let rel = |a: &[f32], r: &[f32]| {
            let e: f64 = a.iter().zip(r).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
            let n: f64 = r.iter().map(|q| (*q as f64).powi(2)).sum();
            (e / n).sqrt()
        };
        let out_f = f.forward_train(&x, &t).to_vec();
        let out_h = h.forward_train(&x, &t).to_vec();
        f.mse_backward(&y, None);
        h.mse_backward(&y, None);
        let (eo, eg) = (rel(&out_h, &out_f), rel(&h.grads, &f.grads));
        assert!(eo > 1e-5 && eo < 2e-2, "output error {eo}");
        assert!(eg > 1e-5 && eg < 3e-2, "gradient error {eg}");
        let pf = FastMlp::freeze(f).predict(&x, &t);
        let ph = FastMlp::freeze(h).predict(&x, &t);
        assert!(
            rel(&ph, &out_h) < 1e-5,
            "bf16 inference repeats bf16 training's forward"
        );
        assert!(rel(&ph, &pf) > 1e-5);
    }

    /// Threads running whole blocks give the same values and tangents as one threaded pass.
    #[test]
    fn block_parallel_inference_matches() {
        let cfg = MlpConfig {
            dim: 2,
            hidden: 32,
            depth: 3,
            time_embedding: TimeEmbedding::Input,
            activation: Activation::Silu,
        };
        let (_, params) = ModelConfig::Mlp(cfg)
            .build(&mut Rng::new(4), &Device::Cpu, DType::F32)
            .unwrap();
        let mut engine = MlpEngine::new(cfg, &params).unwrap();
        engine.threads = 2;
        let e = FastMlp::freeze(engine);
        let n = 2 * PAR_ROWS + 37;
        let mut rng = Rng::new(5);
        let (x, u) = (rng.normal_vec(2 * n), rng.normal_vec(2 * n));
        let t: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
        let (out, jv) = e.predict_jvp(&x, &t, std::slice::from_ref(&u));
        let (want, want_jv) = e.predict_jvp_block(&x, &t, &[&u], false);
        let close = |a: &[f32], b: &[f32]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs()))
        };
        assert!(close(&out, &want) && close(&jv[0], &want_jv[0]));
        assert!(close(&e.predict(&x, &t), &want));
    }
}
