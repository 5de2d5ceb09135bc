//! logitcache core: the on-disk store format, its codecs, the writer and reader,
//! and the CPU loss kernels. This crate knows nothing of Python.

pub mod clean;
pub mod codec;
pub mod copy;
pub mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod kernels;
pub mod manifest;
pub mod merge;
pub mod pool;
pub mod progress;
pub mod reader;
pub mod rebuild;
pub mod record;
pub mod remove;
pub mod repair;
pub mod source;
#[cfg(test)]
mod test_util;
pub mod threads;
pub mod topk;
pub mod verify;
pub mod writer;

pub use error::{Error, Location, Result};

/// Version of this crate, recorded in every manifest as the creating tool.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
