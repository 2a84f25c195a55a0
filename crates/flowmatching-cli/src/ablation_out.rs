//! An ablation's --out folder as it runs: what is saved at every Figure 10 point and measured objective
//! (so that an interrupted run continues with `--resume`), and the key that says which run it holds.

use std::path::Path;

use anyhow::{bail, Result};
use flowmatching::experiments::ablation::{ObjectiveResult, Observer, Progress, Sizes};
use flowmatching::objective::Objective;
use flowmatching::train::Trainer;

use crate::report::ablation::{file_name, picture};
use crate::{io, progress};

/// Progress bars, the Figure 4 picture and a checkpoint for each objective as it finishes; the saved
/// state of an interrupted run (a checkpoint and `progress.json` per objective at its last Figure 10
/// point, `results/NAME.json` once it is measured).
pub struct Reporter<'a> {
    pub out: &'a Path,
    pub image: Option<[usize; 3]>,
    pub window: (f32, f32),
    pub device: candle_core::Device,
    pub bars: progress::RunBars,
    /// Wall seconds an earlier run of this ablation spent on what this one takes over.
    pub carried: f64,
}

impl Reporter<'_> {
    fn checkpoint_dir(&self, objective: Objective) -> std::path::PathBuf {
        self.out.join("checkpoints").join(file_name(objective))
    }

    fn result_file(&self, objective: Objective) -> std::path::PathBuf {
        self.out
            .join("results")
            .join(format!("{}.json", file_name(objective)))
    }
}

fn lib_error(e: anyhow::Error) -> flowmatching::Error {
    flowmatching::Error::Data(format!("{e:#}"))
}

impl Observer for Reporter<'_> {
    fn finished_before(
        &mut self,
        objective: Objective,
    ) -> Result<Option<ObjectiveResult>, flowmatching::Error> {
        let path = self.result_file(objective);
        if !path.exists() {
            return Ok(None);
        }
        let r: ObjectiveResult = io::read_json(&path).map_err(lib_error)?;
        eprintln!(
            "ablate: {} already measured ({})",
            objective.name(),
            path.display()
        );
        self.carried += r.seconds;
        Ok(Some(r))
    }

    fn resume(
        &mut self,
        objective: Objective,
        config: &flowmatching::train::RunConfig,
    ) -> Result<Option<(Trainer, Progress)>, flowmatching::Error> {
        let dir = self.checkpoint_dir(objective);
        let record = dir.join("progress.json");
        if !record.exists() {
            return Ok(None);
        }
        let progress: Progress = io::read_json(&record).map_err(lib_error)?;
        let ck = flowmatching::checkpoint::Checkpoint::load(&dir, &self.device)?;
        if &ck.meta.config != config || ck.meta.step != progress.step {
            // Interrupted between saving the checkpoint and its record: start this objective afresh.
            eprintln!(
                "ablate: {}: the checkpoint in {} does not match its progress record; training it again",
                objective.name(),
                dir.display()
            );
            return Ok(None);
        }
        self.carried += progress.seconds;
        Ok(Some((ck.into_trainer(&self.device)?, progress)))
    }

    fn progress(
        &mut self,
        objective: Objective,
        trainer: &Trainer,
        progress: &Progress,
    ) -> Result<(), flowmatching::Error> {
        let dir = self.checkpoint_dir(objective);
        flowmatching::checkpoint::save(trainer, &dir, Some(progress.last_loss))?;
        io::write_json(&dir.join("progress.json"), progress).map_err(lib_error)
    }

    fn started(&mut self, objective: Objective, from: u64, steps: u64) {
        match from {
            0 => eprintln!("ablate: {} ({steps} steps)", objective.name()),
            _ => eprintln!(
                "ablate: {} (continuing at step {from} of {steps})",
                objective.name()
            ),
        }
        self.bars.start(from, steps);
    }

    fn step(&mut self, step: u64, loss: f64) {
        self.bars.step(step, loss);
    }

    fn finished(
        &mut self,
        trainer: &Trainer,
        row: &[Vec<f32>],
        r: &ObjectiveResult,
    ) -> Result<(), flowmatching::Error> {
        self.bars.finish();
        let name = file_name(r.objective);
        picture(
            &self.out.join(format!("samples-{name}.png")),
            row,
            self.image,
            self.window,
        )
        .map_err(lib_error)?;
        flowmatching::checkpoint::save(
            trainer,
            &self.checkpoint_dir(r.objective),
            Some(r.final_loss),
        )?;
        let path = self.result_file(r.objective);
        io::ensure_dir(path.parent().expect("results/NAME.json has a parent"))
            .map_err(lib_error)?;
        io::write_json(&path, r).map_err(lib_error)
    }
}

/// What must be the same for `--resume` to continue a run: stored as run.json in --out.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunKey {
    pub data: String,
    pub seed: u64,
    pub sizes: Sizes,
    pub model: flowmatching::nn::ModelConfig,
}

impl RunKey {
    fn describe(&self) -> String {
        format!(
            "data {}, seed {}, {} steps at batch {}",
            self.data, self.seed, self.sizes.steps, self.sizes.batch
        )
    }
}

/// Checks --out against --resume for an ablation.
pub fn claim_out(out: &Path, resume: bool, key: &RunKey) -> Result<()> {
    claim_folder(out, resume, key, "an ablation", RunKey::describe)
}

/// Checks --out against --resume: a fresh run refuses a folder that holds one (its run.json), a
/// resumed run needs the same key. `what` names the kind of run ("an ablation"); `describe` says
/// what a saved key holds.
pub fn claim_folder<K>(
    out: &Path,
    resume: bool,
    key: &K,
    what: &str,
    describe: impl Fn(&K) -> String,
) -> Result<()>
where
    K: PartialEq + serde::Serialize + serde::de::DeserializeOwned,
{
    let path = out.join("run.json");
    match (path.exists(), resume) {
        (false, false) => {}
        (true, false) => bail!(
            "{} holds {what} already: --resume continues it, or choose another --out",
            out.display()
        ),
        (false, true) => bail!(
            "--resume: {} holds no {} to continue (no run.json)",
            out.display(),
            what.split_once(' ').map_or(what, |(_, noun)| noun)
        ),
        (true, true) => {
            let Ok(saved) = io::read_json::<K>(&path) else {
                bail!(
                    "--resume: {} is not the record of {what} (the run.json it writes)",
                    path.display()
                );
            };
            if &saved != key {
                bail!(
                    "--resume: the run in {} was started with other settings ({}); give the same \
                     --data, sizes and --seed",
                    out.display(),
                    describe(&saved)
                );
            }
        }
    }
    io::ensure_dir(out)?;
    io::write_json(&path, key)
}
