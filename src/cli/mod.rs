//! `dmemu`'s subcommands, one file each; `main.rs` parses the command line and dispatches here.

pub mod exec;
pub mod hwh;
pub mod nbsd;
pub mod serve;
pub mod switch;

/// Every subcommand's result: a message for standard error on failure (`dmemu: <message>`).
pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;
