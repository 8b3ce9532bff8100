//! The cluster key: 256 random bits that every server of a cluster holds, and
//! nothing else does. It is the secret of [`super::cluster`]'s handshake.
//!
//! # The file
//! One line of 64 hex digits. [`ClusterKey::save_new`] creates it with mode 0600
//! and never replaces an existing file. [`ClusterKey::load`] **refuses** a file that
//! its group or others may read or write, with the `chmod` that fixes it: anyone
//! who can read the key can join the cluster and receive every user's files, so a
//! readable key is a hole, not a style issue; OpenSSH refuses such private keys for
//! the same reason, and users know the fix. Warning instead would need a logger in
//! `proto` (it has none) and would be scrolled past. The servers and the tests
//! create the file through [`ClusterKey::save_new`], so the check costs the lab
//! set-up nothing; only a key copied by hand under a loose umask trips it.

use super::encoding::{hex_decode, hex_encode};
use super::AuthError;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// Length of a key, and of every nonce, in bytes.
pub const KEY_LEN: usize = 32;

/// The largest key file read: the key is 65 bytes; a bound keeps a wrong path (a
/// log, a device) from being read whole.
const MAX_FILE: u64 = 1024;

/// 32 fresh random bytes, used once: the nonces of every handshake.
pub type Nonce = [u8; KEY_LEN];

/// A fresh nonce from the operating system.
pub fn fresh_nonce() -> Result<Nonce, AuthError> {
    let mut n = [0u8; KEY_LEN];
    getrandom::fill(&mut n).map_err(AuthError::Random)?;
    Ok(n)
}

/// A cluster's shared secret. `Debug` does not print it; `==` compares in constant
/// time.
#[derive(Clone)]
pub struct ClusterKey([u8; KEY_LEN]);

impl ClusterKey {
    /// A new random key, for `-p` on a data dir without one.
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).map_err(KeyError::Random)?;
        Ok(ClusterKey(k))
    }

    /// A key from known bytes (tests, and keys held elsewhere).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        ClusterKey(bytes)
    }

    /// The secret bytes, for the MACs of this module only.
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A short name for this key that reveals nothing of it (the first 4 bytes of an
    /// HMAC under the key, hex), so that a log can say which key a server holds and
    /// two operators can tell whether theirs are the same.
    pub fn fingerprint(&self) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(b"replibox cluster key fingerprint v1");
        hex_encode(&mac.finalize().into_bytes()[..4])
    }

    /// Reads a key file: 64 hex digits, surrounding whitespace allowed. Refuses a
    /// file that is not a regular file, or that group or others may access (see the
    /// module doc).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io_err = |op, source| KeyError::Io { path: path.to_path_buf(), op, source };
        let file = File::open(path).map_err(|e| io_err("open", e))?;
        // The checks look at the file that was opened, not at the path again.
        let meta = file.metadata().map_err(|e| io_err("inspect", e))?;
        if !meta.is_file() {
            return Err(KeyError::Malformed { path: path.to_path_buf(), why: "it is not a regular file" });
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: path.to_path_buf(), mode });
        }
        let mut text = String::new();
        file.take(MAX_FILE).read_to_string(&mut text).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => {
                KeyError::Malformed { path: path.to_path_buf(), why: "it is not text; want 64 hex digits" }
            }
            _ => io_err("read", e),
        })?;
        hex_decode::<KEY_LEN>(text.trim())
            .map(ClusterKey)
            .ok_or(KeyError::Malformed { path: path.to_path_buf(), why: "want one line of 64 hex digits" })
    }

    /// Writes the key to a new file with mode 0600, durably (file and directory
    /// synced), and atomically: the file appears whole or not at all. An existing
    /// file is never replaced ([`KeyError::Exists`]): replacing a cluster's key by
    /// accident would lock the other servers out.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        let io_err = |op, source| KeyError::Io { path: path.to_path_buf(), op, source };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().ok_or(KeyError::Malformed { path: path.to_path_buf(), why: "it names no file" })?;
        let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(format!("{}\n", hex_encode(&self.0)).as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", e));
        }
        // A hard link, unlike a rename, fails when the name is taken.
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(KeyError::Exists { path: path.to_path_buf() })
            }
            Err(e) => return Err(io_err("create", e)),
        }
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io_err("sync the directory of", e))
    }

    /// The key at `path`, created there first if there is no file (`-p` on a data
    /// dir without a key). The flag says whether it was created, so the caller can
    /// log how to start a backup with it.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        match Self::load(path) {
            Ok(key) => Ok((key, false)),
            Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                match key.save_new(path) {
                    Ok(()) => Ok((key, true)),
                    // Another process made it in between: theirs is the key.
                    Err(KeyError::Exists { .. }) => Ok((Self::load(path)?, false)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

impl PartialEq for ClusterKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for ClusterKey {}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({})", self.fingerprint())
    }
}

/// Why a cluster key could not be made, read or written.
#[derive(Debug)]
pub enum KeyError {
    /// A file operation failed.
    Io {
        /// The key file.
        path: PathBuf,
        /// What was being done ("open", "read", "write", ...).
        op: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The file does not hold a key.
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Group or others may access the file.
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// [`ClusterKey::save_new`] found a file already there.
    Exists {
        /// The key file.
        path: PathBuf,
    },
    /// The operating system gave no random bytes.
    Random(getrandom::Error),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Io { path, op, source } => write!(f, "cannot {op} cluster key file {}: {source}", path.display()),
            KeyError::Malformed { path, why } => {
                write!(f, "cluster key file {} does not hold a key: {why}", path.display())
            }
            KeyError::Exposed { path, mode } => write!(
                f,
                "cluster key file {} may be read by other users (mode {mode:04o}); \
                 anyone who reads it can join the cluster. Run: chmod 600 {}",
                path.display(),
                path.display()
            ),
            KeyError::Exists { path } => {
                write!(f, "cluster key file {} already exists; not replacing it", path.display())
            }
            KeyError::Random(e) => write!(f, "cannot get random bytes for a cluster key: {e}"),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyError::Io { source, .. } => Some(source),
            KeyError::Random(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("replibox-key-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn save_then_load_gives_the_same_key_in_a_0600_file() {
        let dir = Dir::new("roundtrip");
        let path = dir.0.join("cluster.key");
        let key = ClusterKey::generate().unwrap();
        key.save_new(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1, "no temporary file left behind");
    }

    #[test]
    fn save_never_replaces_an_existing_key() {
        let dir = Dir::new("exists");
        let path = dir.0.join("cluster.key");
        let first = ClusterKey::from_bytes([1; 32]);
        first.save_new(&path).unwrap();
        let err = ClusterKey::from_bytes([2; 32]).save_new(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert_eq!(ClusterKey::load(&path).unwrap(), first);
    }

    #[test]
    fn load_or_create_creates_once_then_loads() {
        let dir = Dir::new("create");
        let path = dir.0.join("cluster.key");
        let (made, created) = ClusterKey::load_or_create(&path).unwrap();
        assert!(created);
        let (again, created) = ClusterKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(made, again);
    }

    #[test]
    fn a_key_readable_by_others_is_refused_with_the_fix() {
        let dir = Dir::new("exposed");
        let path = dir.0.join("cluster.key");
        ClusterKey::from_bytes([7; 32]).save_new(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = ClusterKey::load(&path).unwrap_err();
            assert!(matches!(err, KeyError::Exposed { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(ClusterKey::load(&path).is_ok(), "read-only for the owner is fine");
    }

    #[test]
    fn malformed_files_are_refused_with_a_reason() {
        let dir = Dir::new("malformed");
        let path = dir.0.join("cluster.key");
        let cases: [&[u8]; 6] = [b"", b"abc\n", &[b'a'; 63], &[b'a'; 65], b"zz", &[0xff; 64]];
        for content in cases {
            let _ = fs::remove_file(&path);
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = ClusterKey::load(&path).unwrap_err();
            assert!(matches!(err, KeyError::Malformed { .. }), "{content:?}: {err}");
        }
        // Uppercase and surrounding whitespace are accepted: a key pasted by hand.
        fs::write(&path, format!("  {}\r\n", "AB".repeat(32))).unwrap();
        assert_eq!(ClusterKey::load(&path).unwrap(), ClusterKey::from_bytes([0xab; 32]));
        let err = ClusterKey::load(&dir.0).unwrap_err();
        assert!(matches!(err, KeyError::Malformed { .. } | KeyError::Exposed { .. }), "{err}");
        let err = ClusterKey::load(&dir.0.join("missing")).unwrap_err();
        assert!(err.to_string().starts_with("cannot open cluster key file"), "{err}");
    }

    #[test]
    fn debug_shows_a_fingerprint_not_the_key() {
        let key = ClusterKey::from_bytes([0x5a; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("5a5a"), "{shown}");
        assert_eq!(shown, format!("ClusterKey({})", key.fingerprint()));
        assert_eq!(key.fingerprint().len(), 8);
        assert_ne!(key.fingerprint(), ClusterKey::from_bytes([0x5b; 32]).fingerprint());
    }

    #[test]
    fn equality_compares_every_byte() {
        let a = ClusterKey::from_bytes([9; 32]);
        let mut other = [9; 32];
        other[31] = 8;
        assert_ne!(a, ClusterKey::from_bytes(other));
        assert_eq!(a, a.clone());
    }
}
