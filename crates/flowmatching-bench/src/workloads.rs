//! The workloads: each builds its model and data, times `--iters` repetitions after `--warmup`
//! untimed ones, and prints one JSON line.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use flowmatching::checkpoint::Checkpoint;
use flowmatching::data::{DataSource, TensorDataset, Toy2d};
use flowmatching::field::VelocityField;
use flowmatching::likelihood::{log_likelihood, LikelihoodOptions};
use flowmatching::nn::{Activation, MlpConfig, ModelConfig, TimeEmbedding, UNetConfig};
use flowmatching::objective::Weighting;
use flowmatching::optim::{AdamWConfig, LrDecay};
use flowmatching::path::Prediction;
use flowmatching::path::SchedulerConfig;
use flowmatching::precision::Precision;
use flowmatching::rng::Rng;
use flowmatching::solver::{solve, Adaptive, SolveOptions, SolverKind, StepControl};
use flowmatching::train::{RunConfig, TrainConfig, Trainer, FORMAT_VERSION};
use serde::Serialize;

use crate::args::{BenchArgs, DeviceArg, UNetPreset, Workload};

#[derive(Serialize)]
struct Timing {
    device: String,
    /// For the GEMM workload: the rate in GFLOP/s.
    gflops: Option<f64>,
    workload: String,
    impl_: &'static str,
    median_ms: f64,
    times_ms: Vec<f64>,
    nfe: Option<usize>,
    threads: usize,
    /// The matrix products' arithmetic in force.
    precision: &'static str,
    /// The CPU's model name and detected units.
    cpu: String,
}

/// A training step as the peers run it: Adam (no weight decay), no clipping, no EMA, constant lr.
pub fn train_config(
    hidden: usize,
    depth: usize,
    batch: usize,
    activation: Activation,
) -> RunConfig {
    RunConfig {
        format_version: FORMAT_VERSION,
        model: ModelConfig::Mlp(MlpConfig {
            dim: 2,
            hidden,
            depth,
            time_embedding: TimeEmbedding::Input,
            activation,
        }),
        path: SchedulerConfig::CondOt { sigma_min: 0.0 },
        prediction: Prediction::Velocity,
        weighting: Weighting::Uniform,
        train: TrainConfig {
            steps: u64::MAX,
            batch_size: batch,
            optimizer: AdamWConfig {
                lr: 1e-3,
                ..Default::default()
            },
            warmup_steps: 0,
            lr_decay: LrDecay::Constant,
            grad_clip: None,
            ema_decay: 0.0,
            seed: 0,
            label_dropout: 0.0,
            coupling: Default::default(),
            time_sampling: Default::default(),
            masking: Default::default(),
            crop_frames: None,
            precision: Default::default(),
        },
        data: "checkerboard".into(),
        source: None,
    }
}

/// The preset's U-Net at the Fashion-MNIST shape with 10 classes.
fn unet_preset(preset: UNetPreset) -> UNetConfig {
    match preset {
        UNetPreset::Small => UNetConfig::small(1, 28, 28, 10),
        UNetPreset::Tiny => UNetConfig::tiny(1, 28, 28, 10),
    }
}

fn unet_config(batch: usize, preset: UNetPreset, precision: Precision) -> RunConfig {
    let mut c = train_config(64, 1, batch, Activation::Silu);
    c.model = ModelConfig::UNet(unet_preset(preset));
    c.train.label_dropout = 0.1;
    c.train.precision = precision;
    c
}

/// 1024 labelled random 28 x 28 images (the step's cost does not depend on the pixels).
fn fake_images(n: usize) -> Result<TensorDataset> {
    let mut rng = Rng::new(2);
    let rows = rng.normal_vec(n * 784);
    let labels = (0..n).map(|i| (i % 10) as u32).collect();
    Ok(TensorDataset::new(rows, 784, "random images")?
        .with_labels(labels, 10)?
        .with_image_shape([1, 28, 28])?)
}

/// Per-piece timings of the --unet preset (batch --batch).
fn unet_parts(a: &BenchArgs, dev: &Device) -> Result<()> {
    use flowmatching::nn::{conv2d, conv2d_gemm_backward, ConvImpl};
    let b = a.batch;
    let report = |name: String, times: Vec<f64>| -> Result<()> {
        let t = Timing {
            device: format!("{:?}", a.device).to_lowercase(),
            gflops: None,
            workload: name,
            impl_: "flowmatching",
            median_ms: median(&times),
            times_ms: times,
            nfe: None,
            threads: candle_core::utils::get_num_threads(),
            precision: Precision::F32.name(),
            cpu: flowmatching::precision::cpu_units().describe(),
        };
        println!("{}", serde_json::to_string(&t)?.replace("impl_", "impl"));
        Ok(())
    };
    let cfg = unet_preset(a.unet);
    // Each level's 3x3 convolution at its size, and the first level's decoder one (skip concatenated):
    // for the small preset (64, 64, 28), (128, 64, 28), (128, 128, 14), (128, 128, 7).
    let level = |i: usize| (cfg.base_channels * cfg.channel_mults[i], cfg.height >> i);
    let mut shapes: Vec<(usize, usize, usize)> = (0..cfg.channel_mults.len())
        .map(|i| (level(i).0, level(i).0, level(i).1))
        .collect();
    shapes.insert(1, (2 * level(0).0, level(0).0, level(0).1));
    for (c_in, c_out, hw) in shapes {
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c_in, hw, hw), dev)?)?;
        let w = candle_core::Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), dev)? * 0.05)?,
        )?;
        let bias = Tensor::zeros(c_out, DType::F32, dev)?;
        for (imp, backward) in [
            ("cpu", false),
            ("cpu", true),
            ("candle", false),
            ("candle", true),
            ("gemm-backward", true),
        ] {
            if imp == "cpu" && !dev.is_cpu() {
                continue; // the CPU kernel runs on the CPU only
            }
            let (times, _) = time(a.warmup, a.iters, || {
                let y = match imp {
                    "cpu" => conv2d(ConvImpl::Cpu, x.as_tensor(), w.as_tensor(), &bias, 1)?,
                    "gemm-backward" => conv2d_gemm_backward(x.as_tensor(), w.as_tensor(), 1)?,
                    _ => x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1)?,
                };
                if backward {
                    let g = y.sqr()?.mean_all()?.backward()?;
                    let _ = g.get(w.as_tensor());
                }
                dev.synchronize()?;
                Ok(None)
            })?;
            let pass = if backward { "fwd+bwd" } else { "fwd" };
            report(
                format!("conv3x3-{c_in}-{c_out}-{hw}x{hw}-b{b}-{imp}-{pass}"),
                times,
            )?;
        }
    }
    let preset = format!("{:?}", a.unet).to_lowercase();
    let (model, params) = ModelConfig::UNet(cfg).build(&mut Rng::new(0), dev, DType::F32)?;
    let x = Tensor::randn(0f32, 1.0, (b, 784), dev)?;
    let t = Tensor::rand(0f32, 1.0, b, dev)?;
    for backward in [false, true] {
        let (times, _) = time(a.warmup, a.iters, || {
            let y = model.forward(&x, &t)?;
            if backward {
                let g = y.sqr()?.mean_all()?.backward()?;
                let _ = params.vars().filter_map(|v| g.get(v.as_tensor())).count();
            }
            dev.synchronize()?;
            Ok(None)
        })?;
        let pass = if backward { "fwd+bwd" } else { "fwd" };
        report(format!("unet-{preset}-b{b}-{pass}"), times)?;
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Times `f` `iters` times after `warmup` untimed calls; returns milliseconds and the last NFE.
fn time(
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<Option<usize>>,
) -> Result<(Vec<f64>, Option<usize>)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = vec![];
    let mut nfe = None;
    for _ in 0..iters {
        let start = Instant::now();
        nfe = f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok((times, nfe))
}

/// The CUDA set-up: `FLOWMATCHING_CUDA_EVENTS=1` keeps cudarc's event tracking and
/// `FLOWMATCHING_CUDA_POOL_RELEASE=1` the memory pool's release threshold.
fn cuda_options() -> flowmatching::device::CudaOptions {
    let on = |name: &str| std::env::var(name).as_deref() == Ok("1");
    flowmatching::device::CudaOptions {
        event_tracking: on("FLOWMATCHING_CUDA_EVENTS"),
        release_pool: on("FLOWMATCHING_CUDA_POOL_RELEASE"),
    }
}

pub fn run(a: &BenchArgs) -> Result<()> {
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let dev = match a.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => flowmatching::device::cuda_with(0, cuda_options())
            .map_err(|e| anyhow::anyhow!("{e}; build with scripts/build-cuda.sh"))?,
    };
    // The variant, in the workload's name: convolution, U-Net preset, cudarc event tracking.
    let conv = format!(
        "{}{}{}{}",
        flowmatching::nn::conv_impl(&dev).name(),
        if cfg!(feature = "cudnn") && dev.is_cuda() {
            "-cudnn"
        } else {
            ""
        },
        if a.unet == UNetPreset::Tiny {
            "-tiny"
        } else {
            ""
        },
        if dev.is_cuda() && cuda_options().event_tracking {
            "-events"
        } else {
            ""
        }
    );
    let mut in_force = Precision::F32;
    let (name, (times, nfe)) = match a.workload {
        Workload::UnetParts => return unet_parts(a, &dev),
        Workload::Ot => return crate::ot::run(a),
        Workload::B5Step => {
            let mut trainer = Trainer::new(unet_config(a.batch, a.unet, a.precision), &dev)?;
            in_force = trainer.precision();
            let data = fake_images(1024)?;
            (
                format!("b5-step-b{}-{conv}", a.batch),
                time(a.warmup, a.iters, || {
                    trainer.step(&data).map(|_| None).map_err(Into::into)
                })?,
            )
        }
        Workload::B5Sample => {
            let cfg = unet_config(a.batch, a.unet, a.precision);
            let (model, _) = cfg.model.build(&mut Rng::new(0), &dev, DType::F32)?;
            let mut model = model.frozen()?;
            in_force = model.set_precision(a.precision);
            let x0 = Tensor::from_vec(Rng::new(1).normal_vec(a.batch * 784), (a.batch, 784), &dev)?;
            let solver = SolverKind::Midpoint.solver();
            let opts = SolveOptions::constant(20);
            (
                format!("b5-sample-b{}-{conv}", a.batch),
                time(a.warmup, a.iters, || {
                    let s = solve(&model, solver.as_ref(), &x0, 0.0, 1.0, &opts)?;
                    s.x.device().synchronize()?;
                    Ok(Some(s.stats.nfe))
                })?,
            )
        }
        Workload::B1 | Workload::B2 | Workload::Step => {
            let cfg = match a.workload {
                Workload::B1 => train_config(512, 4, 4096, Activation::Silu),
                Workload::B2 => train_config(64, 3, 256, Activation::Selu),
                _ => train_config(a.hidden, 4, a.batch, Activation::Silu),
            };
            let cfg = RunConfig {
                train: TrainConfig {
                    precision: a.precision,
                    ..cfg.train
                },
                ..cfg
            };
            let mut trainer = Trainer::new(cfg, &dev)?;
            in_force = trainer.precision();
            let data = Toy2d::Checkerboard;
            let name = match a.workload {
                Workload::Step => format!("step-h{}-b{}", a.hidden, a.batch),
                w => format!("{w:?}").to_lowercase(),
            };
            (
                name,
                time(a.warmup, a.iters, || {
                    trainer.step(&data).map(|_| None).map_err(Into::into)
                })?,
            )
        }
        Workload::Gemm => {
            let n = 2048;
            let mut rng = Rng::new(0);
            let (lhs, rhs) = (rng.normal_vec(n * n), rng.normal_vec(n * n));
            let mut c = vec![0f32; n * n];
            in_force = a.precision.on_this_cpu();
            let r = time(a.warmup, a.iters, || {
                flowmatching::nn::matmul(in_force, (n, n, n), &lhs, &rhs, &mut c)?;
                Ok(None)
            })?;
            ("gemm".into(), r)
        }
        Workload::B3Midpoint | Workload::B3Dopri5 | Workload::B4 => {
            let Some(ck) = &a.checkpoint else {
                bail!("this workload needs --checkpoint (the B1 model)")
            };
            let ckpt = Checkpoint::load(ck, &dev)?;
            let mut model = ckpt.model(&dev, false)?;
            if a.workload != Workload::B4 {
                // Likelihoods stay f32.
                in_force = model.set_precision(a.precision);
            }
            let dopri = Adaptive::new(a.tol, a.tol)?;
            match a.workload {
                Workload::B4 => {
                    let x = Tensor::from_vec(
                        Toy2d::Checkerboard.sample(&mut Rng::new(1), 10_000),
                        (10_000, 2),
                        &dev,
                    )?;
                    let opts = LikelihoodOptions {
                        control: StepControl::Adaptive(dopri),
                        ..LikelihoodOptions::default()
                    };
                    let r = time(a.warmup, a.iters, || {
                        Ok(Some(log_likelihood(&model, &x, &opts)?.stats.nfe))
                    })?;
                    ("b4".into(), r)
                }
                w => {
                    let x0 = Tensor::from_vec(Rng::new(1).normal_vec(100_000), (50_000, 2), &dev)?;
                    let (kind, opts, name) = if w == Workload::B3Midpoint {
                        (
                            SolverKind::Midpoint,
                            SolveOptions::constant(20),
                            "b3-midpoint",
                        )
                    } else {
                        (
                            SolverKind::Dopri5,
                            SolveOptions::adaptive(dopri),
                            "b3-dopri5",
                        )
                    };
                    let solver = kind.solver();
                    let r = time(a.warmup, a.iters, || {
                        Ok(Some(
                            solve(&model, solver.as_ref(), &x0, 0.0, 1.0, &opts)?
                                .stats
                                .nfe,
                        ))
                    })?;
                    (name.into(), r)
                }
            }
        }
    };
    let gflops =
        (a.workload == Workload::Gemm).then(|| 2.0 * 2048f64.powi(3) / (median(&times) * 1e6));
    let t = Timing {
        device: format!("{:?}", a.device).to_lowercase(),
        gflops,
        workload: match in_force {
            Precision::F32 => name,
            p => format!("{name}-{}", p.name()),
        },
        impl_: "flowmatching",
        median_ms: median(&times),
        times_ms: times,
        nfe,
        threads: candle_core::utils::get_num_threads(),
        precision: in_force.name(),
        cpu: flowmatching::precision::cpu_units().describe(),
    };
    println!("{}", serde_json::to_string(&t)?.replace("impl_", "impl"));
    Ok(())
}
