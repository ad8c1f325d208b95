//! Fuzz target: the backup file reader (`pilot-agent restore FILE` reads a file an operator
//! brings from elsewhere, as root). Any input must be refused or read, never panic; a file it
//! accepts must have every part the manifest lists with the listed size and SHA-256, and must
//! survive the agent's own encoding and read back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_agent::backup::archive::{self, Part};

fuzz_target!(|data: &[u8]| {
    let Ok(backup) = archive::decode(data, "fuzz.tar") else {
        return;
    };
    // The oracle: what was accepted matches its manifest exactly.
    assert_eq!(backup.parts.len(), backup.manifest.parts.len());
    for info in &backup.manifest.parts {
        let bytes = &backup.parts[&info.name];
        assert_eq!(bytes.len() as u64, info.size, "{}", info.name);
        assert_eq!(archive::sha256_hex(bytes), info.sha256, "{}", info.name);
    }
    let parts: Vec<Part> = backup
        .manifest
        .parts
        .iter()
        .map(|i| Part {
            name: i.name.clone(),
            data: backup.parts[&i.name].clone(),
            runner_id: i.runner_id.clone(),
        })
        .collect();
    let encoded = archive::encode(backup.manifest.clone(), &parts, 0).expect("encodes");
    let again = archive::decode(&encoded[..], "again.tar")
        .unwrap_or_else(|e| panic!("a backup the agent wrote does not read back: {e}"));
    assert_eq!(again.manifest, backup.manifest);
    assert_eq!(again.parts, backup.parts);
});
