//! Case 4: a folder of small files moved into device 1's sync dir at once, until
//! every file is on device 2 and on all three servers; beside it, the same files
//! sent once over loopback TCP, each written into a file and fsynced.

use super::{wait_files, Arrival, Ctx, Pair, Setup};
use crate::copy::Copier;
use crate::report::{median, ms, show_ms, Row, Stands};
use crate::sys::Content;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

const SIZE: usize = 4096;

/// One burst, and its baseline in ms.
struct Burst {
    arrival: Arrival,
    baseline: f64,
}

/// Writes `n` files of 4 KiB of the stream into `dir` (created), and returns them.
pub fn stage(dir: &Path, n: usize, content: &mut Content) -> Result<Vec<(String, Vec<u8>)>, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut files = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("f{i:05}.txt");
        let body = content.bytes(SIZE);
        fs::write(dir.join(&name), &body).map_err(|e| format!("cannot stage {name}: {e}"))?;
        files.push((name, body));
    }
    Ok(files)
}

fn one(ctx: &Ctx, setup: &mut Setup, root: &Path, folder: &str, n: usize) -> Result<Burst, String> {
    let mut content = Content::new(ctx.seed(4_000 + n as u64) ^ folder.len() as u64);
    let staged = root.join("stage").join(folder);
    let files = stage(&staged, n, &mut content)?;
    // The baseline first, from the same staged files (in the page cache for both).
    let mut copier = Copier::start(&root.join("baseline").join(folder)).map_err(|e| format!("baseline: {e}"))?;
    let t0 = Instant::now();
    for (name, body) in &files {
        copier.send(name, &mut &body[..], SIZE as u64).map_err(|e| format!("baseline: {e}"))?;
    }
    copier.wait(files.len()).map_err(|e| format!("baseline: {e}"))?;
    let baseline = ms(t0.elapsed());
    copier.finish().map_err(|e| format!("baseline: {e}"))?;
    // Let the staged files' writeback pass before the clock starts.
    std::thread::sleep(Duration::from_millis(500));

    // The baseline's copies stay until the end of the case: on a file system
    // without a journal (ext2, or ext4 without one), ext4 will not reuse an
    // inode freed within the last minute and checks every such inode it passes
    // when it makes a file, so thousands of files deleted just before a burst
    // would slow each of its creates (seen here: a third of the servers' time
    // in the kernel's `recently_deleted`).
    let arrival = move_in(setup, &staged, folder, &files)?;
    ctx.say(&format!("case 4: {} files: {} to everywhere (bytes checked)", group(n), show_ms(arrival.everywhere)));
    Ok(Burst { arrival, baseline })
}

/// Moves the staged folder into the pair's source as `folder` and returns when
/// every file had arrived where; checks the bytes afterwards.
pub fn move_in(
    pair: &mut dyn Pair,
    staged: &Path,
    folder: &str,
    files: &[(String, Vec<u8>)],
) -> Result<Arrival, String> {
    let expect: Vec<(String, u64)> =
        files.iter().map(|(name, body)| (format!("{folder}/{name}"), body.len() as u64)).collect();
    let places = pair.places();
    let deadline = Duration::from_secs(if files.len() > 2000 { 900 } else { 300 });
    let t0 = Instant::now();
    fs::rename(staged, pair.source().join(folder)).map_err(|e| format!("cannot move {folder} in: {e}"))?;
    let done = wait_files(&places, &expect, deadline, Duration::from_millis(10), &mut || pair.check_alive())?;
    let arrival = Arrival::new(t0, &done);
    for (name, body) in files {
        for place in &places {
            let p = place.join(folder).join(name);
            if fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))? != *body {
                return Err(format!("{} holds other bytes than were moved in", p.display()));
            }
        }
    }
    Ok(arrival)
}

fn row(n: usize, bursts: &[Burst], target_ms: f64, cited: &str) -> Row {
    let every: Vec<f64> = bursts.iter().map(|b| b.arrival.everywhere).collect();
    let dev: Vec<f64> = bursts.iter().map(|b| b.arrival.to_device).collect();
    let servers: Vec<f64> = bursts.iter().filter_map(|b| b.arrival.to_servers).collect();
    let base: Vec<f64> = bursts.iter().map(|b| b.baseline).collect();
    let m = median(&every);
    let runs = if bursts.len() > 1 {
        format!(" (runs: {})", every.iter().map(|v| show_ms(*v)).collect::<Vec<_>>().join(", "))
    } else {
        String::new()
    };
    Row {
        case: 4,
        what: format!("burst {} x 4 KiB, to device 2 and 3 servers", group(n)),
        figure: format!(
            "{} to everywhere{runs}; the 3 servers had every file after {}, device 2 after {}",
            show_ms(m),
            show_ms(median(&servers)),
            show_ms(median(&dev))
        ),
        baseline: format!("single copy, fsync per file: {}{cited}", show_ms(median(&base))),
        ratio: Some(m / median(&base)),
        target: format!("< {}", show_ms(target_ms)),
        stands: Stands::from(m < target_ms),
    }
}

/// 1000 -> "1,000".
pub fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Runs case 4.
pub fn run(ctx: &Ctx) -> (Vec<Row>, String) {
    let how = "4 KiB files of fresh content staged in a folder on the same file system, then the folder moved \
               (one rename) into device 1's sync dir; the clock stops when device 2 and the user's folder on each \
               of the three servers hold every file at its full size (polled every 10 ms, each place's files \
               in turn from the first one not yet complete); the bytes are compared afterwards. The 1,000-file runs share one cluster; the \
               10,000-file burst gets a fresh one. Baseline: the same staged files sent over one loopback TCP \
               connection, each written into a file and fsynced (answers pipelined), before each burst. Nothing is deleted \
               until the run ends (a journal-less ext4 is slow to make files for minutes after thousands were deleted)."
        .to_string();
    let root = ctx.dir.join("burst");
    let mut rows = Vec::new();
    let small = (|| -> Result<Vec<Burst>, String> {
        let mut setup = Setup::start(ctx, &root)?;
        let mut out = Vec::new();
        for r in 1..=ctx.plan.burst_runs {
            let b = one(ctx, &mut setup, &root, &format!("burst-r{r}"), 1000)?;
            out.push(b);
        }
        setup.stop();
        Ok(out)
    })();
    match small {
        Ok(b) => rows.push(row(1000, &b, 2000.0, "; Syncthing: 3.5 s to one device (cited)")),
        Err(e) => rows.push(Row::not_measured(4, "burst 1,000 x 4 KiB, to device 2 and 3 servers", "< 2.00 s", &e)),
    }
    // The small bursts' files stay until the end of the case, for the reason
    // `one` gives for the baseline's: the big burst goes under another folder.
    let small_root = root.with_extension("small");
    let _ = fs::rename(&root, &small_root);
    let what = "burst 10,000 x 4 KiB, to device 2 and 3 servers";
    match ctx.plan.burst_big {
        None => rows.push(Row::not_measured(4, what, "< 10.0 s", "not in a quick run")),
        Some(n) => {
            let big = (|| -> Result<Burst, String> {
                let mut setup = Setup::start(ctx, &root)?;
                let b = one(ctx, &mut setup, &root, "burst-big", n)?;
                setup.stop();
                ctx.say("case 4: processes stopped");
                Ok(b)
            })();
            match big {
                Ok(b) => rows.push(row(n, &[b], 10_000.0, "")),
                Err(e) => rows.push(Row::not_measured(4, what, "< 10.0 s", &e)),
            }
        }
    }
    // Every file of the case stays until the run ends (the run's directory
    // goes then), for the reason case 1's trials give: deleting some 70,000
    // files here would slow every file the cases after it make for minutes.
    if std::env::var_os("BENCH_KEEP").is_some() {
        ctx.say(&format!("case 4: BENCH_KEEP: the small bursts' files and logs are kept in {}", small_root.display()));
    }
    (rows, how)
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped() {
        assert_eq!(super::group(1000), "1,000");
        assert_eq!(super::group(10_000), "10,000");
        assert_eq!(super::group(999), "999");
    }
}
