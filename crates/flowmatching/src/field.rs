//! The [`VelocityField`] trait: a time-dependent vector field v(x, t), the one thing a solver integrates
//! and a model implements.

use candle_core::Tensor;

use crate::error::Result;

/// A time-dependent vector field v(x, t): anything a solver can integrate.
pub trait VelocityField {
    /// v(x, t) for x of shape (B, ...) and t of shape (B,) (t = 0 noise, t = 1 data).
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor>;

    /// v(x, t) and the Jacobian-vector products (dv/dx) u for each tangent u (shaped like x), if the field
    /// computes them itself (forward mode). `None`: callers fall back to autograd.
    fn jvp(
        &self,
        _x: &Tensor,
        _t: &Tensor,
        _tangents: &[Tensor],
    ) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        Ok(None)
    }

    /// Network evaluations of a call of [`VelocityField::forward`] on a batch at times `t` (2 for
    /// classifier-free guidance, which evaluates the conditional and the unconditional field
    /// together, 1 outside its guidance interval). Solvers count NFE with it.
    fn evals_per_call(&self, _t: &[f64]) -> usize {
        1
    }
}

impl<F: VelocityField + ?Sized> VelocityField for &F {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        (**self).forward(x, t)
    }
    fn jvp(&self, x: &Tensor, t: &Tensor, u: &[Tensor]) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        (**self).jvp(x, t, u)
    }
    fn evals_per_call(&self, t: &[f64]) -> usize {
        (**self).evals_per_call(t)
    }
}

impl<F: VelocityField + ?Sized> VelocityField for Box<F> {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        (**self).forward(x, t)
    }
    fn jvp(&self, x: &Tensor, t: &Tensor, u: &[Tensor]) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        (**self).jvp(x, t, u)
    }
    fn evals_per_call(&self, t: &[f64]) -> usize {
        (**self).evals_per_call(t)
    }
}
