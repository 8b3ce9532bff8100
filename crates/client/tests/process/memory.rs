//! Bounded memory: file data moves in chunks.

use crate::harness::files::{same_file, write_seeded};
use crate::harness::*;

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
