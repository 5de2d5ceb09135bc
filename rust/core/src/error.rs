//! Errors of the core crate.

/// Result alias used across the core crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the core can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidInput(String),
}
