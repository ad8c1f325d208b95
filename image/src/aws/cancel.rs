//! Ctrl-C (SIGINT) and SIGTERM as a cancellation, and the steps' progress lines: the
//! publish machinery both targets share ([`crate::steps`]), under this target's path.

pub use crate::steps::Cancel;
pub(crate) use crate::steps::Progress;
