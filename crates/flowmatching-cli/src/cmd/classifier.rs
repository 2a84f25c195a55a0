//! `flowmatching classifier train`: the evaluation classifier (class accuracy of samples, FD features).

use std::time::Instant;

use anyhow::{bail, Result};
use flowmatching::data::DataSource;
use flowmatching::eval::classifier::{train_classifier, ClassifierConfig, ClassifierTraining};

use crate::cli::{ClassifierArgs, ClassifierCommand};
use crate::outputs::Outputs;
use crate::{io, progress};

pub fn run(a: &ClassifierArgs) -> Result<()> {
    match &a.command {
        ClassifierCommand::Train(t) => train(t),
    }
}

fn train(a: &crate::cli::ClassifierTrainArgs) -> Result<()> {
    let mut outs = Outputs::new();
    outs.data(&a.data, "--data");
    if let Some(t) = &a.test_data {
        outs.data(t, "--test-data");
    }
    outs.data_dir(a.images.data_dir.as_deref());
    outs.declare(&a.out, "--out")?;
    let opts = a.images.options();
    let data = io::open_image_set(&a.data, &opts)?;
    let Some(labels) = data.labels() else {
        bail!(
            "{}: a classifier needs labelled images (class sub-folders, or Fashion-MNIST)",
            a.data
        );
    };
    let [channels, height, width] = data.image_shape().expect("image sets have a shape");
    let config = ClassifierConfig {
        channels,
        height,
        width,
        num_classes: data.num_classes(),
    };
    let test_spec = match (&a.test_data, a.data.as_str()) {
        (Some(t), _) => Some(t.clone()),
        (None, "fashion-mnist" | "fashion-mnist:train") => Some("fashion-mnist:test".to_string()),
        _ => None,
    };
    let device = a.device.device()?;
    let s = ClassifierTraining {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
    };
    if !(a.lr > 0.0 && a.lr.is_finite()) {
        bail!("--lr must be positive, got {}", a.lr);
    }
    eprintln!(
        "training a classifier on {} ({} classes)",
        data.describe(),
        config.num_classes
    );
    let per_epoch = data.len().div_ceil(a.batch_size.max(1));
    let bar = progress::training_bar((per_epoch * a.epochs) as u64, 0);
    let start = Instant::now();
    let mut smoothed = None::<f64>;
    let clf = train_classifier(config, data.rows(), labels, s, &device, |step, _, loss| {
        let v = smoothed.map_or(loss, |s| 0.98 * s + 0.02 * loss);
        smoothed = Some(v);
        bar.set_position(step as u64);
        if step % 20 == 0 {
            bar.set_message(format!("{v:.4}"));
        }
    })?;
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    outs.write(&a.out, &clf.to_bytes()?)?;
    let train_acc = clf.accuracy(data.rows(), labels, &device)?;
    print!(
        "classifier trained in {seconds:.0} s: train accuracy {:.2}%",
        100.0 * train_acc
    );
    if let Some(t) = test_spec {
        let test = io::open_image_set(&t, &opts)?;
        let Some(tl) = test.labels() else {
            bail!("{t}: test images need labels");
        };
        let acc = clf.accuracy(test.rows(), tl, &device)?;
        print!(", test accuracy {:.2}% on {t}", 100.0 * acc);
    }
    outs.commit()?;
    println!(" -> {}", a.out.display());
    Ok(())
}
