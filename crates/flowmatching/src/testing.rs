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

/// Checks autograd against central finite differences (step 1e-5) of `loss` at one entry of every f64
/// parameter that `pick` selects: |fd - grad| < tol (1 + |fd|). Returns how many were checked.
pub fn check_gradients(
    params: &crate::params::Params,
    loss: impl Fn() -> Tensor,
    pick: impl Fn(&str) -> bool,
    tol: f64,
) -> usize {
    let dev = candle_core::Device::Cpu;
    let grads = loss().backward().unwrap();
    let mut checked = 0;
    for (name, var) in params.iter().filter(|(n, _)| pick(n)) {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let g = flat(grads.get(var.as_tensor()).unwrap());
        let base = flat(var.as_tensor());
        let i = (base.len() * 2) / 3;
        let eps = 1e-5;
        let set = |v: Vec<f64>| {
            var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                .unwrap()
        };
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            set(v);
            loss().to_scalar::<f64>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        set(base.clone());
        assert!(
            (fd - g[i]).abs() < tol * (1.0 + fd.abs()),
            "{name}: fd {fd} vs autograd {}",
            g[i]
        );
        checked += 1;
    }
    checked
}
