//! Cases 5 and 6: one large file moved into device 1's sync dir until it is complete
//! on device 2 and on all three servers, beside the same bytes copied once over
//! loopback TCP into a file with fsync; and the peak memory of every process
//! while it moves.

use super::{wait_files, Arrival, Ctx, Pair, Setup};
use crate::copy::Copier;
use crate::report::{median, ms, show_mib, show_ms, Row, Stands};
use crate::sys::{self, has_content, proc_stat, write_content};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// How many copies of the moved file are written while it moves: three servers
/// and device 2 (device 1 already holds it).
const WRITTEN_COPIES: usize = 4;

/// What one run measured.
struct Run {
    arrival: Arrival,
    baseline: f64,
    /// The same bytes copied [`WRITTEN_COPIES`] times at once: what the one disk
    /// allows for as many fsynced copies.
    at_once: f64,
    /// Peak RSS (KiB): primary, backup 2, backup 3, device 1, device 2.
    peaks: [u64; 5],
}

fn one(ctx: &Ctx, r: usize) -> Result<Run, String> {
    let root = ctx.dir.join("large");
    let size = ctx.plan.large_mib << 20;
    let mut setup = Setup::start(ctx, &root)?;
    let staged = root.join("stage");
    fs::create_dir_all(&staged).map_err(|e| e.to_string())?;
    let name = format!("large-{r}.bin");
    let seed = ctx.seed(5_000 + r as u64);
    write_content(&staged.join(&name), seed, size).map_err(|e| format!("cannot stage {name}: {e}"))?;

    let mut copier = Copier::start(&root.join("baseline")).map_err(|e| format!("baseline: {e}"))?;
    let mut src = fs::File::open(staged.join(&name)).map_err(|e| e.to_string())?;
    let baseline = ms(copier.copy_one(&name, &mut src, size).map_err(|e| format!("baseline: {e}"))?);
    copier.finish().map_err(|e| format!("baseline: {e}"))?;
    let _ = fs::remove_dir_all(root.join("baseline"));
    let at_once = Copier::copy_at_once(&root.join("baseline"), WRITTEN_COPIES, &staged.join(&name), size)
        .map_err(|e| format!("copies at once: {e}"))?;
    let at_once = ms(at_once);
    let _ = fs::remove_dir_all(root.join("baseline"));
    std::thread::sleep(Duration::from_millis(500));

    // Peaks from here on: the processes have been up since the cluster started.
    let pids: Vec<u32> =
        [setup.cluster.pid(0), setup.cluster.pid(1), setup.cluster.pid(2), setup.dev1.pid(), setup.dev2.pid()]
            .into_iter()
            .map(|p| p.ok_or("a process is not running"))
            .collect::<Result<_, _>>()?;
    for pid in &pids {
        sys::reset_peak(*pid)?;
    }
    let mut peaks = [0u64; 5];
    let arrival = move_in(&mut setup, &staged.join(&name), &name, seed, size, &mut || {
        for (peak, pid) in peaks.iter_mut().zip(&pids) {
            *peak = proc_stat(*pid).map(|s| s.hwm_kib).unwrap_or(0);
        }
    })?;
    setup.stop();
    let _ = fs::remove_dir_all(&root);
    Ok(Run { arrival, baseline, at_once, peaks })
}

/// Moves the staged file into the pair's source as `name` and returns when it had
/// arrived whole where; `arrived` runs right then (to read the processes'
/// peaks), and the bytes are checked afterwards.
pub fn move_in(
    pair: &mut dyn Pair,
    staged: &Path,
    name: &str,
    seed: u64,
    size: u64,
    arrived: &mut dyn FnMut(),
) -> Result<Arrival, String> {
    let places = pair.places();
    let t0 = Instant::now();
    fs::rename(staged, pair.source().join(name)).map_err(|e| format!("cannot move {name} in: {e}"))?;
    let files = [(name.to_string(), size)];
    let done =
        wait_files(&places, &files, Duration::from_secs(600), Duration::from_millis(5), &mut || pair.check_alive())?;
    arrived();
    let arrival = Arrival::new(t0, &done);
    for place in &places {
        let p = place.join(name);
        if !has_content(&p, seed, size).map_err(|e| format!("{}: {e}", p.display()))? {
            return Err(format!("{} holds other bytes than were moved in", p.display()));
        }
    }
    Ok(arrival)
}

/// Runs cases 5 and 6.
pub fn run(ctx: &Ctx) -> (Vec<Row>, String, String) {
    let mib = ctx.plan.large_mib;
    let how5 = format!(
        "a {mib} MiB file of fresh content staged on the same file system, then moved (one rename) into device 1's \
         sync dir; the clock stops when device 2 and all three servers hold it at its full size (polled every 5 ms); \
         the bytes are compared afterwards. A fresh cluster per run. Baseline, just before, from the same staged file \
         (in the page cache for both): the bytes sent once over loopback TCP (127.0.0.1 to 127.0.0.2) into a file, \
         then fsync. Beside it, the same bytes copied four times at once, over four connections into four files written \
         behind as replibox writes them, each fsynced: the four copies written while the file moves (three servers and \
         device 2), about the least time the one disk allows for them. Here the file is stored five times on one disk \
         (device 1, three servers, device 2)."
    );
    let how6 = "peak RSS (VmHWM from /proc/PID/status, reset through /proc/PID/clear_refs just before the file is \
                moved in) of the primary, each backup and both clients while case 5's file moves; the largest of \
                the runs."
        .to_string();
    let target5 = "< 3x the single copy";
    let target6 = "< 64 MiB RSS, every process";
    let mut runs = Vec::new();
    for r in 1..=ctx.plan.large_runs {
        match one(ctx, r) {
            Ok(run) => {
                ctx.say(&format!(
                    "case 5 run {r}: {} to everywhere, single copy {}, {WRITTEN_COPIES} copies at once {}",
                    show_ms(run.arrival.everywhere),
                    show_ms(run.baseline),
                    show_ms(run.at_once)
                ));
                runs.push(run);
            }
            Err(e) => {
                let _ = fs::remove_dir_all(ctx.dir.join("large"));
                let what = format!("large file {mib} MiB, to device 2 and 3 servers");
                return (
                    vec![
                        Row::not_measured(5, &what, target5, &format!("run {r}: {e}")),
                        Row::not_measured(6, "peak RSS during case 5", target6, &format!("run {r}: {e}")),
                    ],
                    how5,
                    how6,
                );
            }
        }
    }
    let every: Vec<f64> = runs.iter().map(|r| r.arrival.everywhere).collect();
    let dev: Vec<f64> = runs.iter().map(|r| r.arrival.to_device).collect();
    let servers: Vec<f64> = runs.iter().filter_map(|r| r.arrival.to_servers).collect();
    let base: Vec<f64> = runs.iter().map(|r| r.baseline).collect();
    let floors: Vec<f64> = runs.iter().map(|r| r.at_once).collect();
    let (m, b, floor) = (median(&every), median(&base), median(&floors));
    let ratio = m / b;
    let runs_text = if runs.len() > 1 {
        format!(" (runs: {})", every.iter().map(|v| show_ms(*v)).collect::<Vec<_>>().join(", "))
    } else {
        String::new()
    };
    let cited = if mib == 1024 { "; Syncthing: 6.0 s (cited)" } else { "" };
    let r5 = Row {
        case: 5,
        what: format!("large file {mib} MiB, to device 2 and 3 servers"),
        figure: format!(
            "{} to everywhere{runs_text}; the 3 servers had it after {}, device 2 after {}",
            show_ms(m),
            show_ms(median(&servers)),
            show_ms(median(&dev))
        ),
        baseline: format!(
            "single copy + fsync: {}; {WRITTEN_COPIES} copies at once, written behind: {} ({:.2}x the single \
             copy; replibox takes {:.2}x them){cited}",
            show_ms(b),
            show_ms(floor),
            floor / b,
            m / floor
        ),
        ratio: Some(ratio),
        target: target5.into(),
        stands: Stands::from(ratio < 3.0),
    };
    let peak = |i: usize| runs.iter().map(|r| r.peaks[i]).max().unwrap_or(0);
    let names = ["primary", "backup 2", "backup 3", "device 1", "device 2"];
    let all: Vec<String> = (0..5).map(|i| format!("{} {}", names[i], show_mib(peak(i)))).collect();
    let worst = (0..5).map(peak).max().unwrap_or(0);
    let r6 = Row {
        case: 6,
        what: format!("peak RSS while the {mib} MiB file moves"),
        figure: all.join(", "),
        baseline: "9 MiB before issue 7 (cited)".into(),
        ratio: Some(worst as f64 / (9.0 * 1024.0)),
        target: target6.into(),
        stands: Stands::from(worst < 64 * 1024),
    };
    (vec![r5, r6], how5, how6)
}
