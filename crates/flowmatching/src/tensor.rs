//! Small tensor helpers shared by the path, the solvers and the models.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// A per-row column shaped (B, 1, ..., 1) to broadcast against `like` (dtype and device of `like`).
pub(crate) fn column(values: impl Iterator<Item = f64>, like: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = values.collect();
    let mut shape = vec![v.len()];
    shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())?)
}

/// A tensor of `n` copies of the time `t` (shape (n,)), as models take it.
pub fn time_tensor(t: f64, n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::full(t, n, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}
