//! The C allocator's settings for a process that moves large files through
//! short-lived chunk buffers (the server and the client call
//! [`keep_freed_memory`] first thing in `main`).
//!
//! glibc gives a thread arena's free memory back to the kernel as soon as more
//! than `M_TRIM_THRESHOLD` of it sits at the arena's top; the threshold follows
//! the largest chunk freed so far, so with 256 KiB chunks it is 512 KiB. A
//! transfer's chunks are received on one thread and freed on another (the
//! primary's backup link writers; a device's sync engine), dozens at a time: the
//! arena empties, is trimmed, and every next chunk faults its pages in again,
//! each a fresh page the kernel must zero (and, on a virtual machine whose host
//! takes freed memory back, find anew). Measured on the test machine while a
//! 1 GiB file went from one device to three servers and the other device: about
//! 108,000 page faults on the primary's receiving thread and 67,000 on the
//! receiving device, per GiB; with the settings below, a few hundred. The five
//! processes then spent about 11% less CPU time in all, and the three servers
//! had the file 0.4-0.7 s (about 15%) sooner.
//!
//! The settings keep up to [`TRIM_THRESHOLD`] of free memory at an arena's top
//! instead of trimming it. That changes no peak: what is kept is what a
//! transfer had in use a moment before (a chunk queue holds at most 16 MiB).

/// Requests at least this large are served by `mmap` of their own (and unmapped
/// when freed); below it, from the arenas. Fixed above the largest frame payload
/// ([`crate::MAX_PAYLOAD`]), so no chunk buffer is mapped and unmapped each time. Setting
/// it also stops glibc's own adjustment of both thresholds.
pub const MMAP_THRESHOLD: i32 = 2 << 20;

/// How much free memory an arena keeps at its top before giving it back: above a
/// backup link's full queue of chunks (64 x 256 KiB).
pub const TRIM_THRESHOLD: i32 = 32 << 20;

/// Sets [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`] (glibc only; elsewhere the
/// allocator is left alone). Returns whether both were taken. Call it before
/// the process starts its threads.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters (under its own
        // lock); it touches no memory of ours, and any value is accepted or
        // refused with 0.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn faults() -> i64 {
        use nix::sys::resource::{getrusage, UsageWho};
        getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage").minor_page_faults()
    }

    /// The pattern the module describes: a thread fills chunk buffers, another
    /// frees them, round after round. With the settings, the rounds after the
    /// first reuse the same pages; glibc's defaults trim them after each round
    /// and fault them in again (about 4,096 faults a round here).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn chunks_freed_on_another_thread_are_reused_without_faulting_in_again() {
        assert!(keep_freed_memory(), "glibc refused the thresholds");
        const CHUNK: usize = 256 * 1024;
        const PER_ROUND: usize = 64;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Vec<u8>>>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let freer = std::thread::spawn(move || {
            for round in rx {
                drop(round);
                if done_tx.send(()).is_err() {
                    return;
                }
            }
        });
        let mut after_first = 0;
        for round in 0..10 {
            let before = faults();
            let chunks: Vec<Vec<u8>> = (0..PER_ROUND).map(|i| vec![i as u8 | 1; CHUNK]).collect();
            let taken = faults() - before;
            tx.send(chunks).unwrap();
            done_rx.recv().unwrap();
            if round > 0 {
                after_first += taken;
            }
        }
        drop(tx);
        freer.join().unwrap();
        let pages_per_round = (CHUNK * PER_ROUND / 4096) as i64;
        assert!(
            after_first < pages_per_round,
            "{after_first} page faults in 9 rounds after the first (a round touches {pages_per_round} pages)"
        );
    }
}
