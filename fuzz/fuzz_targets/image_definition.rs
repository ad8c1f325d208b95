//! Fuzz target: `pilot-image build --target local`'s build definition file
//! (`local::Definition::from_yaml`: YAML over the embedded defaults, then validated). Any text
//! must give a definition or an error, never panic or hang. A definition holds only checked
//! values (an http(s) mirror without a final `/`, suite, components and packages as plain
//! words, at least one format and none twice, a disk of at least `MIN_DISK_SIZE_MIB`, a safe
//! name, an absolute images directory, a one-line kernel command line, `*.tar` images with
//! distinct names); an error names the file, and a position it gives is inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_image::local::definition::MIN_DISK_SIZE_MIB;
use pilot_image::local::{Definition, LocalError, Overrides};

const ORIGIN: &str = "/etc/pilot/image.yaml";

fn word(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-._:".contains(c))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Definition::from_yaml(text, ORIGIN, Overrides::default()) {
        Ok(d) => {
            if let Some(m) = &d.mirror {
                assert!(
                    m.starts_with("http://") || m.starts_with("https://"),
                    "{m:?}"
                );
                assert!(!m.ends_with('/'), "{m:?}");
            }
            assert!(word(&d.suite), "{:?}", d.suite);
            assert!(!d.components.is_empty());
            assert!(d.components.iter().chain(&d.packages).all(|p| word(p)));
            assert!(!d.formats.is_empty());
            for (i, f) in d.formats.iter().enumerate() {
                assert!(!d.formats[..i].contains(f), "format {f} twice");
            }
            assert!(d.disk_size_mib >= MIN_DISK_SIZE_MIB);
            assert!(!d.name.is_empty() && !d.name.starts_with('.'));
            assert!(
                d.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            );
            assert!(d.images_dir.is_absolute());
            assert!(!d.kernel_cmdline.contains('\n'));
            let mut names = Vec::new();
            for i in &d.images {
                let n = i
                    .file_name()
                    .expect("an image file name")
                    .to_string_lossy()
                    .into_owned();
                assert!(n.ends_with(".tar") && !names.contains(&n), "{n}");
                names.push(n);
            }
            for f in &d.formats {
                let out = d.output_path(*f);
                assert!(out.starts_with(&d.output_dir), "{}", out.display());
            }
        }
        Err(LocalError::Definition { origin, message }) => {
            assert_eq!(origin, ORIGIN, "{message}");
            // serde_norway's "at line L column C".
            if let Some(rest) = message.rsplit_once(" at line ").map(|(_, r)| r) {
                let line: usize = rest
                    .split(' ')
                    .next()
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let lines = text.bytes().filter(|b| matches!(b, b'\n' | b'\r')).count() + 1;
                assert!(
                    line >= 1 && line <= lines + 1,
                    "position outside the file: {message}"
                );
            }
        }
        Err(LocalError::Invalid { field, message }) => {
            assert!(!field.is_empty(), "{message}");
        }
        Err(e) => panic!("an unexpected error for a definition: {e}"),
    }
});
