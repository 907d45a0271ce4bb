//! `mirror` (the kernel's dm-raid1, linux-dm-abi.md §5): being built. Its dirty logs come first.

pub mod log;
