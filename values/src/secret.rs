//! Secrets (passwords, tokens): a string that never prints itself, and the one rule for the
//! one-line files that hold them.

use std::fmt;

use zeroize::Zeroizing;

/// A password that never shows itself in `Debug` or `Display` output (and so never in logs,
/// errors or status) and is wiped from memory when dropped. Use [`Secret::expose`] at the one
/// place that really needs the text.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The password itself. Call it only where the value is sent or written, never to format.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Equality for comparing configurations, not for checking a password someone presents (that
/// would want a constant-time comparison).
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why the text of a secret file is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SecretLineError {
    #[error("content is not UTF-8")]
    NotUtf8,
    #[error("file is empty")]
    Empty,
    #[error("password contains a NUL or newline")]
    NulOrNewline,
}

/// The secret a file holds: UTF-8, one trailing newline (`\n` or `\r\n`) dropped so files
/// written by `echo` or an editor work, not empty (that would mean an empty password), and
/// no NUL or newline inside.
pub fn secret_from_line(bytes: &[u8]) -> Result<Secret, SecretLineError> {
    let text = std::str::from_utf8(bytes).map_err(|_| SecretLineError::NotUtf8)?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(text);
    if text.is_empty() {
        return Err(SecretLineError::Empty);
    }
    if text.contains(['\0', '\n']) {
        return Err(SecretLineError::NulOrNewline);
    }
    Ok(Secret::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_itself() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> Secret(<redacted>)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn one_line_rule() {
        assert_eq!(secret_from_line(b"pw\n").unwrap().expose(), "pw");
        assert_eq!(secret_from_line(b"pw\r\n").unwrap().expose(), "pw");
        assert_eq!(secret_from_line(b"pw").unwrap().expose(), "pw");
        assert_eq!(secret_from_line(b"\n").unwrap_err(), SecretLineError::Empty);
        assert_eq!(
            secret_from_line(b"a\nb").unwrap_err(),
            SecretLineError::NulOrNewline
        );
        assert_eq!(
            secret_from_line(b"a\0b").unwrap_err(),
            SecretLineError::NulOrNewline
        );
        assert_eq!(
            secret_from_line(b"\xff").unwrap_err(),
            SecretLineError::NotUtf8
        );
    }
}
