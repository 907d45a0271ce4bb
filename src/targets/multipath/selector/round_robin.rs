//! Placeholder: being written.

use super::PathSelector;
use crate::dm::DmResult;
use crate::invalid;

pub(super) fn create(_args: &[String]) -> DmResult<Box<dyn PathSelector>> {
    Err(invalid!("path selector not yet available"))
}
