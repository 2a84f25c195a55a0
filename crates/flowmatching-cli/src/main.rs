//! The `flowmatching` command. Argument parsing lives in [`cli`]; each subcommand is a small module in
//! [`cmd`] that calls the library.

mod cli;
mod cmd;
#[cfg(test)]
mod fuzz;
mod images;
mod io;
mod plot;
mod progress;

use clap::Parser;

// glibc malloc returns every large activation buffer to the OS and faults it back in on the next step;
// mimalloc keeps them. Measured on the demo: see the README performance notes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = cli::Cli::parse();
    let result = match &args.command {
        cli::Command::Demo(a) => cmd::demo::run(a),
        cli::Command::Train(a) => cmd::train::run(a),
        cli::Command::Sample(a) => cmd::sample::run(a),
        cli::Command::Likelihood(a) => cmd::likelihood::run(a),
        cli::Command::Solvers(a) => cmd::solvers::run(a),
        cli::Command::Bench(a) => cmd::bench::run(a),
        cli::Command::Ablate(a) => cmd::ablate::run(a),
        cli::Command::Classifier(a) => cmd::classifier::run(a),
        cli::Command::ImageEval(a) => cmd::image_eval::run(a),
        cli::Command::Eval(a) => cmd::eval::run(a),
        cli::Command::Reflow(a) => cmd::reflow::run(a),
        cli::Command::Couplings(a) => cmd::couplings::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
