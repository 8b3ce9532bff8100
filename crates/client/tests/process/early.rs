//! Early copies (issue 7): the primary sends a large upload's bytes on to the
//! user's other devices while the servers store them; a device places its copy
//! when told of the change, and lets it go when the upload never completes.

use crate::harness::cluster::three_servers;
use crate::harness::files::{same_file, write_seeded};
use crate::harness::*;
use std::path::{Path, PathBuf};

/// The early copies arriving or held in a device's temporary folder.
fn early_files(device: &Client) -> Vec<PathBuf> {
    let tmp = device.path(".replibox/tmp");
    std::fs::read_dir(&tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("early-")))
                .collect()
        })
        .unwrap_or_default()
}

fn has_file(path: &Path, size: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == size)
}

/// Alice's two devices, both logged in through `primary`.
fn alices_devices(t: &TestDir, primary: &Server) -> (Client, Client) {
    let d1 = Client::headless(t, "dev1", "alice", primary, DEVICE1_IP);
    let d2 = Client::headless(t, "dev2", "alice", primary, DEVICE2_IP);
    (d1, d2)
}

/// A file of `size` seeded bytes, written outside every sync dir, to be moved in.
fn staged(t: &TestDir, name: &str, seed: u64, size: u64) -> PathBuf {
    let path = t.mkdir("outside").join(name);
    write_seeded(&path, seed, size);
    path
}

/// Whether alice's `name` is on every server at its full size.
fn on_servers(servers: [&Server; 3], name: &str, size: u64) -> bool {
    servers.iter().all(|s| has_file(&s.user_dir("alice").join(name), size))
}

/// A 12 MiB file moved into device 1 reaches device 2 as an early copy (its log
/// says it placed one; before, it always downloaded once told), byte-identical
/// and on all three servers; nothing of the copy is left in device 2's
/// temporary folder. The file fits in the primary's queue for device 2, so a
/// device slowed by the machine's load is never left out here (the next test
/// leaves one out on purpose).
#[test]
fn a_large_file_reaches_the_other_device_as_an_early_copy() {
    const SIZE: u64 = 12 << 20;
    let t = TestDir::new("early_copy");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let (d1, d2) = alices_devices(&t, &s1);
    std::fs::rename(staged(&t, "big.bin", 21, SIZE), d1.path("big.bin")).unwrap();
    let src = d1.path("big.bin");
    wait_until(DEADLINE, "big.bin on device 2 and all three servers, byte-identical", || {
        on_servers([&s1, &s2, &s3], "big.bin", SIZE) && has_file(&d2.path("big.bin"), SIZE)
    });
    assert!(same_file(&src, &d2.path("big.bin")), "device 2 holds other bytes than were uploaded");
    for s in [&s1, &s2, &s3] {
        assert!(same_file(&src, &s.user_dir("alice").join("big.bin")), "{} holds other bytes", s.opts.name);
    }
    let log = d2.proc.stderr();
    assert!(
        log.contains("placing the early copy of big.bin"),
        "device 2 did not place an early copy of big.bin; its log:\n{log}"
    );
    assert_eq!(early_files(&d2), Vec::<PathBuf>::new(), "an early copy was left behind on device 2");
}

/// Device 1 dies while it uploads a large file: the primary abandons the
/// upload, tells device 2 to let its early copy go, and device 2 deletes what
/// it received; the file never appears in its sync dir nor on a server.
#[test]
fn an_early_copy_of_an_upload_that_never_completes_is_let_go() {
    const SIZE: u64 = 768 << 20;
    let t = TestDir::new("early_copy_abandoned");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let (mut d1, d2) = alices_devices(&t, &s1);
    std::fs::rename(staged(&t, "huge.bin", 22, SIZE), d1.path("huge.bin")).unwrap();
    wait_until(DEADLINE, "device 2 to receive an early copy of huge.bin", || !early_files(&d2).is_empty());
    d1.proc.kill();
    wait_until(DEADLINE, "device 2 to let the early copy of huge.bin go", || early_files(&d2).is_empty());
    assert!(!d2.path("huge.bin").exists(), "device 2 placed a file whose upload never completed");
    for s in [&s1, &s2, &s3] {
        let name = &s.opts.name;
        assert!(
            !s.user_dir("alice").join("huge.bin").exists(),
            "{name} holds huge.bin: the upload completed before device 1 was killed, or was stored incomplete"
        );
    }
}

/// Device 2 is stopped (SIGSTOP) while device 1 uploads a 64 MiB file: its
/// early copy falls a whole queue behind and is left out, and the upload is on
/// all three servers without waiting for it. Resumed, device 2 lets the copy go
/// and downloads the file when told.
#[test]
fn a_device_that_falls_behind_is_left_out_and_downloads_the_file_once_told() {
    const SIZE: u64 = 64 << 20;
    let t = TestDir::new("early_copy_behind");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let (d1, mut d2) = alices_devices(&t, &s1);
    let file = staged(&t, "big.bin", 23, SIZE);
    d2.proc.signal("STOP");
    std::fs::rename(file, d1.path("big.bin")).unwrap();
    wait_until(DEADLINE, "big.bin on all three servers while device 2 is stopped", || {
        on_servers([&s1, &s2, &s3], "big.bin", SIZE)
    });
    let log = s1.proc.stderr();
    assert!(log.contains("fell behind the early copy"), "the primary never left device 2 out; its log:\n{log}");
    d2.proc.signal("CONT");
    wait_until(DEADLINE, "device 2 to hold big.bin", || has_file(&d2.path("big.bin"), SIZE));
    assert!(same_file(&d1.path("big.bin"), &d2.path("big.bin")), "device 2 holds other bytes than were uploaded");
    let log = d2.proc.stderr();
    assert!(!log.contains("placing the early copy of big.bin"), "device 2 placed a copy it was told to let go:\n{log}");
    wait_until(DEADLINE, "device 2 to let the early copy go", || early_files(&d2).is_empty());
}

/// Device 2's rules ignore `*.iso`: it does not take an early copy of a large
/// `.iso` (before, it wrote the whole copy and kept it in its temporary folder
/// until pushed out or the client restarted), and the file is neither placed
/// nor downloaded there.
#[test]
fn an_early_copy_of_a_path_the_device_ignores_is_not_taken() {
    const SIZE: u64 = 12 << 20;
    let t = TestDir::new("early_copy_ignored");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let d1 = Client::headless(&t, "dev1", "alice", &s1, DEVICE1_IP);
    std::fs::write(t.mkdir("dev2-sync").join(".replibox-ignore"), "*.iso\n").unwrap();
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);
    std::fs::rename(staged(&t, "disk.iso", 24, SIZE), d1.path("disk.iso")).unwrap();
    wait_until(DEADLINE, "disk.iso on all three servers", || on_servers([&s1, &s2, &s3], "disk.iso", SIZE));
    // Notices are applied in order: once the next file is on device 2, the
    // notice of disk.iso was handled.
    std::fs::write(d1.path("after.txt"), "after").unwrap();
    wait_until(DEADLINE, "after.txt on device 2", || has_file(&d2.path("after.txt"), 5));
    let log = d2.proc.stderr();
    assert!(
        log.contains("not taking an early copy of disk.iso: the device's rules leave it out"),
        "device 2 did not refuse an early copy of disk.iso; its log:\n{log}"
    );
    assert_eq!(early_files(&d2), Vec::<PathBuf>::new(), "an early copy of an ignored path is on device 2");
    assert!(!d2.path("disk.iso").exists(), "device 2 placed a file its rules ignore");
}
