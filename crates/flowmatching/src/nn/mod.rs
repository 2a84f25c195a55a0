//! The velocity networks: the MLP, the image U-Net, their layers and the fused CPU MLP engine.
//!
//! - [`mlp`]: the MLP v(x, t) and its configuration;
//! - [`unet`]: the U-Net for images (class-conditional with a null class for guidance);
//! - [`transformer`]: the transformer for sequences of frames (Voicebox's, for speech infilling);
//! - [`layers`]: named weights and the layers built from them (dense, convolution, GroupNorm), and the
//!   choice of convolution implementation ([`ConvImpl`]);
//! - [`model`]: [`ModelConfig`] (what checkpoints store) and [`Model`] (any of the above);
//! - `fused`: the CPU engine that trains and evaluates MLPs on flat buffers ([`FastMlp`] for inference).

mod fused;
pub mod layers;
pub mod mlp;
pub mod model;
pub mod transformer;
pub mod unet;

pub use fused::FastMlp;
pub(crate) use fused::MlpEngine;
pub use layers::{conv2d, conv2d_gemm_backward, conv_impl, set_conv_impl, ConvImpl};
pub use mlp::{Activation, Linear, Mlp, MlpConfig, TimeEmbedding};
pub use model::{Labeled, Model, ModelConfig};
pub use transformer::{SequenceCondition, Transformer, TransformerConfig};
pub use unet::{UNet, UNetConfig};

/// c = a b for row-major a (m x k), b (k x n), c (m x n), through the engine's matrix kernel in
/// `precision` (resolved for this CPU) on the rayon pool: what the engine's layers run, exposed for
/// benchmarks.
pub fn matmul(
    precision: crate::precision::Precision,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> crate::Result<()> {
    if a.len() != m * k || b.len() != k * n || c.len() != m * n {
        return Err(crate::Error::Data(format!(
            "matmul of ({m} x {k}) by ({k} x {n}) into ({m} x {n}) got {}, {} and {} values",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    use crate::cpu::linalg::{matmul_in, View};
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    matmul_in(
        precision.on_this_cpu(),
        c,
        (m, n, k),
        false,
        View::rows(a, k),
        View::rows(b, n),
        par,
    );
    Ok(())
}
