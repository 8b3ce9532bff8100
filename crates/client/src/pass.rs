//! What a local pass sends, and in which order: pure, so that a model test can
//! drive it (`tests/engine_model.rs`). The engine's local pass finds the changed
//! and the vanished paths (scan against index, with its settle rules), asks
//! [`plan`] what to send, and carries it out against the server.

use crate::index::Synced;
use crate::scan::LocalFile;
use replibox_proto::ContentHash;
use std::collections::{BTreeMap, BTreeSet};

/// The requests of one local pass, in the order they are sent: folders, moves,
/// then deletes, then uploads (deletes before uploads, so that a file replaced by
/// a folder, or the reverse, frees its name before the new content needs it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Folders to make on the server (empty ones, or ones already entries), in
    /// path order: parents before children.
    pub folders: Vec<String>,
    /// A new file with the size, mtime, execute bit and content of a vanished
    /// one is that file, moved: renamed on the server instead of sent again.
    pub moves: Vec<(String, String)>,
    /// Vanished paths to delete on the server.
    pub deletes: Vec<String>,
    /// Paths to upload, in path order.
    pub uploads: Vec<String>,
    /// Vanished paths whose deletion is held back (the deletion grace).
    pub held: Vec<String>,
}

impl Plan {
    /// The server would not rename `from` to `to`: fall back to deleting `from`
    /// (or holding its deletion back) and uploading `to`, as if no move had been
    /// seen.
    pub fn move_refused(&mut self, from: &str, to: &str, hold_deletes: bool) {
        if hold_deletes {
            self.held.push(from.to_string());
            self.uploads.retain(|u| !names_collide(from, u));
        } else {
            self.deletes.push(from.to_string());
        }
        if !(hold_deletes && self.held.iter().any(|d| names_collide(d, to))) {
            let at = self.uploads.partition_point(|u| u.as_str() < to);
            self.uploads.insert(at, to.to_string());
        }
    }
}

/// True when `a` and `b` cannot both be live files: the same path, or one a folder
/// on the way to the other.
pub fn names_collide(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| x.len() > y.len() && x.starts_with(y) && x.as_bytes()[y.len()] == b'/';
    a == b || under(a, b) || under(b, a)
}

/// Plans a local pass. `changed`: the paths to send (in path order, settled);
/// `deleted`: indexed paths with no file now; `hold_deletes`: deletions must wait
/// (a file whose name a held deletion frees waits too: sent first, the server
/// would refuse it for good). `hash_of` gives the content hash of a local file,
/// asked only for a new file whose metadata matches a vanished one's.
pub fn plan(
    changed: &[String],
    deleted: &BTreeSet<String>,
    local: &BTreeMap<String, LocalFile>,
    index: &BTreeMap<String, Synced>,
    hold_deletes: bool,
    mut hash_of: impl FnMut(&str) -> Option<ContentHash>,
) -> Plan {
    let mut p = Plan::default();
    let mut left = deleted.clone();
    let mut fresh = Vec::new();
    // A folder is made, never moved (a moved folder is a delete and a create);
    // one whose name a held deletion frees waits like a file would.
    let (folders, changed): (Vec<&String>, Vec<&String>) =
        changed.iter().partition(|c| local.get(*c).is_some_and(|l| l.dir));
    p.folders = folders
        .into_iter()
        .filter(|f| !(hold_deletes && deleted.iter().any(|d| names_collide(d, f))))
        .cloned()
        .collect();
    for path in changed {
        let moved = match (index.get(path), local.get(path)) {
            (None, Some(l)) => moved_from(l, &left, index, || hash_of(path)),
            _ => None,
        };
        match moved {
            Some(from) => {
                left.remove(&from);
                p.moves.push((from, path.clone()));
            }
            None => fresh.push(path.clone()),
        }
    }
    if hold_deletes {
        p.held = left.into_iter().collect();
        p.uploads = fresh.into_iter().filter(|f| !p.held.iter().any(|d| names_collide(d, f))).collect();
    } else {
        p.deletes = left.into_iter().collect();
        p.uploads = fresh;
    }
    p
}

/// The vanished path (among `candidates`) that `l` is, moved: same size, mtime
/// and execute bit as its index entry, and the same content.
fn moved_from(
    l: &LocalFile,
    candidates: &BTreeSet<String>,
    index: &BTreeMap<String, Synced>,
    hash: impl FnOnce() -> Option<ContentHash>,
) -> Option<String> {
    if l.dir {
        return None;
    }
    let matching: Vec<&String> =
        candidates.iter().filter(|c| index.get(*c).is_some_and(|i| !i.dir && i.matches(l))).collect();
    if matching.is_empty() {
        return None;
    }
    let hash = hash()?;
    matching.into_iter().find(|c| index.get(*c).is_some_and(|i| i.hash == hash)).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use replibox_proto::Version;

    fn file(size: u64, mtime_ns: i128) -> LocalFile {
        LocalFile { size, mtime_ns, exec: false, dir: false }
    }

    #[test]
    fn a_vanished_file_found_under_a_new_name_is_a_move_and_the_rest_are_deletes_then_uploads() {
        let l = file(5, 7);
        let index: BTreeMap<String, Synced> = [
            ("old".to_string(), Synced::of(Version(3), ContentHash(9), &l)),
            ("gone".to_string(), Synced::of(Version(1), ContentHash(1), &file(1, 1))),
        ]
        .into();
        let local: BTreeMap<String, LocalFile> = [("new".to_string(), l), ("other".to_string(), file(2, 2))].into();
        let deleted: BTreeSet<String> = ["old".to_string(), "gone".to_string()].into();
        let changed = vec!["new".to_string(), "other".to_string()];
        let p = plan(&changed, &deleted, &local, &index, false, |_| Some(ContentHash(9)));
        assert_eq!(p.moves, vec![("old".to_string(), "new".to_string())]);
        assert_eq!(p.deletes, vec!["gone".to_string()]);
        assert_eq!(p.uploads, vec!["other".to_string()]);
        // Another content: no move.
        let p = plan(&changed, &deleted, &local, &index, false, |_| Some(ContentHash(8)));
        assert!(p.moves.is_empty());
        assert_eq!(p.deletes, vec!["gone".to_string(), "old".to_string()]);
        assert_eq!(p.uploads, changed);
    }

    #[test]
    fn folders_are_made_first_never_moved_and_wait_for_a_held_deletion_of_their_name() {
        let dir = LocalFile { size: 0, mtime_ns: 0, exec: false, dir: true };
        let index: BTreeMap<String, Synced> =
            [("gone".to_string(), Synced::of(Version(1), ContentHash(0), &file(0, 0)))].into();
        let local: BTreeMap<String, LocalFile> =
            [("e".to_string(), dir), ("gone/x".to_string(), dir), ("f".to_string(), file(1, 1))].into();
        let deleted: BTreeSet<String> = ["gone".to_string()].into();
        let changed = vec!["e".to_string(), "f".to_string(), "gone/x".to_string()];
        let p = plan(&changed, &deleted, &local, &index, false, |_| Some(ContentHash(0)));
        assert_eq!(p.folders, vec!["e".to_string(), "gone/x".to_string()]);
        assert!(p.moves.is_empty(), "a folder is never taken for a moved file");
        assert_eq!(p.deletes, vec!["gone".to_string()]);
        assert_eq!(p.uploads, vec!["f".to_string()]);
        let p = plan(&changed, &deleted, &local, &index, true, |_| Some(ContentHash(0)));
        assert_eq!(p.folders, vec!["e".to_string()], "gone/x waits for the deletion of gone");
    }

    #[test]
    fn held_deletions_hold_back_the_uploads_whose_names_they_free() {
        let index: BTreeMap<String, Synced> =
            [("a".to_string(), Synced::of(Version(1), ContentHash(1), &file(1, 1)))].into();
        let local: BTreeMap<String, LocalFile> =
            [("a/b".to_string(), file(2, 2)), ("c".to_string(), file(3, 3))].into();
        let deleted: BTreeSet<String> = ["a".to_string()].into();
        let changed = vec!["a/b".to_string(), "c".to_string()];
        let p = plan(&changed, &deleted, &local, &index, true, |_| None);
        assert_eq!(p.held, vec!["a".to_string()]);
        assert!(p.deletes.is_empty());
        assert_eq!(p.uploads, vec!["c".to_string()]);
        let mut refused = Plan { uploads: vec!["c".into()], ..Plan::default() };
        refused.move_refused("x", "b", false);
        assert_eq!((refused.deletes, refused.uploads), (vec!["x".to_string()], vec!["b".to_string(), "c".to_string()]));
        assert!(names_collide("a", "a/b") && names_collide("a/b", "a") && !names_collide("a", "ab"));
    }
}
