//! Preemption signals (SIGTERM by default): while a manager is open, the first signal
//! sets its flag (the next step saves and flushes) and a second one, while the first is
//! pending, performs the signal's default action (the process ends as killed by it).
//! When the last manager using a signal closes, a signal whose disposition was the
//! default before Cairn took it behaves as the default again.
//!
//! `signal-hook` never reinstalls a previous disposition when its actions are removed (a
//! removed SIGTERM action would leave SIGTERM ignored), so the default is emulated by an
//! action of its own, registered on release and removed when a manager takes the signal
//! again. Handlers a program installed before (a function, not the default) are chained
//! by `signal-hook` and keep running.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use signal_hook::SigId;

use crate::error::{Error, Result};

/// How Cairn uses one signal across the managers of the process.
#[derive(Default)]
struct Use {
    /// Open managers handling it.
    managers: usize,
    /// Whether its disposition was the default before Cairn first took it.
    was_default: bool,
    /// The action that emulates the default while no manager handles it.
    default_action: Option<SigId>,
    /// Whether Cairn has taken this signal before.
    seen: bool,
}

fn uses() -> &'static Mutex<HashMap<i32, Use>> {
    static USES: OnceLock<Mutex<HashMap<i32, Use>>> = OnceLock::new();
    USES.get_or_init(Default::default)
}

/// One manager's hold on a preemption signal; released on [`Preemption::release`] or drop.
pub(crate) struct Preemption {
    signal: i32,
    actions: Vec<SigId>,
}

impl Preemption {
    /// Handles `signal` for a manager whose flag is `flag`.
    pub(crate) fn install(signal: i32, flag: Arc<AtomicBool>) -> Result<Preemption> {
        let failed = |e: std::io::Error| Error::invalid(format!("cannot handle signal {signal}")).with_source(e);
        let mut uses = uses().lock().unwrap_or_else(|p| p.into_inner());
        let entry = uses.entry(signal).or_default();
        if !entry.seen {
            entry.was_default = disposition_is_default(signal);
            entry.seen = true;
        }
        if let Some(id) = entry.default_action.take() {
            signal_hook::low_level::unregister(id);
        }
        // Registered first, so that on the first signal the flag is still unset.
        let second = signal_hook::flag::register_conditional_default(signal, flag.clone()).map_err(failed)?;
        let first = signal_hook::flag::register(signal, flag).map_err(|e| {
            signal_hook::low_level::unregister(second);
            failed(e)
        })?;
        entry.managers += 1;
        Ok(Preemption { signal, actions: vec![second, first] })
    }

    /// Stops handling the signal for this manager (idempotent).
    pub(crate) fn release(&mut self) {
        if self.actions.is_empty() {
            return;
        }
        for id in self.actions.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        let mut uses = uses().lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = uses.get_mut(&self.signal) else { return };
        entry.managers = entry.managers.saturating_sub(1);
        if entry.managers == 0 && entry.was_default {
            let always = Arc::new(AtomicBool::new(true));
            entry.default_action = signal_hook::flag::register_conditional_default(self.signal, always).ok();
        }
    }
}

impl Drop for Preemption {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether `signal`'s current disposition is the default one.
fn disposition_is_default(signal: i32) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: querying only (no new action); `old` is written on success.
    let queried = unsafe { libc::sigaction(signal, std::ptr::null(), old.as_mut_ptr()) } == 0;
    // SAFETY: sigaction succeeded, so `old` is initialised (it was zeroed besides).
    queried && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_DFL
}
