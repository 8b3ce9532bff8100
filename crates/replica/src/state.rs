//! The replicated state and the rules that change it.
//!
//! Everything a server knows that must survive its death lives in [`State`] and
//! changes only through [`State::apply`] of an [`Entry`]: the same entries, applied in
//! the same order, give the same state on every server. The decision functions
//! (`check_*`) say whether a request may become an entry; they read the state and
//! never change it. Nothing here touches a disk, a socket or a clock.

pub use replibox_proto::repl::{Change, Entry, LastRequest, Member, Session};
use replibox_proto::{
    ContentHash, DeviceId, Epoch, FileMeta, LogPos, OpResult, Seq, ServerId, StoredCredentials, Version,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Most devices one user may have connected at once.
pub const MAX_DEVICES: usize = 2;

/// Most bytes of file metadata one listing page may carry, well under the frame
/// header limit (`proto::MAX_HEADER`, 64 KiB) that the page travels in.
pub const LISTING_PAGE_BYTES: usize = 40 * 1024;
/// Most entries one listing page carries, so that the `stat` of each live file on
/// a page (for its times) never holds the core up for long.
pub const LISTING_PAGE_FILES: usize = 500;

/// An upper bound of the bytes `meta` takes in a JSON header: every path byte may
/// be escaped as `\u00XX` (6 bytes), and the other fields take well under 256.
fn encoded_bound(meta: &FileMeta) -> usize {
    6 * meta.path.len() + 256
}

pub use replibox_proto::REQUEST_WINDOW;

/// Tombstones kept per user: past this many (checked every [`PRUNE_EVERY`]
/// entries, so up to that many more), the oldest are forgotten. A tombstone is
/// what tells a device that was away that a file it still holds was deleted; a
/// device away across more deletions than this sends such a file back up as a new
/// one (nothing is lost; a deleted file may come back). Without a bound, a user's
/// deletions grew the state, every snapshot and every full listing for ever.
pub const TOMBSTONES_KEPT: usize = 10_000;
/// Tombstones are counted (a walk over every user's files) once every this many
/// entries: at an entry position, so every server prunes at the same entry.
pub const PRUNE_EVERY: u64 = 1024;

/// The replicated state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Position of the last entry applied.
    #[serde(alias = "seq")]
    pub pos: LogPos,
    /// Every user's files and tombstones: user -> path -> metadata.
    pub files: BTreeMap<String, BTreeMap<String, FileMeta>>,
    /// Sessions by device.
    pub sessions: BTreeMap<DeviceId, Session>,
    /// Last changing request of each device.
    pub requests: BTreeMap<DeviceId, LastRequest>,
    /// The changing requests each device made before its last one, oldest first,
    /// at most [`REQUEST_WINDOW`] - 1 of them: a device may have that many
    /// requests in flight, and any of them may be resent after a lost connection
    /// or a failover.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub earlier: BTreeMap<DeviceId, VecDeque<LastRequest>>,
    /// The current epoch (0 before any primary started one).
    #[serde(default)]
    pub epoch: Epoch,
    /// The primary of the current epoch.
    #[serde(default)]
    pub primary: Option<ServerId>,
    /// Every server of the cluster, the primary included.
    #[serde(default)]
    pub members: BTreeMap<ServerId, Member>,
    /// The highest server id ever seen; new ids are assigned above it, so that an
    /// id is never reused for another server.
    #[serde(default)]
    pub max_id: ServerId,
    /// Per user, the highest version of a tombstone forgotten by pruning: a path
    /// created again gets a version above it, so a device that still holds the
    /// forgotten version never takes the new file for the one it has.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pruned: BTreeMap<String, Version>,
    /// Every user's account: what a login's proof is checked against (derived
    /// keys, never a password). Replicated, so a new primary knows every account.
    #[serde(default)]
    pub accounts: BTreeMap<String, StoredCredentials>,
}

/// Why an entry cannot be applied: the history has a gap or goes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfOrder {
    /// The position the state expected next.
    pub expected: LogPos,
    /// The position it was given.
    pub got: LogPos,
}

impl std::fmt::Display for OutOfOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry pos={} out of order, expected pos={}", self.got, self.expected)
    }
}

impl std::error::Error for OutOfOrder {}

impl State {
    /// The address of the current primary, if known.
    pub fn primary_addr(&self) -> Option<&str> {
        self.primary.and_then(|p| self.members.get(&p)).map(|m| m.addr.as_str())
    }

    /// A live (not deleted) file.
    pub fn live(&self, user: &str, path: &str) -> Option<&FileMeta> {
        self.get(user, path).filter(|m| !m.deleted)
    }

    /// A live folder entry ([`FileMeta::dir`]).
    pub fn live_dir(&self, user: &str, path: &str) -> Option<&FileMeta> {
        self.live(user, path).filter(|m| m.dir)
    }

    /// A file or its tombstone.
    pub fn get(&self, user: &str, path: &str) -> Option<&FileMeta> {
        self.files.get(user).and_then(|f| f.get(path))
    }

    /// The version the next change of `path` takes: above the path's current
    /// version, and in the current epoch's own range (`epoch << 32` and up). A
    /// primary that died may have given a version that no server kept (a device
    /// may even have read it before the backups had it); a version of a later
    /// epoch can never be that one, so a device never takes other bytes for the
    /// version it holds.
    pub fn next_version(&self, user: &str, path: &str) -> Version {
        let current = self.get(user, path).map_or(0, |m| m.version.0);
        let current = current.max(self.pruned.get(user).map_or(0, |v| v.0));
        Version(current.max(self.epoch.0.saturating_mul(1 << 32)).saturating_add(1))
    }

    /// Devices of `user` that hold a session, other than `except`.
    pub fn devices_of(&self, user: &str, except: &DeviceId) -> usize {
        self.sessions.values().filter(|s| s.user == user && &s.device != except).count()
    }

    /// One page of `user`'s files and tombstones in path order, starting after
    /// `after`, and whether more follow. A page always holds at least one entry when
    /// any is left (the longest path fits in a page), so paging always progresses.
    pub fn listing_page(&self, user: &str, after: Option<&str>) -> (Vec<FileMeta>, bool) {
        use std::ops::Bound;
        let Some(files) = self.files.get(user) else { return (Vec::new(), false) };
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_string()));
        let mut rest = files.range::<String, _>((start, Bound::Unbounded)).map(|(_, m)| m).peekable();
        let (mut page, mut bytes) = (Vec::new(), 0);
        while let Some(meta) = rest.peek() {
            let size = encoded_bound(meta);
            if !page.is_empty() && (bytes + size > LISTING_PAGE_BYTES || page.len() >= LISTING_PAGE_FILES) {
                break;
            }
            bytes += size;
            page.push((*meta).clone());
            rest.next();
        }
        let more = rest.peek().is_some();
        (page, more)
    }

    /// The stored answer to a resent request; None for one never applied, which
    /// is served as new; an error for one older than the window.
    ///
    /// Exact: the device's seqs only grow, and the table holds its last
    /// [`REQUEST_WINDOW`] changing requests, so any applied request within the
    /// window below the last one is in it; a seq in the window that is not was
    /// never applied (refused, or never arrived), and is served now. A device
    /// never has more than the window in flight, so what it resends is never
    /// older than that.
    pub fn already_answered(&self, device: &DeviceId, seq: Seq) -> Option<OpResult> {
        let last = self.requests.get(device)?;
        if last.seq == seq {
            return Some(last.result.clone());
        }
        if seq > last.seq {
            return None;
        }
        if let Some(e) = self.earlier.get(device).and_then(|e| e.iter().find(|e| e.seq == seq)) {
            return Some(e.result.clone());
        }
        if seq.0 + REQUEST_WINDOW > last.seq.0 {
            return None;
        }
        Some(OpResult::Error {
            message: format!(
                "request seq={seq} is older than the last {REQUEST_WINDOW} answered (the last is seq={})",
                last.seq
            ),
        })
    }

    /// Applies the next entry of the history.
    pub fn apply(&mut self, entry: &Entry) -> Result<(), OutOfOrder> {
        if entry.pos != self.pos.next() {
            return Err(OutOfOrder { expected: self.pos.next(), got: entry.pos });
        }
        self.pos = entry.pos;
        match &entry.change {
            Change::Put { user, meta, .. } | Change::Delete { user, meta } => {
                self.files.entry(user.clone()).or_default().insert(meta.path.clone(), meta.clone());
            }
            Change::Rename { user, from, to } => {
                let files = self.files.entry(user.clone()).or_default();
                files.insert(from.path.clone(), from.clone());
                files.insert(to.path.clone(), to.clone());
            }
            Change::Login { session } => {
                self.sessions.insert(session.device.clone(), session.clone());
            }
            Change::Logout { device } => {
                self.sessions.remove(device);
            }
            Change::ClearSessions => self.sessions.clear(),
            Change::NewEpoch { epoch, primary, members } => {
                self.epoch = *epoch;
                self.primary = Some(*primary);
                self.members = members.iter().map(|m| (m.id, m.clone())).collect();
                self.max_id = members.iter().map(|m| m.id).fold(self.max_id.max(*primary), ServerId::max);
            }
            Change::Join { member } => {
                self.max_id = self.max_id.max(member.id);
                self.members.insert(member.id, member.clone());
            }
            Change::Leave { id } => {
                self.members.remove(id);
            }
            Change::ReserveId { id } => self.max_id = self.max_id.max(*id),
            Change::Account { user, credentials } => {
                self.accounts.insert(user.clone(), credentials.clone());
            }
        }
        if let Some((device, last)) = &entry.request {
            if let Some(before) = self.requests.insert(device.clone(), last.clone()) {
                let earlier = self.earlier.entry(device.clone()).or_default();
                earlier.push_back(before);
                while earlier.len() as u64 >= REQUEST_WINDOW {
                    earlier.pop_front();
                }
            }
        }
        if entry.pos.0.is_multiple_of(PRUNE_EVERY) {
            self.prune_tombstones();
        }
        Ok(())
    }

    /// Forgets each user's oldest tombstones beyond [`TOMBSTONES_KEPT`] (lowest
    /// versions first), raising that user's `pruned` version. Deterministic: it
    /// depends on the state alone.
    fn prune_tombstones(&mut self) {
        for (user, files) in self.files.iter_mut() {
            let count = files.values().filter(|m| m.deleted).count();
            if count <= TOMBSTONES_KEPT {
                continue;
            }
            let mut tombs: Vec<(Version, String)> =
                files.values().filter(|m| m.deleted).map(|m| (m.version, m.path.clone())).collect();
            tombs.sort();
            let floor = self.pruned.entry(user.clone()).or_default();
            for (version, path) in tombs.into_iter().take(count - TOMBSTONES_KEPT) {
                files.remove(&path);
                *floor = (*floor).max(version);
            }
        }
    }

    /// Refuses a path that would need a live file to be a folder, or a folder to be
    /// a file (`a` is a file and `a/b` is asked for, or the reverse).
    pub fn check_name_free(&self, user: &str, path: &str) -> Result<(), OpResult> {
        for (i, _) in path.match_indices('/') {
            let ancestor = &path[..i];
            if self.live(user, ancestor).is_some_and(|m| !m.dir) {
                return Err(OpResult::Error { message: format!("{ancestor} is a file on the server, not a folder") });
            }
        }
        if let Some(files) = self.files.get(user) {
            let prefix = format!("{path}/");
            let inside =
                files.range(prefix.clone()..).take_while(|(p, _)| p.starts_with(&prefix)).any(|(_, m)| !m.deleted);
            if inside {
                return Err(OpResult::Error { message: format!("{path} is a folder on the server, not a file") });
            }
        }
        Ok(())
    }

    /// The entry a [`Op::Mkdir`](replibox_proto::Op::Mkdir) of `path` makes:
    /// `Ok(None)` when the folder exists already (nothing to change: two devices
    /// that made the same folder agree). A live file there is replaced when the
    /// device saw it at `base` (it made a folder of that name), a conflict
    /// otherwise; a live file on the folder's way is refused, as for an upload.
    pub fn check_mkdir(&self, user: &str, path: &str, base: Option<Version>) -> Result<Option<FileMeta>, OpResult> {
        for (i, _) in path.match_indices('/') {
            let ancestor = &path[..i];
            if self.live(user, ancestor).is_some_and(|m| !m.dir) {
                return Err(OpResult::Error { message: format!("{ancestor} is a file on the server, not a folder") });
            }
        }
        match self.live(user, path) {
            Some(current) if current.dir => Ok(None),
            Some(current) if Some(current.version) != base => {
                Err(OpResult::Conflict { current: Some(current.clone()) })
            }
            _ => Ok(Some(FileMeta {
                path: path.to_string(),
                version: self.next_version(user, path),
                size: 0,
                mtime_ms: 0,
                hash: ContentHash::default(),
                deleted: false,
                atime_ms: 0,
                ctime_ms: 0,
                exec: false,
                dir: true,
            })),
        }
    }

    /// Whether an upload of `path` on top of `base` may go ahead.
    pub fn check_upload(&self, user: &str, path: &str, base: Option<Version>) -> Result<(), OpResult> {
        self.check_name_free(user, path)?;
        match self.live(user, path) {
            Some(current) if Some(current.version) != base => {
                Err(OpResult::Conflict { current: Some(current.clone()) })
            }
            _ => Ok(()),
        }
    }

    /// The tombstone a delete of `path` would leave.
    pub fn check_delete(&self, user: &str, path: &str, base: Option<Version>) -> Result<FileMeta, OpResult> {
        let current = self
            .live(user, path)
            .ok_or_else(|| OpResult::Error { message: format!("no such file on the server: {path}") })?;
        if base.is_some_and(|b| b != current.version) {
            return Err(OpResult::Conflict { current: Some(current.clone()) });
        }
        Ok(tombstone(current, self.next_version(user, path)))
    }

    /// The (tombstone, new metadata) pair a rename would produce.
    pub fn check_rename(
        &self,
        user: &str,
        from: &str,
        to: &str,
        base: Option<Version>,
    ) -> Result<(FileMeta, FileMeta), OpResult> {
        if from == to {
            return Err(OpResult::Error { message: format!("cannot rename {from} onto itself") });
        }
        let current = self
            .live(user, from)
            .ok_or_else(|| OpResult::Error { message: format!("no such file on the server: {from}") })?;
        if current.dir {
            // A folder is renamed as a delete and a create (docs/sync.md).
            return Err(OpResult::Error { message: format!("{from} is a folder; rename only moves a file") });
        }
        if base.is_some_and(|b| b != current.version) {
            return Err(OpResult::Conflict { current: Some(current.clone()) });
        }
        if let Some(existing) = self.live(user, to) {
            return Err(OpResult::Conflict { current: Some(existing.clone()) });
        }
        self.check_name_free(user, to)?;
        let moved = FileMeta { path: to.to_string(), version: self.next_version(user, to), ..current.clone() };
        Ok((tombstone(current, self.next_version(user, from)), moved))
    }
}

/// The tombstone, at `version`, that replaces a live file or folder (a folder's
/// tombstone says it was a folder).
pub fn tombstone(current: &FileMeta, version: Version) -> FileMeta {
    FileMeta {
        path: current.path.clone(),
        version,
        size: 0,
        mtime_ms: current.mtime_ms,
        hash: ContentHash::default(),
        deleted: true,
        atime_ms: 0,
        ctime_ms: 0,
        exec: false,
        dir: current.dir,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &str, version: u64) -> FileMeta {
        FileMeta {
            path: path.into(),
            version: Version(version),
            size: 1,
            mtime_ms: 0,
            hash: ContentHash::of(b"x"),
            deleted: false,
            atime_ms: 0,
            ctime_ms: 0,
            exec: false,
            dir: false,
        }
    }

    fn put(state: &State, path: &str) -> Entry {
        Entry {
            pos: state.pos.next(),
            epoch: state.epoch,
            change: Change::Put {
                user: "u".into(),
                meta: meta(path, state.next_version("u", path).0),
                xfer: "t".into(),
            },
            request: None,
        }
    }

    /// The entry that logs tombstone `meta` of user u.
    fn delete_entry(s: &State, meta: FileMeta) -> Entry {
        Entry { pos: s.pos.next(), epoch: s.epoch, change: Change::Delete { user: "u".into(), meta }, request: None }
    }

    /// The entry that deletes u's `path`, whatever its version.
    fn delete(s: &State, path: &str) -> Entry {
        delete_entry(s, s.check_delete("u", path, None).unwrap())
    }

    #[test]
    fn entries_apply_in_order_only() {
        let mut s = State::default();
        let e = put(&s, "a");
        s.apply(&e).unwrap();
        assert_eq!(s.apply(&e), Err(OutOfOrder { expected: LogPos(2), got: LogPos(1) }));
        let mut gap = put(&s, "b");
        gap.pos = LogPos(5);
        assert!(s.apply(&gap).is_err());
        assert_eq!(s.pos, LogPos(1));
    }

    #[test]
    fn upload_conflicts_only_against_a_live_file_at_another_version() {
        let mut s = State::default();
        assert!(s.check_upload("u", "a", None).is_ok());
        s.apply(&put(&s, "a")).unwrap();
        assert!(s.check_upload("u", "a", Some(Version(1))).is_ok());
        assert!(matches!(s.check_upload("u", "a", None), Err(OpResult::Conflict { .. })));
        assert!(matches!(s.check_upload("u", "a", Some(Version(7))), Err(OpResult::Conflict { .. })));
        let t = s.check_delete("u", "a", Some(Version(1))).unwrap();
        assert_eq!(t.version, Version(2));
        assert!(t.deleted);
        s.apply(&delete_entry(&s, t)).unwrap();
        // Recreating over a tombstone is not a conflict, and the version keeps growing.
        assert!(s.check_upload("u", "a", None).is_ok());
        assert_eq!(s.next_version("u", "a"), Version(3));
    }

    #[test]
    fn delete_and_rename_rules() {
        let mut s = State::default();
        assert!(matches!(s.check_delete("u", "a", None), Err(OpResult::Error { .. })));
        s.apply(&put(&s, "a")).unwrap();
        s.apply(&put(&s, "b")).unwrap();
        assert!(matches!(s.check_rename("u", "a", "b", None), Err(OpResult::Conflict { .. })));
        assert!(matches!(s.check_rename("u", "a", "a", None), Err(OpResult::Error { .. })));
        let (from, to) = s.check_rename("u", "a", "c/d", Some(Version(1))).unwrap();
        assert!(from.deleted && from.path == "a" && from.version == Version(2));
        assert!(!to.deleted && to.path == "c/d" && to.version == Version(1));
    }

    #[test]
    fn a_file_never_becomes_a_folder_nor_the_reverse() {
        let mut s = State::default();
        s.apply(&put(&s, "a")).unwrap();
        s.apply(&put(&s, "d/x")).unwrap();
        assert!(matches!(s.check_upload("u", "a/b", None), Err(OpResult::Error { .. })));
        assert!(matches!(s.check_upload("u", "d", None), Err(OpResult::Error { .. })));
        assert!(matches!(s.check_rename("u", "a", "d", Some(Version(1))), Err(OpResult::Error { .. })));
        assert!(s.check_upload("u", "d/y", None).is_ok());
        assert!(s.check_upload("u", "d.txt", None).is_ok());
        // Once d/x is deleted, d may become a file.
        s.apply(&delete(&s, "d/x")).unwrap();
        assert!(s.check_upload("u", "d", None).is_ok());
    }

    /// The 400-file wall (issue 7): a listing is paged so that every page fits in
    /// a frame header, however many files and however long their names, and the
    /// pages together are the whole listing, each entry once, in order.
    #[test]
    fn listing_pages_fit_a_frame_and_cover_every_file_once() {
        let mut s = State::default();
        let long = "d/".to_string() + &"\u{1}".repeat(250) + "/" + &"é".repeat(120);
        let mut paths: Vec<String> = (0..3000).map(|i| format!("f{i:05}.txt")).collect();
        paths.extend((0..40).map(|i| format!("{long}{i}")));
        for p in &paths {
            s.apply(&put(&s, p)).unwrap();
        }
        s.apply(&delete(&s, "f00007.txt")).unwrap();
        let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let (page, more) = s.listing_page("u", after.as_deref());
            pages += 1;
            assert!(!page.is_empty(), "page {pages} is empty");
            let header = serde_json::to_vec(&replibox_proto::OpResult::Listing { files: page.clone(), more }).unwrap();
            assert!(header.len() < replibox_proto::MAX_HEADER - 1024, "page {pages} is {} bytes", header.len());
            after = page.last().map(|m| m.path.clone());
            seen.extend(page.into_iter().map(|m| m.path));
            if !more {
                break;
            }
        }
        let mut want = paths.clone();
        want.sort();
        assert_eq!(seen, want, "the pages, in order, are every path once (tombstones included)");
        assert!(pages > 3, "3040 files should take several pages, took {pages}");
        assert_eq!(s.listing_page("nobody", None), (Vec::new(), false));
    }

    #[test]
    fn resent_requests_get_their_first_answer() {
        let mut s = State::default();
        let dev = DeviceId("00000001".into());
        let mut e = put(&s, "a");
        let answer = OpResult::Done { meta: meta("a", 1) };
        e.request = Some((dev.clone(), LastRequest { seq: Seq(4), result: answer.clone() }));
        s.apply(&e).unwrap();
        assert_eq!(s.already_answered(&dev, Seq(4)), Some(answer.clone()));
        // Seq 3 was never applied (refused, or never arrived), and is within the
        // window: served as new. A seq below the window gets an error.
        assert_eq!(s.already_answered(&dev, Seq(3)), None);
        assert_eq!(s.already_answered(&dev, Seq(5)), None);
        let last = 4 + REQUEST_WINDOW;
        for seq in 5..=last {
            let mut e = session("alice", "00000009");
            e.pos = s.pos.next();
            let result = OpResult::Done { meta: meta("a", seq) };
            e.request = Some((dev.clone(), LastRequest { seq: Seq(seq), result }));
            s.apply(&e).unwrap();
        }
        // The last REQUEST_WINDOW requests, 5 to 4 + REQUEST_WINDOW, answer as
        // they first did.
        for seq in 5..=last {
            assert_eq!(s.already_answered(&dev, Seq(seq)), Some(OpResult::Done { meta: meta("a", seq) }), "{seq}");
        }
        assert!(matches!(s.already_answered(&dev, Seq(4)), Some(OpResult::Error { .. })), "4 is out of the window");
        assert!(matches!(s.already_answered(&dev, Seq(1)), Some(OpResult::Error { .. })));
        assert_eq!(s.earlier[&dev].len() as u64, REQUEST_WINDOW - 1);
        // Another device's table is its own.
        assert_eq!(s.already_answered(&DeviceId("00000002".into()), Seq(4)), None);
    }

    #[test]
    fn out_of_order_says_what_was_expected() {
        let e = OutOfOrder { expected: LogPos(3), got: LogPos(7) };
        assert_eq!(e.to_string(), "entry pos=7 out of order, expected pos=3");
    }

    fn session(user: &str, device: &str) -> Entry {
        let session = Session {
            user: user.into(),
            device: DeviceId(device.into()),
            ip: "127.0.0.4".into(),
            callback_port: 9,
            token: "t".into(),
        };
        Entry { pos: LogPos(0), epoch: Epoch(0), change: Change::Login { session }, request: None }
    }

    fn apply(s: &mut State, mut e: Entry) {
        e.pos = s.pos.next();
        s.apply(&e).unwrap();
    }

    /// The device limit counts a user's other devices only: not this device, not
    /// another user's.
    #[test]
    fn devices_of_counts_the_users_other_devices() {
        let mut s = State::default();
        let (d1, d2) = (DeviceId("000000d1".into()), DeviceId("000000d2".into()));
        assert_eq!(s.devices_of("alice", &d1), 0);
        apply(&mut s, session("alice", "000000d1"));
        apply(&mut s, session("bob", "000000b1"));
        assert_eq!(s.devices_of("alice", &d1), 0, "a device is not its own other device");
        assert_eq!(s.devices_of("alice", &d2), 1);
        apply(&mut s, session("alice", "000000d2"));
        assert_eq!(s.devices_of("alice", &DeviceId("000000d3".into())), 2);
        assert_eq!(s.devices_of("bob", &d1), 1);
        apply(
            &mut s,
            Entry { pos: LogPos(0), epoch: Epoch(0), change: Change::Logout { device: d1.clone() }, request: None },
        );
        assert_eq!(s.devices_of("alice", &DeviceId("000000d3".into())), 1);
        apply(&mut s, Entry { pos: LogPos(0), epoch: Epoch(0), change: Change::ClearSessions, request: None });
        assert!(s.sessions.is_empty());
    }

    /// The membership changes through entries: a new epoch names the primary and
    /// its members, joins and leaves follow, and ids are never handed out twice.
    #[test]
    fn membership_and_the_primarys_address_follow_the_entries() {
        let mut s = State::default();
        assert_eq!(s.primary_addr(), None);
        let m = |id: u64, addr: &str| Member { id: ServerId(id), addr: addr.into() };
        let new_epoch =
            Change::NewEpoch { epoch: Epoch(4), primary: ServerId(2), members: vec![m(2, "10.0.0.2:4000")] };
        apply(&mut s, Entry { pos: LogPos(0), epoch: Epoch(0), change: new_epoch, request: None });
        assert_eq!((s.epoch, s.primary, s.max_id), (Epoch(4), Some(ServerId(2)), ServerId(2)));
        assert_eq!(s.primary_addr(), Some("10.0.0.2:4000"));
        apply(
            &mut s,
            Entry {
                pos: LogPos(0),
                epoch: Epoch(0),
                change: Change::Join { member: m(5, "10.0.0.5:4000") },
                request: None,
            },
        );
        assert_eq!(s.max_id, ServerId(5));
        apply(
            &mut s,
            Entry { pos: LogPos(0), epoch: Epoch(0), change: Change::ReserveId { id: ServerId(3) }, request: None },
        );
        assert_eq!(s.max_id, ServerId(5), "a reserved id below the highest changes nothing");
        apply(
            &mut s,
            Entry { pos: LogPos(0), epoch: Epoch(0), change: Change::ReserveId { id: ServerId(9) }, request: None },
        );
        assert_eq!(s.max_id, ServerId(9));
        apply(
            &mut s,
            Entry { pos: LogPos(0), epoch: Epoch(0), change: Change::Leave { id: ServerId(5) }, request: None },
        );
        assert_eq!(s.members.keys().copied().collect::<Vec<_>>(), [ServerId(2)]);
        assert_eq!(s.max_id, ServerId(9), "a server that left keeps its id reserved");
        // A primary that is not in its own membership has no address.
        apply(
            &mut s,
            Entry { pos: LogPos(0), epoch: Epoch(0), change: Change::Leave { id: ServerId(2) }, request: None },
        );
        assert_eq!(s.primary_addr(), None);
    }

    /// Tombstones beyond [`TOMBSTONES_KEPT`] are forgotten, the oldest first, at
    /// an entry position every server shares; the user's live files and the
    /// newest tombstones stay; a forgotten path created again gets a version above
    /// its forgotten tombstone; the pruned version survives a snapshot (JSON).
    #[test]
    fn the_oldest_tombstones_beyond_the_bound_are_forgotten() {
        let mut s = State::default();
        let extra = 50;
        let deleted = TOMBSTONES_KEPT + extra;
        let e = put(&s, "live");
        apply(&mut s, e);
        for i in 0..deleted {
            let path = format!("d{i:06}");
            let e = put(&s, &path);
            apply(&mut s, e);
            let e = delete(&s, &path);
            apply(&mut s, e);
        }
        // Up to PRUNE_EVERY entries after the bound is passed, then pruned.
        while !s.pos.0.is_multiple_of(PRUNE_EVERY) {
            apply(&mut s, session("u", "dev"));
        }
        let files = &s.files["u"];
        let tombs = files.values().filter(|m| m.deleted).count();
        assert_eq!(tombs, TOMBSTONES_KEPT, "tombstones kept");
        assert!(files.get("live").is_some_and(|m| !m.deleted), "a live file is never pruned");
        assert!(files.get("d000000").is_none(), "the oldest tombstone is forgotten");
        let newest = format!("d{:06}", deleted - 1);
        assert!(files.get(&newest).is_some_and(|m| m.deleted), "the newest tombstone is kept");
        let forgotten = Version(2); // d000000: put at 1, deleted at 2
        assert!(s.pruned["u"] >= forgotten);
        assert!(s.next_version("u", "d000000") > s.pruned["u"], "a path created again goes above what was forgotten");
        let copy: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(copy, s, "the pruned versions travel in a snapshot");
    }

    fn mkdir(s: &State, path: &str, base: Option<Version>) -> Entry {
        let meta = s.check_mkdir("u", path, base).unwrap().expect("a new folder");
        Entry {
            pos: s.pos.next(),
            epoch: s.epoch,
            change: Change::Put { user: "u".into(), meta, xfer: "dir".into() },
            request: None,
        }
    }

    /// Folders are entries like files: made once (a second mkdir finds it there),
    /// deleted to a folder tombstone, never renamed (delete and create), holding
    /// files without being in their way, and replacing or replaced by a file only
    /// from the version the device saw.
    #[test]
    fn folders_are_entries_that_files_live_in() {
        let mut s = State::default();
        s.apply(&mkdir(&s, "d", None)).unwrap();
        let d = s.live_dir("u", "d").unwrap().clone();
        assert!(d.dir && !d.deleted && d.size == 0);
        assert_eq!(s.check_mkdir("u", "d", None), Ok(None), "an existing folder is no conflict");
        // Files and folders inside it.
        assert!(s.check_upload("u", "d/x", None).is_ok(), "a folder entry is no file in the way");
        s.apply(&put(&s, "d/x")).unwrap();
        s.apply(&mkdir(&s, "d/e", None)).unwrap();
        assert!(s.check_mkdir("u", "d/x/y", None).is_err(), "d/x is a file");
        // A file where a folder with things inside is: refused; an empty one: from its version.
        assert!(matches!(s.check_upload("u", "d", Some(d.version)), Err(OpResult::Error { .. })));
        assert!(matches!(s.check_upload("u", "d/e", None), Err(OpResult::Conflict { .. })));
        let e = s.live_dir("u", "d/e").unwrap().version;
        assert!(s.check_upload("u", "d/e", Some(e)).is_ok());
        // And a folder where a file is: from the file's version only.
        let x = s.live("u", "d/x").unwrap().version;
        assert!(matches!(s.check_mkdir("u", "d/x", None), Err(OpResult::Conflict { .. })));
        assert!(matches!(s.check_mkdir("u", "d/x", Some(x)), Ok(Some(m)) if m.dir && m.version > x));
        // Deleting a folder leaves a folder tombstone; its files stay entries.
        let t = s.check_delete("u", "d", Some(d.version)).unwrap();
        assert!(t.deleted && t.dir);
        s.apply(&delete_entry(&s, t)).unwrap();
        assert!(s.live_dir("u", "d").is_none() && s.live("u", "d/x").is_some());
        assert!(s.check_upload("u", "d/new", None).is_ok(), "a file may go in a deleted folder (it wins)");
        assert!(matches!(s.check_rename("u", "d/e", "f", None), Err(OpResult::Error { .. })), "folders never move");
        // A recreated folder continues its path's versions.
        let again = s.check_mkdir("u", "d", None).unwrap().unwrap();
        assert!(again.version > d.version);
    }

    /// A rename gives the destination the next version of *that* path (which may
    /// have a history of its own), keeping the size, mtime and hash.
    #[test]
    fn a_rename_continues_the_destinations_own_versions() {
        let mut s = State::default();
        s.apply(&put(&s, "b")).unwrap();
        s.apply(&delete(&s, "b")).unwrap();
        s.apply(&put(&s, "a")).unwrap();
        let (_, moved) = s.check_rename("u", "a", "b", Some(Version(1))).unwrap();
        assert_eq!(moved.version, Version(3), "b was at version 2 (its tombstone)");
        assert_eq!((moved.size, moved.hash), (1, ContentHash::of(b"x")));
    }
}
