//! Named weights and the layers built from them (dense, convolution, GroupNorm), shared by the U-Net
//! and the evaluation classifier.
//!
//! A [`Builder`] registers each parameter in the run's [`Params`] (fixed order, stable names) and keeps
//! a tensor sharing its storage, so optimizer updates are seen by the forward pass; [`Weights::frozen`]
//! makes a copy that records no parameter gradients.

use std::collections::HashMap;

use candle_core::{Tensor, D};

use crate::cpu;
use crate::error::{Error, Result};
use crate::params::{Init, Params};
use crate::precision::Precision;

/// Weights by name, with the layer operations that use them.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    map: HashMap<String, Tensor>,
    /// The arithmetic of the CPU convolutions' matrix products (resolved for this CPU).
    precision: Precision,
}

impl Weights {
    fn new(map: HashMap<String, Tensor>) -> Self {
        Self {
            map,
            precision: Precision::F32,
        }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.map
            .get(name)
            .ok_or_else(|| Error::Config(format!("weight '{name}' is missing")))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The same weights as constants.
    pub fn frozen(&self) -> Self {
        Self {
            map: self
                .map
                .iter()
                .map(|(k, v)| (k.clone(), v.detach()))
                .collect(),
            precision: self.precision,
        }
    }

    /// Runs the CPU convolutions' matrix products (forward and backward) in `precision` where this
    /// CPU has the units for it; returns the precision in force. Element-wise work, GroupNorm and the
    /// dense layers stay f32.
    pub fn set_precision(&mut self, precision: Precision) -> Precision {
        self.precision = precision.on_this_cpu();
        self.precision
    }

    /// The precision in force (see [`Weights::set_precision`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// y = x W^T + b over the last dimension.
    pub fn linear(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        let b = self.get(&format!("{name}.bias"))?;
        Ok(x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?)
    }

    /// A k x k convolution (k odd) with "same" padding and stride 1 or 2, plus bias, on (N, C, H, W),
    /// computed as [`conv_impl`] says for the input's device (see [`conv2d`]).
    pub fn conv(&self, name: &str, x: &Tensor, stride: usize) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        let b = self.get(&format!("{name}.bias"))?;
        conv2d_in(conv_impl(x.device()), x, w, b, stride, self.precision)
    }

    /// [`Weights::conv`] plus `extra` (N, C_out): a value per image and channel added to every pixel (the
    /// U-Net's time embedding). On the CPU it joins the convolution's bias, so no broadcast add is left
    /// for autograd (whose backward would be a reduction over the whole activation).
    pub fn conv_plus(
        &self,
        name: &str,
        x: &Tensor,
        stride: usize,
        extra: &Tensor,
    ) -> Result<Tensor> {
        let imp = conv_impl(x.device());
        if imp == ConvImpl::Cpu && cpu::supports(x) {
            let w = self.get(&format!("{name}.weight"))?;
            let b = self.get(&format!("{name}.bias"))?;
            let bias = b.unsqueeze(0)?.broadcast_add(extra)?;
            return cpu::conv::conv2d(x, w, &bias, stride, self.precision);
        }
        let (n, c) = extra.dims2()?;
        Ok(self
            .conv(name, x, stride)?
            .broadcast_add(&extra.reshape((n, c, 1, 1))?)?)
    }

    /// GroupNorm (eps 1e-5): each group of channels normalised over (its channels, H, W), then a
    /// per-channel affine map. On the CPU one fused op; elsewhere [`group_norm_ops`].
    pub fn group_norm(&self, name: &str, x: &Tensor, groups: usize) -> Result<Tensor> {
        self.norm(name, x, groups, false)
    }

    /// SiLU(GroupNorm(x)), fused on the CPU.
    pub fn group_norm_silu(&self, name: &str, x: &Tensor, groups: usize) -> Result<Tensor> {
        self.norm(name, x, groups, true)
    }

    /// LayerNorm (eps 1e-5) over the last dimension, then a per-feature affine map.
    pub fn layer_norm(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let weight = self.get(&format!("{name}.weight"))?;
        let bias = self.get(&format!("{name}.bias"))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + cpu::norm::EPS)?.sqrt()?)?;
        Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
    }

    /// The time embedding of DDPM's networks: [sin(t f), cos(t f)] for the frequencies of
    /// [`time_frequencies`], then Linear, SiLU, Linear (`{name}.0`, `{name}.1`); t (N,) gives (N, E).
    pub fn time_embedding(&self, name: &str, t: &Tensor, freqs: &Tensor) -> Result<Tensor> {
        let arg = t.unsqueeze(1)?.broadcast_mul(freqs)?;
        let sin = Tensor::cat(&[arg.sin()?, arg.cos()?], 1)?;
        let e = self.linear(&format!("{name}.0"), &sin)?.silu()?;
        self.linear(&format!("{name}.1"), &e)
    }

    fn norm(&self, name: &str, x: &Tensor, groups: usize, silu: bool) -> Result<Tensor> {
        let weight = self.get(&format!("{name}.weight"))?;
        let bias = self.get(&format!("{name}.bias"))?;
        if cpu::supports(x) {
            return cpu::norm::group_norm(x, weight, bias, groups, silu);
        }
        let y = group_norm_ops(x, weight, bias, groups)?;
        Ok(if silu { y.silu()? } else { y })
    }
}

/// Softmax over the last dimension from primitive ops, so autograd sees through it (the maximum is
/// subtracted first, as a constant).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// The `half` frequencies f_k = 1000 exp(-ln(10000) k / half) of the sinusoidal time features (the
/// Transformer's positional frequencies, with t in [0, 1] scaled by 1000 as in DDPM), as a (1, half) row.
pub fn time_frequencies(
    half: usize,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<Tensor> {
    let f: Vec<f32> = (0..half)
        .map(|k| 1000.0 * (-(10000f64.ln()) * k as f64 / half as f64).exp() as f32)
        .collect();
    Ok(Tensor::from_vec(f, (1, half), device)?.to_dtype(dtype)?)
}

/// GroupNorm (eps 1e-5) of x (N, C, H, W) with per-channel weight and bias (C), written with candle ops:
/// what runs on a GPU, and the reference the CPU op is tested against.
pub fn group_norm_ops(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let xg = x.reshape((n, groups, (c / groups) * h * w))?;
    let mean = xg.mean_keepdim(2)?;
    let centred = xg.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred.broadcast_div(&(var + cpu::norm::EPS)?.sqrt()?)?;
    Ok(normed
        .reshape((n, c, h, w))?
        .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?)
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
        Weights::new(self.w)
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

/// How a convolution is computed ([`conv2d`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvImpl {
    /// The crate's CPU kernel (CPU default): one candle op with its own backward, a few matrix products
    /// per group of images and direction (column matrices at stride 2, shifted views of a padded stack
    /// of images at stride 1). f32 and f64 on the CPU; elsewhere this choice runs `GemmBackward`.
    Cpu,
    /// candle's conv2d and candle's backward, whose input gradient is a direct (naive) transposed
    /// convolution.
    Candle,
    /// candle's conv2d forward with a backward made of forward convolutions only (see
    /// [`conv2d_gemm_backward`]), which candle runs as im2col + cuBLAS (CUDA default).
    GemmBackward,
}

impl ConvImpl {
    pub fn name(self) -> &'static str {
        match self {
            ConvImpl::Cpu => "cpu",
            ConvImpl::Candle => "candle",
            ConvImpl::GemmBackward => "gemm-backward",
        }
    }

    /// The implementation called `name` ("cpu", "candle" or "gemm-backward"; "im2col" is read as "cpu").
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "cpu" | "im2col" => Ok(ConvImpl::Cpu),
            "candle" => Ok(ConvImpl::Candle),
            "gemm-backward" => Ok(ConvImpl::GemmBackward),
            other => Err(Error::Config(format!(
                "unknown convolution implementation '{other}' (cpu, candle or gemm-backward)"
            ))),
        }
    }
}

/// The process-wide choice of [`set_conv_impl`]: 0 none, else 1 + the variant's index.
static CONV_OVERRIDE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Makes every convolution use `choice` (None: the per-device default of [`conv_impl`]). For A/B
/// benchmarks of the implementations; results agree to rounding.
pub fn set_conv_impl(choice: Option<ConvImpl>) {
    let code = match choice {
        None => 0,
        Some(ConvImpl::Cpu) => 1,
        Some(ConvImpl::Candle) => 2,
        Some(ConvImpl::GemmBackward) => 3,
    };
    CONV_OVERRIDE.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// The convolution used on `device`: [`ConvImpl::Cpu`] on the CPU, [`ConvImpl::GemmBackward`]
/// elsewhere, unless [`set_conv_impl`] chose one.
pub fn conv_impl(device: &candle_core::Device) -> ConvImpl {
    match CONV_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => ConvImpl::Cpu,
        2 => ConvImpl::Candle,
        3 => ConvImpl::GemmBackward,
        _ if device.is_cpu() => ConvImpl::Cpu,
        _ => ConvImpl::GemmBackward,
    }
}

/// y = conv(x, w) + b with padding k/2 and stride 1 or 2 for an odd square kernel w (C_out x C x k x k);
/// b is (C_out), or (N, C_out) for a value per image and channel.
pub fn conv2d(imp: ConvImpl, x: &Tensor, w: &Tensor, b: &Tensor, stride: usize) -> Result<Tensor> {
    conv2d_in(imp, x, w, b, stride, Precision::F32)
}

/// [`conv2d`] whose CPU matrix products run in `precision` (other implementations run in the
/// tensors' dtype).
fn conv2d_in(
    imp: ConvImpl,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    precision: Precision,
) -> Result<Tensor> {
    if imp == ConvImpl::Cpu && cpu::supports(x) {
        return cpu::conv::conv2d(x, w, b, stride, precision);
    }
    let y = match imp {
        ConvImpl::Candle => {
            cpu::conv::check_conv(x, w, stride)?;
            x.conv2d(w, w.dim(2)? / 2, stride, 1, 1)?
        }
        ConvImpl::Cpu | ConvImpl::GemmBackward => conv2d_gemm_backward(x, w, stride)?,
    };
    let bias = match b.rank() {
        1 => b.reshape((1, b.dim(0)?, 1, 1))?,
        _ => b.reshape((b.dim(0)?, b.dim(1)?, 1, 1))?,
    };
    Ok(y.broadcast_add(&bias)?)
}

/// candle's conv2d (padding k/2, no bias) whose backward uses forward convolutions only.
///
/// For y = x * w with stride s and padding p = k/2 (k odd):
/// - dL/dx = conv(dilate_s(g), flip(w)^T, padding k - 1 - p), where dilate_s puts `g[i]` at `s i` and zeros
///   between, and flip(w)^T swaps the kernel's in/out channels and reverses it in space;
/// - dL/dw[o, i] = sum over n of conv(x[n, i], g[n, o]) with dilation s, i.e. a convolution over the
///   batch with the roles of batch and channels swapped (as candle's own backward computes it).
pub fn conv2d_gemm_backward(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    cpu::conv::check_conv(x, w, stride)?;
    let k = w.dim(2)?;
    let y = x.detach().conv2d(&w.detach(), k / 2, stride, 1, 1)?;
    Ok(x.apply_op3(w, &y, ConvGrad { stride })?)
}

/// Forwards a precomputed convolution output and supplies its gradients (see [`conv2d_gemm_backward`]).
struct ConvGrad {
    stride: usize,
}

impl candle_core::CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-backward"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        y: &candle_core::CpuStorage,
        ly: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        y: &candle_core::CudaStorage,
        ly: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.stride;
        let k = w.dim(2)?;
        let p = k / 2;
        let gd = if s == 1 {
            g.clone()
        } else {
            let (n, co, ho, wo) = g.dims4()?;
            g.reshape((n, co, ho, 1, wo, 1))?
                .pad_with_zeros(3, 0, s - 1)?
                .pad_with_zeros(5, 0, s - 1)?
                .reshape((n, co, ho * s, wo * s))?
        };
        let w_t = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let dx = gd.conv2d(&w_t, k - 1 - p, 1, 1, 1)?;
        // The kernel of this convolution is the output gradient; contiguous, so that cuDNN (feature
        // `cudnn`) takes it: candle sends strided kernels to its direct convolution kernel.
        let dw = x
            .transpose(0, 1)?
            .conv2d(&g.transpose(0, 1)?.contiguous()?, p, 1, s, 1)?
            .transpose(0, 1)?;
        let dw = if dw.dim(2)? != k {
            dw.narrow(2, 0, k)?.narrow(3, 0, k)?
        } else {
            dw
        };
        Ok((Some(dx), Some(dw), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// conv_plus (the per-image value joins the CPU convolution's bias) gives the values and gradients of
    /// the convolution followed by a broadcast add.
    #[test]
    fn conv_plus_equals_conv_then_broadcast_add() {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f64, 1.0, (2, 3, 6, 4), &dev).unwrap();
        let w = candle_core::Var::randn(0f64, 1.0, (5, 3, 3, 3), &dev).unwrap();
        let b = candle_core::Var::randn(0f64, 1.0, 5, &dev).unwrap();
        let e = candle_core::Var::randn(0f64, 1.0, (2, 5), &dev).unwrap();
        let weights = Weights::new(HashMap::from([
            ("c.weight".to_string(), w.as_tensor().clone()),
            ("c.bias".to_string(), b.as_tensor().clone()),
        ]));
        let r = Tensor::randn(0f64, 1.0, (2, 5, 6, 4), &dev).unwrap();
        let ours = weights.conv_plus("c", &x, 1, &e).unwrap();
        let want = weights
            .conv("c", &x, 1)
            .unwrap()
            .broadcast_add(&e.reshape((2, 5, 1, 1)).unwrap())
            .unwrap();
        assert!(crate::testing::max_abs_diff(&ours, &want) < 1e-12);
        let go = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [x.as_tensor(), w.as_tensor(), b.as_tensor(), e.as_tensor()] {
            let (a, b) = (go.get(v).unwrap(), gw.get(v).unwrap());
            assert_eq!(a.dims(), b.dims());
            assert!(crate::testing::max_abs_diff(a, b) < 1e-10);
        }
    }

    /// The forward-convolution backward gives candle's gradients for 1x1 and 3x3 kernels, strides 1
    /// and 2, non-square inputs, and a loss that weights every output differently.
    #[test]
    fn gemm_backward_gradients_match_candle() {
        let dev = Device::Cpu;
        for (k, stride) in [(3, 1), (3, 2), (1, 1), (1, 2)] {
            let x = candle_core::Var::randn(0f64, 1.0, (2, 3, 6, 4), &dev).unwrap();
            let w = candle_core::Var::randn(0f64, 1.0, (5, 3, k, k), &dev).unwrap();
            let (ho, wo) = (6 / stride, 4 / stride);
            let r = Tensor::randn(0f64, 1.0, (2, 5, ho, wo), &dev).unwrap();
            let ours = conv2d_gemm_backward(&x, &w, stride).unwrap();
            let want = x.conv2d(&w, k / 2, stride, 1, 1).unwrap();
            assert!(crate::testing::max_abs_diff(&ours, &want) < 1e-12);
            let go = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gw = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [x.as_tensor(), w.as_tensor()] {
                let (a, b) = (go.get(v).unwrap(), gw.get(v).unwrap());
                assert_eq!(a.dims(), b.dims());
                let d = crate::testing::max_abs_diff(a, b);
                assert!(d < 1e-10, "k {k} stride {stride}: gradient differs by {d}");
            }
        }
    }
}
