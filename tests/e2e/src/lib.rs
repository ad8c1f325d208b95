//! End-to-end suites live in tests/; helpers they share (and the benchmarks in src/bin/) here.

pub mod agent;
