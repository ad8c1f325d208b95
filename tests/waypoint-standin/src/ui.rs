//! How Waypoint's CLI prints when stdout is not a terminal (always the case under `docker exec`
//! without `-t`, and in container logs): its non-interactive UI. Errors go to STDOUT as `! `
//! plus the first line, each following line indented by two spaces; headers are `\n» TEXT`;
//! warnings `warning: TEXT`; named values are right-aligned `  name: value` rows followed by a
//! blank line. Error texts pass through Waypoint's `Humanize`, which word-wraps at 80 columns.
//!
//! The stand-in's own log lines are NOT this: they stay on stderr with the `waypoint stand-in:`
//! prefix ([`crate::log!`]).

use std::io::Write;

/// Word-wraps `text` at `limit` columns the way Go's `mitchellh/go-wordwrap` does: breaks
/// replace the whitespace before a word that would overflow, existing newlines are kept, and a
/// word longer than the limit is never split.
pub fn wrap(text: &str, limit: usize) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut current = 0usize;
    let mut word = String::new();
    let mut word_len = 0usize;
    let mut space = String::new();
    let mut space_len = 0usize;
    for c in text.chars() {
        if c == '\n' {
            if word.is_empty() {
                if current + space_len <= limit {
                    out.push_str(&space);
                }
            } else {
                out.push_str(&space);
                out.push_str(&word);
                word.clear();
                word_len = 0;
            }
            space.clear();
            space_len = 0;
            out.push('\n');
            current = 0;
        } else if c.is_whitespace() && c != '\u{a0}' {
            if space.is_empty() || !word.is_empty() {
                current += space_len + word_len;
                out.push_str(&space);
                out.push_str(&word);
                space.clear();
                space_len = 0;
                word.clear();
                word_len = 0;
            }
            space.push(c);
            space_len += 1;
        } else {
            word.push(c);
            word_len += 1;
            if current + space_len + word_len > limit && word_len < limit {
                out.push('\n');
                current = 0;
                space.clear();
                space_len = 0;
            }
        }
    }
    if word.is_empty() {
        if current + space_len <= limit {
            out.push_str(&space);
        }
    } else {
        out.push_str(&space);
        out.push_str(&word);
    }
    out
}

/// Waypoint's `clierrors.Humanize` of an error message: wrapped at 80 columns.
pub fn humanize(message: &str) -> String {
    wrap(message, 80)
}

/// The error style: `! ` + first line, `  ` + each following line.
pub fn error_text(message: &str) -> String {
    let mut out = String::new();
    for (i, line) in message.split('\n').enumerate() {
        out.push_str(if i == 0 { "! " } else { "  " });
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn stdout_write(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout is not worth a panic; the exit code still tells the story.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Prints an error in Waypoint's error style on stdout.
pub fn error(message: &str) {
    stdout_write(&error_text(message));
}

/// Prints a plain line on stdout (Waypoint's default and success styles).
pub fn output(message: &str) {
    stdout_write(&format!("{message}\n"));
}

/// Prints a header (`\n» TEXT`) on stdout.
pub fn header(message: &str) {
    stdout_write(&format!("\n» {message}\n"));
}

/// Prints a step line of a step group (`-> TEXT`) on stdout: the non-interactive UI prints
/// each `Add` and `Update` of a step that way, and nothing for `Done` or `Abort`.
pub fn step(message: &str) {
    stdout_write(&format!("-> {message}\n"));
}

/// Prints a warning (`warning: TEXT`) on stdout.
pub fn warning(message: &str) {
    stdout_write(&format!("warning: {message}\n"));
}

/// Waypoint's `NamedValues`: rows `  NAME: VALUE`, the `  NAME: ` cells right-aligned to the
/// widest, rows with an empty value left out, then an empty line.
pub fn named_values_text(rows: &[(&str, String)]) -> String {
    let cells: Vec<(String, &str)> = rows
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, v)| (format!("  {n}: "), v.as_str()))
        .collect();
    let width = cells
        .iter()
        .map(|(c, _)| c.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (cell, value) in cells {
        let pad = width - cell.chars().count();
        out.push_str(&" ".repeat(pad));
        out.push_str(&cell);
        out.push_str(value);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// Prints [`named_values_text`] on stdout.
pub fn named_values(rows: &[(&str, String)]) {
    stdout_write(&named_values_text(rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_bang_lines_with_indented_continuations() {
        assert_eq!(error_text("one"), "! one\n");
        assert_eq!(error_text("one\n\ntwo"), "! one\n  \n  two\n");
    }

    #[test]
    fn wraps_like_go_wordwrap() {
        assert_eq!(wrap("short text", 80), "short text");
        let long = "Token has expired. The token was valid until: 2026-01-01 00:00:00 +0000 UTC. \
                    Please reauthenticate to continue accessing Waypoint.: invalid authentication token";
        let wrapped = wrap(long, 80);
        assert!(
            wrapped.lines().all(|l| l.chars().count() <= 80),
            "{wrapped}"
        );
        assert!(wrapped.lines().count() >= 2, "{wrapped}");
        assert_eq!(
            wrapped.replace('\n', " "),
            long,
            "only spaces become newlines"
        );
        assert_eq!(wrap("keep\nnewlines", 80), "keep\nnewlines");
        let word = "x".repeat(100);
        assert_eq!(wrap(&word, 80), word, "a long word is never split");
    }

    #[test]
    fn named_values_are_right_aligned_and_skip_empty() {
        let text = named_values_text(&[
            ("advertise-addr", "10.0.0.1:9701".into()),
            ("advertise-tls", "true".into()),
            ("advertise-tls-skip-verify", "false".into()),
            ("empty", String::new()),
        ]);
        assert_eq!(
            text,
            "             advertise-addr: 10.0.0.1:9701\n              advertise-tls: true\n  advertise-tls-skip-verify: false\n\n"
        );
    }
}
