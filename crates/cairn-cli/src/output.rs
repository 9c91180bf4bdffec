//! Everything the CLI prints: data to stdout, messages and progress to stderr, errors as
//! `error: … / caused by: … / hint: …`. The library never prints.

use std::time::{Duration, UNIX_EPOCH};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// A failure to report: the message, its causes, and an optional hint.
pub struct CliError {
    pub message: String,
    pub causes: Vec<String>,
    pub hint: Option<String>,
}

impl From<cairn::Error> for CliError {
    fn from(err: cairn::Error) -> Self {
        let mut causes = Vec::new();
        let mut cause = std::error::Error::source(&err);
        while let Some(c) = cause {
            causes.push(c.to_string());
            cause = c.source();
        }
        let hint = match err.kind() {
            cairn::ErrorKind::NotFound => {
                Some("check the path or URI; `cairn ls RUN` lists committed checkpoints".to_string())
            }
            cairn::ErrorKind::Corrupt => Some("`cairn verify` lists every damaged tensor and file".to_string()),
            cairn::ErrorKind::Permission => Some("check the credentials and permissions of the store".to_string()),
            cairn::ErrorKind::StorageFull => {
                Some("free space on the store (`cairn prune` removes old checkpoints), then save again".to_string())
            }
            cairn::ErrorKind::Internal => Some("this is a bug in cairn; please report it with the command".to_string()),
            cairn::ErrorKind::Unavailable => Some("the store failed or timed out; retrying may succeed".to_string()),
            _ => None,
        };
        CliError { message: err.message().to_string(), causes, hint }
    }
}

impl CliError {
    /// An error with just a message.
    pub fn msg(message: impl Into<String>) -> CliError {
        CliError { message: message.into(), causes: Vec::new(), hint: None }
    }

    /// Prints it to stderr.
    pub fn print(&self) {
        eprintln!("error: {}", clean(&self.message));
        for cause in &self.causes {
            eprintln!("  caused by: {}", clean(cause));
        }
        if let Some(hint) = &self.hint {
            eprintln!("  hint: {hint}");
        }
    }
}

/// A byte count for humans (`1.50 MiB`).
pub fn size(bytes: u64) -> String {
    HumanBytes(bytes).to_string()
}

/// A creation time as RFC 3339 UTC, to the second.
pub fn time(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// Milliseconds as seconds with two decimals (`0.25s`), or `-` when not known.
pub fn seconds(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), |ms| format!("{:.2}s", ms as f64 / 1000.0))
}

/// A progress bar over `bytes` on stderr, with the rate and time left, hidden when
/// stderr is not a terminal.
pub fn progress(bytes: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(bytes);
    let template = "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ({eta})";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// A library progress callback drawing on `bar`: each stage starts it over, its message
/// `label` and the stage's name.
pub fn follow<'a>(bar: &'a ProgressBar, label: &'a str) -> impl Fn(cairn::progress::Stage, u64) + Sync + 'a {
    let stage = std::sync::Mutex::new(None);
    move |now, bytes| {
        let mut current = stage.lock().unwrap_or_else(|p| p.into_inner());
        if *current != Some(now) {
            *current = Some(now);
            bar.set_position(0);
            bar.set_message(format!("{} {label}", now.name()));
        }
        bar.inc(bytes);
    }
}

/// `text` safe to print (see [`cairn::error::escape_control`]).
pub fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    cairn::error::escape_control(text)
}

/// Prints rows as a left-aligned table with a header; cells are [`clean`]ed and padded
/// by hand (cells may be longer than `format!` widths allow).
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<std::borrow::Cow<'_, str>>> =
        rows.iter().map(|row| row.iter().map(|cell| clean(cell)).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (c, w) in cells.iter().zip(&widths) {
            out.push_str(c);
            out.extend(std::iter::repeat_n(' ', w.saturating_sub(c.chars().count()) + 2));
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(|c| c.as_ref()).collect());
    }
}

/// Metrics as `name=value` pairs.
pub fn metrics(info: &cairn::CheckpointInfo) -> String {
    let pairs = info.metrics.keys().filter_map(|k| info.metric(k).map(|v| format!("{}={v}", clean(k))));
    pairs.collect::<Vec<_>>().join(" ")
}
