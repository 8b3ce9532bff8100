//! Case 3: a 4 KiB file saved into device 1's sync dir, until it is complete in
//! device 2's; both ways of saving, one file at a time, interleaved so that the
//! machine's noise falls on both alike; beside it, the same 4 KiB copied once over
//! loopback TCP into a file with fsync.

use super::{wait_files, Ctx, Pair, Setup};
use crate::copy::Copier;
use crate::report::{median, ms, percentile, show_ms, Row, Stands};
use crate::sys::Content;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// The size of each file.
pub const SIZE: usize = 4096;

/// How a file is saved.
#[derive(Clone, Copy, PartialEq)]
pub enum Save {
    /// Open, write, close: the file itself is written.
    InPlace,
    /// Written under a temporary name in the same folder, closed, then renamed
    /// into place, as editors save.
    Rename,
}

fn save(dir: &Path, name: &str, body: &[u8], how: Save) -> std::io::Result<()> {
    match how {
        Save::InPlace => fs::File::create(dir.join(name))?.write_all(body),
        Save::Rename => {
            let tmp = dir.join(format!(".{name}.tmp"));
            fs::File::create(&tmp)?.write_all(body)?;
            fs::rename(tmp, dir.join(name))
        }
    }
}

/// Runs case 3.
pub fn run(ctx: &Ctx) -> (Vec<Row>, String) {
    let n = ctx.plan.propagation_files;
    let how = format!(
        "one cluster, two replibox-client devices (127.0.0.4 and .5); {n} files of 4 KiB per way of saving, one at a \
         time, the two ways interleaved, fresh content each. The clock starts before the file is created in device \
         1's sync dir (in place: create, write, close; renamed: the same under `.NAME.tmp`, then rename) and stops \
         when device 2's copy has its full size (polled every 1 ms; the client places files by rename, so full size \
         is complete); the bytes are checked afterwards. Baseline: the same 4 KiB sent over an open loopback TCP \
         connection and written into a file with fsync, once per file, in the same loop."
    );
    let targets = ["median < 30 ms, p95 < 100 ms"; 2];
    match measure(ctx, n) {
        Ok((inplace, renamed, base)) => {
            let b = median(&base);
            let row = |what: &str, v: &[f64], target: &str| {
                let (m, p) = (median(v), percentile(v, 95.0));
                Row {
                    case: 3,
                    what: what.into(),
                    figure: format!("median {}, p95 {} ({} files)", show_ms(m), show_ms(p), v.len()),
                    baseline: format!(
                        "single copy: median {}, p95 {}; Syncthing: 1.1 s median (cited)",
                        show_ms(b),
                        show_ms(percentile(&base, 95.0))
                    ),
                    ratio: Some(m / b),
                    target: target.into(),
                    stands: Stands::from(m < 30.0 && p < 100.0),
                }
            };
            (
                vec![
                    row("propagation 4 KiB, written in place", &inplace, targets[0]),
                    row("propagation 4 KiB, temp name + rename", &renamed, targets[1]),
                ],
                how,
            )
        }
        Err(e) => (
            vec![
                Row::not_measured(3, "propagation 4 KiB, written in place", targets[0], &e),
                Row::not_measured(3, "propagation 4 KiB, temp name + rename", targets[1], &e),
            ],
            how,
        ),
    }
}

/// Saves `body` into the pair's source as `STEM-w.txt` (in place) or `STEM-r.txt`
/// (renamed), and returns the ms until the other device holds it; checks the bytes.
pub fn one_file(pair: &mut dyn Pair, stem: &str, body: &[u8], how: Save) -> Result<f64, String> {
    let name = format!("{stem}-{}.txt", if how == Save::InPlace { "w" } else { "r" });
    let dest = pair.places()[0].clone();
    let t0 = Instant::now();
    save(&pair.source(), &name, body, how).map_err(|e| format!("cannot save {name}: {e}"))?;
    let files = [(name.clone(), body.len() as u64)];
    wait_files(std::slice::from_ref(&dest), &files, Duration::from_secs(60), Duration::from_millis(1), &mut || {
        pair.check_alive()
    })?;
    let took = ms(t0.elapsed());
    if fs::read(dest.join(&name)).map_err(|e| e.to_string())? != body {
        return Err(format!("{name} arrived on the other device with other bytes"));
    }
    // Let the echo of this file (the other side's index update) pass before the next.
    std::thread::sleep(Duration::from_millis(30));
    Ok(took)
}

type Samples = (Vec<f64>, Vec<f64>, Vec<f64>);

fn measure(ctx: &Ctx, n: usize) -> Result<Samples, String> {
    let root = ctx.dir.join("propagation");
    let mut setup = Setup::start(ctx, &root)?;
    let mut copier = Copier::start(&root.join("baseline")).map_err(|e| format!("baseline receiver: {e}"))?;
    let (mut inplace, mut renamed, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut content = Content::new(ctx.seed(3));
    for i in 0..n {
        for how in [Save::InPlace, Save::Rename] {
            let took = one_file(&mut setup, &format!("p{i:04}"), &content.bytes(SIZE), how)?;
            match how {
                Save::InPlace => inplace.push(took),
                Save::Rename => renamed.push(took),
            }
        }
        let body = content.bytes(SIZE);
        let took =
            copier.copy_one(&format!("b{i:04}"), &mut &body[..], SIZE as u64).map_err(|e| format!("baseline: {e}"))?;
        base.push(ms(took));
        if (i + 1) % 20 == 0 {
            ctx.say(&format!(
                "case 3: {} of {n}: median so far {} in place, {} renamed",
                i + 1,
                show_ms(median(&inplace)),
                show_ms(median(&renamed))
            ));
        }
    }
    copier.finish().map_err(|e| format!("baseline: {e}"))?;
    setup.stop();
    // Its files stay until the run ends, for the reason case 1's trials give.
    Ok((inplace, renamed, base))
}
