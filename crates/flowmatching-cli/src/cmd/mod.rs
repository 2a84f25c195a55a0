//! One module per subcommand; each turns parsed arguments into library calls.

pub mod ablate;
pub mod bench;
pub mod demo;
pub mod likelihood;
pub mod sample;
pub mod solvers;
pub mod train;
