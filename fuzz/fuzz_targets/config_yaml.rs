//! Fuzz target: the configuration parser (`Config::from_yaml`), the one parser of a file an
//! operator or user-data writes, on raw text (the libFuzzer dictionary fuzz/dict/config_yaml.dict
//! holds its keys and YAML's indicators). Any input must give a configuration or diagnostics,
//! never a panic, a stack overflow or a hang; every diagnostic must point inside the input
//! (line and column); an accepted configuration must build a ruleset that matches its own nft
//! listing (see `pilot_agent_fuzz::check_config`). Inputs up to the size bound and beyond
//! (`-max_len=1100000`: `bounds::MAX_BYTES` is 1 MiB).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The agent reads the file with read_to_string: non-UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    pilot_agent_fuzz::check_config(text);
});
