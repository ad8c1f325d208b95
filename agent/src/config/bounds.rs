//! Bounds checked on the configuration's text before the YAML parser sees it: its size and how
//! deeply it nests, in block and flow style alike.
//!
//! The YAML loader builds (and later drops) its tree recursively, so input nested deeply enough
//! overflows the stack and aborts the process: a compact block sequence `- - - … x` 100,000
//! deep on one line does it. An abort in `pilot-agent-firewall.service` at boot would leave no
//! table at all, so such input must be refused with an error, like any other bad input. The
//! scan here is lexical and over-estimates depth rather than under-estimates it (every more
//! indented line counts as a level, every `- `, `? ` and `[`/`{`), which is safe because the
//! limits are far above any real configuration: the documented example nests 4 deep and is
//! under 8 KiB.

use super::schema::Diagnostic;

/// The largest configuration read: the documented example is about 7 KiB; user-data, which
/// carries the file, is limited to 16 KiB on AWS and 256 KiB on GCP.
pub const MAX_BYTES: usize = 1024 * 1024;

/// The deepest nesting accepted (mappings, sequences, flow collections together).
pub const MAX_DEPTH: usize = 64;

/// Checks `text` against [`MAX_BYTES`] and [`MAX_DEPTH`]; the error points at the first byte
/// beyond the size limit, or at the indicator that nests too deep.
pub fn check(text: &str) -> Result<(), Diagnostic> {
    if text.len() > MAX_BYTES {
        let (line, col) = position(text, MAX_BYTES);
        return Err(Diagnostic {
            line,
            col,
            message: format!(
                "the configuration is larger than {} KiB ({} bytes); refused before parsing",
                MAX_BYTES / 1024,
                text.len()
            ),
        });
    }
    Scan::default().run(text)
}

/// Line and column (1-based, in characters) of byte `offset`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// The scan's state between lines.
///
/// Block structure is counted from indentation and line-leading indicators alone, whatever
/// quotes or block scalars the line may be part of: a multi-line string can make the count too
/// high (harmless at these limits), never too low. Quotes are tracked only so that brackets and
/// `#` inside them are not taken for flow collections and comments; a mistake there can only
/// miss flow nesting, which the YAML parser bounds itself ("recursion limit exceeded").
#[derive(Default)]
struct Scan {
    /// Indentations of the open block levels, innermost last.
    indents: Vec<usize>,
    /// Open `[` and `{`.
    flow: usize,
    /// Inside a quoted scalar that spans lines: its quote character.
    quote: Option<char>,
}

impl Scan {
    fn run(mut self, text: &str) -> Result<(), Diagnostic> {
        for (n, line) in text.split('\n').enumerate() {
            self.line(n + 1, line.strip_suffix('\r').unwrap_or(line))?;
        }
        Ok(())
    }

    fn too_deep(line: usize, col: usize, depth: usize) -> Diagnostic {
        Diagnostic {
            line,
            col,
            message: format!(
                "the configuration nests deeper than {MAX_DEPTH} levels ({depth} here); \
                 refused before parsing"
            ),
        }
    }

    fn line(&mut self, number: usize, line: &str) -> Result<(), Diagnostic> {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        let rest = &line[indent..];
        if rest.is_empty() || (self.quote.is_none() && rest.starts_with('#')) {
            return Ok(());
        }
        // Block levels: the open ones this line's indentation keeps, and its own.
        while self.indents.last().is_some_and(|&i| i > indent) {
            self.indents.pop();
        }
        if self.indents.last() != Some(&indent) {
            self.indents.push(indent);
        }
        let mut depth = self.indents.len() + self.flow;
        let col_of = |i: usize| indent + rest[..i].chars().count() + 1;
        if depth > MAX_DEPTH {
            return Err(Self::too_deep(number, col_of(0), depth));
        }
        // Compact nesting at the start of the line: `- - x`, `? - x`, `: - x`.
        let mut i = 0;
        while let Some(after) = rest[i..]
            .strip_prefix(['-', '?', ':'])
            .filter(|a| a.is_empty() || a.starts_with([' ', '\t']))
        {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(Self::too_deep(number, col_of(i), depth));
            }
            i = rest.len() - after.trim_start_matches([' ', '\t']).len();
        }
        self.inline(number, rest, i, depth, col_of)
    }

    /// The rest of a line from byte `start`: an implicit `key:` and flow collections.
    fn inline(
        &mut self,
        number: usize,
        rest: &str,
        start: usize,
        mut depth: usize,
        col_of: impl Fn(usize) -> usize,
    ) -> Result<(), Diagnostic> {
        let mut prev = ' ';
        let mut key_seen = false;
        let mut chars = rest[start..]
            .char_indices()
            .map(|(i, c)| (start + i, c))
            .peekable();
        while let Some((i, c)) = chars.next() {
            let next = chars.peek().map_or(' ', |&(_, n)| n);
            if let Some(q) = self.quote {
                if c == q && q == '\'' && next == '\'' {
                    chars.next(); // '' is a quote inside '…'
                } else if c == q {
                    self.quote = None;
                } else if c == '\\' && q == '"' {
                    chars.next();
                }
                prev = c;
                continue;
            }
            let at_node_start = matches!(prev, ' ' | '\t' | '[' | '{' | ',') || i == start;
            match c {
                '#' if matches!(prev, ' ' | '\t') => break,
                '"' | '\'' if at_node_start => self.quote = Some(c),
                '[' | '{' => depth += 1,
                ']' | '}' => depth = depth.saturating_sub(1),
                ':' if self.flow == 0 && !key_seen && matches!(next, ' ' | '\t') => {
                    key_seen = true;
                    depth += 1;
                }
                _ => {}
            }
            match c {
                '[' | '{' => self.flow += 1,
                ']' | '}' => self.flow = self.flow.saturating_sub(1),
                _ => {}
            }
            if depth > MAX_DEPTH {
                return Err(Self::too_deep(number, col_of(i), depth));
            }
            prev = c;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_error(text: &str) -> Option<(usize, usize)> {
        check(text).err().map(|d| (d.line, d.col))
    }

    #[test]
    fn real_configurations_pass() {
        let example = include_str!("../../examples/agent.yaml");
        check(example).unwrap();
        check("").unwrap();
        check("a:\n  b:\n    - c: [1, {d: e}]\n    - |\n        text\n          deeper\n").unwrap();
        check("a: b 'c\nd: [e]\n").unwrap();
        check("a: \"x [ { \\\" ' \"\nb: 'it''s [ {'\n").unwrap();
        check("a: # [ {\n  - b\n").unwrap();
    }

    #[test]
    fn compact_block_sequences_are_bounded() {
        let ok = format!("a:\n{}x\n", "- ".repeat(MAX_DEPTH - 3));
        check(&ok).unwrap();
        let deep = format!("extra_names:\n{}x\n", "- ".repeat(100_000));
        let (line, col) = depth_error(&deep).unwrap();
        assert_eq!(line, 2);
        assert!(col <= 2 * MAX_DEPTH, "{col}");
    }

    #[test]
    fn indented_block_nesting_is_bounded() {
        let mut deep = String::new();
        for i in 0..200 {
            deep.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        let (line, col) = depth_error(&deep).unwrap();
        // Line MAX_DEPTH opens level MAX_DEPTH; its `key:` is one too many.
        let key = format!("k{}", MAX_DEPTH - 1);
        assert_eq!((line, col), (MAX_DEPTH, MAX_DEPTH - 1 + key.len() + 1));
    }

    #[test]
    fn flow_nesting_is_bounded_across_lines() {
        let deep = format!("a: {}\n", "[\n".repeat(100));
        assert!(depth_error(&deep).is_some());
        let deep = format!("a: {}{}\n", "{x: ".repeat(100), "}".repeat(100));
        assert_eq!(depth_error(&deep).map(|p| p.0), Some(1));
        // Brackets inside quotes or comments are text.
        check(&format!(
            "a: \"{}\"\nb: 1 # {}\n",
            "[".repeat(200),
            "{".repeat(200)
        ))
        .unwrap();
    }

    #[test]
    fn size_is_bounded_with_a_position() {
        let big = format!("a: 1\n{}", "#".repeat(MAX_BYTES));
        let d = check(&big).unwrap_err();
        assert_eq!((d.line, d.col), (2, MAX_BYTES - 5 + 1));
        assert!(d.message.contains("larger than 1024 KiB"), "{}", d.message);
    }
}
