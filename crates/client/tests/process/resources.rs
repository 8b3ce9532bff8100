//! When resources run out or go wrong (issue 7, items 4 to 8, and issue 11's disk
//! faults): a data dir in use, a full disk on the primary, on a backup and on a
//! device, a data dir that becomes read-only on the primary and on a backup, file
//! descriptors, a flood of connections, a peer trickling bytes, and retries that
//! must back off.
//!
//! Back-off is checked by counting attempts (log lines, connections) while a
//! condition lasts, never by timing one: a client that retries at once makes
//! hundreds where one that backs off makes a handful.

use crate::harness::cluster::*;
use crate::harness::disk::{ReadOnly, SmallDisk};
use crate::harness::files::{self, write_seeded};
use crate::harness::proxy::Proxy;
use crate::harness::raw::{frame_bytes, refusal, LoginEnd, Raw};
use crate::harness::*;
use crate::server::run_to_exit;
use replibox_proto::{Msg, Op, OpResult};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// Lines of `log` that contain `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Waits until `window` has passed since `since` (a count of attempts is taken
/// over it; nothing is asserted about time).
fn let_pass(window: Duration, since: Instant) {
    wait_until(window + DEADLINE, "the counting window to pass", || since.elapsed() >= window);
}

/// Issue 7, item 4: a second server on a data dir in use is refused before it
/// touches anything there (exit 1, naming the first one's pid), whether it starts
/// as primary or as backup; the first one goes on, its log unchanged.
#[test]
fn a_second_server_on_a_data_dir_in_use_exits_1_and_says_which_holds_it() {
    let t = TestDir::new("resources_data_dir_lock");
    let s1 = primary(&t, &[]);
    wait_members(&[&s1], &[1]);
    let seq = s1.status()["seq"].clone();
    let log_file = s1.data.join("meta/log.jsonl");
    let log_before = std::fs::read(&log_file).unwrap();
    let data = s1.data.to_str().unwrap().to_string();
    let pid = s1.proc.pid().to_string();
    let via = s1.addr.to_string();
    for (i, mode) in [vec!["-p"], vec!["-b", &via]].into_iter().enumerate() {
        let port = free_port(SERVER_IP).to_string();
        let args = [mode, vec!["--bind", "127.0.0.1", "--port", &port, "--data", &data]].concat();
        let (status, err) = run_to_exit(&t, &format!("second-{i}"), &args);
        assert_eq!(status.code(), Some(1), "a second server {args:?}: {status}, stderr:\n{err}");
        assert!(
            err.contains("is in use by another replibox-server") && err.contains(&format!("pid {pid}")),
            "the refusal should say the data dir is in use, and by which process:\n{err}"
        );
    }
    assert_eq!(s1.status()["seq"], seq, "the first server's history moved");
    assert_eq!(std::fs::read(&log_file).unwrap(), log_before, "the log was written by a second server");
    let mut a = Raw::login(s1.addr, "alice", "00000000000000a1", "a client of the first server");
    assert!(matches!(a.request(Op::List { after: None }), OpResult::Listing { .. }));
}

/// Issue 7, item 5: the primary's disk is full. An upload gets `error: the server
/// is out of space` (not a lost connection), nothing of it is stored or listed,
/// and the session goes on; a file that does not fit, dropped into the sync dir,
/// is tried again with a back-off (a handful of attempts, not one per few
/// milliseconds, and no storm of logins), and goes through once there is room.
#[test]
fn a_full_disk_on_the_primary_is_said_plainly_and_retried_with_back_off() {
    let t = TestDir::new("resources_primary_disk_full");
    let disk = SmallDisk::mount(t.join("small-disk"), "2m");
    let mut opts = ServerOpts::primary("server");
    opts.data = Some(disk.path.join("data"));
    let server = Server::start(&t, opts);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);

    let big = t.join("big.bin");
    write_seeded(&big, 7, 4 << 20);
    let said = d1.err(&format!("upload {}", big.display()));
    assert!(said.contains("out of space"), "the upload should fail with a plain reason: {said}");
    assert!(!listed(&d1.ok("list_server")).contains_key("big.bin"), "a file the server could not store is listed");
    assert!(!server.user_dir("alice").join("big.bin").exists());
    let left: Vec<_> = std::fs::read_dir(server.tmp_dir()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "the failed upload left temporary files: {left:?}");
    assert_eq!(count(&server.log(), "logged in user=alice"), 1, "the failed upload cost the session");

    // The watcher's way: a file that does not fit, retried while the disk is full.
    let since = Instant::now();
    write_seeded(&d1.path("video.bin"), 8, 3 << 20);
    wait_until(DEADLINE, "a first attempt to send video.bin", || count(&server.log(), "cannot write upload") >= 2);
    let_pass(Duration::from_secs(10), since);
    let attempts = count(&server.log(), "cannot write upload") - 1;
    assert!(
        (1..=8).contains(&attempts),
        "{attempts} attempts to send video.bin in 10 s on a full disk: retries should back off"
    );
    let logins = count(&server.log(), "logged in user=alice");
    assert_eq!(logins, 1, "the client logged in {logins} times while the disk was full");
    assert!(d1.activity().contains("out of space"), "the activity should say why video.bin waits:\n{}", d1.activity());

    disk.grow("64m");
    wait_until(DEADLINE, "video.bin on the server once there is room", || {
        server.user_dir("alice").join("video.bin").metadata().is_ok_and(|m| m.len() == 3 << 20)
    });
    assert!(d1.ok(&format!("upload {}", big.display())).contains("uploaded big.bin"));
}

/// Issue 7, item 8: a backup whose disk fills up leaves the cluster with a clear
/// log line and joins again with a back-off (a handful of times while its disk
/// stays full, not five times a second); the primary says loudly, in its log and
/// in `--status`, that it runs with fewer backups than it had, and both stop once
/// the backup has room again and is back.
#[test]
fn a_backup_with_a_full_disk_leaves_and_rejoins_with_back_off_and_the_primary_says_so() {
    let t = TestDir::new("resources_backup_disk_full");
    let disk = SmallDisk::mount(t.join("small-disk"), "2m");
    let s1 = primary(&t, &[]);
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    let mut opts = backup_opts("s3", 3, s1.addr, Some(3), &[]);
    opts.data = Some(disk.path.join("s3-data"));
    let s3 = Server::start(&t, opts);
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    let d1 = Client::headless(&t, "dev1", "alice", &s1, DEVICE1_IP);

    let since = Instant::now();
    write_seeded(&d1.path("big.bin"), 9, 3 << 20);
    wait_until(DEADLINE, "big.bin on the primary and the backup with room", || {
        [&s1, &s2].iter().all(|s| s.user_dir("alice").join("big.bin").metadata().is_ok_and(|m| m.len() == 3 << 20))
    });
    wait_until(DEADLINE, "s3 to leave, saying why", || count(&s3.log(), "leaving the cluster") >= 1);
    assert!(
        s3.log().lines().any(|l| l.contains("leaving the cluster") && l.contains("No space left")),
        "s3 should say it leaves because its disk is full:\n{}",
        s3.log()
    );
    wait_until(DEADLINE, "the primary to say it runs with fewer backups", || {
        s1.log().contains("running with 1 of the 2 backups")
    });
    let note = s1.status()["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("running with 1 of the 2 backups"), "--status of the primary should say so: {note}");

    let_pass(Duration::from_secs(12), since);
    let leaves = count(&s3.log(), "leaving the cluster");
    assert!((1..=5).contains(&leaves), "s3 left {leaves} times in 12 s: it should rejoin with a back-off");

    disk.grow("64m");
    wait_until(Duration::from_secs(90), "s3 back with big.bin", || {
        s3.user_dir("alice").join("big.bin").metadata().is_ok_and(|m| m.len() == 3 << 20)
            && members(&s1).is_some_and(|m| m == [1, 2, 3])
    });
    wait_until(DEADLINE, "the primary to say its backups are back", || {
        s1.log().contains("all 2 backups are live again")
    });
    assert_eq!(s1.status()["note"], serde_json::Value::Null, "the note should be gone");
}

/// Issue 11: the disk of a device fills up while the other device sends it files.
/// The device says plainly, in its activity, that it is out of space; it tries
/// again with a back-off (a handful of attempts, not one every few milliseconds,
/// and on the same connection: no login); nothing is lost (the server holds every file) and nothing
/// half-written shows in its sync dir (every file there is whole); once the disk
/// has room again, every file arrives by itself.
#[test]
fn a_full_disk_on_a_client_is_said_plainly_loses_nothing_and_recovers_by_itself() {
    let t = TestDir::new("resources_client_disk_full");
    let disk = SmallDisk::mount(t.join("small-disk"), "2m");
    let server = Server::primary(&t);
    let d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let mut opts = ClientOpts::new("dev2", "alice", &server, DEVICE2_IP);
    opts.sync_dir = Some(disk.path.join("sync"));
    let d2 = Client::spawn(&t, opts);
    d2.wait_logged_in();

    // About 3.3 MiB for a 2 MiB disk: the first files fit, the rest do not.
    let mut want = Want::new();
    for (i, size) in [10_000usize, 900_000, 900_000, 900_000, 600_000].into_iter().enumerate() {
        let name = format!("f{i}.bin");
        let bytes = files::seeded(40 + i as u64, size);
        files::put(&d1.path(&name), &bytes);
        want.insert(name, bytes);
    }
    wait_until(DEADLINE, "every file on the server", || {
        want.iter().all(|(p, b)| server.user_dir("alice").join(p).metadata().is_ok_and(|m| m.len() == b.len() as u64))
    });
    wait_until(DEADLINE, "dev2 to say it is out of space", || d2.activity().contains("this device is out of space"));

    let since = Instant::now();
    let logins_before = count(&server.log(), "logged in user=alice");
    let said_before = count(&d2.activity(), "this device is out of space");
    let_pass(Duration::from_secs(10), since);
    let logins = count(&server.log(), "logged in user=alice") - logins_before;
    let said = count(&d2.activity(), "this device is out of space") - said_before;
    // A full disk is no network trouble: the connection stays (the rest of a
    // download that cannot be written is read and dropped).
    assert_eq!(logins, 0, "dev2 logged in {logins} times in 10 s while its disk was full");
    assert!(said <= 8, "dev2 said {said} times in 10 s that it is out of space: retries should back off");
    // Whatever is visible in dev2's sync dir is a whole file, as dev1 has it.
    let tree = files::tree(&d2.sync_dir);
    assert!(tree.files.len() < want.len(), "every file fit on a 2 MiB disk: the test proves nothing");
    for (p, size) in &tree.files {
        let whole = want.get(p).is_some_and(|b| b.len() as u64 == *size && files::holds(&d2.path(p), b));
        assert!(whole, "{p} ({size} bytes) in dev2's sync dir is not a whole file from dev1");
    }
    // The server lost nothing, and dev1 was not disturbed.
    wait_trees("dev1 unchanged", &[&d1.sync_dir], &want);
    for (p, b) in &want {
        assert!(files::holds(&server.user_dir("alice").join(p), b), "{p} on the server is not what dev1 sent");
    }

    disk.grow("64m");
    wait_trees("every file on dev2 once its disk has room", &[&d2.sync_dir, &d1.sync_dir], &want);
    let left: Vec<_> =
        std::fs::read_dir(d2.sync_dir.join(".replibox/tmp")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "dev2 left temporary files behind: {left:?}");
}

/// Issue 11: the primary's data dir becomes read-only while it serves. A change
/// is refused with a plain reason (`the server's data dir is read-only`), nothing
/// of it is stored or listed, the server goes on serving, a file dropped into the
/// sync dir is tried again with a back-off, and everything goes through once the
/// data dir is writable again.
#[test]
fn an_unwritable_data_dir_on_the_primary_refuses_changes_plainly_and_recovers() {
    let t = TestDir::new("resources_primary_read_only");
    let server = Server::primary(&t);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    std::fs::write(d1.path("before.txt"), b"stored before").unwrap();
    wait_until(DEADLINE, "before.txt on the server", || server.user_dir("alice").join("before.txt").exists());
    let seq = server.status()["seq"].clone();

    let mut read_only = ReadOnly::make(&server.data);
    let new = t.join("new.bin");
    write_seeded(&new, 11, 100_000);
    let said = d1.err(&format!("upload {}", new.display()));
    assert!(said.contains("data dir is read-only"), "the upload should fail with a plain reason: {said}");
    let said = d1.err("delete before.txt");
    assert!(said.contains("data dir is read-only"), "the delete should fail with a plain reason: {said}");
    let listing = listed(&d1.ok("list_server"));
    assert!(listing.contains_key("before.txt") && !listing.contains_key("new.bin"), "listing: {listing:?}");
    assert!(server.user_dir("alice").join("before.txt").exists(), "a refused delete removed the file");
    assert_eq!(server.status()["seq"], seq, "refused changes reached the history");

    // The watcher's way: a new file, tried again with a back-off while it lasts.
    let since = Instant::now();
    std::fs::write(d1.path("later.txt"), b"written while the server could not store it").unwrap();
    wait_until(DEADLINE, "a first attempt to send later.txt", || {
        count(&server.log(), "cannot create temporary file") >= 2
    });
    let_pass(Duration::from_secs(10), since);
    let attempts = count(&server.log(), "cannot create temporary file") - 1;
    assert!((1..=8).contains(&attempts), "{attempts} attempts to send later.txt in 10 s: retries should back off");
    assert!(d1.activity().contains("data dir is read-only"), "the activity should say why:\n{}", d1.activity());

    read_only.undo();
    wait_until(DEADLINE, "later.txt on the server once it may write", || {
        server.user_dir("alice").join("later.txt").exists()
    });
    assert!(d1.ok(&format!("upload {}", new.display())).contains("uploaded new.bin"));
    assert!(d1.ok("delete before.txt").contains("deleted before.txt"));
    assert!(!server.user_dir("alice").join("before.txt").exists());
}

/// Issue 11: a backup's data dir becomes read-only. The backup leaves the cluster
/// saying why, and joins again with a back-off while it lasts; the primary goes on
/// with the other backup and says so; nothing the primary acknowledged is lost;
/// once the data dir is writable again the backup is back with every file.
#[test]
fn an_unwritable_data_dir_on_a_backup_makes_it_leave_and_rejoin_once_writable() {
    let t = TestDir::new("resources_backup_read_only");
    let s1 = primary(&t, &[]);
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    let s3 = backup(&t, "s3", 3, s1.addr, Some(3), &[]);
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    let d1 = Client::headless(&t, "dev1", "alice", &s1, DEVICE1_IP);

    let mut read_only = ReadOnly::make(&s3.data);
    let since = Instant::now();
    write_seeded(&d1.path("doc.bin"), 12, 300_000);
    wait_until(DEADLINE, "doc.bin on the primary and the writable backup", || {
        [&s1, &s2].iter().all(|s| s.user_dir("alice").join("doc.bin").metadata().is_ok_and(|m| m.len() == 300_000))
    });
    wait_until(DEADLINE, "s3 to leave, saying why", || {
        s3.log().lines().any(|l| l.contains("leaving the cluster") && l.contains("Read-only file system"))
    });
    wait_until(DEADLINE, "the primary to say it runs with fewer backups", || {
        s1.log().contains("running with 1 of the 2 backups")
    });
    let_pass(Duration::from_secs(12), since);
    let leaves = count(&s3.log(), "leaving the cluster");
    assert!((1..=5).contains(&leaves), "s3 left {leaves} times in 12 s: it should rejoin with a back-off");
    assert!(!s3.user_dir("alice").join("doc.bin").exists(), "s3 stored doc.bin on a read-only data dir?");

    read_only.undo();
    wait_until(Duration::from_secs(90), "s3 back with doc.bin", || {
        s3.user_dir("alice").join("doc.bin").metadata().is_ok_and(|m| m.len() == 300_000)
            && members(&s1).is_some_and(|m| m == [1, 2, 3])
    });
    wait_until(DEADLINE, "the primary to say its backups are back", || {
        s1.log().contains("all 2 backups are live again")
    });
}

/// Issue 7, item 6: a network that breaks every connection right after the login
/// does not make the client log in again at once each time: the logins back off
/// (a handful in ten seconds, against hundreds), and once the network is whole
/// again the client carries on syncing.
#[test]
fn reconnections_back_off_when_every_connection_breaks_at_once() {
    let t = TestDir::new("resources_reconnect_back_off");
    let server = Server::primary(&t);
    let proxy = Proxy::start(SERVER_IP, server.addr);
    let d1 = Client::spawn(&t, ClientOpts::at("dev1", "alice", proxy.addr, DEVICE1_IP));
    d1.wait_logged_in();

    // The connection in place breaks at its next frame from the server (a pong
    // within 3 s), and so does every new one, right after its welcome.
    proxy.cut_after(|_| true);
    wait_until(DEADLINE, "the first cut", || proxy.cuts() >= 1);
    let since = Instant::now();
    let before = proxy.cuts();
    let_pass(Duration::from_secs(10), since);
    let logins = proxy.cuts() - before;
    assert!(
        (2..=12).contains(&logins),
        "{logins} logins in 10 s while every connection broke: reconnections should back off"
    );

    proxy.cut_after(|_| false);
    std::fs::write(d1.path("after.txt"), b"the network is whole again").unwrap();
    wait_until(DEADLINE, "after.txt on the server", || server.user_dir("alice").join("after.txt").exists());
}

/// Starts a primary on 127.0.0.1 whose process may hold at most `nofile` open
/// files (`ulimit -n`, soft and hard).
fn limited_primary(t: &TestDir, name: &str, nofile: u32, extra: &[&str]) -> Server {
    let port = free_port(SERVER_IP);
    let data = t.join(format!("{name}-data"));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(server_bin())
        .args(["-p", "--bind", "127.0.0.1", "--port", &port.to_string(), "--data"])
        .arg(&data)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE");
    let mut proc = Proc::spawn(t, name, cmd, false);
    let addr = SocketAddr::new(SERVER_IP, port);
    wait_until(DEADLINE, &format!("{name} to listen"), || {
        if let Some(status) = proc.try_status() {
            fail(format!("{name} exited at start-up ({status}): {}", proc.stderr()));
        }
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    });
    let opts = ServerOpts { port: Some(port), data: Some(data.clone()), ..ServerOpts::primary(name) };
    Server { opts, addr, data, proc }
}

/// The lowest descriptor number process `pid` does not use: with its open-file
/// limit there, its next `accept` fails with EMFILE.
fn lowest_free_fd(pid: u32) -> u64 {
    let used = open_fds(pid);
    (0..).find(|n| !used.contains(n)).unwrap_or_default()
}

/// The descriptors process `pid` holds.
fn open_fds(pid: u32) -> std::collections::BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| fail(format!("cannot list the descriptors of {pid}: {e}")))
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Lowers `pid`'s open-file limit to the descriptors it holds, once they have
/// stayed the same for 200 ms and did not change while the limit was set. A
/// server just started on a loaded machine may still close a file it used at
/// start-up: that descriptor, free under the limit, let an accept through now
/// and then (and each one a new streak of failed accepts in the log).
fn starve_of_fds(pid: u32) {
    wait_until(DEADLINE, "the server's descriptors to stay the same while its limit is lowered", || {
        let before = open_fds(pid);
        std::thread::sleep(Duration::from_millis(200));
        if open_fds(pid) != before {
            return false;
        }
        set_fd_limit(pid, lowest_free_fd(pid));
        open_fds(pid) == before
    });
}

/// Sets process `pid`'s soft open-file limit with prlimit(1) (the hard one stays:
/// raising it needs a capability a container may not have).
fn set_fd_limit(pid: u32, limit: u64) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
        .output()
        .unwrap_or_else(|e| fail(format!("cannot run prlimit: {e}")));
    assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
}

/// Issue 7, item 7: out of file descriptors (its limit lowered to the descriptors
/// it holds while it runs), the accept loop backs off instead of spinning: a line
/// or two in its log where it used to write one every few milliseconds, and it
/// takes the waiting connections once descriptors are there again.
#[test]
fn out_of_file_descriptors_the_accept_loop_backs_off() {
    let t = TestDir::new("resources_accept_back_off");
    let server = Server::primary(&t);
    wait_members(&[&server], &[1]);
    let pid = server.proc.pid();
    starve_of_fds(pid);
    let since = Instant::now();
    // They wait in the kernel's backlog: every accept fails while the limit holds.
    let _waiting: Vec<TcpStream> = (0..5)
        .map(|i| {
            TcpStream::connect_timeout(&server.addr, Duration::from_secs(5))
                .unwrap_or_else(|e| fail(format!("connection {i}: {e}")))
        })
        .collect();
    wait_until(DEADLINE, "accepts to fail", || server.log().contains("accept failed"));
    let_pass(Duration::from_secs(5), since);
    let lines = count(&server.log(), "accept failed") + count(&server.log(), "accept still failing");
    assert!(lines <= 3, "{lines} log lines of failed accepts in 5 s: the accept loop should back off");
    set_fd_limit(pid, 1024);
    let mut a = Raw::login(server.addr, "alice", "00000000000000a1", "a client once descriptors are back");
    assert!(matches!(a.request(Op::List { after: None }), OpResult::Listing { .. }));
    assert!(server.log().contains("accepting again"), "the server should say it accepts again");
}

/// Issue 7, item 7: without `--max-connections`, the limit fits the process's
/// open-file limit (here (160 - 64) / 12 = 8 connections), and a connection beyond
/// it is told why in a `refused` frame and closed, while those already in are
/// served; once some close, new ones are taken again.
#[test]
fn connections_beyond_the_limit_are_refused_politely() {
    let t = TestDir::new("resources_max_connections");
    let server = limited_primary(&t, "server", 160, &[]);
    wait_until(DEADLINE, "the server to say its limit", || {
        server.log().contains("serving at most 8 connections at once (open-file limit 160)")
    });
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    let mut held: Vec<Raw> = Vec::new();
    // Accepted connections count until their thread ends: retry while the
    // harness's own probe connection is still being closed.
    for (i, u) in users.iter().enumerate() {
        let device = format!("{:016x}", 0xb100 + i);
        let r = wait_for(DEADLINE, &format!("{u} to log in"), || {
            let mut r = Raw::connect(server.addr, u);
            match r.try_password_login(u, &device) {
                Some(LoginEnd::Welcome { .. }) => Some(r),
                _ => None,
            }
        });
        held.push(r);
    }
    let mut extra = Raw::connect(server.addr, "a ninth connection");
    let frames = extra.expect_closed();
    let reason = refusal(&frames).unwrap_or_else(|| fail(format!("no refusal, frames: {frames:?}")));
    assert!(reason.contains("limit of 8 connections"), "the refusal should say why: {reason}");
    for r in held.iter_mut() {
        let seq = r.next_seq();
        r.send(&Msg::Request { seq, op: Op::List { after: None } });
        assert!(matches!(r.reply_to(seq), OpResult::Listing { .. }), "{}: a connection in is served", r.what);
    }
    drop(held.pop());
    wait_for(DEADLINE, "a connection taken again once one closed", || {
        let mut r = Raw::connect(server.addr, "a later connection");
        let end = r.try_password_login("later", "00000000000000c1");
        matches!(end, Some(LoginEnd::Welcome { .. })).then_some(())
    });
}

/// Issue 7, item 7: after the hello, a whole frame has a deadline: a client that
/// trickles a frame one byte every 2 s (each byte well within the silence bound)
/// is cut off once the frame is overdue, instead of holding its threads for ever.
#[test]
fn a_client_trickling_a_frame_is_cut_off() {
    let t = TestDir::new("resources_trickle");
    let server = Server::primary(&t);
    let mut r = Raw::login(server.addr, "alice", "00000000000000a1", "a trickling client");
    let frame = frame_bytes(r#"{"epoch":0,"msg":{"kind":"ping"}}"#);
    let mut w = r.stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        // The first bytes of a frame that never ends: a length far above its header.
        let mut bytes = vec![0u8, 0, 4, 0];
        bytes.extend_from_slice(&frame[4..]);
        bytes.resize(1024, b' ');
        for b in bytes {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    r.wait_closed(Duration::from_secs(90));
    let _ = r.stream.shutdown(std::net::Shutdown::Both);
    let _ = trickle.join();
    wait_until(DEADLINE, "the server to say why", || server.log().contains("did not arrive whole"));
}

/// Issue 7, item 9 (and `--max-connections`): what cannot work is refused at
/// start-up with 1 and a reason, before any data dir is made: `-b` without a
/// port, `-b` at the server's own address (by its IP, and by `localhost` when it
/// listens on every address), `-p` on a port in use, and `--max-connections 0`.
/// `--help` lists `--max-connections`.
#[test]
fn start_up_refuses_what_cannot_work_before_making_a_data_dir() {
    let t = TestDir::new("resources_start_up_refusals");
    let taken = std::net::TcpListener::bind(SocketAddr::new(SERVER_IP, 0)).unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let port = free_port(SERVER_IP).to_string();
    let me = format!("127.0.0.1:{port}");
    let me_local = format!("localhost:{port}");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("-b without a port", vec!["-b", "127.0.0.1", "--bind", "127.0.0.1", "--port", &port], "port is missing"),
        ("-b at itself", vec!["-b", &me, "--bind", "127.0.0.1", "--port", &port], "this server itself"),
        ("-b at itself by name", vec!["-b", &me_local, "--bind", "0.0.0.0", "--port", &port], "this server itself"),
        ("-p on a port in use", vec!["-p", "--bind", "127.0.0.1", "--port", &taken_port], "cannot listen"),
        (
            "--max-connections 0",
            vec!["-p", "--bind", "127.0.0.1", "--port", &port, "--max-connections", "0"],
            "--max-connections",
        ),
    ];
    for (i, (what, args, says)) in cases.into_iter().enumerate() {
        let data = t.join(format!("data-{i}"));
        let data_arg = data.to_str().unwrap().to_string();
        let args = [args, vec!["--data", &data_arg]].concat();
        let (status, err) = run_to_exit(&t, &format!("refused-{i}"), &args);
        assert_eq!(status.code(), Some(1), "{what}: {status}, stderr:\n{err}");
        assert!(err.contains(says), "{what}: stderr should say why ({says:?}):\n{err}");
        assert!(!data.exists(), "{what}: a refused start made its data dir");
    }
    drop(taken);
    let help = Command::new(server_bin()).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--max-connections"), "--help lists --max-connections");
}

/// Issue 11: a device's sync dir becomes read-only while the client runs (a
/// read-only bind mount, as root). What the other device sends cannot be written
/// there: the device says why, stays logged in, nothing is lost on the server or
/// on the other device, and everything arrives once the sync dir is writable.
#[test]
fn an_unwritable_sync_dir_on_a_client_is_said_plainly_and_recovers() {
    let t = TestDir::new("resources_client_read_only");
    let server = Server::primary(&t);
    let d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    let mut want = Want::new();
    files::put(&d1.path("before.txt"), b"before");
    want.insert("before.txt".into(), b"before".to_vec());
    wait_trees("before.txt on dev2", &[&d2.sync_dir], &want);

    let mut read_only = ReadOnly::make(&d2.sync_dir);
    let logins_before = count(&server.log(), "logged in user=alice");
    for i in 0..5 {
        let name = format!("d/f{i}.txt");
        let bytes = format!("sent while dev2 could not write {i}").into_bytes();
        files::put(&d1.path(&name), &bytes);
        want.insert(name, bytes);
    }
    wait_trees("every file on the server", &[&server.user_dir("alice")], &want);
    wait_until(DEADLINE, "dev2 to say it cannot write", || d2.activity().contains("Read-only file system"));
    assert!(!d2.path("d").exists(), "something was written into a read-only sync dir");
    wait_trees("dev1 unchanged", &[&d1.sync_dir], &want);

    read_only.undo();
    wait_trees("every file on dev2 once its sync dir is writable", &[&d2.sync_dir, &d1.sync_dir], &want);
    let logins = count(&server.log(), "logged in user=alice") - logins_before;
    assert_eq!(logins, 0, "dev2 logged in again {logins} times: a local write error is no network trouble");
}
