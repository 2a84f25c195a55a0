//! Progress bars and Ctrl-C handling for long commands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar showing step, loss, steps/s and ETA.
pub fn training_bar(total: u64, start: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps | loss {msg} | {per_sec} | ETA {eta}",
        )
        .expect("static template"),
    );
    bar.set_position(start);
    bar.reset_eta();
    bar
}

/// A bar counting items (points, samples) with rate and ETA.
pub fn counter_bar(total: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit} | {{per_sec}} | ETA {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template"));
    bar
}

/// A flag set when the user presses Ctrl-C (installed once per process).
pub fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        // If a handler cannot be installed, Ctrl-C simply ends the process as usual.
        let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
        flag
    })
    .clone()
}

/// The training bar of a study that trains one run after another: started per run, advanced per step
/// (the loss shown every 20 steps), cleared when the run is done.
#[derive(Default)]
pub struct RunBars(Option<ProgressBar>);

impl RunBars {
    pub fn start(&mut self, from: u64, steps: u64) {
        self.0 = Some(training_bar(steps, from));
    }

    pub fn step(&self, step: u64, loss: f64) {
        if let Some(bar) = &self.0 {
            bar.set_position(step);
            if step.is_multiple_of(20) {
                bar.set_message(format!("{loss:.4}"));
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}
