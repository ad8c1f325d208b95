//! Waypoint's CLI configuration directory and its contexts, as the stand-in models them.
//!
//! Every command's initialisation makes sure `$XDG_CONFIG_HOME/waypoint` (default
//! `$HOME/.config/waypoint`, mode 0700) exists and fails the command if it cannot, before
//! doing anything else. Contexts live in `<dir>/context/<name>.hcl`; `_default.hcl` (a symlink
//! to one, or a file holding its name) is the default. `server bootstrap` writes one, and the
//! connection of later commands starts from the default context (then the environment, then
//! flags). The files are HCL of the same shape as Waypoint's; the stand-in writes and reads
//! only the attributes below.

use std::path::{Path, PathBuf};

use crate::flags::go_quote;

/// The CLI directory (`$XDG_CONFIG_HOME/waypoint` or `$HOME/.config/waypoint`); `env` looks a
/// variable up. Like Go's `xdg`, a relative `XDG_CONFIG_HOME` is ignored.
pub fn config_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let base = env("XDG_CONFIG_HOME")
        .filter(|v| Path::new(v).is_absolute())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env("HOME").unwrap_or_default()).join(".config"));
    base.join("waypoint")
}

/// Creates the CLI directory if missing (0700), with Go `xdg`'s error text on failure.
pub fn ensure_config_dir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|_| {
            format!(
                "could not create any of the following paths: {}",
                dir.display()
            )
        })
}

/// A Go-style I/O error: `OP PATH: reason` (Go's `*PathError`), e.g.
/// `open /x: permission denied`.
pub fn go_path_error(op: &str, path: &Path, err: &std::io::Error) -> String {
    format!("{op} {}: {}", path.display(), go_errno_text(err))
}

/// The errno text as Go prints it: lower case, without Rust's `(os error N)`.
pub fn go_errno_text(err: &std::io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().collect::<String>() + chars.as_str(),
        None => text,
    }
}

/// The server block of a context (and its workspace).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextConfig {
    pub address: String,
    pub tls: bool,
    pub tls_skip_verify: bool,
    pub require_auth: bool,
    pub auth_token: String,
    pub workspace: String,
}

/// The contexts under one CLI directory.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

impl Storage {
    pub fn new(cli_dir: &Path) -> Storage {
        Storage {
            dir: cli_dir.join("context"),
        }
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.hcl"))
    }

    fn default_path(&self) -> PathBuf {
        self.dir.join("_default.hcl")
    }

    /// Writes context `name` (0755 directory, file created like Go's `os.Create`); when no
    /// default exists yet, it becomes the default, as in Waypoint.
    pub fn set(&self, name: &str, cfg: &ContextConfig) -> Result<(), String> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(|e| go_path_error("mkdir", &self.dir, &e))?;
        let path = self.path_of(name);
        std::fs::write(&path, render(cfg)).map_err(|e| go_path_error("open", &path, &e))?;
        if self.default_name()?.is_none() {
            self.set_default(name)?;
        }
        Ok(())
    }

    /// Makes `name` the default: a symlink `_default.hcl` to it, else a file with its name.
    pub fn set_default(&self, name: &str) -> Result<(), String> {
        let src = self.path_of(name);
        std::fs::metadata(&src).map_err(|e| go_path_error("stat", &src, &e))?;
        let dst = self.default_path();
        match std::fs::remove_file(&dst) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(go_path_error("remove", &dst, &e)),
        }
        if std::os::unix::fs::symlink(&src, &dst).is_ok() {
            return Ok(());
        }
        std::fs::write(&dst, name).map_err(|e| go_path_error("open", &dst, &e))
    }

    /// The default context's name, if one is set.
    pub fn default_name(&self) -> Result<Option<String>, String> {
        let path = self.default_path();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(go_path_error("lstat", &path, &e)),
        };
        if meta.file_type().is_symlink() {
            let target =
                std::fs::read_link(&path).map_err(|e| go_path_error("readlink", &path, &e))?;
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".hcl").to_string())
                .unwrap_or_default();
            return Ok(Some(name));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| go_path_error("open", &path, &e))?;
        Ok(Some(text))
    }

    /// Loads context `name`.
    pub fn load(&self, name: &str) -> Result<ContextConfig, String> {
        let path = self.path_of(name);
        let text = std::fs::read_to_string(&path).map_err(|e| go_path_error("open", &path, &e))?;
        parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The HCL text of a context.
pub fn render(cfg: &ContextConfig) -> String {
    format!(
        "workspace = {}\n\nserver {{\n  address          = {}\n  tls              = {}\n  \
         tls_skip_verify  = {}\n  address_internal = \"\"\n  require_auth     = {}\n  \
         auth_token       = {}\n  platform         = \"\"\n}}\n",
        go_quote(&cfg.workspace),
        go_quote(&cfg.address),
        cfg.tls,
        cfg.tls_skip_verify,
        cfg.require_auth,
        go_quote(&cfg.auth_token),
    )
}

/// Reads the attributes the stand-in writes (strings with Go/HCL escapes, bools) from a
/// context file; anything else that is not blank, a comment or a brace is an error.
pub fn parse(text: &str) -> Result<ContextConfig, String> {
    let mut cfg = ContextConfig::default();
    let mut in_server = false;
    let mut saw_server = false;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
            continue;
        }
        if line == "server {" {
            in_server = true;
            saw_server = true;
            continue;
        }
        if line == "}" && in_server {
            in_server = false;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "line {}: argument or block definition required",
                n + 1
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        let string = || unquote(value).ok_or_else(|| format!("line {}: invalid string", n + 1));
        let boolean = || match value {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("line {}: a bool is required", n + 1)),
        };
        match (in_server, key) {
            (false, "workspace") => cfg.workspace = string()?,
            (true, "address") => cfg.address = string()?,
            (true, "tls") => cfg.tls = boolean()?,
            (true, "tls_skip_verify") => cfg.tls_skip_verify = boolean()?,
            (true, "require_auth") => cfg.require_auth = boolean()?,
            (true, "auth_token") => cfg.auth_token = string()?,
            (true, "address_internal" | "platform") => {
                string()?;
            }
            _ => return Err(format!("line {}: unsupported argument {key:?}", n + 1)),
        }
    }
    if !saw_server || in_server {
        return Err("missing or unclosed server block".into());
    }
    Ok(cfg)
}

fn unquote(value: &str) -> Option<String> {
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dir_follows_xdg() {
        let env = |k: &str| match k {
            "HOME" => Some("/home/waypoint".to_string()),
            "XDG_CONFIG_HOME" => Some("relative/ignored".to_string()),
            _ => None,
        };
        assert_eq!(
            config_dir(&env),
            PathBuf::from("/home/waypoint/.config/waypoint")
        );
        let env = |k: &str| (k == "XDG_CONFIG_HOME").then(|| "/xdg".to_string());
        assert_eq!(config_dir(&env), PathBuf::from("/xdg/waypoint"));
    }

    #[test]
    fn contexts_round_trip_and_the_first_becomes_default() {
        let dir = tempfile::tempdir().unwrap();
        let st = Storage::new(dir.path());
        assert_eq!(st.default_name().unwrap(), None);
        let cfg = ContextConfig {
            address: "127.0.0.1:9701".into(),
            tls: true,
            tls_skip_verify: true,
            require_auth: true,
            auth_token: "tok\"en".into(),
            workspace: String::new(),
        };
        st.set("bootstrap-1", &cfg).unwrap();
        assert_eq!(st.default_name().unwrap().as_deref(), Some("bootstrap-1"));
        assert_eq!(st.load("bootstrap-1").unwrap(), cfg);
        st.set("other", &ContextConfig::default()).unwrap();
        assert_eq!(st.default_name().unwrap().as_deref(), Some("bootstrap-1"));
        st.set_default("other").unwrap();
        assert_eq!(st.default_name().unwrap().as_deref(), Some("other"));
        assert!(parse("garbage").is_err());
    }

    #[test]
    fn unwritable_places_give_go_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = ensure_config_dir(&file.join("waypoint")).unwrap_err();
        assert_eq!(
            err,
            format!(
                "could not create any of the following paths: {}/waypoint",
                file.display()
            )
        );
        let err = Storage::new(&file)
            .set("x", &ContextConfig::default())
            .unwrap_err();
        assert!(err.starts_with("mkdir "), "{err}");
        assert!(err.ends_with(": not a directory"), "{err}");
    }
}
