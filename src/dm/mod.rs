//! The device-mapper engine (NetBSD's dev / pdev / table / target split).

pub mod command;
pub mod error;
pub mod types;

pub use command::*;
pub use error::{DmError, DmResult};
pub use types::*;
