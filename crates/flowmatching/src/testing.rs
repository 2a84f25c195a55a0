//! Helpers shared by the unit tests.

use candle_core::{DType, Tensor};

use crate::train::Trainer;

/// max |a - b| over all elements, in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// For each saved tensor of two trainers (weights, EMA, optimizer moments): its name and max |a - b|.
pub fn state_differences(a: &Trainer, b: &Trainer) -> Vec<(String, f64)> {
    let (sa, sb) = (a.state_tensors().unwrap(), b.state_tensors().unwrap());
    sa.iter()
        .zip(&sb)
        .map(|((n, x), (_, y))| (n.clone(), max_abs_diff(x, y)))
        .collect()
}
