//! `flowmatching image-eval`: FD and class accuracy of an image model's samples.
//!
//! FD is the Frechet distance between Gaussians fitted to the evaluation classifier's penultimate
//! features of `n` generated images and of the test set, shown beside two references made the same way:
//! real training images vs the test set (the floor) and draws from a Gaussian with the training images'
//! pixel mean and covariance (a ceiling). Every image set is clamped to [-1, 1], the range of a stored
//! image, before the classifier sees it.

use std::time::Instant;

use anyhow::{bail, Result};
use flowmatching::checkpoint::Checkpoint;
use flowmatching::data::DataSource;
use flowmatching::eval::classifier::FEATURES;
use flowmatching::eval::frechet::{frechet_distance, GaussianStats};
use flowmatching::rng::Rng;
use flowmatching::sample::Conditioning;
use flowmatching::solver::{SolveOptions, Stats};
use serde::Serialize;

use crate::cli::ImageEvalArgs;
use crate::outputs::Outputs;
use crate::resolve::{control, load_classifier, solver_kind};
use crate::{images, io, sampling};

#[derive(Debug, Serialize)]
struct References {
    /// Classifier accuracy on the test set.
    classifier_test_accuracy: f64,
    /// FD of `n` real training images against the test set (the best a model can hope for).
    fd_train_vs_test: f64,
    /// FD of `n` draws from the Gaussian fitted to the training pixels (a ceiling).
    fd_gaussian_vs_test: f64,
}

#[derive(Debug, Serialize)]
struct GuidedResult {
    /// Guidance weight w in v_uncond + w (v_cond - v_uncond) (None: unconditional model).
    guidance: Option<f64>,
    fd: f64,
    /// FD / FD of the Gaussian ceiling.
    fd_ratio_to_gaussian: f64,
    /// Fraction of samples the classifier assigns to the class they were drawn for (conditional only).
    class_accuracy: Option<f64>,
    /// Cost of the costliest batch (NFE counts network calls: 2 per guided call).
    stats: Stats,
    seconds: f64,
    grid: String,
}

#[derive(Debug, Serialize)]
struct Report {
    checkpoint: String,
    step: u64,
    model: flowmatching::nn::ModelConfig,
    device: String,
    solver: String,
    num_samples: usize,
    seed: u64,
    references: References,
    results: Vec<GuidedResult>,
}

fn clamp(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
}

/// The first `n` rows of a random permutation of `rows`.
fn subset(rows: &[f32], dim: usize, n: usize, rng: &mut Rng) -> Vec<f32> {
    let total = rows.len() / dim;
    let mut order: Vec<usize> = (0..total).collect();
    for i in (1..total).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order[..n.min(total)]
        .iter()
        .flat_map(|&i| rows[i * dim..(i + 1) * dim].iter().copied())
        .collect()
}

pub fn run(a: &ImageEvalArgs) -> Result<()> {
    if a.num_samples < 2 {
        bail!("--num-samples must be at least 2 (a covariance needs two images)");
    }
    let device = a.device.device()?;
    let ckpt = Checkpoint::load(&a.checkpoint, &device)?;
    let config = &ckpt.meta.config;
    let Some(shape) = config.model.image_shape() else {
        bail!("{}: not an image model", a.checkpoint.display());
    };
    let k = config.model.num_classes();
    if k == 0 && a.guidance.iter().any(|&w| w != 1.0) {
        eprintln!("note: the model is unconditional; evaluating it without guidance");
    }
    let clf = load_classifier(&a.classifier, shape, &device)?;
    let mut weights: Vec<Option<f64>> = if k == 0 {
        vec![None]
    } else {
        a.guidance.iter().map(|&w| Some(w)).collect()
    };
    // A weight listed twice ("1,1.0") is evaluated once.
    let mut seen = vec![];
    weights.retain(|w| {
        let fresh = !seen.contains(w);
        seen.push(*w);
        fresh
    });
    let grid_name = |w: Option<f64>| match w {
        Some(w) => format!("samples-w{w}.png"),
        None => "samples.png".into(),
    };
    let mut outs = Outputs::new();
    outs.checkpoint(&a.checkpoint);
    outs.input(&a.classifier, "the --classifier file");
    outs.data(&a.train_data, "--train-data");
    outs.data(&a.test_data, "--test-data");
    outs.data_dir(a.images.data_dir.as_deref());
    let names = [
        "gaussian.png".to_string(),
        "results.json".into(),
        "report.md".into(),
    ];
    for name in names
        .into_iter()
        .chain(weights.iter().map(|&w| grid_name(w)))
    {
        outs.declare(&a.out.join(&name), "--out")?;
    }
    let opts = a.images.options();
    let test = io::open_image_set(&a.test_data, &opts)?;
    let train = io::open_image_set(&a.train_data, &opts)?;
    let dim = test.dim();
    if dim != config.model.dim() || train.dim() != dim {
        bail!("the test and training images must have the model's shape {shape:?}");
    }
    let mut rng = Rng::new(a.seed).fork(7);
    eprintln!("reference statistics (classifier features of real and Gaussian images)...");
    let test_stats = clf.feature_stats(test.rows(), &device)?;
    let classifier_test_accuracy = match test.labels() {
        Some(l) => clf.accuracy(test.rows(), l, &device)?,
        None => f64::NAN,
    };
    let real = subset(train.rows(), dim, a.num_samples, &mut rng);
    let fd_train_vs_test = frechet_distance(&clf.feature_stats(&real, &device)?, &test_stats)?;
    let pixels = GaussianStats::of(&real, dim)?;
    let mut gauss = pixels.sample(&mut rng, a.num_samples)?;
    clamp(&mut gauss);
    let fd_gaussian_vs_test = frechet_distance(&clf.feature_stats(&gauss, &device)?, &test_stats)?;
    let png = images::grid_png(&gauss[..dim * 100.min(a.num_samples)], shape, 10)?;
    outs.write(&a.out.join("gaussian.png"), &png)?;
    let references = References {
        classifier_test_accuracy,
        fd_train_vs_test,
        fd_gaussian_vs_test,
    };
    eprintln!("{references:?}");

    let model = ckpt.model(&device, true)?;
    let kind = solver_kind(a.solver);
    let solve_opts = SolveOptions::with_control(control(kind, a.steps, &a.tol)?);
    let mut results = vec![];
    for w in weights {
        let start = Instant::now();
        let cond = w.map(|w| Conditioning::blocks(a.num_samples, k, w));
        let drawn = sampling::draw(
            &model,
            config,
            a.num_samples,
            a.seed,
            kind,
            &solve_opts,
            cond.as_ref(),
            None,
            &device,
            a.batch,
        )?;
        let (mut x, stats) = (drawn.x, drawn.stats);
        clamp(&mut x);
        let seconds = start.elapsed().as_secs_f64();
        let fd = frechet_distance(&clf.feature_stats(&x, &device)?, &test_stats)?;
        let class_accuracy = match &cond {
            Some(c) => Some(clf.accuracy(&x, &c.labels, &device)?),
            None => None,
        };
        let grid = grid_name(w);
        outs.write(
            &a.out.join(&grid),
            &class_grid(&x, shape, cond.as_ref(), k)?,
        )?;
        let r = GuidedResult {
            guidance: w,
            fd,
            fd_ratio_to_gaussian: fd / fd_gaussian_vs_test,
            class_accuracy,
            stats,
            seconds,
            grid,
        };
        eprintln!("{r:?}");
        results.push(r);
    }
    let report = Report {
        checkpoint: a.checkpoint.display().to_string(),
        step: ckpt.meta.step,
        model: config.model.clone(),
        device: format!("{device:?}"),
        solver: format!("{:?} ({:?})", kind, solve_opts.control),
        num_samples: a.num_samples,
        seed: a.seed,
        references,
        results,
    };
    outs.write(&a.out.join("results.json"), &io::json_bytes(&report)?)?;
    let mut md = markdown(&report);
    if a.train_data.starts_with("fashion-mnist") {
        md += &format!(
            "Rows, top to bottom: {}.\n",
            images::FASHION_CLASSES.join(", ")
        );
    }
    outs.write(&a.out.join("report.md"), md.as_bytes())?;
    outs.commit()?;
    println!("{md}");
    Ok(())
}

/// Ten samples per class, one row per class (or the first 100 samples for unconditional models), as PNG.
fn class_grid(
    x: &[f32],
    shape: [usize; 3],
    cond: Option<&Conditioning>,
    k: usize,
) -> Result<Vec<u8>> {
    let dim = shape.iter().product::<usize>();
    let Some(c) = cond else {
        let n = (x.len() / dim).min(100);
        return images::grid_png(&x[..n * dim], shape, 10);
    };
    let mut rows = vec![];
    for class in 0..k as u32 {
        let picked: Vec<usize> = (0..c.labels.len())
            .filter(|&i| c.labels[i] == class)
            .take(10)
            .collect();
        for i in picked {
            rows.extend_from_slice(&x[i * dim..(i + 1) * dim]);
        }
    }
    images::grid_png(&rows, shape, 10)
}

fn markdown(r: &Report) -> String {
    let refs = &r.references;
    let mut s = format!(
        "# Image evaluation\n\nCheckpoint `{}` at step {}, {} samples per row, solver {}, device {}.\n\n\
         FD: Frechet distance of the evaluation classifier's {FEATURES}-d penultimate features against the \
         test set (classifier test accuracy {:.2}%).\n\n\
         | samples | guidance w | FD | FD / Gaussian ceiling | class accuracy | NFE per batch | seconds |\n\
         |---|---|---|---|---|---|---|\n\
         | real train images (floor) | | {:.3} | {:.4} | | | |\n\
         | Gaussian fit to train pixels (ceiling) | | {:.3} | 1 | | | |\n",
        r.checkpoint,
        r.step,
        r.num_samples,
        r.solver,
        r.device,
        100.0 * refs.classifier_test_accuracy,
        refs.fd_train_vs_test,
        refs.fd_train_vs_test / refs.fd_gaussian_vs_test,
        refs.fd_gaussian_vs_test,
    );
    for g in &r.results {
        s += &format!(
            "| model ([grid]({})) | {} | {:.3} | {:.4} | {} | {} | {:.1} |\n",
            g.grid,
            g.guidance.map_or("-".into(), |w| format!("{w}")),
            g.fd,
            g.fd_ratio_to_gaussian,
            g.class_accuracy
                .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
            g.stats.nfe,
            g.seconds
        );
    }
    s += "\nGuidance: v = v_uncond + w (v_cond - v_uncond); w = 0 is the unconditional model (its class \
          accuracy is chance), w = 1 the conditional one. Grids: one row per class.\n";
    s
}
