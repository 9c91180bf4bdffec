//! `cairn._cairn.Manager`: the native side of `cairn.CheckpointManager`.

use std::mem::ManuallyDrop;

use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
use cairn::policy::{Every, Retention, SavePolicy};
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
    local: bool,
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
    #[pyo3(signature = (uri, policies, save_interval=None, keep_last=None, keep_every=None, keep_best=None, metric=None, mode="min", async_save=true, max_in_flight=1, preemption_signal=None, storage_options=None, rank=0, world_size=1, orphan_grace=Some(3600.0)))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        uri: &str,
        policies: Vec<(u64, Option<u64>)>,
        save_interval: Option<f64>,
        keep_last: Option<usize>,
        keep_every: Option<u64>,
        keep_best: Option<usize>,
        metric: Option<String>,
        mode: &str,
        async_save: bool,
        max_in_flight: usize,
        preemption_signal: Option<i32>,
        storage_options: Option<StoreOptions>,
        rank: u32,
        world_size: u32,
        orphan_grace: Option<f64>,
    ) -> PyResult<Manager> {
        guarded(|| {
            let rules = policies.into_iter().map(|(interval, until)| Every { interval, until }).collect();
            let mut policy = SavePolicy::steps(rules).map_err(to_py_err)?;
            if let Some(seconds) = save_interval {
                policy = policy.with_time_interval(self::seconds("save_interval", seconds)?);
            }
            let mode = mode.parse().map_err(to_py_err)?;
            let retention =
                Retention::from_flags(keep_last, keep_every, keep_best, metric.clone(), mode).map_err(to_py_err)?;
            let orphan_grace = orphan_grace.map(|s| seconds("orphan_grace", s)).transpose()?;
            let mut opts = ManagerOptions::default()
                .with_policy(policy)
                .with_retention(retention)
                .with_async_save(async_save)
                .with_max_in_flight(max_in_flight)
                .with_preemption_signal(preemption_signal)
                .with_ranks(rank, world_size)
                .with_orphan_grace(orphan_grace);
            opts.metric = metric;
            let storage = storage_options.unwrap_or_default();
            let inner = py
                .detach(|| CheckpointManager::with_run(Run::at(Location::with_options(uri, true, &storage)?), opts))
                .map_err(to_py_err)?;
            let local = inner.run().location().local_dir().is_some();
            Ok(Manager { inner: ManuallyDrop::new(inner), local })
        })
    }

    /// Whether `on_step` would save `step` now.
    #[pyo3(signature = (step, force=false))]
    fn due(&self, step: u64, force: bool) -> bool {
        self.inner.due(step, force)
    }

    #[pyo3(signature = (step, tensors, values, structure=None, force=false, metrics=None, metadata=None, staging=None))]
    #[allow(clippy::too_many_arguments)]
    fn on_step<'py>(
        &self,
        py: Python<'py>,
        step: u64,
        tensors: Vec<TensorLeaf<'py>>,
        values: Vec<(String, Bound<'py, PyAny>)>,
        structure: Option<String>,
        force: bool,
        metrics: Option<Vec<(String, Bound<'py, PyAny>)>>,
        metadata: Option<String>,
        staging: Option<Vec<Bound<'py, PyAny>>>,
    ) -> PyResult<bool> {
        let leaves = (tensors, values, structure, staging);
        self.submit(py, leaves, (force, false), metrics, metadata, |state, req| match state {
            Handover::Borrowed(state) => self.inner.on_step(step, state, req),
            Handover::Staged(state) => self.inner.on_step_owned(step, state, req),
        })
    }

    #[pyo3(signature = (step, tensors, values, structure=None, temporary=false, metrics=None, metadata=None, staging=None))]
    #[allow(clippy::too_many_arguments)]
    fn save<'py>(
        &self,
        py: Python<'py>,
        step: u64,
        tensors: Vec<TensorLeaf<'py>>,
        values: Vec<(String, Bound<'py, PyAny>)>,
        structure: Option<String>,
        temporary: bool,
        metrics: Option<Vec<(String, Bound<'py, PyAny>)>>,
        metadata: Option<String>,
        staging: Option<Vec<Bound<'py, PyAny>>>,
    ) -> PyResult<()> {
        let leaves = (tensors, values, structure, staging);
        self.submit(py, leaves, (true, temporary), metrics, metadata, |state, req| match state {
            Handover::Borrowed(state) => self.inner.save(step, state, req),
            Handover::Staged(state) => self.inner.save_owned(step, state, req),
        })
    }

    /// Blocks until a save slot is free; raises a background error.
    fn wait_for_slot(&self, py: Python<'_>) -> PyResult<()> {
        guarded(|| py.detach(|| self.inner.wait_for_slot()).map_err(to_py_err))
    }

    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        guarded(|| py.detach(|| self.inner.wait()).map_err(to_py_err))
    }

    /// Waits, then stops handling the preemption signal.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        guarded(|| py.detach(|| self.inner.close()).map_err(to_py_err))
    }

    #[pyo3(signature = (step=None, prefix=None, keys=None, rename=None))]
    fn restore<'py>(
        &self,
        py: Python<'py>,
        step: Option<u64>,
        prefix: Option<Vec<String>>,
        keys: Option<Vec<String>>,
        rename: Option<Vec<(String, String)>>,
    ) -> PyResult<PyLeaves<'py>> {
        guarded(|| {
            let opts = load_options(prefix, keys, rename)?;
            let (state, info) = py.detach(|| self.inner.restore(step, &opts)).map_err(to_py_err)?;
            state_to_py(py, state, &info, self.local)
        })
    }

    fn latest_step(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        guarded(|| py.detach(|| self.inner.latest_step()).map_err(to_py_err))
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

/// Flattened leaves as the Python layer passes them: tensors, values, structure, and the
/// staging buffers the tensors lie in, if Python staged them.
pub(crate) type PyState<'py> =
    (Vec<TensorLeaf<'py>>, Vec<(String, Bound<'py, PyAny>)>, Option<String>, Option<Vec<Bound<'py, PyAny>>>);

/// How a state reaches the manager.
enum Handover<'a> {
    /// Over the caller's own buffers: an async save snapshots them before returning.
    Borrowed(&'a State),
    /// Over private staging buffers nobody else writes: the manager keeps them and writes
    /// from them, no snapshot copy.
    Staged(State),
}

impl Manager {
    /// Builds the state and the request (`force`, `temporary`), then runs `act` with the
    /// GIL released; borrowed buffers are dropped back under the GIL.
    fn submit<'py, T: Send>(
        &self,
        py: Python<'py>,
        (tensors, values, structure, staging): PyState<'py>,
        (force, temporary): (bool, bool),
        metrics: Option<Vec<(String, Bound<'py, PyAny>)>>,
        metadata: Option<String>,
        act: impl FnOnce(Handover<'_>, SaveRequest) -> cairn::Result<T> + Send,
    ) -> PyResult<T> {
        guarded(|| {
            let staging = staging.as_deref().map(Staging::new).transpose()?;
            let state = state_from_py(tensors, values, structure, staging.as_ref())?;
            let req = SaveRequest {
                force,
                temporary,
                metrics: metrics_from_py(metrics)?,
                metadata: metadata_from_json(metadata)?,
            };
            if staging.is_some() {
                drop(staging);
                return py.detach(|| act(Handover::Staged(state), req)).map_err(to_py_err);
            }
            let out = py.detach(|| act(Handover::Borrowed(&state), req)).map_err(to_py_err)?;
            drop(state);
            Ok(out)
        })
    }
}
