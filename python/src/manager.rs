//! `cairn._cairn.Manager`: the native side of `cairn.CheckpointManager`.

use std::mem::ManuallyDrop;

use cairn::manager::{CheckpointManager, Handover, ManagerOptions, SaveRequest};
use cairn::policy::{Every, SavePolicy};
use cairn::telemetry::{self, Event};
use cairn::tier::LocalTier;
use cairn::{Location, Run, State, StoreOptions};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::*;
use crate::errors::*;

/// The manager behind `cairn.CheckpointManager`.
#[pyclass(module = "cairn._cairn")]
pub(crate) struct Manager {
    /// Dropped with the GIL released (see `Drop`).
    inner: ManuallyDrop<CheckpointManager>,
    /// Whether the runs of the tiers (the local one, then the manager's own) are local
    /// folders, whose loaded tensors are private mappings.
    mapped: (bool, bool),
}

impl Drop for Manager {
    /// Dropping the manager waits for its saves in flight, whose staging buffers are
    /// released under the GIL on the worker thread: it waits with the GIL released.
    fn drop(&mut self) {
        // SAFETY: `inner` is taken once, here, and never used again.
        let mut inner = Some(unsafe { ManuallyDrop::take(&mut self.inner) });
        Python::try_attach(|py| {
            let inner = inner.take();
            py.detach(move || drop(inner));
        });
        drop(inner);
    }
}

#[pymethods]
impl Manager {
    #[new]
    #[pyo3(signature = (uri, policies=None, save_interval=None, keep_last=None, keep_every=None, keep_best=None, async_save=true, max_in_flight=1, preemption_signal=None, storage_options=None, rank=0, world_size=1, orphan_grace=Some(3600.0), all_gather=None, timeout=600.0, incremental=true, mtbf=None, local=None, on_event=None, event_log=None, background_snapshot=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        uri: &str,
        policies: Option<Vec<(u64, Option<u64>)>>,
        save_interval: Option<f64>,
        keep_last: Option<usize>,
        keep_every: Option<u64>,
        keep_best: Option<(usize, String, String)>,
        async_save: bool,
        max_in_flight: usize,
        preemption_signal: Option<i32>,
        storage_options: Option<StoreOptions>,
        rank: u32,
        world_size: u32,
        orphan_grace: Option<f64>,
        all_gather: Option<Py<PyAny>>,
        timeout: f64,
        incremental: bool,
        mtbf: Option<f64>,
        local: Option<LocalArgs>,
        on_event: Option<Py<PyAny>>,
        event_log: Option<std::path::PathBuf>,
        background_snapshot: bool,
    ) -> PyResult<Manager> {
        guarded(|| {
            let policy = save_policy(policies, save_interval, mtbf)?;
            let retention = retention(keep_last, keep_every, keep_best)?;
            let orphan_grace = orphan_grace.map(|s| seconds("orphan_grace", s)).transpose()?;
            let mut opts = ManagerOptions::default()
                .with_policy(policy)
                .with_retention(retention)
                .with_async_save(async_save)
                .with_max_in_flight(max_in_flight)
                .with_background_snapshot(background_snapshot)
                .with_preemption_signal(preemption_signal)
                .with_ranks(rank, world_size)
                .with_coordination_timeout(seconds("timeout", timeout)?)
                .with_orphan_grace(orphan_grace);
            opts.save = opts.save.with_incremental(incremental);
            if let Some(f) = all_gather {
                opts = opts.with_all_gather(std::sync::Arc::new(move |payload| crate::call_all_gather(&f, payload)));
            }
            if let Some(callback) = on_event {
                opts = opts.with_event_sink(std::sync::Arc::new(move |event: &Event| call_on_event(&callback, event)));
            }
            if let Some(path) = event_log {
                opts = opts.with_event_sink(telemetry::json_lines(&path).map_err(to_py_err)?);
            }
            let storage = storage_options.unwrap_or_default();
            let local = local
                .map(|(uri, policies, save_interval, mtbf, (last, every, best), grace)| {
                    let policy = save_policy(policies, save_interval, mtbf)?;
                    Ok::<_, PyErr>((
                        uri,
                        policy,
                        crate::convert::retention(last, every, best)?,
                        seconds("upload_grace", grace)?,
                    ))
                })
                .transpose()?;
            let inner = py
                .detach(|| {
                    if let Some((uri, policy, retention, grace)) = local {
                        let tier = LocalTier::new(Run::create(&uri)?, policy, retention).with_upload_grace(grace);
                        opts = opts.with_local_tier(tier);
                    }
                    CheckpointManager::with_run(Run::at(Location::with_options(uri, true, &storage)?), opts)
                })
                .map_err(to_py_err)?;
            let mapped = (
                inner.local_run().is_some_and(|r| r.location().local_dir().is_some()),
                inner.run().location().local_dir().is_some(),
            );
            Ok(Manager { inner: ManuallyDrop::new(inner), mapped })
        })
    }

    /// Saves if the policy says so (or `force`); returns whether it saved. The one
    /// crossing of a step: `prepare()` is called only when the step saves, once a save
    /// slot is free, and returns `(leaves, metrics, metadata)` as `cairn._tree` and the
    /// Python layer make them.
    #[pyo3(signature = (step, prepare, force=false))]
    fn on_step(&self, py: Python<'_>, step: u64, prepare: Py<PyAny>, force: bool) -> PyResult<bool> {
        let req = SaveRequest { force, ..Default::default() };
        self.submit(py, prepare, |make| self.inner.on_step_with(step, req, make))
    }

    /// Saves as `step` now, whatever the policy; `prepare` as for `on_step`.
    #[pyo3(signature = (step, prepare, temporary=false))]
    fn save(&self, py: Python<'_>, step: u64, prepare: Py<PyAny>, temporary: bool) -> PyResult<()> {
        let req = SaveRequest { force: true, temporary, ..Default::default() };
        self.submit(py, prepare, |make| self.inner.save_with(step, req, make))
    }

    /// `(interval, blocking, writing, mtbf)` in seconds (the first three `None` until a
    /// save is measured), when the policy has an automatic interval; else `None`.
    #[allow(clippy::type_complexity)]
    fn cadence(&self) -> Option<(Option<f64>, Option<f64>, Option<f64>, f64)> {
        self.inner.cadence().map(|c| {
            let estimates = c.estimates();
            (
                c.interval().map(|d| d.as_secs_f64()),
                estimates.map(|(b, _)| b.as_secs_f64()),
                estimates.map(|(_, w)| w.as_secs_f64()),
                c.mtbf().as_secs_f64(),
            )
        })
    }

    /// Returns once the state handed to the last save is copied (see
    /// `CheckpointManager::wait_snapshot`).
    fn wait_snapshot(&self, py: Python<'_>) -> PyResult<()> {
        guarded(|| {
            py.detach(|| self.inner.wait_snapshot());
            Ok(())
        })
    }

    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        guarded(|| py.detach(|| self.inner.wait()).map_err(to_py_err))
    }

    /// Waits, then stops handling the preemption signal.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        guarded(|| py.detach(|| self.inner.close()).map_err(to_py_err))
    }

    #[pyo3(signature = (step=None, prefix=None, keys=None, rename=None, arrays=None))]
    fn restore<'py>(
        &self,
        py: Python<'py>,
        step: Option<u64>,
        prefix: Option<Vec<String>>,
        keys: Option<Vec<String>>,
        rename: Option<Vec<(String, String)>>,
        arrays: Option<Arrays<'py>>,
    ) -> PyResult<(PyLeaves<'py>, Vec<String>)> {
        guarded(|| {
            let opts = load_options(prefix, keys, rename)?;
            let restored = py.detach(|| self.inner.restore_reporting(step, &opts)).map_err(to_py_err)?;
            let from_local = self.inner.local_run().is_some_and(|r| {
                restored.info.uri.strip_prefix(r.location().uri()).is_some_and(|rest| rest.starts_with('/'))
            });
            let mapped = if from_local { self.mapped.0 } else { self.mapped.1 };
            let passed_over = restored.passed_over.iter().map(cairn::Error::full_message).collect();
            Ok((state_to_py(py, restored.state, &restored.info, mapped, arrays)?, passed_over))
        })
    }

    /// Restores with `load(checkpoint_uri)` for each copy tried, as `restore` tries them:
    /// `(what load returned, info, passed over)`. A `CheckpointError` from `load` is
    /// judged by its kind (a damaged copy is passed over); any other exception is raised.
    fn restore_into<'py>(
        &self,
        py: Python<'py>,
        step: Option<u64>,
        load: Py<PyAny>,
    ) -> PyResult<(Py<PyAny>, Bound<'py, PyDict>, Vec<String>)> {
        guarded(|| {
            let raised: std::sync::Mutex<Option<PyErr>> = std::sync::Mutex::new(None);
            let restored = py.detach(|| {
                self.inner.restore_with(step, |checkpoint| {
                    Python::attach(|py| {
                        load.call1(py, (checkpoint.location().uri(),)).map_err(|err| {
                            let judged = cairn::Error::new(error_kind(py, &err), err.to_string());
                            *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                            judged
                        })
                    })
                })
            });
            let raised = raised.into_inner().unwrap_or_else(|p| p.into_inner());
            match restored {
                Ok(r) => {
                    let passed_over = r.passed_over.iter().map(cairn::Error::full_message).collect();
                    Ok((r.state, info_to_py(py, &r.info)?, passed_over))
                }
                // The load's own error, raised as it was.
                Err(e) => match raised.filter(|err| err.to_string() == e.message()) {
                    Some(err) => Err(err),
                    None => Err(to_py_err(e)),
                },
            }
        })
    }

    /// The steps still owed to the durable tier.
    fn pending_uploads(&self) -> Vec<u64> {
        self.inner.pending_uploads()
    }

    /// The local tier's run, if any.
    fn local_uri(&self) -> Option<String> {
        self.inner.local_run().map(|r| r.location().uri().to_string())
    }

    fn latest_step(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        guarded(|| py.detach(|| self.inner.latest_step()).map_err(to_py_err))
    }

    fn settled_latest_step(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        guarded(|| py.detach(|| self.inner.settled_latest_step()).map_err(to_py_err))
    }

    /// The cleanup problems since the last call, as exception objects (never raised:
    /// the checkpoints were committed).
    fn take_cleanup_errors<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyAny>> {
        self.inner
            .take_cleanup_errors()
            .into_iter()
            .map(|e| to_py_err(e).into_value(py).into_bound(py).into_any())
            .collect()
    }

    fn list<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        guarded(|| {
            let infos = py.detach(|| self.inner.list()).map_err(to_py_err)?;
            infos.iter().map(|i| info_to_py(py, i)).collect()
        })
    }

    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        guarded(|| py.detach(|| self.inner.reset()).map_err(to_py_err))
    }

    fn preempted(&self) -> bool {
        self.inner.preempted()
    }

    fn uri(&self) -> String {
        self.inner.run().location().uri().to_string()
    }
}

/// What `local=` says from Python: the local run's uri, its step rules, time interval and
/// mtbf (as for the manager's own policy), its retention (keep_last, keep_every,
/// keep_best), and the upload grace in seconds.
type LocalArgs = (
    String,
    Option<Vec<(u64, Option<u64>)>>,
    Option<f64>,
    Option<f64>,
    (Option<usize>, Option<u64>, Option<(usize, String, String)>),
    f64,
);

/// A save policy from the step rules, the time interval and the mtbf of an automatic one.
fn save_policy(
    rules: Option<Vec<(u64, Option<u64>)>>,
    save_interval: Option<f64>,
    mtbf: Option<f64>,
) -> PyResult<SavePolicy> {
    let mut policy = match rules {
        Some(rules) => {
            SavePolicy::steps(rules.into_iter().map(|(interval, until)| Every { interval, until }).collect())
                .map_err(to_py_err)?
        }
        None => SavePolicy::default(),
    };
    if let Some(interval) = save_interval {
        policy = policy.with_time_interval(seconds("save_interval", interval)?);
    }
    if let Some(mtbf) = mtbf {
        policy = policy.with_auto_interval(seconds("mtbf", mtbf)?);
    }
    Ok(policy)
}

/// Calls `on_event(event)` with the event as a dict (its JSON form); an exception it
/// raises is reported as unraisable, never to the save.
fn call_on_event(callback: &Py<PyAny>, event: &Event) {
    Python::attach(|py| {
        let called = pyo3::types::PyModule::import(py, "json")
            .and_then(|json| json.call_method1("loads", (event.to_json().to_string(),)))
            .and_then(|dict| callback.call1(py, (dict,)));
        if let Err(err) = called {
            err.write_unraisable(py, Some(callback.bind(py)));
        }
    });
}

/// The state a save makes from Python, kept by the binding so that buffers borrowed from
/// Python objects are released under the GIL, in one go, after the save took its copy.
type Made = std::sync::OnceLock<State>;

impl Manager {
    /// Runs `act` with the GIL released, giving it the `make` that calls `prepare()` (with
    /// the GIL) and builds the state: handed over whole when Python staged it in private
    /// buffers, else lent for the save to copy. A Python error in `prepare` is raised as
    /// it is.
    fn submit<T: Send>(
        &self,
        py: Python<'_>,
        prepare: Py<PyAny>,
        act: impl for<'m> FnOnce(&mut (dyn FnMut(&mut SaveRequest) -> cairn::Result<Handover<'m>> + 'm)) -> cairn::Result<T>
            + Send,
    ) -> PyResult<T> {
        guarded(|| {
            let made = Made::new();
            let raised: std::sync::Mutex<Option<PyErr>> = std::sync::Mutex::new(None);
            let result = py.detach(|| {
                let mut make =
                    |req: &mut SaveRequest| {
                        Python::attach(|py| prepared(py, &prepare, req))
                            .map(|(state, staged)| {
                                if staged {
                                    Handover::Give(state)
                                } else {
                                    Handover::Copy(made.get_or_init(|| state))
                                }
                            })
                            .map_err(|err| {
                                let shown = cairn::Error::new(
                                    cairn::ErrorKind::Invalid,
                                    format!("preparing the state failed: {err}"),
                                );
                                *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                                shown
                            })
                    };
                act(&mut make)
            });
            drop(made);
            if let Some(err) = raised.into_inner().unwrap_or_else(|p| p.into_inner()) {
                return Err(err);
            }
            result.map_err(to_py_err)
        })
    }
}

/// What `prepare()` returns: the flattened leaves (`cairn._tree.Leaves`), the metrics and
/// the metadata as JSON.
type Prepared<'py> = (Bound<'py, PyAny>, Option<Vec<(String, Bound<'py, PyAny>)>>, Option<String>);

/// Calls `prepare()` and converts what it returns: the state (and whether it lies in
/// private staging buffers), with the request's metrics and metadata filled in.
fn prepared(py: Python<'_>, prepare: &Py<PyAny>, req: &mut SaveRequest) -> PyResult<(State, bool)> {
    let (leaves, metrics, metadata): Prepared<'_> = prepare.call0(py)?.extract(py)?;
    let tensors: Vec<TensorLeaf<'_>> = leaves.getattr("tensors")?.extract()?;
    let values: Vec<(String, Bound<'_, PyAny>)> = leaves.getattr("values")?.extract()?;
    let structure: Option<String> = leaves.getattr("structure")?.extract()?;
    let staging: Option<Vec<Bound<'_, PyAny>>> = leaves.getattr("staging")?.extract()?;
    req.metrics = metrics_from_py(metrics)?;
    req.metadata = metadata_from_json(metadata)?;
    let staging = staging.as_deref().map(Staging::new).transpose()?;
    let state = state_from_py(tensors, values, structure, staging.as_ref())?;
    Ok((state, staging.is_some()))
}
