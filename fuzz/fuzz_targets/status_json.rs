//! Fuzz target: the status file reader (`Status`, deserialised from status.json as
//! `Status::read` does) and its renderers as `pilot-agent status` and the endpoint's
//! `/v1/status` use them. Any input must be rejected or rendered, never panic; a status read
//! must survive the agent's own write and read unchanged (what `run` rewrites each pass).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_agent::status_file::{self, Status};
use pilot_agent::views::status_report::{Observation, render_json, render_text};

fuzz_target!(|data: &[u8]| {
    let Ok(status) = serde_json::from_slice::<Status>(data) else {
        return;
    };
    // As `Status::write` writes it.
    let written = serde_json::to_vec_pretty(&status).expect("a status serializes");
    let back: Status = serde_json::from_slice(&written)
        .unwrap_or_else(|e| panic!("a status the agent wrote does not read back: {e}"));
    // Timestamps are written with milliseconds: equal after one more round.
    let again: Status = serde_json::from_slice(&serde_json::to_vec_pretty(&back).unwrap()).unwrap();
    assert_eq!(back, again, "status.json does not round-trip");
    let observation = Observation::Recorded {
        status,
        agent_gone: data.first().is_some_and(|b| b & 1 == 1),
    };
    let _ = observation.condition();
    let _ = render_json(&observation, None);
    let now = status_file::now();
    let _ = render_text(&observation, None, 100, true, now);
    let _ = render_text(&observation, None, 0, false, now);
});
