//! Fuzz target: the configuration parser (`Config::from_yaml`), the one parser of a file an
//! operator or user-data writes. Any input must give a config or diagnostics, never a panic,
//! and every diagnostic must point inside the input (line 1..=breaks+2).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    // The agent reads the file with read_to_string: non-UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(diagnostics) = Config::from_yaml(text) {
        assert!(!diagnostics.is_empty(), "an error without a diagnostic");
        // YAML counts a lone CR as a line break too (editors may not): an upper bound.
        let lines = text.bytes().filter(|b| matches!(b, b'\n' | b'\r')).count() + 1;
        for d in &diagnostics {
            assert!(
                d.line >= 1 && d.line <= lines + 1,
                "diagnostic outside the input: {d}"
            );
        }
    }
});
