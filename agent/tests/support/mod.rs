//! Shared helpers of the agent's integration tests.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod pg;
