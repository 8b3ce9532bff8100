//! Bounded memory: file data moves in chunks.

use crate::harness::cluster::three_servers;
use crate::harness::files::{same_file, write_seeded};
use crate::harness::*;
use std::path::Path;
use std::process::Command;

/// While a 256 MiB file crosses from device 1 through the server to device 2, the
/// peak resident memory (VmHWM) of the server and of both clients stays under
/// 64 MiB, and the file arrives byte-identical.
#[test]
fn peak_memory_stays_bounded_while_a_256_mib_file_crosses() {
    const SIZE: u64 = 256 * 1024 * 1024;
    const BOUND_KIB: u64 = 64 * 1024;
    let t = TestDir::new("memory_256_mib");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    write_seeded(&d1.path("huge/256 MiB.bin"), 8, SIZE);
    let src = d1.path("huge/256 MiB.bin");
    let at_server = server.user_dir("alice").join("huge/256 MiB.bin");
    let at_d2 = d2.path("huge/256 MiB.bin");
    wait_until(DEADLINE, "the 256 MiB file to reach the server and device 2 byte-identical", || {
        same_file(&src, &at_server) && same_file(&src, &at_d2)
    });
    let peaks = [("server", server.proc.vm_hwm_kib()), ("dev1", d1.proc.vm_hwm_kib()), ("dev2", d2.proc.vm_hwm_kib())];
    eprintln!("peak memory (VmHWM) in KiB: {peaks:?}");
    for (name, kib) in peaks {
        assert!(kib < BOUND_KIB, "{name} peaked at {kib} KiB while a 256 MiB file crossed (bound {BOUND_KIB} KiB)");
    }
}

/// Bytes of `path` in the page cache, as util-linux's `fincore` counts them.
#[track_caller]
fn cached_bytes(path: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("cannot run fincore (util-linux)");
    assert!(out.status.success(), "fincore {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().unwrap_or_else(|_| panic!("fincore {} printed {text:?}", path.display()))
}

/// A large file does not stay in the page cache of the servers that store it, nor
/// of the device that receives it: each writes it through
/// `proto::durable::WriteBehind`, which syncs every 32 MiB and drops what it
/// synced, so at most about one window (plus a chunk) is left cached; and the
/// primary sends it to device 2 through `ReadBehind`, which drops what it has
/// sent. Written plainly, all 160 MiB would stay cached on each, pushing out what
/// else was there (on a machine that hands freed memory back to its host, filling
/// new pages is what made a 1 GiB file slow), and the commit's fsync would find
/// the whole file still to write. The file is checked byte for byte afterwards
/// (reading it caches it again, so only then).
#[test]
fn a_large_file_does_not_stay_in_the_page_cache_of_those_that_store_it() {
    const SIZE: u64 = 160 << 20;
    const BOUND: u64 = 64 << 20;
    let t = TestDir::new("memory_write_behind");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    let src = outside.join("big.bin");
    write_seeded(&src, 11, SIZE);
    // Answered once all three servers hold it.
    d1.ok(&format!("upload {}", src.display()));
    let stored: Vec<_> =
        [&s1, &s2, &s3].iter().map(|s| (s.opts.name.clone(), s.user_dir("alice").join("big.bin"))).collect();
    for (name, path) in &stored {
        let cached = cached_bytes(path);
        eprintln!("{name}: {cached} bytes of big.bin cached");
        assert!(cached < BOUND, "{name} keeps {cached} bytes of the {SIZE}-byte big.bin cached (bound {BOUND})");
    }
    // Device 2 starts only now, so that its download reads the primary's copy
    // from the disk.
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);
    let at_d2 = d2.path("big.bin");
    wait_until(DEADLINE, "device 2 to hold big.bin at its full size", || {
        std::fs::metadata(&at_d2).is_ok_and(|m| m.len() == SIZE)
    });
    let cached = cached_bytes(&at_d2);
    eprintln!("dev2: {cached} bytes of big.bin cached");
    assert!(cached < BOUND, "device 2 keeps {cached} bytes of the {SIZE}-byte big.bin cached (bound {BOUND})");
    let cached = cached_bytes(&stored[0].1);
    eprintln!("s1 after sending it: {cached} bytes of big.bin cached");
    assert!(
        cached < BOUND,
        "s1 keeps {cached} bytes of the {SIZE}-byte big.bin cached after sending it (bound {BOUND})"
    );
    for (name, path) in &stored {
        assert!(same_file(&src, path), "{name} holds other bytes than were uploaded");
    }
    assert!(same_file(&src, &at_d2), "device 2 holds other bytes than were uploaded");
}
