//! Case 8: replibox and Syncthing side by side, on cases 3, 4 and 5, in the same run.
//!
//! Two Syncthing instances share one folder on this machine, each confined to
//! 127.0.0.1 and a temporary directory: listening on a loopback port, the other
//! instance's address given, no global or local discovery, no relays, no NAT
//! traversal, no usage or crash reporting, no upgrades, the GUI off. The folder's
//! watcher is on with its shortest delay (1 s, the least this version accepts).
//! Syncthing carries a file to one other device; replibox's figure beside it is to
//! device 2 (through the primary, after both backups stored it), and to everywhere.

use crate::cases::{burst, large, propagation, Ctx, Pair, Setup};
use crate::procs::{run as run_cmd, Proc};
use crate::report::{median, percentile, show_ms, Row, Stands};
use crate::sys::{wait_for, write_content, Content};
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Two Syncthing instances sharing the folder `bench`.
struct Syncthing {
    procs: Vec<Proc>,
    dirs: [PathBuf; 2],
}

impl Pair for Syncthing {
    fn source(&self) -> PathBuf {
        self.dirs[0].clone()
    }

    fn places(&self) -> Vec<PathBuf> {
        vec![self.dirs[1].clone()]
    }

    fn check_alive(&mut self) -> Result<(), String> {
        for p in &mut self.procs {
            if let Some(status) = p.exited() {
                return Err(format!("{} exited ({status})", p.name));
            }
        }
        Ok(())
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// The syncthing binary, installed with apt-get when root and missing; Err says
/// why case 8 cannot run.
fn syncthing_binary(ctx: &Ctx) -> Result<PathBuf, String> {
    if let Some(p) = which("syncthing") {
        return Ok(p);
    }
    let root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next().map(|u| u == "0")))
        .unwrap_or(false);
    if !root {
        return Err("syncthing is not installed, and installing it needs root: apt-get install syncthing".into());
    }
    ctx.say("syncthing is missing: installing it with apt-get (the Debian package)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "syncthing"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        ctx.say("apt-get install failed; running apt-get update once, then trying again");
        let _ = run_cmd(&["apt-get", "update"]);
        if !install() {
            return Err("apt-get install syncthing failed".into());
        }
    }
    which("syncthing").ok_or_else(|| "syncthing is still not on PATH after apt-get install".into())
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| e.to_string())
}

/// The whole config of one instance: everything that could reach beyond this
/// machine is off, and the peer is at its loopback address.
fn config(me: &str, peer: &str, my_port: u16, peer_port: u16, folder: &Path) -> String {
    let device = |id: &str, port: u16| {
        format!(
            "    <device id=\"{id}\" name=\"{id8}\" compression=\"never\" introducer=\"false\">\n        \
             <address>tcp://127.0.0.1:{port}</address>\n        <autoAcceptFolders>false</autoAcceptFolders>\n    \
             </device>\n",
            id8 = &id[..7]
        )
    };
    format!(
        r#"<configuration version="36">
    <folder id="bench" label="bench" path="{path}" type="sendreceive" rescanIntervalS="3600" fsWatcherEnabled="true" fsWatcherDelayS="1" ignorePerms="false" autoNormalize="true">
        <filesystemType>basic</filesystemType>
        <device id="{me}" introducedBy=""></device>
        <device id="{peer}" introducedBy=""></device>
        <minDiskFree unit="%">0</minDiskFree>
        <markerName>.stfolder</markerName>
    </folder>
{dev_me}{dev_peer}    <gui enabled="false" tls="false">
        <address>127.0.0.1:0</address>
    </gui>
    <options>
        <listenAddress>tcp://127.0.0.1:{my_port}</listenAddress>
        <globalAnnounceServer></globalAnnounceServer>
        <globalAnnounceEnabled>false</globalAnnounceEnabled>
        <localAnnounceEnabled>false</localAnnounceEnabled>
        <relaysEnabled>false</relaysEnabled>
        <natEnabled>false</natEnabled>
        <startBrowser>false</startBrowser>
        <urAccepted>-1</urAccepted>
        <autoUpgradeIntervalH>0</autoUpgradeIntervalH>
        <crashReportingEnabled>false</crashReportingEnabled>
        <stunKeepaliveStartS>0</stunKeepaliveStartS>
        <stunServer></stunServer>
        <announceLANAddresses>false</announceLANAddresses>
        <setLowPriority>false</setLowPriority>
        <minHomeDiskFree unit="%">0</minHomeDiskFree>
    </options>
</configuration>
"#,
        path = folder.display(),
        dev_me = device(me, my_port),
        dev_peer = device(peer, peer_port),
    )
}

impl Syncthing {
    fn start(ctx: &Ctx, bin: &Path, root: &Path) -> Result<Syncthing, String> {
        let _ = fs::remove_dir_all(root);
        let homes = [root.join("home-a"), root.join("home-b")];
        let dirs = [root.join("a"), root.join("b")];
        let mut ids = Vec::new();
        for home in &homes {
            let out = Command::new(bin)
                .arg("generate")
                .arg(format!("--home={}", home.display()))
                .arg("--no-default-folder")
                .env("HOME", root)
                .output()
                .map_err(|e| format!("cannot run syncthing generate: {e}"))?;
            if !out.status.success() {
                return Err(format!("syncthing generate failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            let out = Command::new(bin)
                .arg("serve")
                .arg(format!("--home={}", home.display()))
                .arg("--device-id")
                .env("HOME", root)
                .output()
                .map_err(|e| format!("cannot ask syncthing for its device id: {e}"))?;
            let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if id.len() < 8 {
                return Err(format!("syncthing gave no device id: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            ids.push(id);
        }
        let ports = [free_port()?, free_port()?];
        for i in 0..2 {
            fs::create_dir_all(dirs[i].join(".stfolder")).map_err(|e| e.to_string())?;
            let cfg = config(&ids[i], &ids[1 - i], ports[i], ports[1 - i], &dirs[i]);
            fs::write(homes[i].join("config.xml"), cfg).map_err(|e| format!("cannot write syncthing's config: {e}"))?;
        }
        let mut procs = Vec::new();
        for (i, home) in homes.iter().enumerate() {
            let log = fs::File::create(root.join(format!("syncthing-{i}.log"))).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.arg("serve")
                .arg(format!("--home={}", home.display()))
                .args(["--no-browser", "--no-restart", "--no-upgrade", "--logflags=0"])
                .env("HOME", root)
                .env("STNODEFAULTFOLDER", "1")
                .env("STNOUPGRADE", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log);
            procs.push(Proc::spawn(&format!("syncthing {}", ["a", "b"][i]), cmd)?);
        }
        let mut st = Syncthing { procs, dirs };
        // Ready once a file goes across.
        fs::write(st.dirs[0].join("ready.txt"), b"ready").map_err(|e| e.to_string())?;
        let b = st.dirs[1].join("ready.txt");
        wait_for(
            "the two Syncthing instances to connect and sync",
            Duration::from_secs(180),
            Duration::from_millis(50),
            || {
                if let Err(e) = st.check_alive() {
                    return Some(Err(e));
                }
                b.is_file().then_some(Ok(()))
            },
        )?
        .map_err(|e| format!("{e}; see {}", root.display()))?;
        ctx.say("syncthing: two instances up and in sync on 127.0.0.1");
        Ok(st)
    }
}

fn side_by_side(what: &str, ours: &[f64], ours_everywhere: Option<&[f64]>, theirs: &[f64], p95: bool) -> Row {
    let (o, t) = (median(ours), median(theirs));
    let fmt = |v: &[f64]| {
        if p95 {
            format!("median {}, p95 {}", show_ms(median(v)), show_ms(percentile(v, 95.0)))
        } else if v.len() > 1 {
            format!("median {} of {}", show_ms(median(v)), v.len())
        } else {
            show_ms(median(v))
        }
    };
    let mut figure = format!("replibox to device 2: {}", fmt(ours));
    if let Some(e) = ours_everywhere {
        figure.push_str(&format!(" (to device 2 and 3 servers: {})", fmt(e)));
    }
    Row {
        case: 8,
        what: what.into(),
        figure,
        baseline: format!("Syncthing to the other device: {} (same run)", fmt(theirs)),
        ratio: Some(o / t),
        target: "a ratio (replibox / Syncthing)".into(),
        stands: Stands::NoTarget,
    }
}

/// Runs case 8: rows, and how they were measured.
pub fn run(ctx: &Ctx) -> (Vec<Row>, Vec<(u8, String)>) {
    let how = vec![(
        8,
        "replibox (three servers on 127.0.0.1-3, two replibox-client devices) and two Syncthing instances \
         (the Debian package; 127.0.0.1 only, discovery, relays, NAT and reporting off, watcher delay 1 s) run at \
         once, and each measurement is made on both, one after the other, with the same code: case 3's files \
         saved one at a time (interleaved), case 4's folder of 4 KiB files moved in, case 5's large file moved in \
         (replibox in a fresh cluster per run). Syncthing's figure is to the other instance; replibox's to device \
         2, with its figure to device 2 and all three servers beside it."
            .to_string(),
    )];
    let bin = match syncthing_binary(ctx) {
        Ok(b) => b,
        Err(why) => {
            ctx.say(&format!("case 8 skipped: {why}"));
            return (vec![Row::not_measured(8, "Syncthing side by side", "a ratio", &why)], how);
        }
    };
    match measure(ctx, &bin) {
        Ok(rows) => (rows, how),
        Err(e) => (vec![Row::not_measured(8, "Syncthing side by side", "a ratio", &e)], how),
    }
}

/// The bursts of one size: replibox to device 2 and to everywhere, Syncthing.
struct BurstSamples {
    files: usize,
    to_device: Vec<f64>,
    everywhere: Vec<f64>,
    theirs: Vec<f64>,
}

fn measure(ctx: &Ctx, bin: &Path) -> Result<Vec<Row>, String> {
    let root = ctx.dir.join("peers");
    let mut st = Syncthing::start(ctx, bin, &root.join("syncthing"))?;
    let mut rows = Vec::new();
    let mut content = Content::new(ctx.seed(8));

    // Case 3, interleaved file by file.
    {
        let mut rb = Setup::start(ctx, &root.join("replibox"))?;
        let mut samples: [[Vec<f64>; 2]; 2] = Default::default();
        let n = ctx.plan.propagation_files;
        for i in 0..n {
            for (k, how) in [propagation::Save::InPlace, propagation::Save::Rename].into_iter().enumerate() {
                let body = content.bytes(propagation::SIZE);
                samples[0][k].push(propagation::one_file(&mut rb, &format!("p{i:04}"), &body, how)?);
                samples[1][k].push(propagation::one_file(&mut st, &format!("p{i:04}"), &body, how)?);
            }
            if (i + 1) % 10 == 0 {
                ctx.say(&format!(
                    "case 8 propagation {} of {n}: replibox {} / Syncthing {} (in place, median so far)",
                    i + 1,
                    show_ms(median(&samples[0][0])),
                    show_ms(median(&samples[1][0]))
                ));
            }
        }
        rows.push(side_by_side("propagation 4 KiB, written in place", &samples[0][0], None, &samples[1][0], true));
        rows.push(side_by_side("propagation 4 KiB, temp name + rename", &samples[0][1], None, &samples[1][1], true));

        // Case 4 on the same replibox cluster.
        let mut sizes = vec![1000; ctx.plan.burst_runs];
        sizes.extend(ctx.plan.burst_big);
        let mut by_size: Vec<BurstSamples> = Vec::new();
        for (r, n) in sizes.into_iter().enumerate() {
            let folder = format!("burst-{r}");
            let staged = root.join("stage").join(&folder);
            let files = burst::stage(&staged, n, &mut content)?;
            let ours = burst::move_in(&mut rb, &staged, &folder, &files)?;
            let (dev, every) = (ours.to_device, ours.everywhere);
            let files = burst::stage(&staged, n, &mut content)?;
            let theirs = burst::move_in(&mut st, &staged, &folder, &files)?.to_device;
            ctx.say(&format!(
                "case 8 burst of {}: replibox {} to device 2 / Syncthing {}",
                burst::group(n),
                show_ms(dev),
                show_ms(theirs)
            ));
            match by_size.iter_mut().find(|e| e.files == n) {
                Some(e) => {
                    e.to_device.push(dev);
                    e.everywhere.push(every);
                    e.theirs.push(theirs);
                }
                None => by_size.push(BurstSamples {
                    files: n,
                    to_device: vec![dev],
                    everywhere: vec![every],
                    theirs: vec![theirs],
                }),
            }
        }
        for b in &by_size {
            let what = format!("burst {} x 4 KiB", burst::group(b.files));
            rows.push(side_by_side(&what, &b.to_device, Some(&b.everywhere), &b.theirs, false));
        }
        rb.stop();
        let _ = fs::remove_dir_all(root.join("replibox"));
    }

    // Case 5: replibox in a fresh cluster per run, Syncthing on its running pair.
    let size = ctx.plan.large_mib << 20;
    let (mut dev, mut every, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..ctx.plan.large_runs {
        let name = format!("large-{r}.bin");
        let staged = root.join("stage").join(&name);
        fs::create_dir_all(root.join("stage")).map_err(|e| e.to_string())?;
        let seed = ctx.seed(8_000 + r as u64);
        {
            let mut rb = Setup::start(ctx, &root.join("replibox"))?;
            write_content(&staged, seed, size).map_err(|e| format!("cannot stage {name}: {e}"))?;
            std::thread::sleep(Duration::from_millis(500));
            let ours = large::move_in(&mut rb, &staged, &name, seed, size, &mut || {})?;
            dev.push(ours.to_device);
            every.push(ours.everywhere);
            rb.stop();
            let _ = fs::remove_dir_all(root.join("replibox"));
        }
        write_content(&staged, seed, size).map_err(|e| format!("cannot stage {name}: {e}"))?;
        std::thread::sleep(Duration::from_millis(500));
        let t = large::move_in(&mut st, &staged, &name, seed, size, &mut || {})?.to_device;
        theirs.push(t);
        ctx.say(&format!(
            "case 8 large file run {}: replibox {} to device 2 / Syncthing {}",
            r + 1,
            show_ms(dev[r]),
            show_ms(t)
        ));
        // Free the disk: delete it on Syncthing's side and wait for the delete to cross.
        let _ = fs::remove_file(st.dirs[0].join(&name));
        let gone = st.dirs[1].join(&name);
        wait_for("Syncthing to delete the large file", Duration::from_secs(120), Duration::from_millis(100), || {
            (!gone.exists()).then_some(())
        })?;
    }
    let what = format!("large file {} MiB", ctx.plan.large_mib);
    rows.push(side_by_side(&what, &dev, Some(&every), &theirs, false));
    drop(st);
    let _ = fs::remove_dir_all(&root);
    Ok(rows)
}
