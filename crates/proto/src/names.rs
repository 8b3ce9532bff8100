//! Validation of usernames and of file paths inside a user's directory.
//!
//! Every path that crosses the wire is relative to the user's directory, made of
//! `/`-separated components; none may be empty, `.`, `..`, contain NUL or a
//! backslash, or start with `.replibox` (the client's own state). Paths are checked
//! at every edge: the server before touching the disk, the client before writing
//! anything it received.

use std::fmt;

/// Longest path accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest path component accepted, in bytes (the usual file system limit).
pub const MAX_COMPONENT: usize = 255;
/// Prefix of the names the client keeps for itself; never synced.
pub const RESERVED_PREFIX: &str = ".replibox";

/// Why a username or path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    /// The refused input, as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid name {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for NameError {}

fn refuse<T>(input: &str, reason: &'static str) -> Result<T, NameError> {
    Err(NameError { input: input.to_string(), reason })
}

/// Checks a username: `[A-Za-z0-9_.-]{1,64}`, not starting with a dot.
pub fn validate_username(user: &str) -> Result<(), NameError> {
    if user.is_empty() || user.len() > 64 {
        return refuse(user, "a username has 1 to 64 characters");
    }
    if user.starts_with('.') {
        return refuse(user, "a username may not start with a dot");
    }
    if !user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-') {
        return refuse(user, "a username uses only A-Z, a-z, 0-9, '_', '.' and '-'");
    }
    Ok(())
}

/// Checks a path relative to a user's directory.
pub fn validate_path(path: &str) -> Result<(), NameError> {
    if path.is_empty() {
        return refuse(path, "the path is empty");
    }
    if path.len() > MAX_PATH {
        return refuse(path, "the path is longer than 4096 bytes");
    }
    if path.contains('\0') {
        return refuse(path, "the path contains a NUL byte");
    }
    if path.contains('\\') {
        return refuse(path, "the path contains a backslash");
    }
    if path.starts_with('/') {
        return refuse(path, "absolute paths are not allowed");
    }
    for component in path.split('/') {
        match component {
            "" => return refuse(path, "the path has an empty component"),
            "." | ".." => return refuse(path, "'.' and '..' are not allowed in a path"),
            c if c.len() > MAX_COMPONENT => return refuse(path, "a path component is longer than 255 bytes"),
            c if c.starts_with(RESERVED_PREFIX) => return refuse(path, "names starting with .replibox are reserved"),
            _ => {}
        }
    }
    Ok(())
}

/// True for a path component the client keeps for itself.
pub fn is_reserved(component: &str) -> bool {
    component.starts_with(RESERVED_PREFIX)
}

/// Whether `xfer` is a transfer name as a primary makes them (`x` PID, time,
/// counter): it becomes a file name on backups and devices, so nothing else is
/// taken.
pub fn is_transfer_name(xfer: &str) -> bool {
    !xfer.is_empty() && xfer.len() <= 128 && xfer.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["alice", "a", "Bob_1.x-y", &"u".repeat(64)] {
            assert!(validate_username(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".alice", "a/b", "a b", "../x", "é", &"u".repeat(65), "a\0b"] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths() {
        for ok in ["a", "a/b/c.txt", "with space.pdf", "ünïcödé/ファイル", "a..b", ".hidden"] {
            assert!(validate_path(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(256);
        for bad in [
            "",
            "/etc/passwd",
            "../bob/x",
            "a/../../b",
            "a//b",
            "a/",
            "./a",
            "a\0b",
            "a\\b",
            ".replibox/index",
            "d/.replibox-tmp",
            &long,
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    /// The length limits are inclusive: 4096 bytes of path and 255 bytes of
    /// component are accepted, one more byte is not.
    #[test]
    fn length_limits_are_exact() {
        let component = "c".repeat(MAX_COMPONENT);
        assert!(validate_path(&component).is_ok());
        assert!(validate_path(&format!("{component}c")).is_err());
        // Components of 99 bytes and a slash: every 100th byte is a slash.
        let path_of = |len: usize| -> String {
            let p: String = (0..len).map(|i| if i % 100 == 99 { '/' } else { 'p' }).collect();
            assert!(!p.ends_with('/'));
            p
        };
        assert!(validate_path(&path_of(MAX_PATH)).is_ok(), "exactly 4096 bytes is allowed");
        assert_eq!(validate_path(&path_of(MAX_PATH + 1)).unwrap_err().reason, "the path is longer than 4096 bytes");
    }

    #[test]
    fn reserved_names_are_the_clients_own() {
        for reserved in [".replibox", ".replibox-tmp", ".replibox.json"] {
            assert!(is_reserved(reserved), "{reserved}");
        }
        for ordinary in ["replibox", "a.replibox", ".hidden", "x"] {
            assert!(!is_reserved(ordinary), "{ordinary}");
        }
    }

    #[test]
    fn error_names_the_input() {
        let e = validate_path("../bob/x").unwrap_err();
        assert!(e.to_string().contains("../bob/x"));
    }
}
