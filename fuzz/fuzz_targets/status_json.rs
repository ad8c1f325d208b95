//! Fuzz target: the status file reader (`Status`, deserialised from status.json as
//! `Status::read` does) and its renderers as `pilot-agent status` uses them. Any input must
//! be rejected or rendered, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_agent::commands::status::{Observation, render_json, render_text};
use pilot_agent::status::Status;

fuzz_target!(|data: &[u8]| {
    let Ok(status) = serde_json::from_slice::<Status>(data) else {
        return;
    };
    let observation = Observation::Recorded {
        status,
        agent_gone: data.first().is_some_and(|b| b & 1 == 1),
    };
    let _ = render_json(&observation, None);
    let now = pilot_agent::status::now();
    let _ = render_text(&observation, None, 100, true, now);
    let _ = render_text(&observation, None, 0, false, now);
});
