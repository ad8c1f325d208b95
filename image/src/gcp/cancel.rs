//! Ctrl-C (SIGINT) and SIGTERM as a cancellation, the steps' progress lines, the bound on a
//! wait: the publish machinery both targets share ([`crate::steps`]), under this target's path.

pub(crate) use crate::steps::Progress;
pub use crate::steps::{Cancel, Deadline, secs};
