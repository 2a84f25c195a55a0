//! The library's error type.

/// Everything that can go wrong in the library. Every variant names the problem in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Input data are unusable (empty, wrong shape, not finite, ...).
    #[error("invalid data: {0}")]
    Data(String),
    /// A checkpoint is missing, truncated, corrupted or from another model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    /// Training produced a NaN or an infinity.
    #[error("training diverged at step {step}: {what} is not finite (NaN or Inf); {advice}")]
    NonFinite {
        step: u64,
        what: String,
        /// What to change, given the run's settings.
        advice: String,
    },
    /// An ODE solve could not finish (a solve with `throw` set; otherwise the solution says so).
    #[error("{0}")]
    SolverStopped(SolveStop),
    /// An I/O error, with the file it concerns. (The OS error is part of the message, not a separate
    /// source, so that printing the error chain does not repeat it.)
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            error: source,
        }
    }
}

/// Where and why an ODE solve stopped before reaching its final time (step limit, step-size
/// underflow, a state that is no longer finite).
#[derive(Debug, Clone, PartialEq)]
pub struct SolveStop {
    pub reason: String,
    /// Time, step size and attempted steps of the sample that stopped the solve.
    pub t: f64,
    pub h: f64,
    pub steps: usize,
    /// The time each sample had reached.
    pub t_reached: Vec<f64>,
}

impl std::fmt::Display for SolveStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the ODE solve stopped at t = {:.6} with step size h = {:.3e} after {} steps: {}",
            self.t, self.h, self.steps, self.reason
        )
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
