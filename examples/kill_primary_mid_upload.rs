//! A primary killed in the middle of an upload: device 1 uploads a 256 MiB file;
//! once a quarter of it or more is in the primary's `DATA/tmp`, the primary is killed with
//! SIGKILL. The front-end waits for the new primary's call and sends the upload
//! again from its first byte; the new primary stores it. Prints a timeline, then
//! checks that the file is byte for byte on both live servers and on device 2, and
//! that the changes acknowledged before and after are everywhere too. Exits
//! non-zero on any loss.
//!
//! ```text
//! cargo run --release --example kill_primary_mid_upload [-- --runs N]
//! ```
//!
//! The file's bytes come from a seeded generator (no file on disk), so every copy
//! can be checked against it. Talks only to 127.0.0.1-127.0.0.5.

#[path = "scenario/mod.rs"]
mod scenario;

use scenario::{check_everywhere, wait_for, Cluster, Measured, Timeline, SOON};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

const SIZE: u64 = 256 * 1024 * 1024;
const NAME: &str = "big.bin";

/// `SIZE` bytes that depend only on their offset: block k of 8 bytes is
/// splitmix64(k). Readable from any position, so a resend can start over.
struct Seeded {
    pos: u64,
}

fn splitmix64(k: u64) -> u64 {
    let mut z = k.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Read for Seeded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min((SIZE - self.pos) as usize);
        let mut i = 0;
        while i < n {
            let at = self.pos + i as u64;
            let block = splitmix64(at / 8).to_le_bytes();
            let off = (at % 8) as usize;
            let take = (8 - off).min(n - i);
            buf[i..i + take].copy_from_slice(&block[off..off + take]);
            i += take;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Seeded {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
            SeekFrom::End(d) => SIZE.saturating_add_signed(d),
        }
        .min(SIZE);
        Ok(self.pos)
    }
}

/// None when `path` holds exactly the seeded bytes; else what differs.
fn differs(path: &Path) -> Option<String> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot open {}: {e}", path.display())),
    };
    let (mut want, mut got) = (Seeded { pos: 0 }, vec![0u8; 1 << 20]);
    let mut expect = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = match f.read(&mut got) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Some(format!("cannot read {}: {e}", path.display())),
        };
        let m = want.read(&mut expect[..n]).unwrap_or(0);
        if m != n || got[..n] != expect[..n] {
            return Some(format!("{} differs from the uploaded bytes after offset {at}", path.display()));
        }
        at += n as u64;
    }
    (at != SIZE).then(|| format!("{} holds {at} bytes, not {SIZE}", path.display()))
}

/// The size of a partial upload in `tmp` a quarter done or more, if one is there.
fn partial(tmp: &Path) -> Option<u64> {
    std::fs::read_dir(tmp)
        .ok()?
        .flatten()
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .find(|n| *n >= SIZE / 4 && *n < SIZE)
}

fn run(root: &Path, tl: &Timeline) -> Result<Measured, String> {
    let (mut cluster, device1, device2) = Cluster::on_loopback_with_devices(root, tl)?;
    let mut acked = vec!["before.txt".to_string()];
    device1.upload("before.txt", &mut std::io::Cursor::new(b"acknowledged before".to_vec()), 19)?;
    tl.say("before.txt acknowledged");

    let front = device1.front.clone();
    let started = Instant::now();
    let upload = std::thread::spawn(move || {
        let r = front.upload(NAME, &mut Seeded { pos: 0 }, SIZE, 0, None, false, &mut |_| {});
        (r, Instant::now())
    });
    tl.say(format!("device 1 starts uploading {NAME} ({} MiB)", SIZE >> 20));
    let tmp = cluster.data(1).join("tmp");
    let seen = wait_for("the upload to be under way on the primary", SOON, || {
        partial(&tmp).map(Some).or_else(|| upload.is_finished().then_some(None))
    })?;
    let Some(bytes) = seen else {
        return Err("the upload finished before the primary could be killed mid-way (machine too fast?)".into());
    };
    let killed = Instant::now();
    cluster.kill(1);
    tl.say(format!(
        "killed the primary (SIGKILL) with {:.1} MiB of {NAME} in its DATA/tmp, {} ms into the upload",
        bytes as f64 / 1048576.0,
        (killed - started).as_millis()
    ));
    let (p, epoch) = cluster.wait_primary(&[2, 3], 1)?;
    tl.say(format!("server {p} reports itself primary of epoch {epoch}"));
    let (result, done) = upload.join().map_err(|_| "the upload thread panicked".to_string())?;
    match result {
        Ok(replibox_proto::OpResult::Done { .. }) => {}
        other => return Err(format!("the upload of {NAME} ended with {other:?}")),
    }
    if let Some(line) = device1.resumed_since(killed) {
        tl.say(line);
    }
    let after_kill = done - killed;
    tl.say(format!(
        "{NAME} acknowledged {} ms after the kill (sent again, whole, to the new primary)",
        after_kill.as_millis()
    ));
    acked.push(NAME.into());
    device1.upload("after.txt", &mut std::io::Cursor::new(b"acknowledged after".to_vec()), 18)?;
    acked.push("after.txt".into());
    tl.say("after.txt acknowledged");

    let other = if p == 2 { 3 } else { 2 };
    let servers = [(p, format!("server {p} (primary)")), (other, format!("server {other} (backup)"))];
    check_everywhere(&cluster, &acked, &servers, &device2, tl)?;
    let copies = [(servers[0].1.clone(), cluster.files(p)), (servers[1].1.clone(), cluster.files(other))];
    for (what, dir) in copies.iter().chain([&("device 2".to_string(), device2.dir.clone())]) {
        if let Some(e) = differs(&dir.join(NAME)) {
            return Err(format!("LOSS: {what}: {e}"));
        }
    }
    tl.say(format!("{NAME} is byte for byte the uploaded content on both servers and device 2"));
    device1.front.logout();
    Ok(vec![(format!("{NAME} acknowledged after the kill"), after_kill)])
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(runs) = scenario::runs_arg("kill_primary_mid_upload", &args) else { return ExitCode::from(2) };
    scenario::main_loop("kill_primary_mid_upload", runs, run)
}
