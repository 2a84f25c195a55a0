//! Experiments as library functions: a configuration in, numbers out, no files written (the command
//! line renders reports and figures from the results).
//!
//! - [`ablation`]: the flow-matching paper's five-objective ablation (Table 1, Figures 4, 7 and 10);
//! - [`couplings`]: independent, minibatch OT and Sinkhorn couplings and one round of reflow compared
//!   on straightness, few-step quality and cost.

pub mod ablation;
pub mod couplings;
pub mod schedules;
