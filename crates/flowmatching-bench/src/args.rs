//! The benchmark's arguments.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Training step, MLP 3-512x4-2 SiLU, batch 4096, Adam.
    B1,
    /// Training step, MLP 3-64x3-2 SELU, batch 256, Adam.
    B2,
    /// Sampling 50,000 points with midpoint, 20 steps (needs --checkpoint).
    B3Midpoint,
    /// Sampling 50,000 points with Dopri5 at rtol = atol = 1e-5 (needs --checkpoint).
    B3Dopri5,
    /// Exact-divergence log-likelihood of 10,000 points (needs --checkpoint).
    B4,
    /// Training step of the B1 network at --hidden and --batch (the scaling study).
    Step,
    /// One f32 matrix product of 2048 x 2048 by 2048 x 2048: the machine's GEMM rate.
    Gemm,
    /// U-Net training step (small preset, Fashion-MNIST shape, 10 classes, batch --batch; B5 uses 128).
    B5Step,
    /// U-Net sampling: --batch images, midpoint 20 steps (B5 uses 128).
    B5Sample,
    /// One exact minibatch OT coupling of --batch points in --dim dimensions (cost matrix and
    /// assignment), optionally of the points in --points; prints the plan's cost beside the time.
    Ot,
    /// The --unet preset's pieces (B5 shapes for small): each level's 3x3 convolution (ours, candle's,
    /// GEMM backward) and the whole network, forward and forward + backward; one JSON line each.
    UnetParts,
}

/// Times one benchmark workload (our side of bench/run.py, which runs the PyTorch peers on the same
/// workloads, interleaved); prints one JSON line.
#[derive(Debug, Parser)]
#[command(name = "flowmatching-bench", version, about)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub workload: Workload,
    /// Timed repetitions.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// The B1 model for sampling and likelihood workloads.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Where to run: the CPU, or the first CUDA GPU (needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// The U-Net of the b5-step, b5-sample and unet-parts workloads (B5 itself is `small`).
    #[arg(long, value_enum, default_value = "small")]
    pub unet: UNetPreset,
    /// Dimension of the points of the `ot` workload.
    #[arg(long, default_value_t = 2)]
    pub dim: usize,
    /// The `ot` workload's points: 2 x batch x dim little-endian float32 values (x0, then x1).
    #[arg(long)]
    pub points: Option<PathBuf>,
    /// rtol = atol of the Dopri5 solves in b3-dopri5 and b4 (the workloads' own setting is 1e-5).
    #[arg(long, default_value_t = 1e-5)]
    pub tol: f64,
    /// Matrix products of the MLP workloads (b1, b2, step, b3-*) in f32, or bf16 with f32
    /// accumulation (AVX-512 BF16; elsewhere f32, and the JSON line says so).
    #[arg(long, default_value = "f32", value_parser = precision)]
    pub precision: flowmatching::precision::Precision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UNetPreset {
    Tiny,
    Small,
}

fn precision(s: &str) -> Result<flowmatching::precision::Precision, String> {
    flowmatching::precision::Precision::parse(s).map_err(|e| e.to_string())
}
