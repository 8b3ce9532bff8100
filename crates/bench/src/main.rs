//! `replibox-bench`: what replibox's users feel, each figure beside a baseline
//! measured in the same run (or cited, when it cannot be), printed as a table and
//! written into `docs/benchmarks.md`.
//!
//! # Layout
//! - [`cases`]: the cases of issue 12 (failover, propagation, bursts, a large file
//!   and memory, many users) and issue 7's user of many files, one module each.
//! - [`peers`]: case 8, Syncthing side by side (`--peers`).
//! - [`cluster`]: servers and devices, and the one place that says how they are let in.
//! - [`lab`]: network namespaces for the host-loss case (root).
//! - [`copy`]: the single-copy baseline (loopback TCP into a file, fsync).
//! - [`report`]: statistics, the table, the doc's generated blocks.
//! - [`procs`], [`sys`]: child processes and clean-up; `/proc`, binaries, content.
//!
//! Benchmarks are not tests: nothing here asserts a time. A case that fails says
//! why in its row, and the others still run.

mod cases;
mod cluster;
mod copy;
mod lab;
mod peers;
mod procs;
mod report;
mod sys;

use cases::{Ctx, Plan};
use clap::Parser;
use cluster::Credentials;
use report::{replace_block, Report, Row};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Benchmarks replibox where its users feel it: three servers and two devices on
/// 127.0.0.x (and network namespaces of its own for host loss, as root).
#[derive(Parser, Debug)]
#[command(name = "replibox-bench")]
struct Args {
    /// A short run (a few minutes): fewer trials, a 256 MiB file, no 10,000-file
    /// burst. The doc is left alone unless --doc is given.
    #[arg(long)]
    quick: bool,
    /// Only these cases (comma-separated numbers: 1-7, 9). The doc is left alone
    /// unless --doc is given.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    cases: Option<Vec<u8>>,
    /// Case 8: replibox and Syncthing side by side on cases 3, 4 and 5, in the same
    /// run (installs syncthing with apt-get when root and it is missing).
    #[arg(long)]
    peers: bool,
    /// Write the results into this Markdown file (default: docs/benchmarks.md,
    /// after a full run of every case).
    #[arg(long, value_name = "PATH")]
    doc: Option<PathBuf>,
    /// Never write the doc.
    #[arg(long, conflicts_with = "doc")]
    no_doc: bool,
    /// Where the temporary directory goes (default: $BENCH_DIR, else the system's
    /// temporary directory). A full run needs about 11 GiB free there.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seed of the content (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

/// The case numbers and the names of what they measure.
const CASES: [(u8, &str); 8] = [
    (1, "failover outage, process death"),
    (2, "failover outage, host loss"),
    (3, "propagation latency"),
    (4, "bursts of small files"),
    (5, "large file"),
    (6, "memory during the large file"),
    (7, "many users"),
    (9, "a user of many files"),
];

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replibox-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    procs::install_interrupt_handler()?;
    let selected: Vec<u8> = match &args.cases {
        Some(list) => {
            if let Some(bad) = list.iter().find(|n| !CASES.iter().any(|c| c.0 == **n)) {
                return Err(format!("--cases: there is no case {bad}; the cases are 1 to 7 and 9 (8 is --peers)"));
            }
            list.clone()
        }
        None => CASES.iter().map(|c| c.0).collect(),
    };
    let plan = Plan::new(args.quick);
    let parent = args
        .dir
        .clone()
        .or_else(|| std::env::var_os("BENCH_DIR").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir);
    let server = sys::bin("replibox-server")?;
    sys::bin("replibox-client")?;
    let mut need_mib = if selected.contains(&5) || args.peers { plan.large_mib * 7 + 1024 } else { 2048 };
    if selected.contains(&9) && !args.peers {
        // Five copies of every file (device 1, three servers, device 2), a block
        // each, and the servers' logs.
        need_mib += (plan.many_files as u64 * 5 * 4096) >> 20;
        need_mib += 512;
    }
    if let Some(free) = sys::free_mib(&parent) {
        if free < need_mib {
            return Err(format!(
                "only {free} MiB free in {}; this run needs about {need_mib} MiB (set --dir or BENCH_DIR)",
                parent.display()
            ));
        }
    }
    let seed =
        args.seed.unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    let dir = parent.join(format!("replibox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    procs::register_dir(dir.clone());
    let mut machine = sys::Machine::probe(&dir);
    let ctx =
        Ctx { dir: dir.clone(), plan: plan.clone(), creds: Credentials::new(&dir), started: Instant::now(), seed };
    ctx.say(&format!("working in {}; {}", dir.display(), plan.describe()));

    let mut rows: Vec<Row> = Vec::new();
    let mut how: Vec<(u8, String)> = Vec::new();
    if args.peers {
        let (r, h) = peers::run(&ctx);
        rows.extend(r);
        how.extend(h);
    } else {
        for &(case, name) in &CASES {
            if !selected.contains(&case) || (case == 6 && selected.contains(&5)) {
                continue;
            }
            ctx.say(&format!("case {case}: {name}"));
            match case {
                1 => push(&mut rows, &mut how, 1, cases::failover::process_death(&ctx)),
                2 => push(&mut rows, &mut how, 2, cases::failover::host_loss(&ctx)),
                3 => {
                    let (r, h) = cases::propagation::run(&ctx);
                    rows.extend(r);
                    how.push((3, h));
                }
                4 => {
                    let (r, h) = cases::burst::run(&ctx);
                    rows.extend(r);
                    how.push((4, h));
                }
                5 | 6 => {
                    let (r, h5, h6) = cases::large::run(&ctx);
                    rows.extend(r);
                    how.push((5, h5));
                    how.push((6, h6));
                }
                7 => push(&mut rows, &mut how, 7, cases::users::run(&ctx)),
                _ => {
                    let (r, h) = cases::many::run(&ctx);
                    rows.extend(r);
                    how.push((9, h));
                }
            }
        }
    }
    machine.load.1 = sys::load_average();
    let defaults = sys::server_defaults(&server);
    let mut settings = vec![plan.describe()];
    settings.push(format!(
        "server timings (its defaults, read from `replibox-server --help`): {}",
        if defaults.is_empty() {
            "unknown".to_string()
        } else {
            defaults.iter().map(|(k, v)| format!("--{k} {v}")).collect::<Vec<_>>().join(", ")
        }
    ));
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
    settings.push(format!(
        "{} build; every process on this one machine; servers and clients log at RUST_LOG=warn",
        if exe.contains("/release/") { "release" } else { "NOT a release" }
    ));
    let command = std::env::args()
        .map(|a| if a.contains('/') { a.rsplit('/').next().unwrap_or(&a).to_string() } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    let report = Report { machine, settings, rows, how, took: ctx.started.elapsed(), command };
    println!("{}", report.text());

    let full = !args.quick && args.cases.is_none();
    let doc = match (&args.doc, args.no_doc) {
        (_, true) => None,
        (Some(p), _) => Some(p.clone()),
        (None, false) if full => Some(sys::repo_root().join("docs/benchmarks.md")),
        _ => None,
    };
    if let Some(path) = doc {
        let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
        let (name, heading) =
            if args.peers { ("bench-peers", "## Side by side with Syncthing") } else { ("bench", "## Results") };
        let new = replace_block(&old, name, heading, &report.markdown());
        std::fs::write(&path, new).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let shown = path.canonicalize().unwrap_or(path);
        eprintln!("bench: wrote the results into {}", shown.display());
    } else {
        eprintln!("bench: the doc is left alone (a quick or partial run; give --doc PATH to write one)");
    }
    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn push(rows: &mut Vec<Row>, how: &mut Vec<(u8, String)>, case: u8, (row, h): (Row, String)) {
    rows.push(row);
    how.push((case, h));
}
