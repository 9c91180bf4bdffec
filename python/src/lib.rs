//! `cairn._cairn`: the thin PyO3 layer over the Cairn library. Python flattens its nested
//! state into keyed leaves (see `cairn/_tree.py`); this module moves those leaves in and
//! out of Rust without copies (arrays are borrowed through the buffer protocol, loaded
//! tensors are exported as buffers over the read memory), releases the GIL around all
//! I/O, maps errors to `cairn.CheckpointError` subclasses, and never lets a panic out.

mod convert;
mod errors;
mod manager;
mod parts;
mod tree;

use std::collections::BTreeMap;

use cairn::dist::{save_as_rank, CallbackExchange, Exchange, Ranks};
use cairn::{Checkpoint, ErrorKind, Location, Run, SaveOptions, StoreOptions, Target};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::convert::*;
use crate::errors::*;
use crate::manager::Manager;

/// Saves flattened leaves to `uri` (a run when `step` is given, else a checkpoint folder).
#[pyfunction]
#[pyo3(signature = (uri, tensors, values, structure=None, step=None, metrics=None, metadata=None, storage_options=None, rank=0, world_size=1, all_gather=None, timeout=600.0, incremental=false))]
#[allow(clippy::too_many_arguments)]
fn save<'py>(
    py: Python<'py>,
    uri: &str,
    tensors: Vec<TensorLeaf<'py>>,
    values: Vec<(String, Bound<'py, PyAny>)>,
    structure: Option<String>,
    step: Option<u64>,
    metrics: Option<Vec<(String, Bound<'py, PyAny>)>>,
    metadata: Option<String>,
    storage_options: Option<StoreOptions>,
    rank: u32,
    world_size: u32,
    all_gather: Option<Py<PyAny>>,
    timeout: f64,
    incremental: bool,
) -> PyResult<Bound<'py, PyDict>> {
    guarded(|| {
        let state = state_from_py(tensors, values, structure, None)?;
        let opts = SaveOptions {
            step,
            metrics: metrics_from_py(metrics)?,
            metadata: metadata_from_json(metadata)?,
            incremental,
            ..Default::default()
        };
        let storage = storage_options.unwrap_or_default();
        let ranks = Ranks { rank, world_size, timeout: seconds("timeout", timeout)? };
        let info = py
            .detach(|| {
                let location = Location::with_options(uri, true, &storage)?;
                let mut gather = all_gather.as_ref().map(|f| {
                    CallbackExchange::new(rank, world_size, move |payload: Vec<u8>| call_all_gather(f, payload))
                });
                let exchange = gather.as_mut().map(|g| g as &mut dyn Exchange);
                save_as_rank(&location, &state, &opts, ranks, exchange)
            })
            .map_err(to_py_err)?;
        drop(state);
        info_to_py(py, &info)
    })
}

/// A requested box of a tensor: `(offsets, shape)`.
type BoxRequest = (Vec<u64>, Vec<u64>);

/// Calls a Python all-gather: `f(bytes) -> list[bytes]`, one entry per rank.
pub(crate) fn call_all_gather(f: &Py<PyAny>, payload: Vec<u8>) -> cairn::Result<Vec<Vec<u8>>> {
    Python::attach(|py| {
        let got = f.call1(py, (PyBytes::new(py, &payload),))?;
        got.extract::<Vec<Vec<u8>>>(py)
    })
    .map_err(|e| cairn::Error::new(ErrorKind::Unavailable, format!("all_gather callback failed: {e}")))
}

/// Opens `uri` (a checkpoint folder, or the latest or given `step` of a run): its
/// manifest is read and validated once, however many loads follow.
#[pyfunction]
#[pyo3(signature = (uri, step=None, storage_options=None))]
fn open(py: Python<'_>, uri: &str, step: Option<u64>, storage_options: Option<StoreOptions>) -> PyResult<Opened> {
    guarded(|| {
        py.detach(|| {
            let location = Location::with_options(uri, false, &storage_options.unwrap_or_default())?;
            match step {
                Some(step) => Run::at(location).checkpoint(step),
                None => cairn::open_at(location),
            }
        })
        .map(|ckpt| Opened { ckpt })
        .map_err(to_py_err)
    })
}

/// A committed checkpoint, opened (`cairn::Checkpoint`).
#[pyclass(frozen, module = "cairn._cairn")]
struct Opened {
    ckpt: Checkpoint,
}

#[pymethods]
impl Opened {
    /// Loads the selected tensors and values: `(tensors, values, info, structure)`.
    /// `progress(stage, nbytes)` is told the tensor bytes read (`"reading"`).
    #[pyo3(signature = (prefix=None, keys=None, rename=None, boxes=None, shapes=None, rank=None, progress=None, arrays=None))]
    #[allow(clippy::too_many_arguments)]
    fn load<'py>(
        &self,
        py: Python<'py>,
        prefix: Option<Vec<String>>,
        keys: Option<Vec<String>>,
        rename: Option<Vec<(String, String)>>,
        boxes: Option<BTreeMap<String, BoxRequest>>,
        shapes: Option<BTreeMap<String, Vec<u64>>>,
        rank: Option<u32>,
        progress: Option<Py<PyAny>>,
        arrays: Option<Arrays<'py>>,
    ) -> PyResult<PyLeaves<'py>> {
        guarded(|| {
            let mut opts = load_options(prefix, keys, rename)?;
            for (key, (offsets, shape)) in boxes.unwrap_or_default() {
                opts = opts.with_box(key, offsets, shape);
            }
            for (key, shape) in shapes.unwrap_or_default() {
                opts = opts.with_shape(key, shape);
            }
            opts.rank = rank;
            let told = progress.map(Told::new);
            let state = py
                .detach(|| {
                    let state = self.ckpt.load_with(&opts, &Told::tell(&told));
                    if let Some(told) = &told {
                        told.flush();
                    }
                    state
                })
                .map_err(to_py_err)?;
            state_to_py(py, state, &self.ckpt.info(), self.ckpt.location().local_dir().is_some(), arrays)
        })
    }

    /// What the checkpoint holds, without reading it: `(tensors, value keys, structure)`,
    /// each tensor as `(key, dtype name, global shape)`; rank 0's values and structure
    /// unless `rank` is given.
    #[pyo3(signature = (rank=None))]
    fn describe(&self, rank: Option<u32>) -> Described {
        let manifest = self.ckpt.manifest();
        let own = rank.and_then(|r| manifest.ranks.get(&r.to_string()));
        let mut tensors: BTreeMap<&String, (String, Vec<u64>)> =
            manifest.tensors.iter().map(|(k, t)| (k, (t.dtype.name().to_string(), t.shape.clone()))).collect();
        let mut values: Vec<String> = manifest.values.keys().cloned().collect();
        let mut structure = manifest.structure.clone();
        if let Some(own) = own {
            tensors.extend(own.tensors.iter().map(|(k, t)| (k, (t.dtype.name().to_string(), t.shape.clone()))));
            values = own.values.keys().cloned().collect();
            structure = own.structure.clone();
        }
        let tensors = tensors.into_iter().map(|(k, (dtype, shape))| (k.clone(), dtype, shape)).collect();
        (tensors, values, structure)
    }
}

/// `Opened.describe()`: tensors as `(key, dtype, shape)`, value keys, structure.
type Described = (Vec<(String, String, Vec<u64>)>, Vec<String>, Option<String>);

/// Lists the readable committed checkpoints of the run at `uri` as info dicts, in step
/// order, with the message of each damaged one skipped.
#[pyfunction]
#[pyo3(signature = (uri, storage_options=None))]
fn list_checkpoints<'py>(
    py: Python<'py>,
    uri: &str,
    storage_options: Option<StoreOptions>,
) -> PyResult<(Vec<Bound<'py, PyDict>>, Vec<String>)> {
    guarded(|| {
        let survey = py
            .detach(|| {
                let run = Run::at(Location::with_options(uri, false, &storage_options.unwrap_or_default())?);
                run.survey()
            })
            .map_err(to_py_err)?;
        let infos = survey.checkpoints.iter().map(|i| info_to_py(py, i)).collect::<PyResult<_>>()?;
        Ok((infos, survey.damaged.iter().map(|e| e.full_message()).collect()))
    })
}

/// A prune report as Python receives it: deleted steps, kept count, damaged messages,
/// removed paths.
type PruneTuple = (Vec<u64>, usize, Vec<String>, Vec<String>);

/// Applies retention to the run at `uri` and removes leftovers of unfinished saves older
/// than `grace` seconds: `(deleted steps, kept count, damaged messages, removed paths)`.
#[pyfunction]
#[pyo3(signature = (uri, keep_last=None, keep_every=None, keep_best=None, grace=3600.0, dry_run=false, storage_options=None))]
#[allow(clippy::too_many_arguments)]
fn prune(
    py: Python<'_>,
    uri: &str,
    keep_last: Option<usize>,
    keep_every: Option<u64>,
    keep_best: Option<(usize, String, String)>,
    grace: f64,
    dry_run: bool,
    storage_options: Option<StoreOptions>,
) -> PyResult<PruneTuple> {
    guarded(|| {
        let grace = seconds("grace", grace)?;
        let retention = retention(keep_last, keep_every, keep_best)?;
        let report = py
            .detach(|| {
                let run = Run::at(Location::with_options(uri, false, &storage_options.unwrap_or_default())?);
                run.prune(&retention, grace, dry_run)
            })
            .map_err(to_py_err)?;
        let damaged = report.damaged.iter().map(|e| e.full_message()).collect();
        Ok((report.deleted, report.kept, damaged, report.removed))
    })
}

/// Copies a checkpoint (a folder with a manifest) or a whole run from `src` to `dst`,
/// verified at the destination; returns the info dicts of what was copied.
#[pyfunction]
#[pyo3(signature = (src, dst, src_options=None, dst_options=None, progress=None))]
fn copy<'py>(
    py: Python<'py>,
    src: &str,
    dst: &str,
    src_options: Option<StoreOptions>,
    dst_options: Option<StoreOptions>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    guarded(|| {
        let told = progress.map(Told::new);
        let infos = py
            .detach(|| {
                let tell = Told::tell(&told);
                let from = Location::with_options(src, false, &src_options.unwrap_or_default())?;
                let to = Location::with_options(dst, true, &dst_options.unwrap_or_default())?;
                let copied = match cairn::resolve_at(from)? {
                    Target::Checkpoint(from) => {
                        cairn::transfer::copy_checkpoint(&Checkpoint::open_at(from)?, &to, &tell).map(|i| vec![i])
                    }
                    Target::Run(from) => cairn::transfer::copy_run(&from, &Run::at(to), &tell),
                };
                if let Some(told) = &told {
                    told.flush();
                }
                copied
            })
            .map_err(to_py_err)?;
        infos.iter().map(|i| info_to_py(py, i)).collect()
    })
}

/// Packs the checkpoint at `uri` (or a run's latest) into one self-contained bundle.
#[pyfunction]
#[pyo3(signature = (uri, storage_options=None))]
fn to_bytes<'py>(py: Python<'py>, uri: &str, storage_options: Option<StoreOptions>) -> PyResult<Bound<'py, PyBytes>> {
    guarded(|| {
        let bytes = py
            .detach(|| {
                let ckpt = cairn::open_at(Location::with_options(uri, false, &storage_options.unwrap_or_default())?)?;
                cairn::transfer::to_bytes(&ckpt)
            })
            .map_err(to_py_err)?;
        Ok(PyBytes::new(py, &bytes))
    })
}

/// Unpacks a bundle into the checkpoint folder `uri`, commits and verifies it.
#[pyfunction]
#[pyo3(signature = (bundle, uri, storage_options=None))]
fn from_bytes<'py>(
    py: Python<'py>,
    bundle: &[u8],
    uri: &str,
    storage_options: Option<StoreOptions>,
) -> PyResult<Bound<'py, PyDict>> {
    guarded(|| {
        let info = py
            .detach(|| {
                cairn::transfer::from_bytes(
                    bundle,
                    &Location::with_options(uri, true, &storage_options.unwrap_or_default())?,
                )
            })
            .map_err(to_py_err)?;
        info_to_py(py, &info)
    })
}

/// A local directory holding the checkpoint at `uri` (downloaded once into `cache_dir`).
#[pyfunction]
#[pyo3(signature = (uri, cache_dir, storage_options=None))]
fn as_directory(
    py: Python<'_>,
    uri: &str,
    cache_dir: std::path::PathBuf,
    storage_options: Option<StoreOptions>,
) -> PyResult<std::path::PathBuf> {
    guarded(|| {
        py.detach(|| {
            let location = Location::with_options(uri, false, &storage_options.unwrap_or_default())?;
            cairn::transfer::as_directory(location, &cache_dir)
        })
        .map_err(to_py_err)
    })
}

/// Registers a URI prefix resolved by a Python callable that maps such a URI to another
/// URI Cairn understands (the longest registered prefix wins).
#[pyfunction]
fn register_scheme(prefix: String, resolver: Py<PyAny>) -> PyResult<()> {
    let shown = prefix.clone();
    cairn::register_scheme(
        prefix,
        std::sync::Arc::new(move |uri: &str, options: &StoreOptions| {
            let target: String =
                Python::attach(|py| resolver.call1(py, (uri,)).and_then(|r| r.extract(py))).map_err(|e| {
                    cairn::Error::new(
                        ErrorKind::Invalid,
                        format!("scheme resolver failed prefix=`{shown}` uri=`{uri}`: {e}"),
                    )
                })?;
            if target.starts_with(shown.as_str()) {
                return Err(cairn::Error::new(
                    ErrorKind::Invalid,
                    format!("scheme resolver returned a uri with its own prefix prefix=`{shown}` uri=`{target}`"),
                ));
            }
            Location::with_options(&target, true, options)
        }),
    );
    Ok(())
}

/// Removes a prefix registered with `register_scheme`; returns whether it was there.
#[pyfunction]
fn unregister_scheme(prefix: &str) -> bool {
    cairn::unregister_scheme(prefix)
}

#[pymodule]
fn _cairn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(save, m)?)?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(list_checkpoints, m)?)?;
    m.add_function(wrap_pyfunction!(prune, m)?)?;
    m.add_function(wrap_pyfunction!(copy, m)?)?;
    m.add_function(wrap_pyfunction!(to_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(from_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(as_directory, m)?)?;
    m.add_function(wrap_pyfunction!(register_scheme, m)?)?;
    m.add_function(wrap_pyfunction!(unregister_scheme, m)?)?;
    m.add_function(wrap_pyfunction!(parts::write_part, m)?)?;
    m.add_function(wrap_pyfunction!(parts::commit_parts, m)?)?;
    m.add_function(wrap_pyfunction!(parts::remove_run, m)?)?;
    m.add_function(wrap_pyfunction!(tree::unflatten, m)?)?;
    m.add_class::<Manager>()?;
    m.add_class::<Opened>()?;
    m.add_class::<TensorBuffer>()?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("CheckpointNotFoundError", py.get_type::<CheckpointNotFoundError>())?;
    m.add("AlreadyExistsError", py.get_type::<AlreadyExistsError>())?;
    m.add("CorruptCheckpointError", py.get_type::<CorruptCheckpointError>())?;
    m.add("IncompatibleError", py.get_type::<IncompatibleError>())?;
    m.add("PermissionDeniedError", py.get_type::<PermissionDeniedError>())?;
    m.add("StorageFullError", py.get_type::<StorageFullError>())?;
    m.add("UnavailableError", py.get_type::<UnavailableError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
