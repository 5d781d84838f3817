//! Progress of long work (rebuilds, chain verification): a bar with
//! events/s and ETA on a terminal, plain lines otherwise, always on stderr
//! so that stdout carries only results.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often the plain (non-terminal) form prints a line.
const PLAIN_LINE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the bar redraws, at most.
const BAR_REFRESH_PER_S: u8 = 10;

pub struct Progress {
    label: String,
    /// What is counted: `events`, `customers`.
    unit: &'static str,
    form: Form,
}

enum Form {
    Bar(ProgressBar),
    Lines {
        started: Instant,
        last_line: Option<Instant>,
        done: u64,
        total: u64,
        /// What the last line said, so that `finish` does not repeat it.
        printed: Option<(u64, u64)>,
    },
}

impl Progress {
    /// A bar if stderr is a terminal, plain lines otherwise, counting events.
    pub fn start(label: &str, total: u64) -> Progress {
        Progress::counting(label, total, "events")
    }

    /// The same, counting `unit`.
    pub fn counting(label: &str, total: u64, unit: &'static str) -> Progress {
        let form = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(BAR_REFRESH_PER_S));
            let template =
                format!("{{msg}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit}, {{rate}} {unit}/s, ETA {{eta}}");
            let style = ProgressStyle::with_template(&template)
                .expect("a valid progress template")
                .with_key("rate", |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                    let _ = write!(out, "{:.0}", state.per_sec());
                })
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_owned());
            Form::Bar(bar)
        } else {
            Form::Lines { started: Instant::now(), last_line: None, done: 0, total, printed: None }
        };
        Progress { label: label.to_owned(), unit, form }
    }

    /// `done` of `total` events; `total` may grow (the log grows while a
    /// server writes).
    pub fn update(&mut self, done: u64, total: u64) {
        match &mut self.form {
            Form::Bar(bar) => {
                bar.set_length(total.max(done));
                bar.set_position(done);
            }
            Form::Lines { started, last_line, done: last_done, total: last_total, printed } => {
                *last_done = done;
                *last_total = total.max(done);
                if last_line.is_none_or(|at| at.elapsed() >= PLAIN_LINE_INTERVAL) {
                    *last_line = Some(Instant::now());
                    *printed = Some((done, *last_total));
                    eprintln!("{}", plain_line(&self.label, self.unit, done, *last_total, started.elapsed()));
                }
            }
        }
    }

    /// Ends the bar, or prints the last line.
    pub fn finish(self) {
        match self.form {
            Form::Bar(bar) => bar.finish_and_clear(),
            Form::Lines { started, done, total, printed, .. } => {
                if printed != Some((done, total)) {
                    eprintln!("{}", plain_line(&self.label, self.unit, done, total, started.elapsed()));
                }
            }
        }
    }
}

fn plain_line(label: &str, unit: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 { done as f64 / seconds } else { 0.0 };
    format!("{label}: {done}/{total} {unit}, {rate:.0} {unit}/s")
}
