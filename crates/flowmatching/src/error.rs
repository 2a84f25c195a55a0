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
    #[error("training diverged at step {step}: {what} is not finite (NaN or Inf); lower the learning rate or enable gradient clipping")]
    NonFinite { step: u64, what: String },
    /// An ODE solve could not finish; the error holds the last state and where it stopped.
    #[error("{0}")]
    SolverStopped(Box<crate::solver::SolveError>),
    /// An I/O error, with the file it concerns.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
