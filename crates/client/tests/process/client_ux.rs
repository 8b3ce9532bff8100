//! The client as a new user meets it (issue 9, and issue 7's items 2, 3 and 4 on
//! the client's side): ignore rules, device names, one client per sync dir,
//! `download` that never overwrites, the fixes to the command loop, `status`,
//! signals while a command waits, a vanished sync dir, the status pane's table,
//! a terminal session and the summary of a burst.

use crate::harness::files::{holds, put};
use crate::harness::*;
use std::fs;
use std::path::Path;
use std::process::Command;

/// Puts `name` in `from`'s sync dir and waits until the server stored it and `to`
/// holds it. A pass over `from`'s sync dir sends its files in path order, so
/// `name` is no barrier for files of the same pass: wait for those first. For
/// everything `from` did in earlier passes, it is: the engine runs one pass at a
/// time, and `to` receives changes in the order the server stored them.
#[track_caller]
fn barrier(server: &Server, from: &Client, to: &Client, name: &str) {
    put(&from.path(name), name.as_bytes());
    wait_until(DEADLINE, &format!("{name} to reach the server and {}", to.opts.name), || {
        holds(&server.user_dir("alice").join(name), name.as_bytes()) && holds(&to.path(name), name.as_bytes())
    });
}

fn on_server(server: &Server, name: &str) -> bool {
    server.user_dir("alice").join(name).exists()
}

/// Built-in rules keep editor and OS junk local; `.replibox-ignore` adds rules
/// and overrides a default with `!`; a rule change applies without a restart;
/// an ignored path is neither sent, received nor deleted, in either direction;
/// a path no longer ignored is brought into agreement both ways.
#[test]
fn ignore_rules_keep_files_local_and_apply_without_a_restart() {
    let t = TestDir::new("ux_ignore_rules");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");

    // The defaults.
    let junk = [".notes.txt.swp", "notes.txt~", ".#notes.txt", ".DS_Store", "Thumbs.db", "sub/desktop.ini"];
    for j in junk {
        put(&d1.path(j), b"junk");
    }
    put(&d1.path("sub/real.txt"), b"real");
    wait_until(DEADLINE, "a normal file next to the junk to reach device 2", || {
        holds(&d2.path("sub/real.txt"), b"real")
    });
    barrier(&server, &d1, &d2, "after defaults.txt");
    for j in junk {
        assert!(!on_server(&server, j), "{j} is ignored by default but reached the server");
        assert!(!d2.path(j).exists(), "{j} is ignored by default but reached device 2");
    }

    // Rules of device 1's own, written while it runs: no restart.
    put(&d1.path(".replibox-ignore"), b"# device 1's rules\n*.log\nbuild/\n!*.swp\n");
    put(&d1.path("debug.log"), b"device 1's log");
    put(&d1.path("build/out.o"), b"object");
    wait_until(DEADLINE, "the .swp file, ignored by default, to be sent once !*.swp overrides it", || {
        holds(&server.user_dir("alice").join(".notes.txt.swp"), b"junk")
    });
    barrier(&server, &d1, &d2, "after rules.txt");
    assert!(!d2.path(".notes.txt.swp").exists(), "device 2's defaults still ignore *.swp: not received");
    assert!(!on_server(&server, "debug.log") && !on_server(&server, "build/out.o"), "ignored files were sent");
    assert!(!on_server(&server, ".replibox-ignore"), "the rules file itself is never synced");

    // Device 2 has no such rules: its .log files reach the server, never device 1.
    put(&d2.path("from2.log"), b"device 2's log");
    put(&d2.path("debug.log"), b"device 2's debug.log");
    wait_until(DEADLINE, "device 2's .log files on the server", || {
        holds(&server.user_dir("alice").join("from2.log"), b"device 2's log")
            && holds(&server.user_dir("alice").join("debug.log"), b"device 2's debug.log")
    });
    barrier(&server, &d2, &d1, "after d2 logs.txt");
    assert!(!d1.path("from2.log").exists(), "device 1 received a file its rules ignore");
    assert!(holds(&d1.path("debug.log"), b"device 1's log"), "an ignored file was overwritten from the server");

    // Deleted on device 2: the server deletes it, device 1's ignored copy stays.
    fs::remove_file(d2.path("debug.log")).unwrap();
    wait_until(DEADLINE, "device 2's delete of debug.log to reach the server", || !on_server(&server, "debug.log"));
    barrier(&server, &d2, &d1, "after d2 delete.txt");
    assert!(holds(&d1.path("debug.log"), b"device 1's log"), "an ignored file was deleted");

    // A synced file that becomes ignored, then is deleted here: not deleted there.
    put(&d1.path(".replibox-ignore"), b"*.log\nbuild/\n!*.swp\nsub/\n");
    fs::remove_file(d1.path("sub/real.txt")).unwrap();
    barrier(&server, &d1, &d2, "after sub ignored.txt");
    assert!(holds(&server.user_dir("alice").join("sub/real.txt"), b"real"), "an ignored file's deletion was sent");
    assert!(holds(&d2.path("sub/real.txt"), b"real"), "an ignored file's deletion reached device 2");

    // No rule for *.log any more: device 1 sends its debug.log and receives
    // from2.log, without a restart.
    put(&d1.path(".replibox-ignore"), b"build/\nsub/\n");
    wait_until(DEADLINE, "debug.log and from2.log to be synced once no longer ignored", || {
        holds(&server.user_dir("alice").join("debug.log"), b"device 1's log")
            && holds(&d1.path("from2.log"), b"device 2's log")
    });
    assert!(!on_server(&server, "build/out.o"), "build/ is still ignored");
}

/// `--device-name` names this device's conflicted copies; without it, the host
/// name does. The login's summary after a conflict counts the download and the
/// upload it made, and says "1 conflict".
#[test]
fn device_names_name_conflicted_copies() {
    let t = TestDir::new("ux_device_names");
    let server = Server::primary(&t);
    let mut opts = ClientOpts::new("laptop-dev", "alice", &server, DEVICE1_IP);
    opts.device_name = Some("laptop".into());
    let mut d1 = Client::spawn(&t, opts);
    d1.wait_logged_in();
    let mut opts = ClientOpts::new("default-name", "alice", &server, DEVICE2_IP).interactive();
    opts.device_name = None;
    let mut d2 = Client::spawn(&t, opts);
    d2.wait_logged_in();
    let host = host_name();
    assert!(
        d2.proc.stderr().contains(&format!("(device {host}, id ")),
        "without --device-name, the login line should name the host {host:?}:\n{}",
        d2.proc.stderr()
    );
    let status = d2.status();
    assert!(status.lines().last().unwrap().starts_with(&format!("device {host} (id ")), "{status}");

    put(&d1.path("report.txt"), b"first version\n");
    wait_until(DEADLINE, "report.txt on device 2", || holds(&d2.path("report.txt"), b"first version\n"));
    assert!(d1.stop().success());
    put(&d2.path("report.txt"), b"edited on device 2\n");
    wait_until(DEADLINE, "device 2's edit on the server", || {
        holds(&server.user_dir("alice").join("report.txt"), b"edited on device 2\n")
    });
    put(&d1.path("report.txt"), b"edited on the laptop while it was off\n");
    // An edit from a minute ago: settled at once, so the login's pass sends the
    // conflicted copy and its summary counts it.
    let a_minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    fs::File::options().write(true).open(d1.path("report.txt")).unwrap().set_modified(a_minute_ago).unwrap();
    d1.restart(&t);

    let stem = "report (conflicted copy laptop ";
    let copy = wait_for(DEADLINE, "a conflicted copy named after the laptop on device 1", || {
        fs::read_dir(&d1.sync_dir)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(stem) && n.ends_with(").txt"))
    });
    assert!(holds(&d1.path(&copy), b"edited on the laptop while it was off\n"), "the copy holds the laptop's edit");
    assert!(holds(&d1.path("report.txt"), b"edited on device 2\n"), "the name keeps the server's version");
    wait_until(DEADLINE, "the conflicted copy on the server and device 2", || {
        on_server(&server, &copy) && d2.path(&copy).exists()
    });
    let summary = d1.proc.stdout().lines().rev().find(|l| l.contains("in sync with the server")).unwrap().to_string();
    assert!(
        summary.ends_with("(1 uploaded, 1 downloaded, 0 deleted there, 0 deleted here, 1 conflict)"),
        "the login's summary should count the conflict's download and upload: {summary}"
    );
}

/// A second client on a sync dir in use exits 2 with a message naming the first
/// one, before logging in; the first goes on syncing.
#[test]
fn a_second_client_on_a_sync_dir_exits_2_and_the_first_goes_on() {
    let t = TestDir::new("ux_one_client_per_dir");
    let server = Server::primary(&t);
    let d1 = Client::headless(&t, "first", "alice", &server, DEVICE1_IP);
    let mut opts = ClientOpts::new("second", "alice", &server, DEVICE2_IP);
    opts.sync_dir = Some(d1.sync_dir.clone());
    let mut second = Client::spawn(&t, opts);
    let status = second.proc.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(2), "the second client should exit 2");
    let err = second.proc.stderr();
    assert!(
        err.contains("is in use by another replibox-client") && err.contains(&format!("pid {}", d1.proc.pid())),
        "the second client should say the sync dir is in use, by whom:\n{err}"
    );
    assert_eq!(server.status()["sessions"], 1, "the second client must not log in");
    put(&d1.path("still syncing.txt"), b"the first client goes on");
    wait_until(DEADLINE, "the first client's next file on the server", || {
        holds(&server.user_dir("alice").join("still syncing.txt"), b"the first client goes on")
    });
}

/// `download NAME` never replaces a file in the working directory: the copy gets
/// the first free name, `NAME (1).EXT`, and the outcome says so.
#[test]
fn download_never_overwrites_a_file() {
    let t = TestDir::new("ux_download_free_name");
    let server = Server::primary(&t);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    put(&d1.path("docs/notes.txt"), b"from the server");
    wait_until(DEADLINE, "notes.txt on the server", || {
        holds(&server.user_dir("alice").join("docs/notes.txt"), b"from the server")
    });
    put(&d1.cwd.join("notes.txt"), b"my own notes");
    let out = d1.ok("download docs/notes.txt");
    assert!(out.contains("notes (1).txt") && out.contains("already there"), "the outcome should say which: {out}");
    assert!(holds(&d1.cwd.join("notes.txt"), b"my own notes"), "download replaced a file");
    assert!(holds(&d1.cwd.join("notes (1).txt"), b"from the server"));
    let out = d1.ok("download docs/notes.txt");
    assert!(out.contains("notes (2).txt"), "{out}");
    assert!(
        holds(&d1.cwd.join("notes (1).txt"), b"from the server")
            && holds(&d1.cwd.join("notes (2).txt"), b"from the server")
    );
    let leftovers: Vec<_> = fs::read_dir(&d1.cwd)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("replibox-download"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

/// What a new user met: `delete` typed on a device said "deleted on another
/// device" there; `help` did not list help, quit or quoting; an open quote was
/// taken as part of the name; end of input printed no `bye`.
#[test]
fn the_command_loop_fixes_from_a_new_users_session() {
    let t = TestDir::new("ux_cli_fixes");
    let server = Server::primary(&t);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);

    put(&d1.path("my notes.txt"), b"notes");
    wait_until(DEADLINE, "my notes.txt on device 2", || holds(&d2.path("my notes.txt"), b"notes"));
    let e = d1.err("delete \"my notes.txt");
    assert!(e.contains("quote"), "an open quote should be an error about the quote: {e}");
    assert!(d1.path("my notes.txt").exists(), "a command with an open quote did something");
    assert_eq!(d1.ok("delete \"my notes.txt\""), "deleted my notes.txt");
    wait_until(DEADLINE, "device 2 to delete it and say so", || {
        !d2.path("my notes.txt").exists() && d2.activity().contains("deleted my notes.txt (deleted on another device)")
    });
    assert!(
        !d1.activity().contains("deleted on another device"),
        "the device where delete was typed says 'deleted on another device':\n{}",
        d1.activity()
    );

    d1.proc.send_line("help");
    wait_until(DEADLINE, "help's text", || d1.proc.stdout().contains("A quote left open is an error."));
    let help = d1.proc.stdout();
    for word in ["help ", "quit", "status", "quoted"] {
        assert!(help.contains(word), "help should mention {word:?}:\n{help}");
    }

    d1.proc.close_stdin();
    let status = d1.proc.wait_exit(DEADLINE);
    assert_eq!(d1.proc.stdout().lines().last(), Some("bye"), "end of input should print bye like exit");
    assert!(!status.success(), "the open quote was an error, so the exit status is 1; got {status}");
}

/// `status` says "in sync" with the server's address and epoch; with the server
/// gone and a local change made, it says how many changes wait and that the
/// server is unreachable; once the server is back, in sync again at the new epoch.
#[test]
fn status_says_in_sync_or_what_waits_and_why() {
    let t = TestDir::new("ux_status");
    let mut server = Server::primary(&t);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    let epoch = server.status()["epoch"].as_u64().unwrap();
    let s = d1.status();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines[0], "in sync", "{s}");
    assert!(s.contains(&format!("server {} (connected), epoch {epoch}", server.addr)), "{s}");
    assert!(lines.last().unwrap().starts_with("device dev1 (id "), "{s}");

    server.kill();
    wait_until(DEADLINE, "the client to notice the server is gone", || {
        d1.activity().contains("connection to the server lost")
    });
    put(&d1.path("offline edit.txt"), b"made while the server was down");
    // Until its first pass, the engine may see the file as still being written:
    // wait for the reason that matters here.
    let s = wait_for(DEADLINE, "status to count the change that waits for the server", || {
        let s = d1.status();
        let first = s.lines().next().unwrap_or_default();
        (first.starts_with("1 change waiting") && first.contains("unreachable")).then_some(s)
    });
    // The front-end keeps the last primary and epoch it knew while it waits.
    assert!(s.contains(&format!("server {} (unreachable since", server.addr)), "{s}");
    assert!(s.contains(&format!("), epoch {epoch}")), "{s}");

    server.restart(&t);
    let epoch = server.status()["epoch"].as_u64().unwrap();
    wait_until(DEADLINE, "the change to reach the server once it is back", || {
        holds(&server.user_dir("alice").join("offline edit.txt"), b"made while the server was down")
    });
    let s = wait_for(DEADLINE, "status to say in sync again", || {
        let s = d1.status();
        s.starts_with("in sync\n").then_some(s)
    });
    assert!(s.contains(&format!("(connected), epoch {epoch}")), "{s}");
}

/// With the server gone, `list_client` still answers at once (it never asks the
/// server), and SIGTERM ends the session while `list_server` waits for the
/// server, instead of being ignored until the request gives up.
#[test]
fn a_signal_ends_a_command_that_waits_on_the_server() {
    let t = TestDir::new("ux_signal_mid_command");
    let mut server = Server::primary(&t);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    put(&d1.path("a.txt"), b"a");
    wait_until(DEADLINE, "a.txt on the server", || on_server(&server, "a.txt"));
    server.kill();
    wait_until(DEADLINE, "the client to notice the server is gone", || {
        d1.activity().contains("connection to the server lost")
    });
    assert_eq!(listed(&d1.ok("list_client")).keys().collect::<Vec<_>>(), ["a.txt"], "list_client");

    d1.proc.send_line("list_server");
    d1.proc.signal("TERM");
    let status = d1.proc.wait_exit(DEADLINE);
    let err = d1.proc.stderr();
    assert!(
        !err.contains("error: the server is unavailable"),
        "the signal was ignored until list_server gave up:\n{err}"
    );
    assert_eq!(d1.proc.stdout().lines().last(), Some("bye"), "a signal ends the session cleanly");
    if err.contains("error: list_server: interrupted") {
        assert!(!status.success(), "a command cut short makes the exit status 1");
    }
}

/// `rm -rf` of a whole sync dir, or a sync dir replaced by an empty folder (as an
/// unmounted file system leaves its mount point), stops that client with a clear
/// message and a non-zero exit, and deletes nothing on the server or the other
/// device.
#[test]
fn a_vanished_sync_dir_stops_the_client_and_deletes_nothing() {
    let t = TestDir::new("ux_vanished_sync_dir");
    let (server, mut d1, mut d2) = server_and_two_devices(&t, "alice");
    let mut want = Want::new();
    for i in 0..30 {
        let name = if i % 3 == 0 { format!("dir {i}/f{i}.txt") } else { format!("f{i}.txt") };
        let bytes = format!("file {i}").into_bytes();
        put(&d1.path(&name), &bytes);
        want.insert(name, bytes);
    }
    let users = server.user_dir("alice");
    wait_trees("the files everywhere", &[&d1.sync_dir, &d2.sync_dir, &users], &want);

    fs::remove_dir_all(&d1.sync_dir).unwrap();
    let status = d1.proc.wait_exit(DEADLINE);
    assert!(!status.success(), "a client whose sync dir vanished should exit non-zero, got {status}");
    let err = d1.proc.stderr();
    assert!(err.contains("error: the sync dir") && err.contains("is gone"), "no clear message:\n{err}");
    put(&d2.path("barrier.txt"), b"after");
    want.insert("barrier.txt".into(), b"after".to_vec());
    wait_trees("everything still on the server and device 2", &[&d2.sync_dir, &users], &want);

    // Device 2's folder replaced by an empty one, as an unmount leaves it.
    let away = t.join("dev2-sync.away");
    fs::rename(&d2.sync_dir, &away).unwrap();
    fs::create_dir(&d2.sync_dir).unwrap();
    let status = d2.proc.wait_exit(DEADLINE);
    assert!(!status.success(), "a client whose sync dir was replaced should exit non-zero, got {status}");
    assert!(d2.proc.stderr().contains("error: the sync dir"), "{}", d2.proc.stderr());
    let d3 = Client::headless(&t, "dev3", "alice", &server, DEVICE3_IP);
    wait_trees("everything on the server, and on a new device", &[&users, &d3.sync_dir], &want);
}

fn cluster_status(servers: &[String]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster-status.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--once")
        .args(servers)
        .env("REPLIBOX_SERVER", server_bin())
        .output()
        .unwrap_or_else(|e| fail(format!("cannot run {}: {e}", script.display())));
    assert!(out.status.success(), "cluster-status.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The row of `addr` in the status pane's table, split on runs of two or more
/// spaces (a cell may hold single spaces: "backup (primary down)").
fn row(table: &str, addr: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(addr))
        .unwrap_or_else(|| fail(format!("no row for {addr} in:\n{table}")));
    line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect()
}

/// `make cluster`'s status pane shows one table row per server, a server that
/// does not answer included, and a backup whose primary is down says so.
#[test]
fn the_status_pane_shows_a_table() {
    let t = TestDir::new("ux_status_pane");
    let mut opts = ServerOpts::primary("s1");
    opts.mode.extend(["--id".into(), "1".into()]);
    let mut s1 = Server::start(&t, opts);
    let s2 = Server::start(
        &t,
        ServerOpts {
            name: "s2".into(),
            ip: "127.0.0.2".parse().unwrap(),
            port: None,
            data: None,
            mode: vec!["-b".into(), s1.addr.to_string(), "--id".into(), "2".into()],
            extra: vec![],
        },
    );
    wait_until(DEADLINE, "s2 to join", || {
        s2.try_status().is_some_and(|v| v["members"].as_array().is_some_and(|m| m.len() == 2))
    });
    let dead = format!("127.0.0.3:{}", free_port("127.0.0.3".parse().unwrap()));
    let addrs = [s1.addr.to_string(), s2.addr.to_string(), dead.clone()];
    let epoch = s1.status()["epoch"].to_string();

    let table = cluster_status(&addrs);
    let header: Vec<&str> =
        table.lines().find(|l| l.starts_with("ID")).unwrap_or_else(|| fail(&table)).split_whitespace().collect();
    assert_eq!(header, ["ID", "ADDRESS", "ROLE", "EPOCH", "SEQ", "SESSIONS", "ANSWERS"], "{table}");
    let r1 = row(&table, &addrs[0]);
    assert_eq!(r1[..3], ["1".to_string(), addrs[0].clone(), "primary".into()], "{table}");
    assert_eq!((&r1[3], r1.last().unwrap().as_str()), (&epoch, "yes"), "{table}");
    assert_eq!(row(&table, &addrs[1])[..3], ["2".to_string(), addrs[1].clone(), "backup".into()], "{table}");
    assert!(row(&table, &dead).last().unwrap().starts_with("no"), "{table}");
    assert!(!table.contains('{'), "the pane should not show raw JSON:\n{table}");

    // The pane itself, redrawn every second: it remembers the id of a server that
    // stops answering, and shows the failover.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster-status.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(&addrs).env("REPLIBOX_SERVER", server_bin());
    let pane = Proc::spawn(&t, "pane", cmd, false);
    let last_table = || {
        let out = pane.stdout();
        out.rsplit("\u{1b}[H\u{1b}[2J").next().unwrap_or_default().to_string()
    };
    wait_until(DEADLINE, "the pane to show s1 answering", || {
        last_table().lines().any(|l| l.contains(&addrs[0]) && l.ends_with("yes"))
    });
    s1.kill();
    let table = wait_for(DEADLINE, "the pane to show s1 down and s2 taking over", || {
        let table = last_table();
        let complete = table.lines().filter(|l| l.contains("127.0.0.")).count() == 3;
        (complete
            && row(&table, &addrs[0]).last().is_some_and(|a| a.starts_with("no"))
            && row(&table, &addrs[1]).get(2).is_some_and(|r| r == "primary"))
        .then_some(table)
    });
    assert_eq!(row(&table, &addrs[0])[0], "1", "a server that does not answer keeps its id: {table}");
    let next: u64 = epoch.parse::<u64>().unwrap_or(0) + 1;
    assert_eq!(row(&table, &addrs[1])[3], next.to_string(), "the new primary's epoch: {table}");

    // A backup that has no primary says so.
    let lost = Server::start(
        &t,
        ServerOpts {
            name: "lost".into(),
            ip: "127.0.0.6".parse().unwrap(),
            port: None,
            data: None,
            mode: vec!["-b".into(), dead.clone()],
            extra: vec![],
        },
    );
    let lost_addr = lost.addr.to_string();
    let table = wait_for(DEADLINE, "the pane to show a backup without a primary", || {
        let table = cluster_status(std::slice::from_ref(&lost_addr));
        table.contains("backup (no primary)").then_some(table)
    });
    assert!(row(&table, &lost_addr).last().is_some_and(|a| a == "yes"), "{table}");
}

/// On a terminal (a pty, through script(1)): the line can be edited, history
/// recalls the last command, a background line appears above a redrawn prompt,
/// and Ctrl-C at the prompt ends the session with `bye` and status 0.
#[test]
fn a_terminal_session_edits_lines_and_ctrl_c_says_bye() {
    let t = TestDir::new("ux_terminal");
    let server = Server::primary(&t);
    let sync_dir = t.join("tty-sync");
    let client = format!(
        "{} alice {} {} --bind {DEVICE1_IP} --sync-dir '{}' --device-name tty",
        client_bin().display(),
        server.addr.ip(),
        server.addr.port(),
        sync_dir.display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &client, "/dev/null"])
        .env("TERM", "xterm")
        .env("RUST_LOG", "warn")
        .env_remove("REPLIBOX_PASSWORD")
        .current_dir(&t.path);
    let mut tty = Proc::spawn(&t, "tty", cmd, true);
    let screen = |p: &Proc| p.stdout();
    // No password in the environment: it is asked for on the terminal, without echo.
    wait_until(DEADLINE, "the password prompt", || screen(&tty).contains("password for alice"));
    tty.send_bytes(format!("{}\r", password_of("alice")).as_bytes());
    wait_until(DEADLINE, "the prompt", || screen(&tty).contains("replibox> "));
    assert!(!screen(&tty).contains(&password_of("alice")), "the password was echoed:\n{}", screen(&tty));

    // "helq", backspace, "p", Enter: line editing.
    tty.send_bytes(b"helq\x7fp\r");
    wait_until(DEADLINE, "help's text", || screen(&tty).matches("A quote left open is an error.").count() == 1);
    let after_last_help = |p: &Proc| {
        let s = screen(p);
        s[s.rfind("A quote left open").unwrap_or(0)..].contains("replibox> ")
    };
    wait_until(DEADLINE, "the prompt after help", || after_last_help(&tty));
    // Up, Enter: history.
    tty.send_bytes(b"\x1b[A\r");
    wait_until(DEADLINE, "help's text again, recalled from history", || {
        screen(&tty).matches("A quote left open is an error.").count() == 2
    });
    wait_until(DEADLINE, "the prompt after the second help", || after_last_help(&tty));

    // A background line while the prompt waits: printed, and the prompt redrawn.
    put(&sync_dir.join("typed elsewhere.txt"), b"x");
    wait_until(DEADLINE, "the upload's line, then the prompt again", || {
        let s = screen(&tty);
        s.rfind("uploaded typed elsewhere.txt").is_some_and(|i| s[i..].contains("replibox> "))
    });

    tty.send_bytes(b"\x03");
    let status = tty.wait_exit(DEADLINE);
    assert!(screen(&tty).contains("bye"), "Ctrl-C at the prompt should end the session with bye");
    assert!(status.success(), "Ctrl-C at the prompt is a clean end: {status}");
    assert!(!screen(&tty).contains("error:"), "{}", screen(&tty));
}

/// A burst of files is summarised, on the sending and the receiving device,
/// instead of a line per file.
#[test]
fn a_burst_of_files_is_summarised() {
    let t = TestDir::new("ux_burst_summary");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let mut want = Want::new();
    for i in 0..40 {
        let name = format!("burst {i:02}.txt");
        put(&d1.path(&name), name.as_bytes());
        want.insert(name.clone(), name.into_bytes());
    }
    wait_trees("the burst everywhere", &[&d2.sync_dir, &server.user_dir("alice")], &want);
    for (dev, verb) in [(&d1, "uploaded"), (&d2, "received")] {
        // (lines for single files, files in summary lines), once all 40 are told.
        let (single, summarised) = wait_for(DEADLINE, &format!("{} to tell of all 40 files", dev.opts.name), || {
            let activity = dev.activity();
            let single = activity.lines().filter(|l| l.starts_with(&format!("{verb} burst "))).count();
            let summarised: usize = activity
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{verb} "))?.split_once(" files (")?.0.parse::<usize>().ok())
                .sum();
            (single + summarised == 40).then_some((single, summarised))
        });
        assert!(
            summarised > 0 && single < 40,
            "{}: a burst of 40 files should be summarised, got {single} single lines:\n{}",
            dev.opts.name,
            dev.activity()
        );
    }
}

/// A device that receives files still sends its own changes without waiting for
/// a rescan (the tests' clients rescan once an hour): the hint of a received file
/// renamed into place starts no pass, and must not hide a folder moved in (one
/// hint, for the folder) nor an editor's save over a received file.
#[test]
fn a_receiving_device_still_sends_a_folder_moved_in_and_a_save_over_a_received_file() {
    let t = TestDir::new("ux_receiving_device_sends");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let mut want = Want::new();
    for i in 0..20 {
        let name = format!("got {i:02}.txt");
        put(&d1.path(&name), name.as_bytes());
        want.insert(name.clone(), name.into_bytes());
    }
    let users = server.user_dir("alice");
    wait_trees("device 1's files everywhere", &[&d2.sync_dir, &users], &want);

    // A folder staged outside the sync dir, then moved in with one rename.
    let staged = t.join("staged");
    for i in 0..5 {
        let name = format!("moved in/f{i}.txt");
        put(&staged.join(format!("f{i}.txt")), name.as_bytes());
        want.insert(name.clone(), name.into_bytes());
    }
    fs::rename(&staged, d2.path("moved in")).unwrap();
    // Waited for alone: another change here would start a pass that finds both.
    wait_trees("the folder moved into device 2, everywhere", &[&d1.sync_dir, &users], &want);
    // A save over a file device 2 received, renamed over it from outside the sync
    // dir, so that the rename is the only hint.
    let tmp = t.join("got 03.txt.new");
    put(&tmp, b"edited on device 2");
    fs::rename(&tmp, d2.path("got 03.txt")).unwrap();
    want.insert("got 03.txt".into(), b"edited on device 2".to_vec());
    wait_trees("device 2's changes everywhere", &[&d1.sync_dir, &users], &want);
}

/// True when `p` exists and its owner's execute bit is set.
fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o100 != 0)
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| fail(format!("chmod {mode:o} {}: {e}", p.display())));
}

/// The execute bit syncs, and nothing else of the mode: a script made
/// executable on device 1 is executable on every server and on device 2; a
/// `chmod +x` alone (no new bytes, no new mtime) is a change; `chmod -x` on
/// device 2 comes back to device 1; a group-write bit stays local.
#[test]
fn the_execute_bit_syncs_and_nothing_else_of_the_mode() {
    let t = TestDir::new("ux_execute_bit");
    let (s1, s2, s3) = crate::harness::cluster::three_servers(&t, &[]);
    let servers = [&s1, &s2, &s3];
    let d1 = Client::headless(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);
    let on_all = |what: &str, name: &str, body: &[u8], exec: bool| {
        wait_until(DEADLINE, what, || {
            servers.iter().all(|s| {
                let p = s.user_dir("alice").join(name);
                holds(&p, body) && executable(&p) == exec
            }) && holds(&d2.path(name), body)
                && executable(&d2.path(name)) == exec
                && holds(&d1.path(name), body)
                && executable(&d1.path(name)) == exec
        });
    };

    // Written executable from the start.
    put(&d1.path("tools/run.sh"), b"#!/bin/sh\necho run\n");
    chmod(&d1.path("tools/run.sh"), 0o755);
    put(&d1.path("plain.txt"), b"not a program");
    on_all("run.sh executable on every server and on device 2", "tools/run.sh", b"#!/bin/sh\necho run\n", true);
    on_all("plain.txt not executable anywhere", "plain.txt", b"not a program", false);

    // chmod +x alone: same bytes, same mtime.
    chmod(&d1.path("plain.txt"), 0o755);
    on_all("a chmod +x alone to reach everyone", "plain.txt", b"not a program", true);

    // chmod -x on the other device comes back.
    chmod(&d2.path("tools/run.sh"), 0o644);
    on_all("a chmod -x on device 2 to reach everyone", "tools/run.sh", b"#!/bin/sh\necho run\n", false);

    // Other bits stay local: a group-write bit on device 1 makes no new version.
    let before = s1.try_status().and_then(|s| s["seq"].as_u64());
    chmod(&d1.path("plain.txt"), 0o775);
    barrier(&s1, &d1, &d2, "after the group bit.txt");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    assert_eq!(mode(&d2.path("plain.txt")) & 0o020, 0, "device 1's group-write bit reached device 2");
    let after = s1.try_status().and_then(|s| s["seq"].as_u64());
    // The barrier file is one upload, one entry: nothing else was sent.
    assert_eq!(after, before.map(|b| b + 1), "a group-write bit alone made a change on the server");
}
