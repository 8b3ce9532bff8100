//! What to do with one path, given what the server, the disk and the index say.
//!
//! Pure: the sync engine calls [`decide`] for every path at login (and whenever it
//! must catch up), then carries the action out. The rule is that no change is ever
//! lost: when both sides changed, both survive (a conflicted copy, or the edit
//! winning over the delete).

use crate::index::Synced;
use crate::scan::LocalFile;
use replibox_proto::names::MAX_COMPONENT;
use replibox_proto::{FileMeta, Version};

/// What the engine should do with a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Already in sync.
    Nothing,
    /// Send the local file; `base` is the server version it replaces.
    Upload {
        /// Version the upload replaces (None: a new file).
        base: Option<Version>,
    },
    /// Delete the server's file, which the device saw at `base`.
    DeleteRemote {
        /// The version deleted.
        base: Version,
    },
    /// Fetch the server's version.
    Download,
    /// Delete the local file (deleted on the server, unchanged here).
    DeleteLocal,
    /// Drop the index entry (gone on both sides).
    ForgetIndex,
    /// Record the server's version in the index: the same thing is on both
    /// sides (a folder here and a folder there; a folder has no content that
    /// could differ).
    Adopt,
    /// Both sides changed the file: keep the server's under the name and the
    /// local one as a conflicted copy (unless their contents are equal).
    Conflict,
}

/// True when the local file differs from what was last in sync.
pub fn locally_changed(local: Option<&LocalFile>, index: Option<&Synced>) -> bool {
    match (local, index) {
        (Some(l), Some(i)) => !i.matches(l),
        (None, None) => false,
        _ => true,
    }
}

/// Decides one path.
pub fn decide(server: Option<&FileMeta>, local: Option<&LocalFile>, index: Option<&Synced>) -> Action {
    let live = server.filter(|m| !m.deleted);
    if let (Some(s), Some(l)) = (live, local) {
        if s.dir && l.dir {
            let known = index.is_some_and(|i| i.dir && i.version == s.version);
            return if known { Action::Nothing } else { Action::Adopt };
        }
    }
    if let (Some(s), Some(i), Some(l)) = (server, index, local) {
        // The server forgot what this device last synced: its version went back,
        // or another content (or a delete) carries the very version. Only a
        // failover after a partition does that: a primary cut off from its
        // backups acknowledged it, and the other side's primary never had it
        // (docs/reliability.md, "Partitions"). The unchanged local copy is that
        // acknowledged change: it is sent again, or kept as a conflicted copy
        // beside a different one, never overwritten (which would lose it on the
        // device too, or leave the device and the server disagreeing for good).
        if i.matches(l) {
            if s.version < i.version || (s.version == i.version && s.deleted) {
                return Action::Upload { base: live.map(|m| m.version) };
            }
            if s.version == i.version && s.hash != i.hash {
                return Action::Conflict;
            }
        }
    }
    let local_changed = locally_changed(local, index);
    let server_changed = match (server, index) {
        (Some(s), Some(i)) => s.version != i.version,
        (Some(s), None) => !s.deleted,
        // The server has no record at all (a new data dir): nothing changed there
        // that could win over the local copy, which is sent again below.
        (None, _) => false,
    };
    match (local_changed, server_changed) {
        (false, false) => {
            if local.is_some() && server.is_none() {
                Action::Upload { base: None }
            } else {
                Action::Nothing
            }
        }
        (true, false) => match (local, live) {
            (Some(_), _) => Action::Upload { base: live.map(|m| m.version) },
            (None, Some(m)) => Action::DeleteRemote { base: m.version },
            (None, None) => Action::ForgetIndex,
        },
        (false, true) => match (local, live) {
            (_, Some(_)) => Action::Download,
            (Some(_), None) => Action::DeleteLocal,
            (None, None) => Action::ForgetIndex,
        },
        (true, true) => match (local, live) {
            (Some(_), Some(_)) => Action::Conflict,
            (Some(_), None) => Action::Upload { base: None },
            (None, Some(_)) => Action::Download,
            (None, None) => Action::ForgetIndex,
        },
    }
}

/// `dir/name (conflicted copy DEVICE DATE).ext`, with ` 2`, ` 3`... after DATE
/// while `taken` says the name exists. The name is shortened (never the part from
/// ` (conflicted copy` on) so that it stays within the file system's 255 bytes.
pub fn conflicted_name(path: &str, device: &str, date: &str, taken: impl Fn(&str) -> bool) -> String {
    let (dir, file) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    // A leading dot is part of the name (".bashrc"), not an extension.
    let (stem, ext) = match file.rfind('.') {
        Some(i) if i > 0 => (&file[..i], &file[i..]),
        _ => (file, ""),
    };
    let mut n = 1;
    loop {
        let suffix = if n == 1 { String::new() } else { format!(" {n}") };
        let mut tail = format!(" (conflicted copy {device} {date}{suffix}){ext}");
        let mut stem = stem;
        if tail.len() >= MAX_COMPONENT {
            // An extension too long to keep: it becomes part of the name.
            tail = format!(" (conflicted copy {device} {date}{suffix})");
            stem = file;
        }
        let candidate = format!("{dir}{}{tail}", truncate(stem, MAX_COMPONENT.saturating_sub(tail.len())));
        if !taken(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use replibox_proto::ContentHash;

    fn meta(v: u64, deleted: bool) -> FileMeta {
        FileMeta {
            path: "p".into(),
            version: Version(v),
            size: 1,
            mtime_ms: 0,
            hash: ContentHash::of(b"s"),
            deleted,
            atime_ms: 0,
            ctime_ms: 0,
            exec: false,
            dir: false,
        }
    }
    fn synced(v: u64) -> Synced {
        Synced { version: Version(v), size: 1, mtime_ns: 10, hash: ContentHash::of(b"s"), exec: false, dir: false }
    }
    const SAME: LocalFile = LocalFile { size: 1, mtime_ns: 10, exec: false, dir: false };
    const EDITED: LocalFile = LocalFile { size: 2, mtime_ns: 20, exec: false, dir: false };

    fn folder(v: u64, deleted: bool) -> FileMeta {
        FileMeta { dir: true, size: 0, hash: ContentHash::default(), ..meta(v, deleted) }
    }
    fn synced_folder(v: u64) -> Synced {
        Synced::of(Version(v), ContentHash::default(), &LocalFile::DIR)
    }

    /// Folders follow the files' rules (made, removed, the change winning over
    /// a delete), except that a folder here and a folder there are always the
    /// same: never a conflict, the server's version is recorded.
    #[test]
    fn folders() {
        use Action::*;
        let dir = LocalFile::DIR;
        let (live, newer, gone) = (folder(3, false), folder(4, false), folder(4, true));
        let file = meta(3, false);
        type Case<'a> = (Option<&'a FileMeta>, Option<&'a LocalFile>, Option<Synced>, Action);
        let cases: Vec<Case> = vec![
            (Some(&live), Some(&dir), Some(synced_folder(3)), Nothing),
            (None, Some(&dir), None, Upload { base: None }),
            (Some(&gone), Some(&dir), None, Upload { base: None }),
            (Some(&live), None, Some(synced_folder(3)), DeleteRemote { base: Version(3) }),
            (Some(&gone), Some(&dir), Some(synced_folder(3)), DeleteLocal),
            (Some(&live), Some(&dir), None, Adopt),
            (Some(&newer), Some(&dir), Some(synced_folder(3)), Adopt),
            (Some(&newer), None, Some(synced_folder(3)), Download),
            (Some(&live), None, None, Download),
            (Some(&gone), None, Some(synced_folder(3)), ForgetIndex),
            // A file replaced by a folder here, and the reverse: sent over the
            // version this device saw.
            (Some(&file), Some(&dir), Some(synced(3)), Upload { base: Some(Version(3)) }),
            (Some(&live), Some(&SAME), Some(synced_folder(3)), Upload { base: Some(Version(3)) }),
            // A folder here where the server has a file nobody here saw: both kept.
            (Some(&file), Some(&dir), None, Conflict),
        ];
        for (i, (s, l, idx, want)) in cases.into_iter().enumerate() {
            assert_eq!(decide(s, l, idx.as_ref()), want, "case {i}");
        }
    }

    /// After a partition the server may hold less than this device synced (a
    /// blind primary acknowledged it, then was replaced): the device's copy is
    /// sent again or kept beside the server's, never overwritten.
    #[test]
    fn a_server_that_forgot_what_was_synced_gets_it_again() {
        let older = meta(2, false);
        assert_eq!(decide(Some(&older), Some(&SAME), Some(&synced(3))), Action::Upload { base: Some(Version(2)) });
        let older_tomb = meta(2, true);
        assert_eq!(decide(Some(&older_tomb), Some(&SAME), Some(&synced(3))), Action::Upload { base: None });
        let same_tomb = meta(3, true);
        assert_eq!(decide(Some(&same_tomb), Some(&SAME), Some(&synced(3))), Action::Upload { base: None });
        let mut other = meta(3, false);
        other.hash = ContentHash::of(b"other side");
        assert_eq!(decide(Some(&other), Some(&SAME), Some(&synced(3))), Action::Conflict);
        // Edited here too: both survive, as for any change on both sides.
        assert_eq!(decide(Some(&older), Some(&EDITED), Some(&synced(3))), Action::Conflict);
    }

    #[test]
    fn every_case() {
        use Action::*;
        let live = meta(3, false);
        let newer = meta(4, false);
        let gone = meta(4, true);
        type Case<'a> = (Option<&'a FileMeta>, Option<&'a LocalFile>, Option<Synced>, Action);
        let cases: Vec<Case> = vec![
            (Some(&live), Some(&SAME), Some(synced(3)), Nothing),
            (Some(&live), Some(&EDITED), Some(synced(3)), Upload { base: Some(Version(3)) }),
            (Some(&live), None, Some(synced(3)), DeleteRemote { base: Version(3) }),
            (Some(&newer), Some(&SAME), Some(synced(3)), Download),
            (Some(&gone), Some(&SAME), Some(synced(3)), DeleteLocal),
            (Some(&newer), Some(&EDITED), Some(synced(3)), Conflict),
            (Some(&gone), Some(&EDITED), Some(synced(3)), Upload { base: None }),
            (Some(&newer), None, Some(synced(3)), Download),
            (Some(&gone), None, Some(synced(3)), ForgetIndex),
            (Some(&live), None, None, Download),
            (None, Some(&SAME), None, Upload { base: None }),
            (Some(&live), Some(&SAME), None, Conflict),
            (Some(&gone), None, None, Nothing),
            (Some(&gone), Some(&SAME), None, Upload { base: None }),
            (None, Some(&SAME), Some(synced(3)), Upload { base: None }),
            (None, None, Some(synced(3)), ForgetIndex),
        ];
        for (i, (s, l, idx, want)) in cases.into_iter().enumerate() {
            assert_eq!(decide(s, l, idx.as_ref()), want, "case {i}");
        }
    }

    #[test]
    fn conflicted_names() {
        let never = |_: &str| false;
        assert_eq!(
            conflicted_name("a/report.pdf", "dev1", "2026-11-26", never),
            "a/report (conflicted copy dev1 2026-11-26).pdf"
        );
        assert_eq!(conflicted_name("notes", "d", "x", never), "notes (conflicted copy d x)");
        assert_eq!(conflicted_name(".bashrc", "d", "x", never), ".bashrc (conflicted copy d x)");
        let first = "f (conflicted copy d x).txt".to_string();
        assert_eq!(conflicted_name("f.txt", "d", "x", |c| c == first), "f (conflicted copy d x 2).txt");
    }

    #[test]
    fn conflicted_names_stay_within_255_bytes() {
        let long = format!("dir/{}.txt", "n".repeat(240));
        let copy = conflicted_name(&long, "0123abcd", "2026-11-26", |_| false);
        let file = copy.strip_prefix("dir/").unwrap();
        assert!(file.len() <= MAX_COMPONENT, "{} bytes", file.len());
        assert!(file.ends_with(" (conflicted copy 0123abcd 2026-11-26).txt"), "{copy}");
        assert!(file.starts_with("nnnn"));
        // Multi-byte characters are cut whole.
        let wide = format!("{}.md", "é".repeat(126));
        let copy = conflicted_name(&wide, "d", "2026-11-26", |_| false);
        assert!(copy.len() <= MAX_COMPONENT && copy.ends_with(" (conflicted copy d 2026-11-26).md"), "{copy}");
        // An extension too long to keep whole.
        let ext = format!("a.{}", "x".repeat(250));
        let copy = conflicted_name(&ext, "d", "x", |_| false);
        assert!(copy.len() <= MAX_COMPONENT && copy.ends_with(" (conflicted copy d x)"), "{copy}");
        // Numbering keeps within the limit too.
        let copy = conflicted_name(&long, "0123abcd", "2026-11-26", |c| !c.contains(" 2)"));
        assert!(copy.strip_prefix("dir/").unwrap().len() <= MAX_COMPONENT && copy.contains("2026-11-26 2).txt"));
    }
}
