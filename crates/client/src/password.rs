//! Where the user's password comes from: `--password-file PATH`, else the
//! `REPLIBOX_PASSWORD` environment variable, else a prompt without echo when
//! there is a terminal to ask on. The password itself never leaves the client:
//! the login proves it (see `replibox_proto::auth::scram`).

use std::io::IsTerminal;
use std::path::Path;

/// The environment variable a password may come from.
pub const ENV: &str = "REPLIBOX_PASSWORD";

/// The largest password file read: a bound keeps a wrong path (a log, a device)
/// from being read whole.
const MAX_FILE: u64 = 4096;

/// The password in `path`: its first line, without the line ending (so that
/// `echo secret > file` works). An empty one is refused.
pub fn from_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("");
    non_empty(line.to_string()).map_err(|e| format!("{e} (in {})", path.display()))
}

fn non_empty(password: String) -> Result<String, String> {
    if password.is_empty() {
        Err("the password is empty".into())
    } else {
        Ok(password)
    }
}

/// Asks on the terminal, without echo.
pub fn prompt(text: &str) -> Result<String, String> {
    let password = rpassword::prompt_password(text).map_err(|e| format!("cannot read a password: {e}"))?;
    non_empty(password)
}

/// The password to log in with, from the first source that has one.
pub fn for_login(file: Option<&Path>, user: &str) -> Result<String, String> {
    if let Some(path) = file {
        return from_file(path);
    }
    if let Some(text) = std::env::var_os(ENV) {
        let text = text.into_string().map_err(|_| format!("{ENV} is not valid UTF-8"))?;
        return non_empty(text).map_err(|e| format!("{e} ({ENV})"));
    }
    if std::io::stdin().is_terminal() {
        return prompt(&format!("password for {user} (a first login creates the account with it): "));
    }
    Err(format!(
        "no password for {user}: give it with --password-file PATH or the {ENV} environment variable \
         (or start the client on a terminal to be asked); a first login creates the account with it"
    ))
}

/// A new password for `passwd`: from `file`, or asked twice on the terminal.
pub fn new_password(file: Option<&Path>) -> Result<String, String> {
    if let Some(path) = file {
        return from_file(path);
    }
    if !std::io::stdin().is_terminal() {
        return Err("no terminal to ask on: give the new password in a file, passwd PATH".into());
    }
    let first = prompt("new password: ")?;
    let again = prompt("the new password again: ")?;
    if first != again {
        return Err("the two passwords differ; nothing changed".into());
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_gives_its_first_line_and_refuses_an_empty_one() {
        let dir = std::env::temp_dir().join(format!("replibox-password-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret with spaces\r\nnext line\n").unwrap();
        assert_eq!(from_file(&file).unwrap(), "s3cret with spaces");
        std::fs::write(&file, "\n").unwrap();
        assert!(from_file(&file).unwrap_err().contains("empty"));
        let missing = from_file(&dir.join("missing")).unwrap_err();
        assert!(missing.contains("cannot read the password file"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
