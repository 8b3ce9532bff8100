//! The session: commands read from stdin (with line editing and history when
//! stdin is a terminal, one plain line per command otherwise, which scripts and
//! tests rely on), each run on a worker thread while the main thread listens for
//! signals too, so that Ctrl-C or SIGTERM ends the session even while a command
//! waits on a server that does not answer.
//!
//! ```text
//!  stdin (rustyline or lines) --Input--> main --Cmd--> command (Shell::run)
//!                                         ^  <--outcome--'
//!                  ctrlc --signal---------+
//!                  sync-engine --stopped--'   (the sync dir vanished)
//! ```

use crate::cli::{self, Cmd, Shell};
use crate::console::{Console, PromptPrinter};
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use rustyline::error::ReadlineError;
use rustyline::history::DefaultHistory;
use rustyline::Editor;
use std::io::{BufRead, IsTerminal, Write};
use std::os::fd::AsFd;

/// The prompt shown on a terminal.
const PROMPT: &str = "replibox> ";

/// What the reader got.
enum Input {
    /// A line the user typed (or a script wrote).
    Line(String),
    /// Ctrl-C at the prompt.
    Interrupted,
    /// End of input (Ctrl-D at the prompt, or the end of a script).
    End,
}

/// Where commands come from.
pub struct Reader {
    lines: Receiver<Input>,
    /// On a terminal: asks the reader to show the prompt and read one line (the
    /// prompt appears only once the previous command's outcome is printed).
    ready: Option<Sender<()>>,
    _terminal: Option<TerminalGuard>,
}

/// Restores the terminal's settings when the session ends. rustyline restores
/// them itself when readline returns, but a session ended by SIGTERM while the
/// prompt is up never sees readline return.
struct TerminalGuard {
    saved: nix::sys::termios::Termios,
}

impl TerminalGuard {
    fn save() -> Option<TerminalGuard> {
        nix::sys::termios::tcgetattr(std::io::stdin().as_fd()).ok().map(|saved| TerminalGuard { saved })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin().as_fd(), nix::sys::termios::SetArg::TCSANOW, &self.saved);
        // rustyline turns bracketed paste on while it reads; turn it off again.
        let mut out = std::io::stdout();
        if out.is_terminal() {
            let _ = out.write_all(b"\x1b[?2004l");
            let _ = out.flush();
        }
    }
}

/// Starts reading stdin and returns the reader and the console to print through:
/// on a terminal a rustyline prompt, whose printer puts background lines above
/// it; otherwise plain lines, as before.
pub fn start_reader() -> Result<(Reader, Console), String> {
    if std::io::stdin().is_terminal() {
        let terminal = TerminalGuard::save();
        let (printer_tx, printer_rx) = bounded::<Option<PromptPrinter>>(1);
        let (console_tx, console_rx) = bounded::<Console>(1);
        let (ready_tx, ready_rx) = unbounded::<()>();
        let (tx, rx) = unbounded();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || edit_lines(printer_tx, console_rx, ready_rx, tx))
            .map_err(|e| e.to_string())?;
        let console = match printer_rx.recv() {
            Ok(Some(printer)) => Console::with_prompt(printer),
            _ => Console::plain(),
        };
        let _ = console_tx.send(console.clone());
        Ok((Reader { lines: rx, ready: Some(ready_tx), _terminal: terminal }, console))
    } else {
        let (tx, rx) = unbounded();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if tx.send(Input::Line(line)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Input::End);
            })
            .map_err(|e| e.to_string())?;
        Ok((Reader { lines: rx, ready: None, _terminal: None }, Console::plain()))
    }
}

/// The terminal reader's thread: one readline per request on `ready`.
fn edit_lines(
    printer_tx: Sender<Option<PromptPrinter>>,
    console_rx: Receiver<Console>,
    ready: Receiver<()>,
    out: Sender<Input>,
) {
    let mut editor = match Editor::<(), DefaultHistory>::new() {
        Ok(e) => e,
        Err(e) => {
            log::warn!("no line editing: {e}");
            let _ = printer_tx.send(None);
            let _ = out.send(Input::End);
            return;
        }
    };
    let printer = editor.create_external_printer().ok().map(|p| Box::new(p) as PromptPrinter);
    let _ = printer_tx.send(printer);
    let Ok(console) = console_rx.recv() else { return };
    while ready.recv().is_ok() {
        console.set_prompt_up(true);
        let got = editor.readline(PROMPT);
        console.set_prompt_up(false);
        let input = match got {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                Input::Line(line)
            }
            Err(ReadlineError::Interrupted) => Input::Interrupted,
            Err(ReadlineError::Eof) => Input::End,
            Err(e) => {
                log::warn!("cannot read the terminal: {e}");
                Input::End
            }
        };
        let end = !matches!(input, Input::Line(_));
        if out.send(input).is_err() || end {
            return;
        }
    }
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// `exit`, `quit`, end of input, or Ctrl-C at the prompt: a clean end.
    Exit,
    /// SIGINT, SIGTERM or SIGHUP.
    Signal,
    /// The sync engine stopped on its own, for this reason (the sync dir vanished).
    Stopped(String),
}

/// What the session did.
pub struct Outcome {
    /// How it ended.
    pub ended: Ended,
    /// A command failed (or was cut short by a signal).
    pub failed: bool,
    /// The command thread, which may still be finishing a command cut short; join
    /// it once the front-end is logged out (then every request gives up at once).
    pub worker: Worker,
}

/// The thread that runs commands.
pub struct Worker {
    commands: Option<Sender<Cmd>>,
    results: Receiver<Result<String, String>>,
    busy: bool,
}

impl Worker {
    fn start(shell: Shell) -> Result<Worker, String> {
        let (commands, todo) = unbounded::<Cmd>();
        let (done, results) = unbounded();
        std::thread::Builder::new()
            .name("command".into())
            .spawn(move || {
                for cmd in todo {
                    if done.send(shell.run(cmd)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Worker { commands: Some(commands), results, busy: false })
    }

    fn send(&mut self, cmd: Cmd) -> Result<(), String> {
        let tx = self.commands.as_ref().ok_or("the session is over")?;
        tx.send(cmd).map_err(|_| "the command thread has stopped".to_string())?;
        self.busy = true;
        Ok(())
    }

    /// Lets a command cut short end (its requests give up once the front-end is
    /// logged out) and the thread with it, unless another signal comes first.
    pub fn finish(mut self, signals: &Receiver<()>) {
        self.commands = None;
        if self.busy {
            select! {
                recv(self.results) -> _ => {}
                recv(signals) -> _ => {}
            }
        }
    }
}

/// Runs the session: the login's `get_sync_dir`, then commands from `reader`
/// (None: `--headless`, which only waits for a signal) until exit, end of input,
/// a signal, or the engine's stop.
pub fn run(
    shell: Shell,
    console: &Console,
    reader: Option<&Reader>,
    signals: &Receiver<()>,
    stopped: &Receiver<String>,
) -> Result<Outcome, String> {
    let mut worker = Worker::start(shell)?;
    let mut failed = false;
    let finish = |ended, failed, worker| Ok(Outcome { ended, failed, worker });
    // get_sync_dir runs by itself at login.
    match wait_for(&mut worker, Cmd::GetSyncDir, signals, stopped)? {
        Done::Finished(Ok(out)) => console.outcome(&out),
        Done::Finished(Err(e)) => {
            console.error(&format!("get_sync_dir: {e}"));
            failed = true;
        }
        Done::Cut(ended) => {
            console.error("get_sync_dir: interrupted");
            return finish(ended, true, worker);
        }
    }
    let Some(reader) = reader else {
        let ended = select! {
            recv(signals) -> _ => Ended::Signal,
            recv(stopped) -> why => Ended::Stopped(why.unwrap_or_default()),
        };
        return finish(ended, failed, worker);
    };
    loop {
        if let Some(ready) = &reader.ready {
            let _ = ready.send(());
        }
        let line = select! {
            recv(reader.lines) -> input => match input {
                Ok(Input::Line(line)) => line,
                Ok(Input::Interrupted) | Ok(Input::End) | Err(_) => return finish(Ended::Exit, failed, worker),
            },
            recv(signals) -> _ => return finish(Ended::Signal, failed, worker),
            recv(stopped) -> why => return finish(Ended::Stopped(why.unwrap_or_default()), failed, worker),
        };
        let cmd = match cli::parse(&line) {
            Ok(Some(Cmd::Exit)) => return finish(Ended::Exit, failed, worker),
            Ok(Some(cmd)) => cmd,
            Ok(None) => continue,
            Err(e) => {
                console.error(&e);
                failed = true;
                continue;
            }
        };
        let word = cmd.word();
        match wait_for(&mut worker, cmd, signals, stopped)? {
            Done::Finished(Ok(out)) => console.outcome(&out),
            Done::Finished(Err(e)) => {
                console.error(&e);
                failed = true;
            }
            Done::Cut(ended) => {
                console.error(&format!("{word}: interrupted before it finished"));
                return finish(ended, true, worker);
            }
        }
    }
}

/// A command's end.
enum Done {
    /// It finished: its outcome or error.
    Finished(Result<String, String>),
    /// A signal or the engine's stop came first.
    Cut(Ended),
}

fn wait_for(worker: &mut Worker, cmd: Cmd, signals: &Receiver<()>, stopped: &Receiver<String>) -> Result<Done, String> {
    worker.send(cmd)?;
    let done = select! {
        recv(worker.results) -> r => Done::Finished(r.map_err(|_| "the command thread has stopped".to_string())?),
        recv(signals) -> _ => Done::Cut(Ended::Signal),
        recv(stopped) -> why => Done::Cut(Ended::Stopped(why.unwrap_or_default())),
    };
    if matches!(done, Done::Finished(_)) {
        worker.busy = false;
    }
    Ok(done)
}
