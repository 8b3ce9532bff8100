//! Everything the client writes for the user goes through one [`Console`], so
//! that three kinds of output share a terminal without garbling each other:
//!
//! - command outcomes (stdout) and command errors (stderr, `error: ...`), which
//!   the session prints while no prompt is shown;
//! - background activity (stderr): `uploaded ...`, `received ...`, `conflict
//!   on ...`. While the line-editing prompt is up, these go through rustyline's
//!   external printer, which prints them above the prompt and redraws it;
//! - one transfer's progress line (stderr, terminal only), drawn in place with
//!   `\r` and erased when the transfer ends or before any other line is printed,
//!   so that a finished transfer leaves no line behind. It is not drawn while the
//!   prompt is up: it would overwrite what the user is typing (`status` shows it
//!   instead).

use crossbeam_channel::{unbounded, Sender};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

/// Clears the current terminal line and returns to its start.
const CLEAR_LINE: &str = "\r\x1b[2K";

/// A printer that puts lines above a live prompt (rustyline's `ExternalPrinter`).
pub type PromptPrinter = Box<dyn rustyline::ExternalPrinter + Send>;

#[derive(Default)]
struct State {
    /// The line-editing prompt is on screen (readline is running).
    prompt_up: bool,
    /// The transfer whose progress line is on screen now, if any.
    shown: Option<u64>,
    /// The latest progress text of the transfer that reported last: what the line
    /// says, drawn or not (for `status`).
    latest: Option<(u64, String)>,
    next_id: u64,
}

struct Inner {
    state: Mutex<State>,
    /// stderr is a terminal: progress lines may be drawn.
    stderr_tty: bool,
    /// Lines for the prompt printer's thread, when there is a prompt.
    above_prompt: Option<Sender<String>>,
}

/// The client's output: cheap to clone, shared by every thread.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

impl Console {
    /// Output without a line-editing prompt: background lines go straight to
    /// stderr.
    pub fn plain() -> Console {
        Console::build(None)
    }

    /// Output beside a line-editing prompt: while the prompt is up, background
    /// lines go through `printer`, on a thread of its own. That thread is there
    /// because rustyline's printer can block until readline reads its pipe, and
    /// the sync engine must never wait for the user to press Enter.
    pub fn with_prompt(mut printer: PromptPrinter) -> Console {
        let (tx, rx) = unbounded::<String>();
        let spawned = std::thread::Builder::new().name("console".into()).spawn(move || {
            for line in rx {
                if printer.print(line.clone()).is_err() {
                    eprintln!("{line}");
                }
            }
        });
        Console::build(spawned.is_ok().then_some(tx))
    }

    fn build(above_prompt: Option<Sender<String>>) -> Console {
        Console {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                stderr_tty: std::io::stderr().is_terminal(),
                above_prompt,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Erases the progress line if one is on screen. Called with the state
    /// locked, before anything else is written.
    fn clear_progress(&self, state: &mut State) {
        if state.shown.take().is_some() {
            let mut err = std::io::stderr();
            let _ = write!(err, "{CLEAR_LINE}");
            let _ = err.flush();
        }
    }

    /// A line about background activity (stderr, or above the prompt).
    pub fn activity(&self, line: impl Into<String>) {
        let line = line.into();
        let mut state = self.state();
        if state.prompt_up {
            if let Some(tx) = &self.inner.above_prompt {
                if tx.send(line.clone()).is_ok() {
                    return;
                }
            }
        }
        self.clear_progress(&mut state);
        eprintln!("{line}");
    }

    /// A command's outcome (stdout), printed when it has finished.
    pub fn outcome(&self, text: &str) {
        let mut state = self.state();
        self.clear_progress(&mut state);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }

    /// A command's error (stderr): `error: ...`, the form scripts look for.
    pub fn error(&self, message: &str) {
        let mut state = self.state();
        self.clear_progress(&mut state);
        eprintln!("error: {message}");
    }

    /// Says whether the line-editing prompt is on screen; the session calls it
    /// just before readline and just after it returns.
    pub fn set_prompt_up(&self, up: bool) {
        let mut state = self.state();
        if up {
            self.clear_progress(&mut state);
        }
        state.prompt_up = up;
    }

    /// Leaves a prompt that is still up (the session ended by a signal while
    /// readline waited): the next line starts on a line of its own.
    pub fn leave_prompt(&self) {
        let mut state = self.state();
        if std::mem::take(&mut state.prompt_up) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }

    /// A new id for one transfer's progress.
    pub fn progress_id(&self) -> u64 {
        let mut state = self.state();
        state.next_id += 1;
        state.next_id
    }

    /// Transfer `id` is at `text`: drawn in place on a terminal while no prompt is
    /// up, and kept for `status` in any case.
    pub fn progress(&self, id: u64, text: String) {
        let mut state = self.state();
        if self.inner.stderr_tty && !state.prompt_up {
            let mut err = std::io::stderr();
            let _ = write!(err, "{CLEAR_LINE}{text}");
            let _ = err.flush();
            state.shown = Some(id);
        }
        state.latest = Some((id, text));
    }

    /// Transfer `id` ended: its line is erased (the outcome or activity line that
    /// follows takes its place) and forgotten.
    pub fn end_progress(&self, id: u64) {
        let mut state = self.state();
        if state.shown == Some(id) {
            self.clear_progress(&mut state);
        }
        if state.latest.as_ref().is_some_and(|(i, _)| *i == id) {
            state.latest = None;
        }
    }

    /// The progress of the transfer that reported last, while it runs.
    pub fn current_transfer(&self) -> Option<String> {
        self.state().latest.as_ref().map(|(_, t)| t.clone())
    }
}
