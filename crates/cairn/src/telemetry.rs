//! Telemetry: what a manager did, as structured events. Every save, upload, load and
//! deletion ends with one [`Event`]: which operation, on which tier, its step, how long
//! each phase took, the bytes it moved and whether it failed. Events go to the sinks
//! given in [`crate::manager::ManagerOptions::events`] (a callback, a JSON Lines file),
//! one at a time, on the thread that did the work, never while the manager holds a
//! lock; a sink's own failure (a panic included) never fails the operation it reports,
//! and a sink must not call back into the manager (such calls are refused).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Error, Result};

/// What an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// A checkpoint saved (committed or failed).
    Save,
    /// A checkpoint copied from the local tier to the durable one, verified there.
    Upload,
    /// A checkpoint loaded by `restore`.
    Load,
    /// A checkpoint deleted by retention.
    Delete,
}

/// The tier an operation ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// The fast tier a manager saves into first (`local=`).
    Local,
    /// The run the manager was opened on: its only tier, or the one uploads go to.
    Durable,
}

/// A timed phase of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The training loop blocked while the state was made and copied.
    Snapshot,
    /// Every data file written durably (in the background for an asynchronous save).
    Write,
    /// The manifest created (the commit) and the run's `LATEST` hint written.
    Commit,
    /// The data files copied to the durable tier.
    Upload,
    /// The copy read back and checked at the durable tier.
    Verify,
    /// Tensors read and checked by a load.
    Read,
    /// A checkpoint removed by retention.
    Retention,
}

/// One operation of a manager, once it is over.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// What was done.
    pub operation: Operation,
    /// Where.
    pub tier: Tier,
    /// The checkpoint's step.
    pub step: u64,
    /// The checkpoint's folder.
    pub uri: String,
    /// When it ended, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// How long each phase took, in the order they ran.
    pub phases: Vec<(Phase, Duration)>,
    /// Bytes moved: written by a save, copied by an upload, read by a load, stored by a
    /// deleted checkpoint's own files.
    pub bytes: u64,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<String>,
    /// What else a person should know (e.g. the copies a restore passed over).
    pub detail: Option<String>,
    /// After a save, the interval an automatic cadence chose from the costs measured so
    /// far, this save's included (see [`crate::cadence::Cadence`]).
    pub interval: Option<Duration>,
}

impl Event {
    /// An event ending now.
    pub fn new(operation: Operation, tier: Tier, step: u64, uri: impl Into<String>) -> Event {
        Event {
            operation,
            tier,
            step,
            uri: uri.into(),
            unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            phases: Vec::new(),
            bytes: 0,
            error: None,
            detail: None,
            interval: None,
        }
    }

    /// Adds a timed phase.
    pub fn with_phase(mut self, phase: Phase, took: Duration) -> Event {
        self.phases.push((phase, took));
        self
    }

    /// Sets the bytes moved.
    pub fn with_bytes(mut self, bytes: u64) -> Event {
        self.bytes = bytes;
        self
    }

    /// Records how it ended.
    pub fn with_outcome<T>(mut self, outcome: &Result<T>) -> Event {
        self.error = outcome.as_ref().err().map(Error::full_message);
        self
    }

    /// The time of all its phases together.
    pub fn duration(&self) -> Duration {
        self.phases.iter().map(|(_, took)| *took).sum()
    }

    /// How long `phase` took, if it ran.
    pub fn phase(&self, phase: Phase) -> Option<Duration> {
        self.phases.iter().find(|(p, _)| *p == phase).map(|(_, took)| *took)
    }

    /// Bytes per second over the phase that moved them (write, upload or read), if any.
    pub fn throughput(&self) -> Option<f64> {
        let moving = [Phase::Write, Phase::Upload, Phase::Read].iter().find_map(|p| self.phase(*p))?;
        (moving > Duration::ZERO && self.bytes > 0).then(|| self.bytes as f64 / moving.as_secs_f64())
    }

    /// The event as one JSON object: `operation`, `tier`, `step`, `uri`, `unix_ms`,
    /// `duration_s`, `phases` (seconds by phase name), `bytes`, `bytes_per_s`, `error`,
    /// `detail`, `interval_s`.
    pub fn to_json(&self) -> serde_json::Value {
        let phases: serde_json::Map<String, serde_json::Value> =
            self.phases.iter().map(|(phase, took)| (name(phase), serde_json::json!(took.as_secs_f64()))).collect();
        serde_json::json!({
            "operation": self.operation,
            "tier": self.tier,
            "step": self.step,
            "uri": self.uri,
            "unix_ms": self.unix_ms,
            "duration_s": self.duration().as_secs_f64(),
            "phases": phases,
            "bytes": self.bytes,
            "bytes_per_s": self.throughput(),
            "error": self.error,
            "detail": self.detail,
            "interval_s": self.interval.map(|d| d.as_secs_f64()),
        })
    }
}

/// The name a phase has in JSON.
fn name(phase: &Phase) -> String {
    serde_json::to_value(phase).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Where events go: called once per event, from the manager's background threads.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// A sink appending each event to the file at `path` as one line of JSON (created if
/// absent). A line that cannot be written is dropped: telemetry never fails a save.
pub fn json_lines(path: &Path) -> Result<EventSink> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::from_io(e, "opening event log", &format!("file=`{}`", path.display())))?;
    let file = Mutex::new(file);
    Ok(Arc::new(move |event: &Event| {
        let mut line = event.to_json().to_string();
        line.push('\n');
        if let Ok(mut file) = file.lock() {
            let _ = file.write_all(line.as_bytes());
        }
    }))
}

thread_local! {
    /// Set while this thread runs a sink.
    static IN_SINK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is running an event sink (which must not call back into
/// the manager that called it).
pub(crate) fn in_sink() -> bool {
    IN_SINK.get()
}

/// The sinks of a manager, called in turn, one event at a time.
pub(crate) struct Sinks {
    sinks: Vec<EventSink>,
    /// Held while the sinks are called: events reach them in the order they were emitted.
    order: Arc<Mutex<()>>,
}

impl Sinks {
    pub(crate) fn new(sinks: Vec<EventSink>) -> Sinks {
        Sinks { sinks, order: Arc::default() }
    }

    /// Whether anyone listens (an event need not be made otherwise).
    pub(crate) fn active(&self) -> bool {
        !self.sinks.is_empty()
    }

    /// Gives `event` to every sink; a sink that panics is passed over (the work it
    /// reports is done).
    pub(crate) fn emit(&self, event: Event) {
        if self.sinks.is_empty() {
            return;
        }
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let outer = IN_SINK.replace(true);
        for sink in &self.sinks {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(&event)));
        }
        IN_SINK.set(outer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_json_object_with_its_phases_in_seconds() {
        let event = Event::new(Operation::Save, Tier::Local, 7, "file:///r/step-7")
            .with_phase(Phase::Snapshot, Duration::from_millis(250))
            .with_phase(Phase::Write, Duration::from_secs(2))
            .with_bytes(4_000_000_000);
        let json = event.to_json();
        assert_eq!(json["operation"], "save");
        assert_eq!(json["tier"], "local");
        assert_eq!(json["step"], 7);
        assert_eq!(json["phases"]["snapshot"], 0.25);
        assert_eq!(json["phases"]["write"], 2.0);
        assert_eq!(json["duration_s"], 2.25);
        assert_eq!(json["bytes_per_s"], 2e9);
        assert!(json["error"].is_null());
    }

    #[test]
    fn a_failed_operation_says_why_and_moves_no_bytes_per_second() {
        let failed: Result<()> = Err(Error::corrupt("bad crc file=`x`"));
        let event = Event::new(Operation::Upload, Tier::Durable, 1, "s3://b/r/step-1").with_outcome(&failed);
        assert!(event.error.as_deref().is_some_and(|e| e.contains("bad crc")));
        assert_eq!(event.throughput(), None);
    }

    #[test]
    fn the_json_lines_sink_appends_one_line_per_event() {
        let dir = std::env::temp_dir().join(format!("cairn-telemetry-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let sinks = Sinks::new(vec![json_lines(&path).unwrap()]);
        for step in [1, 2] {
            sinks.emit(Event::new(Operation::Delete, Tier::Durable, step, "u"));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
