//! Target types, one file each (the way every Linux target is one `target_type`). Adding a target
//! is one new file plus one line in [`registry`].

pub mod delay;
pub mod dust;
pub mod error;
pub mod flakey;
pub mod linear;
pub mod mirror;
pub mod multipath;
mod sscanf;
pub mod striped;
pub mod switch;
pub mod zero;

use crate::dm::target::TargetRegistry;

/// The built-in registry. Order is registration order: the kernel registers error, linear and
/// striped at init and module targets later; LIST_VERSIONS reports newest first.
pub fn registry() -> TargetRegistry {
    let mut r = TargetRegistry::default();
    r.register(&error::TYPE);
    r.register(&linear::TYPE);
    r.register(&striped::TYPE);
    r.register(&zero::TYPE);
    r.register(&switch::TYPE);
    r.register(&flakey::TYPE);
    r.register(&dust::TYPE);
    r.register(&delay::TYPE);
    r.register(&multipath::TYPE);
    r.register(&mirror::TYPE);
    r
}
