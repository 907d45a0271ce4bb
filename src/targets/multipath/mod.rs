//! `multipath` 1.15.0 (linux-dm-abi.md §4, the kernel's `dm-mpath.c`, seed 004's hardware-handler
//! hooks). Being written.

pub mod handler;
pub mod selector;
