//! The device-mapper engine (NetBSD's dev / pdev / table / target split): synchronous, driven by
//! typed [`Command`]s, free of sockets and wire formats.

pub mod command;
pub mod device;
pub mod engine;
pub mod error;
pub mod pdev;
pub mod stats;
pub mod table;
pub mod target;
pub mod types;

pub use command::*;
pub use engine::{Engine, EngineConfig};
pub use error::{DmError, DmResult};
pub use types::*;

#[cfg(test)]
mod tests;
