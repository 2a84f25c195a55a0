//! One module per subcommand; each turns parsed arguments into library calls.

pub mod ablate;
pub mod bench;
pub mod classifier;
pub mod demo;
pub mod image_eval;
pub mod likelihood;
pub mod sample;
pub mod solvers;
pub mod train;
