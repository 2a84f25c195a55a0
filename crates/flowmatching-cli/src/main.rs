//! The `flowmatching` command. Argument parsing lives in [`cli`]; each subcommand is a small module in
//! [`cmd`] that calls the library.

mod ablation_out;
mod cli;
mod cmd;
mod espeak;
#[cfg(test)]
mod fuzz;
mod images;
mod io;
mod memory;
mod outputs;
mod plot;
mod progress;
mod report;
mod resolve;
mod sampling;
mod studies;
mod training;

use clap::{CommandFactory, FromArgMatches};

/// The ids of the options the command line gave (not defaults).
fn given_on_command_line(m: &clap::ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

// glibc malloc returns every large activation buffer to the OS and faults it back in on the next step;
// mimalloc keeps them. Measured on the demo: see the README performance notes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: its place in mimalloc v3's `mi_option_e` (libmimalloc-sys names
/// only some options; the test below checks this one by its documented default of 1000 ms).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// Keeps the pages mimalloc frees instead of returning them to the OS a second later: a training step
/// frees and reallocates the same activations every step, and each returned page came back as a page
/// fault the kernel zeroed. On the CPU U-Net step at batch 32 (`bench b5-step --unet tiny --batch 32`,
/// 2026-11-26) page faults fell from ~20,000 to ~500 per run and the step was faster in 11 of 13
/// alternated pairs (median -4%); the batch-8 step, U-Net sampling and the MLP engine (whose buffers
/// are reused anyway) did not change. The process keeps its peak memory until it exits.
fn keep_freed_pages() {
    // SAFETY: sets one of mimalloc's documented options (thread-safe); -1 means "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// `FLOWMATCHING_CONV=cpu|candle|gemm-backward` picks the convolution for A/B comparisons.
fn conv_from_env() -> flowmatching::Result<()> {
    if let Ok(name) = std::env::var("FLOWMATCHING_CONV") {
        flowmatching::nn::set_conv_impl(Some(flowmatching::nn::ConvImpl::from_name(&name)?));
    }
    Ok(())
}

/// A write past the file-size limit (RLIMIT_FSIZE) then fails with EFBIG, which the command reports and
/// cleans up after, instead of SIGXFSZ killing the process with a temporary file left behind.
fn write_errors_instead_of_sigxfsz() {
    // SAFETY: sets the disposition of one signal to "ignore"; no handler runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() {
    keep_freed_pages();
    write_errors_instead_of_sigxfsz();
    if let Err(e) = conv_from_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let matches = cli::Cli::command().get_matches();
    let mut args = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (cli::Command::Train(a), Some(("train", m))) = (&mut args.command, matches.subcommand())
    {
        a.given = given_on_command_line(m);
    }
    let result = match &args.command {
        cli::Command::Demo(a) => cmd::demo::run(a),
        cli::Command::Train(a) => match cmd::train_speech::corpus_dir(&a.data) {
            Some(dir) => cmd::train_speech::run(a, &dir),
            None => cmd::train::run(a),
        },
        cli::Command::Sample(a) => cmd::sample::run(a),
        cli::Command::Likelihood(a) => cmd::likelihood::run(a),
        cli::Command::Solvers(a) => cmd::solvers::run(a),
        cli::Command::Ablate(a) => cmd::ablate::run(a),
        cli::Command::Classifier(a) => cmd::classifier::run(a),
        cli::Command::ImageEval(a) => cmd::image_eval::run(a),
        cli::Command::Eval(a) => cmd::eval::run(a),
        cli::Command::Reflow(a) => cmd::reflow::run(a),
        cli::Command::Couplings(a) => cmd::couplings::run(a),
        cli::Command::Schedules(a) => cmd::schedules::run(a),
        cli::Command::SpeechCorpus(a) => cmd::speech_corpus::run(a),
        cli::Command::Infill(a) => cmd::infill::run(a),
    };
    if let Err(e) = result {
        if e.downcast_ref::<training::Interrupted>().is_some() {
            // The training loop has said where its checkpoint is.
            std::process::exit(130);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MI_OPTION_PURGE_DELAY is mimalloc's purge delay: its documented default is 1000 ms (no other
    /// option defaults to that), and setting it reads back.
    #[test]
    fn purge_delay_option_is_the_one_we_set() {
        // SAFETY: reads and sets mimalloc options (thread-safe).
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
            keep_freed_pages();
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), -1);
        }
    }
}
