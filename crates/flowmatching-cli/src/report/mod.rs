//! Reports rendered from experiment results: markdown and PNG figures, separate from the computing.

pub mod ablation;
pub mod couplings;
pub mod schedules;
