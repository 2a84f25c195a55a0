//! The training loop of the commands that train: a progress bar (steps/s, loss, ETA), periodic
//! checkpoints, and a checkpoint on Ctrl-C or at the time limit, from which `--resume` continues.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use flowmatching::checkpoint;
use flowmatching::train::Trainer;

use crate::progress;

/// An advisory lock on a training folder, so that a second run on the same folder is refused while
/// the first runs instead of both writing its checkpoints. The operating system releases it when the
/// process ends, crashed or not; the lock file is removed when the guard is dropped.
pub struct FolderLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes the lock of `dir` (which must exist), or says who holds it.
pub fn lock_folder(dir: &Path) -> Result<FolderLock> {
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(FolderLock { path, _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{} is in use by another training run (it holds {}); wait for that run to end or choose another --out",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            bail!("cannot lock {} ({e})", path.display())
        }
    }
}

/// The step of the checkpoint in `dir`, if it holds a readable one.
fn saved_step(dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(dir.join(checkpoint::META_FILE)).ok()?;
    checkpoint::CheckpointMeta::parse(&bytes)
        .ok()
        .map(|m| m.step)
}

/// How a training loop ended.
pub struct Outcome {
    pub last_loss: f64,
    pub seconds: f64,
    /// Stopped at the time limit (`--max-minutes`) before the last step.
    pub interrupted: bool,
}

/// Training stopped by Ctrl-C after saving its checkpoint: the command exits with status 130, as a
/// process ended by SIGINT does, so that scripts can tell it from a finished run.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Runs the trainer to its configured total (`step_once` takes one optimizer step), with a progress bar and periodic checkpoints in `out`.
/// At the time limit it saves a checkpoint and returns with `interrupted` set; on Ctrl-C it saves a
/// checkpoint and returns [`Interrupted`].
pub fn run_loop(
    trainer: &mut Trainer,
    step_once: &mut dyn FnMut(&mut Trainer) -> flowmatching::Result<f64>,
    out: &Path,
    every: u64,
    max_minutes: Option<f64>,
) -> Result<Outcome> {
    let total = trainer.config().train.steps;
    let bar = progress::training_bar(total, trainer.step_count());
    let stop = progress::interrupt_flag();
    let start = Instant::now();
    let mut loss = f64::NAN;
    let mut smoothed = None::<f64>;
    while trainer.step_count() < total {
        loss = match step_once(trainer) {
            Ok(l) => l,
            Err(e) => {
                bar.abandon();
                match saved_step(out) {
                    Some(step) => bail!(
                        "{e}\nthe last good checkpoint (step {step}) is in {}",
                        out.display()
                    ),
                    None => bail!("{e}\nno checkpoint was written"),
                }
            }
        };
        let s = smoothed.map_or(loss, |s| 0.98 * s + 0.02 * loss);
        smoothed = Some(s);
        let step = trainer.step_count();
        bar.set_position(step);
        if step.is_multiple_of(20) || step == total {
            bar.set_message(format!("{s:.4}"));
        }
        if every > 0 && step.is_multiple_of(every) && step < total {
            checkpoint::save(trainer, out, Some(loss))?;
        }
        let out_of_time = max_minutes.is_some_and(|m| start.elapsed().as_secs_f64() > 60.0 * m);
        if stop.load(Ordering::SeqCst) || out_of_time {
            bar.abandon();
            checkpoint::save(trainer, out, Some(loss))?;
            eprintln!(
                "{} at step {step}; checkpoint saved in {}. Resume with the same command plus --resume.",
                if out_of_time { "time limit reached" } else { "interrupted" },
                out.display()
            );
            if !out_of_time {
                return Err(Interrupted.into());
            }
            return Ok(Outcome {
                last_loss: loss,
                seconds: start.elapsed().as_secs_f64(),
                interrupted: true,
            });
        }
    }
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    checkpoint::save(trainer, out, Some(loss))?;
    Ok(Outcome {
        last_loss: loss,
        seconds,
        interrupted: false,
    })
}

/// The line that ends a finished training run (scripts parse its "done: N steps in S s").
pub fn report_done(trainer: &Trainer, o: &Outcome, out: &Path) {
    if !o.interrupted {
        eprintln!(
            "done: {} steps in {:.1} s, last loss {:.4}; checkpoint in {}",
            trainer.step_count(),
            o.seconds,
            o.last_loss,
            out.display()
        );
    }
}

/// Trains into folder `out` (created if missing, and removed again if the run fails before saving):
/// takes the folder's lock, runs [`run_loop`] and prints the closing line. `what` names the data.
pub fn train_in_folder(
    trainer: &mut Trainer,
    step_once: &mut dyn FnMut(&mut Trainer) -> flowmatching::Result<f64>,
    out: &Path,
    what: &str,
    every: u64,
    max_minutes: Option<f64>,
) -> Result<()> {
    if let Some(m) = max_minutes.filter(|m| *m <= 0.0) {
        bail!("--max-minutes must be positive, got {m}");
    }
    let created = crate::io::missing_folders(out);
    crate::io::ensure_dir(out)?;
    let result = (|| {
        let _lock = lock_folder(out)?;
        eprintln!(
            "training on {what} for {} steps",
            trainer.config().train.steps
        );
        let o = run_loop(trainer, step_once, out, every, max_minutes)?;
        report_done(trainer, &o, out);
        Ok(())
    })();
    if result.is_err() {
        // The folders this run made, if nothing was saved into them (a saved checkpoint keeps them).
        for d in created {
            let _ = std::fs::remove_dir(d);
        }
    }
    result
}

/// A resumed trainer set to run to `steps` in all (`--resume` with `--steps`), which must be beyond
/// the checkpoint's step.
pub fn continue_to(mut trainer: Trainer, steps: u64) -> Result<Trainer> {
    if steps <= trainer.step_count() {
        bail!(
            "--resume: the checkpoint is already at step {}; pass a larger --steps",
            trainer.step_count()
        );
    }
    trainer.set_total_steps(steps);
    eprintln!("resuming from step {} of {steps}", trainer.step_count());
    Ok(trainer)
}

/// Says when the precision asked for does not run here: bf16 on a CPU without AVX-512 BF16, or for a
/// model other than the MLP engine and the CPU U-Net.
pub fn note_precision(
    asked: flowmatching::precision::Precision,
    in_force: flowmatching::precision::Precision,
) {
    if asked == in_force {
        return;
    }
    let units = flowmatching::precision::cpu_units();
    let why = match units.bf16_matmul() {
        false => format!("this CPU ({}) has no AVX-512 BF16", units.describe()),
        true => "bf16 runs the matrix products of the MLP engine and of the U-Net's CPU convolutions only"
            .to_string(),
    };
    eprintln!(
        "precision: {} asked, but {why}: matrix products run {}",
        asked.name(),
        in_force.name()
    );
}
