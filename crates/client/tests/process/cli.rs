//! The commands read from stdin.

use crate::harness::files::{holds, put, seeded};
use crate::harness::*;
use std::fs;

/// `upload` of a file from outside the sync dir prints its outcome once the server
/// has stored it, and the file reaches both sync dirs; `download NAME` writes a copy
/// into the working directory that is not synced; `list_server`/`list_client` show
/// names and sizes; `delete` removes the file everywhere; a missing file, an
/// unknown name or an unknown command print an error on stderr and the session goes
/// on; errors make the final exit code non-zero; end of input works like `exit`.
#[test]
fn cli_commands_work_and_errors_leave_the_session_running() {
    let t = TestDir::new("cli_commands");
    let server = Server::primary(&t);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    let users = server.user_dir("alice");

    // upload from outside the sync dir (a multi-chunk file, a name with a space).
    let report = seeded(41, 700 * 1024 + 3);
    let outside = t.mkdir("outside");
    put(&outside.join("report 2026.pdf"), &report);
    let out = d1.ok(&format!("upload {}", outside.join("report 2026.pdf").display()));
    assert!(out.contains("report 2026.pdf"), "the upload outcome should name the file: {out}");
    // The outcome is printed only once the server stored the file: no waiting here.
    assert!(holds(&users.join("report 2026.pdf"), &report), "upload printed its outcome before the server stored it");
    assert!(holds(&outside.join("report 2026.pdf"), &report), "the uploaded source changed");
    wait_until(DEADLINE, "the uploaded file in both sync dirs", || {
        holds(&d1.path("report 2026.pdf"), &report) && holds(&d2.path("report 2026.pdf"), &report)
    });

    // A nested file made on device 2, for download and the listings.
    put(&d2.path("docs/notes.txt"), b"notes from device 2");
    wait_until(DEADLINE, "docs/notes.txt on device 1", || holds(&d1.path("docs/notes.txt"), b"notes from device 2"));

    // download: a copy in the working directory, named after the file.
    let out = d1.ok("download report 2026.pdf");
    assert!(out.contains("report 2026.pdf"), "the download outcome should name the file: {out}");
    assert!(holds(&d1.cwd.join("report 2026.pdf"), &report), "download did not write the copy in the working dir");
    let synced_before = files::tree(&d1.sync_dir);
    d1.ok("download docs/notes.txt");
    assert!(holds(&d1.cwd.join("notes.txt"), b"notes from device 2"), "download of a nested file");
    // That copy is not synced: the download put nothing in the sync dir, and the
    // copy is not the synced file (a link to it, say): changing the copy leaves the
    // sync dir, the server and the other device as they were, even once a change
    // made after it has reached them all.
    assert_eq!(files::tree(&d1.sync_dir), synced_before, "the download changed the sync dir");
    fs::write(d1.cwd.join("notes.txt"), b"changed in the working dir only").unwrap();
    put(&d1.path("after the copy.txt"), b"made after the copy changed");
    wait_until(DEADLINE, "a change made after the copy's to reach the server and device 2", || {
        holds(&users.join("after the copy.txt"), b"made after the copy changed")
            && holds(&d2.path("after the copy.txt"), b"made after the copy changed")
    });
    for (root, whose) in [(&d1.sync_dir, "device 1's sync dir"), (&users, "the server"), (&d2.sync_dir, "device 2")] {
        assert!(
            holds(&root.join("docs/notes.txt"), b"notes from device 2"),
            "changing the downloaded copy changed {whose}"
        );
    }

    let mut sizes = std::collections::BTreeMap::new();
    sizes.insert("after the copy.txt".to_string(), 27u64);
    sizes.insert("docs/notes.txt".to_string(), 19u64);
    sizes.insert("report 2026.pdf".to_string(), report.len() as u64);
    assert_eq!(listed(&d1.ok("list_server")), sizes, "list_server");
    assert_eq!(listed(&d1.ok("list_client")), sizes, "list_client");
    assert!(holds(&users.join("docs/notes.txt"), b"notes from device 2"), "the downloaded copy was synced");

    // Errors, each followed by a working command.
    let missing = t.join("no such file.txt");
    for line in [
        format!("upload {}", missing.display()),
        "download nosuch.txt".to_string(),
        "delete nosuch.txt".to_string(),
        "download docs".to_string(),
        format!("upload {}", outside.display()),
        "frobnicate".to_string(),
        "upload".to_string(),
        "list_client extra".to_string(),
    ] {
        let e = d1.err(&line);
        assert!(!e.trim().is_empty(), "{line}: empty error message");
        assert_eq!(listed(&d1.ok("list_client")), sizes, "list_client after {line:?}");
    }
    assert!(!d1.cwd.join("nosuch.txt").exists(), "a failed download left a file");

    // delete: gone from the server and this sync dir when the outcome is printed,
    // then from the other device.
    let out = d1.ok("delete report 2026.pdf");
    assert!(out.contains("report 2026.pdf"), "the delete outcome should name the file: {out}");
    assert!(!users.join("report 2026.pdf").exists(), "delete printed its outcome before the server deleted");
    assert!(!d1.path("report 2026.pdf").exists(), "delete left the file in this device's sync dir");
    wait_until(DEADLINE, "the delete to reach device 2", || !d2.path("report 2026.pdf").exists());
    sizes.remove("report 2026.pdf");
    assert_eq!(listed(&d1.ok("list_server")), sizes, "list_server after delete");
    assert!(holds(&d1.cwd.join("report 2026.pdf"), &report), "delete removed the downloaded copy");

    // get_sync_dir by hand.
    let out = d1.ok("get_sync_dir");
    assert!(out.contains("in sync with the server"), "get_sync_dir: {out}");

    // exit: "bye", and a non-zero code because commands failed.
    let status = d1.stop();
    assert!(!status.success(), "the session had errors, so the exit code should be non-zero; got {status}");

    // End of input works like exit, and a session without errors exits with 0.
    let mut d3 = Client::interactive(&t, "dev3", "alice", &server, DEVICE3_IP);
    assert!(holds(&d3.path("docs/notes.txt"), b"notes from device 2"), "a new device logs in in sync");
    assert!(listed(&d3.ok("list_client")).contains_key("docs/notes.txt"));
    d3.proc.close_stdin();
    let status = d3.proc.wait_exit(DEADLINE);
    assert!(status.success(), "end of input should end a clean session with 0, got {status}");
}

/// The option lines of a `--help` text (those that start with `-` once indented),
/// split into their spellings: `-p, --primary` gives `-p` and `--primary`, and
/// `--port <PORT>` gives `--port` and `<PORT>`.
fn option_words(help: &str) -> std::collections::BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',']).filter(|w| !w.is_empty()).map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// The `[default: X]` under option `flag` in a `--help` text.
fn default_of(help: &str, flag: &str) -> Option<String> {
    let lines: Vec<&str> = help.lines().collect();
    let at = lines.iter().position(|l| l.trim_start().starts_with('-') && l.split([' ', ',']).any(|w| w == flag))?;
    lines[at + 1..]
        .iter()
        .take_while(|l| !l.trim_start().starts_with('-'))
        .find_map(|l| l.trim().strip_prefix("[default: ").and_then(|d| d.strip_suffix(']')))
        .map(str::to_string)
}

/// The command line is a contract: `--help` names every option with the spelling
/// and the default that the README gives, the sync dir defaults to
/// `./sync_dir_USER`, and an invalid username, a missing argument or an
/// unreachable server make the client exit with 2 and say why; a server command
/// line that does not parse exits with 2 too.
#[test]
fn command_line_contract() {
    let t = TestDir::new("cli_contract");
    let help = |bin: std::path::PathBuf| {
        let out = std::process::Command::new(&bin).arg("--help").output().unwrap();
        assert!(out.status.success(), "{} --help failed", bin.display());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let client_help = help(client_bin());
    assert!(
        client_help.lines().any(|l| l.trim() == "Usage: replibox-client [OPTIONS] <USER> <HOST> <PORT>"),
        "replibox-client --help should give the usage USER HOST PORT:\n{client_help}"
    );
    let words = option_words(&client_help);
    for word in ["--sync-dir", "<DIR>", "--bind", "<IP>", "--headless", "--callback-port", "--failover-wait-s"] {
        assert!(words.contains(word), "replibox-client --help should have an option {word}:\n{client_help}");
    }
    for (flag, default) in [("--callback-port", "0"), ("--failover-wait-s", "30")] {
        assert_eq!(default_of(&client_help, flag).as_deref(), Some(default), "the default of {flag}:\n{client_help}");
    }
    let server_help = help(server_bin());
    let words = option_words(&server_help);
    for word in [
        "-p",
        "--primary",
        "-b",
        "--backup",
        "<HOST:PORT>",
        "--status",
        "--id",
        "--port",
        "--bind",
        "--data",
        "--heartbeat-ms",
        "--ack-timeout-ms",
        "--failure-timeout-ms",
        "--election-timeout-ms",
    ] {
        assert!(words.contains(word), "replibox-server --help should have an option {word}:\n{server_help}");
    }
    for (flag, default) in [
        ("--port", "4000"),
        ("--bind", "0.0.0.0"),
        ("--data", "./replibox-data"),
        ("--heartbeat-ms", "100"),
        ("--ack-timeout-ms", "2000"),
        // Issue 6: a host cut off without a FIN is replaced in well under a second.
        ("--failure-timeout-ms", "400"),
        ("--election-timeout-ms", "150"),
    ] {
        assert_eq!(default_of(&server_help, flag).as_deref(), Some(default), "the default of {flag}:\n{server_help}");
    }
    for (args, what) in [
        (vec![], "no mode"),
        (vec!["-p", "-b", "127.0.0.1:1"], "-p with -b"),
        (vec!["-p", "--status", "127.0.0.1:1"], "-p with --status"),
        (vec!["-p", "--port", "not-a-port"], "a port that is not a number"),
        (vec!["-p", "--id", "-3"], "a negative id"),
        (vec!["-p", "--frobnicate"], "an unknown option"),
    ] {
        let mut cmd = std::process::Command::new(server_bin());
        cmd.args(&args).current_dir(&t.path);
        let (status, _, err) = run_bounded(&t, "bad-server-args", cmd);
        assert_eq!(status.code(), Some(2), "replibox-server with {what} should exit with 2");
        assert!(!err.is_empty(), "replibox-server with {what} should say why on stderr");
    }
    assert!(!t.join("replibox-data").exists(), "a command line that does not parse made a data dir");

    let server = Server::primary(&t);
    // No --sync-dir: ./sync_dir_alice in the working directory.
    let cwd = t.mkdir("home");
    let mut opts = ClientOpts::new("default-dir", "alice", &server, DEVICE1_IP).interactive();
    opts.cwd = Some(cwd.clone());
    let mut c = Client::spawn_without_sync_dir(&t, opts);
    c.wait_logged_in();
    assert!(cwd.join("sync_dir_alice/.replibox").is_dir(), "the sync dir should default to ./sync_dir_alice");
    put(&cwd.join("sync_dir_alice/hello.txt"), b"hello");
    wait_until(DEADLINE, "a file in the default sync dir to reach the server", || {
        holds(&server.user_dir("alice").join("hello.txt"), b"hello")
    });
    assert!(c.stop().success());

    // Nothing listens on this port: the client cannot start.
    let nobody = free_port(SERVER_IP).to_string();
    for (args, what, why) in [
        (vec!["../bob", "127.0.0.1", "1"], "an invalid username", "username"),
        (vec![".alice", "127.0.0.1", "1"], "a username starting with a dot", "username"),
        (vec!["alice", "127.0.0.1"], "a missing port", "PORT"),
        (vec!["alice", "127.0.0.1", "not-a-port"], "a port that is not a number", "not-a-port"),
        (vec!["alice", "127.0.0.1", nobody.as_str(), "--headless"], "an unreachable server", "cannot reach"),
    ] {
        let mut cmd = std::process::Command::new(client_bin());
        // With a password, so that the unreachable server is what stops it.
        cmd.args(&args).current_dir(&cwd).env("REPLIBOX_PASSWORD", password_of("alice"));
        let (status, out, err) = run_bounded(&t, "bad-client-args", cmd);
        assert_eq!(status.code(), Some(2), "{what}: should exit with 2");
        assert!(err.contains(why), "{what}: should say why on stderr ({why:?}):\n{err}");
        assert!(out.is_empty(), "{what}: printed an outcome: {out}");
    }
    assert!(!cwd.join("sync_dir_../bob").exists() && !t.join("bob").exists(), "an invalid username made a directory");
}
