//! The batch progress bar (stderr; hidden when stderr is not a terminal, in which case
//! notable lines are still printed).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Images done / total, with failures in the message.
pub struct BatchProgress {
    bar: ProgressBar,
    tty: bool,
    failed: u64,
    cancelled: u64,
}

impl BatchProgress {
    /// A bar for `total` images (`None`: unknown, a counter is shown). `enabled = false`
    /// hides it entirely.
    pub fn new(total: Option<u64>, enabled: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::no_length(),
        };
        bar.set_draw_target(if enabled && tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let template = if total.is_some() {
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images {msg} (eta {eta})"
        } else {
            "{spinner} [{elapsed_precise}] {pos} images {msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Self {
            bar,
            tty: enabled && tty,
            failed: 0,
            cancelled: 0,
        }
    }

    /// One more image done.
    pub fn image_done(&self) {
        self.bar.inc(1);
    }

    /// One more failed job.
    pub fn job_failed(&mut self) {
        self.failed += 1;
        self.update_message();
    }

    /// One more cancelled job.
    pub fn job_cancelled(&mut self) {
        self.cancelled += 1;
        self.update_message();
    }

    fn update_message(&self) {
        let mut parts = Vec::new();
        if self.failed > 0 {
            parts.push(format!("{} failed", self.failed));
        }
        if self.cancelled > 0 {
            parts.push(format!("{} cancelled", self.cancelled));
        }
        self.bar.set_message(if parts.is_empty() {
            String::new()
        } else {
            format!("({})", parts.join(", "))
        });
    }

    /// Prints a line to stderr without garbling the bar.
    pub fn println(&self, line: &str) {
        if self.tty {
            self.bar.suspend(|| eprintln!("{line}"));
        } else {
            eprintln!("{line}");
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
