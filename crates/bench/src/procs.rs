//! Child processes and everything else the harness must undo: on a normal end each
//! owner cleans up in `Drop`; on Ctrl-C (or SIGTERM, SIGHUP) the handler installed
//! by [`install_interrupt_handler`] kills every child still registered, removes
//! the network namespaces and links and the temporary directory, then exits 130.
//!
//! Children run in process groups of their own, so a Ctrl-C on the terminal reaches
//! only the harness, which then stops them in a known order instead of racing them.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What is still to be undone if the harness is interrupted.
#[derive(Default)]
struct Registry {
    pids: BTreeSet<u32>,
    /// Commands that undo a network set-up (`ip netns del ...`), newest last.
    undo: Vec<Vec<String>>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut guard = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Registry::default))
}

/// Sends SIGKILL to `pid` (std has no kill(2) by pid; /bin/kill keeps the crate
/// free of a libc binding for this one call).
pub fn kill_pid(pid: u32) {
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Runs `argv` quietly; Err with its stderr when it fails.
pub fn run(argv: &[&str]) -> Result<(), String> {
    let out =
        Command::new(argv[0]).args(&argv[1..]).output().map_err(|e| format!("cannot run {}: {e}", argv.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Remembers a command that undoes a set-up step, for an interrupted run.
pub fn register_undo(argv: &[&str]) {
    with_registry(|r| r.undo.push(argv.iter().map(|s| s.to_string()).collect()));
}

/// Forgets an undo command once it has been carried out normally.
pub fn forget_undo(argv: &[&str]) {
    with_registry(|r| r.undo.retain(|u| u.iter().map(String::as_str).ne(argv.iter().copied())));
}

/// Remembers a directory to remove if the harness is interrupted.
pub fn register_dir(dir: PathBuf) {
    with_registry(|r| r.dirs.push(dir));
}

/// Installs the Ctrl-C / SIGTERM / SIGHUP handler.
pub fn install_interrupt_handler() -> Result<(), String> {
    ctrlc::set_handler(|| {
        eprintln!("bench: interrupted; stopping every process it started and removing what it set up");
        let reg = with_registry(std::mem::take);
        for pid in reg.pids.iter().rev() {
            kill_pid(*pid);
        }
        for argv in reg.undo.iter().rev() {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let _ = run(&argv);
        }
        for dir in &reg.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    })
    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))
}

/// A child process, SIGKILLed and reaped when dropped.
pub struct Proc {
    child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Starts `cmd` in a process group of its own and registers it.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc, String> {
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        with_registry(|r| r.pids.insert(child.id()));
        Ok(Proc { child, name: name.to_string() })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stdin, when it was started with a pipe there (once).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Its exit status if it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `grace` for it to end (a client logs out),
    /// then SIGKILL.
    pub fn stop(mut self, grace: Duration) {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).stderr(Stdio::null()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Drop kills and reaps.
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        with_registry(|r| r.pids.remove(&pid));
    }
}
