//! The sync engine's documented rules (docs/sync.md), one by one: an explicit
//! upload over unsent edits, a delete answered `conflict`, a refused rename, a copy
//! and a delete that are not a rename, an unreadable index, equal content at a
//! first login, the times in listings, and the periodic rescan.

use crate::harness::files::{holds, put, tree};
use crate::harness::proxy::Proxy;
use crate::harness::*;
use replibox_proto::{Frame, Msg};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 2001-02-03 04:05:06 UTC.
const OLD: u64 = 981_173_106;

/// Writes `bytes` at `path` (outside any sync dir first, then moved in, so the
/// watcher sees one finished file) with mtime `secs` after the Unix epoch.
fn put_with_mtime(path: &Path, bytes: &[u8], secs: u64) {
    let staged = path.with_file_name(format!(".staged-{}", path.file_name().unwrap().to_string_lossy()));
    let staging = staged.parent().unwrap().parent().unwrap().join("staging");
    fs::create_dir_all(&staging).unwrap();
    let staged = staging.join(staged.file_name().unwrap());
    put(&staged, bytes);
    File::options().write(true).open(&staged).unwrap().set_modified(UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::rename(&staged, path).unwrap();
}

/// The names of the conflicted copies of `stem` + `ext` in a tree.
fn copies_of(root: &Path, stem: &str, ext: &str) -> Vec<String> {
    tree(root)
        .files
        .into_keys()
        .filter(|p| p.starts_with(&format!("{stem} (conflicted copy ")) && p.ends_with(&format!("){ext}")))
        .collect()
}

/// A notice on its way to a device.
fn is_notice(f: &Frame) -> bool {
    matches!(f.msg, Msg::Notice { .. })
}

/// `upload PATH` with a file name whose local copy has edits not sent yet (its
/// writer still has it open): the explicit upload replaces the server's version,
/// and the local edit is kept as a conflicted copy, which reaches everyone.
#[test]
fn an_explicit_upload_over_unsent_edits_keeps_them_as_a_conflicted_copy() {
    let t = TestDir::new("rules_explicit_upload_over_edits");
    let server = Server::primary(&t);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    let users = server.user_dir("alice");
    put(&d1.path("x.txt"), b"version 1");
    wait_until(DEADLINE, "x.txt on the server and device 2", || {
        holds(&users.join("x.txt"), b"version 1") && holds(&d2.path("x.txt"), b"version 1")
    });
    // An edit whose writer keeps the file open: not sent yet (the engine waits for
    // the writer for up to 5 s).
    let mut writer = File::create(d1.path("x.txt")).unwrap();
    writer.write_all(b"a local edit, not sent yet").unwrap();
    writer.flush().unwrap();
    let outside = t.mkdir("outside");
    put(&outside.join("x.txt"), b"the explicit upload");
    d1.ok(&format!("upload {}", outside.join("x.txt").display()));
    drop(writer);
    let copy = format!("x (conflicted copy {} ", d1.device_label());
    let mut want = Want::new();
    want.insert("x.txt".into(), b"the explicit upload".to_vec());
    let name = wait_for(DEADLINE, "the conflicted copy of the local edit on the server", || {
        let copies = copies_of(&users, "x", ".txt");
        (copies.len() == 1 && copies[0].starts_with(&copy)).then(|| copies[0].clone())
    });
    want.insert(name, b"a local edit, not sent yet".to_vec());
    wait_trees("the explicit upload and the kept edit everywhere", &[&users, &d1.sync_dir, &d2.sync_dir], &want);
}

/// A delete made on a device that missed the server's newer version (its notices
/// are withheld) is answered `conflict`: the edit wins, the device downloads it
/// back, and nothing is deleted anywhere.
#[test]
fn a_delete_answered_conflict_brings_the_edit_back() {
    let t = TestDir::new("rules_delete_conflict");
    let server = Server::primary(&t);
    let d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let proxy = Proxy::start(SERVER_IP, server.addr);
    let d2 = Client::spawn(&t, ClientOpts::at("dev2", "alice", proxy.addr, DEVICE2_IP));
    d2.wait_logged_in();
    let users = server.user_dir("alice");
    put(&d1.path("x.txt"), b"version 1");
    wait_until(DEADLINE, "x.txt on device 2", || holds(&d2.path("x.txt"), b"version 1"));
    proxy.withhold(is_notice);
    put(&d1.path("x.txt"), b"version 2, edited on device 1");
    wait_until(DEADLINE, "the edit on the server", || holds(&users.join("x.txt"), b"version 2, edited on device 1"));
    fs::remove_file(d2.path("x.txt")).unwrap();
    let mut want = Want::new();
    want.insert("x.txt".into(), b"version 2, edited on device 1".to_vec());
    wait_trees("the edit back on device 2, and kept everywhere", &[&d2.sync_dir, &users, &d1.sync_dir], &want);
    assert!(!server.log().contains("deleted user=alice path=x.txt"), "the stale delete was applied");
}

/// A move whose rename the server refuses (the file changed there meanwhile, and
/// the device missed it) falls back to a delete and an upload: the delete is
/// answered `conflict` (the edit wins and comes back), the upload stores the moved
/// file under its new name. Nothing is lost.
#[test]
fn a_refused_rename_falls_back_to_a_delete_and_an_upload() {
    let t = TestDir::new("rules_refused_rename");
    let server = Server::primary(&t);
    let d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let proxy = Proxy::start(SERVER_IP, server.addr);
    let d2 = Client::spawn(&t, ClientOpts::at("dev2", "alice", proxy.addr, DEVICE2_IP));
    d2.wait_logged_in();
    let users = server.user_dir("alice");
    put(&d1.path("a.txt"), b"the original a");
    wait_until(DEADLINE, "a.txt on device 2", || holds(&d2.path("a.txt"), b"the original a"));
    proxy.withhold(is_notice);
    put(&d1.path("a.txt"), b"a, edited on device 1");
    wait_until(DEADLINE, "the edit on the server", || holds(&users.join("a.txt"), b"a, edited on device 1"));
    fs::rename(d2.path("a.txt"), d2.path("b.txt")).unwrap();
    let mut want = Want::new();
    want.insert("a.txt".into(), b"a, edited on device 1".to_vec());
    want.insert("b.txt".into(), b"the original a".to_vec());
    wait_trees("both versions on the server and device 2", &[&users, &d2.sync_dir], &want);
    let log = server.log();
    assert!(!log.contains("renamed user=alice from=a.txt"), "the server renamed a file that changed since");
    let dev2 = d2.device_id();
    assert_eq!(server.stored("alice", "b.txt"), vec![(1, 14, dev2)], "b.txt should have been uploaded by device 2");
    wait_trees("both versions on device 1", &[&d1.sync_dir], &want);
}

/// A copy followed by a delete of the original is not a move (the copy has a new
/// mtime): the server gets an upload and a delete, not a rename.
#[test]
fn a_copy_and_a_delete_are_not_taken_for_a_rename() {
    let t = TestDir::new("rules_copy_not_rename");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    put_with_mtime(&d1.path("c.txt"), b"copied, then deleted", OLD);
    wait_until(DEADLINE, "c.txt on device 2", || holds(&d2.path("c.txt"), b"copied, then deleted"));
    fs::copy(d1.path("c.txt"), d1.path("d.txt")).unwrap();
    assert_ne!(
        fs::metadata(d1.path("d.txt")).unwrap().modified().unwrap(),
        UNIX_EPOCH + Duration::from_secs(OLD),
        "the copy kept the original's mtime: the test cannot tell a copy from a move"
    );
    fs::remove_file(d1.path("c.txt")).unwrap();
    let mut want = Want::new();
    want.insert("d.txt".into(), b"copied, then deleted".to_vec());
    wait_trees("d.txt, and no c.txt, everywhere", &[&users, &d2.sync_dir], &want);
    let log = server.log();
    assert!(!log.contains("renamed user=alice from=c.txt"), "a copy and a delete were sent as a rename:\n{log}");
    assert_eq!(server.stored("alice", "d.txt").len(), 1, "d.txt should have been uploaded");
    assert!(log.contains("deleted user=alice path=c.txt"), "c.txt should have been deleted");
}

/// An unreadable index is set aside as `index.json.bad` and rebuilt: every file
/// counts as new, and one whose content equals the server's is recognised by its
/// hash, so no conflicted copy is made and nothing is sent again. The same holds
/// for a new device whose sync dir already holds the server's files.
#[test]
fn an_unreadable_index_and_equal_content_at_first_login_make_no_conflicted_copy() {
    let t = TestDir::new("rules_unreadable_index");
    let server = Server::primary(&t);
    let mut d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let users = server.user_dir("alice");
    let mut want = Want::new();
    want.insert("a.txt".into(), b"alpha".to_vec());
    want.insert("docs/b.txt".into(), b"bravo".to_vec());
    for (p, b) in &want {
        put(&d1.path(p), b);
    }
    wait_trees("the files on the server", &[&users], &want);
    assert!(d1.stop().success());
    let stored = server.log().matches("stored user=alice").count();
    let index = d1.sync_dir.join(".replibox/index.json");
    fs::write(&index, b"{ this is not an index").unwrap();

    d1.restart(&t);
    let none = "(0 uploaded, 0 downloaded, 0 deleted there, 0 deleted here, 0 conflicts)";
    let login = d1.proc.stdout();
    assert!(login.contains(none), "the login with a rebuilt index should change nothing: {login}");
    assert_eq!(fs::read(index.with_extension("json.bad")).unwrap(), b"{ this is not an index");
    // Written once the engine is done with the login's reconciliation.
    let rebuilt: serde_json::Value =
        wait_for(DEADLINE, "the rebuilt index", || fs::read(&index).ok().and_then(|b| serde_json::from_slice(&b).ok()));
    assert!(
        rebuilt.get("a.txt").is_some() && rebuilt.get("docs/b.txt").is_some(),
        "the index was not rebuilt: {rebuilt}"
    );
    files::check_tree(&d1.sync_dir, &want).unwrap_or_else(|e| fail(format!("device 1 after the rebuild: {e}")));

    // A new device whose sync dir already holds the same files.
    let d2_dir = t.join("dev2-sync");
    for (p, b) in &want {
        put(&d2_dir.join(p), b);
    }
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    let login = d2.proc.stdout();
    assert!(login.contains(none), "a first login over equal files should change nothing: {login}");
    files::check_tree(&d2.sync_dir, &want).unwrap_or_else(|e| fail(format!("device 2 after its first login: {e}")));
    assert_eq!(server.log().matches("stored user=alice").count(), stored, "equal files were sent again");
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The row of `name` in a listing: size, mtime, atime, ctime.
fn row(table: &str, name: &str) -> [String; 4] {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| fail(format!("no row for {name} in:\n{table}")));
    let words: Vec<&str> = line[name.len()..].split_whitespace().collect();
    assert_eq!(words.len(), 7, "a row has a size and three dates: {line:?}");
    let at = |i: usize| format!("{} {}", words[i], words[i + 1]);
    [words[0].to_string(), at(1), at(3), at(5)]
}

/// The times in listings: `list_server` shows the uploading device's mtime and the
/// access and status-change times of the server's copy, `list_client` those of the
/// local file, all in UTC.
#[test]
fn listings_show_the_documented_times() {
    use std::os::unix::fs::MetadataExt;
    let t = TestDir::new("rules_listing_times");
    let server = Server::primary(&t);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    let outside = t.mkdir("outside");
    put_with_mtime(&outside.join("t.txt"), b"timed", OLD);
    d1.ok(&format!("upload {}", outside.join("t.txt").display()));
    let time = |secs: i64| utc(UNIX_EPOCH + Duration::from_secs(secs as u64));

    // Access times far from the status-change times (which setting them moves to
    // now), so that no column can stand in for another.
    let accessed = |path: &Path, secs: u64| {
        let times = fs::FileTimes::new().set_accessed(UNIX_EPOCH + Duration::from_secs(secs));
        File::options().write(true).open(path).unwrap().set_times(times).unwrap();
    };
    let stored = server.user_dir("alice").join("t.txt");
    accessed(&stored, OLD + 4 * 365 * 86_400);
    accessed(&d1.path("t.txt"), OLD + 2 * 365 * 86_400);

    let listed = d1.ok("list_server");
    let md = fs::metadata(&stored).unwrap();
    let want = ["5".to_string(), time(OLD as i64), time(md.atime()), time(md.ctime())];
    assert_eq!(
        row(&listed, "t.txt"),
        want,
        "list_server: size, mtime (the device's), atime and ctime (the server's copy)"
    );
    assert_eq!((want[1].as_str(), want[2].as_str()), ("2001-02-03 04:05:06", "2005-02-02 04:05:06"));

    let listed = d1.ok("list_client");
    let md = fs::metadata(d1.path("t.txt")).unwrap();
    let want = ["5".to_string(), time(OLD as i64), time(md.atime()), time(md.ctime())];
    assert_eq!(want[2], "2003-02-03 04:05:06");
    assert_eq!(row(&listed, "t.txt"), want, "list_client: size, mtime, atime and ctime of the local file");
}

/// The periodic rescan finds what the watcher cannot see: a file changed through
/// a hard link from outside the sync dir (inotify reports a change under the
/// path it was made through) reaches the server by the next full reconciliation.
#[test]
fn the_periodic_rescan_finds_a_change_the_watcher_cannot_see() {
    let t = TestDir::new("rules_periodic_rescan");
    let server = Server::primary(&t);
    let mut opts = ClientOpts::new("dev1", "alice", &server, DEVICE1_IP);
    opts.rescan = Duration::from_secs(1);
    let d1 = Client::spawn(&t, opts);
    d1.wait_logged_in();
    let users = server.user_dir("alice");
    put(&d1.path("linked.txt"), b"before");
    wait_until(DEADLINE, "linked.txt on the server", || holds(&users.join("linked.txt"), b"before"));
    let outside = t.mkdir("outside").join("link to linked.txt");
    fs::hard_link(d1.path("linked.txt"), &outside).unwrap();
    let mut f = File::options().write(true).truncate(true).open(&outside).unwrap();
    f.write_all(b"changed through a link").unwrap();
    drop(f);
    wait_until(DEADLINE, "the change made through the link on the server", || {
        holds(&users.join("linked.txt"), b"changed through a link")
    });
}
