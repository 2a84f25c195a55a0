//! One module per subcommand; each turns parsed arguments into library calls.

pub mod ablate;
pub mod classifier;
pub mod couplings;
pub mod demo;
pub mod eval;
pub mod image_eval;
pub mod infill;
pub mod likelihood;
pub mod reflow;
pub mod sample;
pub mod schedules;
pub mod solvers;
pub mod speech_corpus;
pub mod train;
pub mod train_speech;
