//! What the image's integration tests share: the binaries under test.

use std::path::{Path, PathBuf};

/// `pilot-image`, as cargo built it for this test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pilot-image");

/// The agent binary built next to this one by `cargo build --release --workspace`.
pub fn agent_bin() -> PathBuf {
    let bin = Path::new(BIN).with_file_name("pilot-agent");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --workspace` first",
        bin.display()
    );
    bin
}
