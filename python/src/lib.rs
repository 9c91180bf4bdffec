//! `cairn._cairn`: the thin PyO3 layer over the Cairn library. Python flattens its nested
//! state into keyed leaves (see `cairn/_tree.py`); this module moves those leaves in and
//! out of Rust without copies (arrays are borrowed through the buffer protocol, loaded
//! tensors are exported as buffers over the read memory), releases the GIL around all
//! I/O, maps errors to `cairn.CheckpointError` subclasses, and never lets a panic out.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void, CString};
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use bytes::Bytes;
use cairn::dist::{save_as_rank, CallbackExchange, Exchange, Ranks};
use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
use cairn::policy::{Every, Retention, SavePolicy};
use cairn::{
    CheckpointInfo, DType, Entry, ErrorKind, LoadOptions, Location, RenameRule, Run, SaveOptions, Slice, State,
    StoreOptions, Tensor, Value,
};
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyBufferError, PyException};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString};

create_exception!(_cairn, CheckpointError, PyException, "Base class of every Cairn error.");
create_exception!(_cairn, InvalidArgumentError, CheckpointError, "The call passed something unusable.");
create_exception!(_cairn, CheckpointNotFoundError, CheckpointError, "The run, checkpoint or key does not exist.");
create_exception!(
    _cairn,
    AlreadyExistsError,
    CheckpointError,
    "The step is already committed; nothing was overwritten."
);
create_exception!(
    _cairn,
    CorruptCheckpointError,
    CheckpointError,
    "Stored bytes are damaged (checksum, truncation, impossible header)."
);
create_exception!(_cairn, IncompatibleError, CheckpointError, "Well-formed data this version of Cairn cannot use.");
create_exception!(_cairn, PermissionDeniedError, CheckpointError, "The store refused access.");
create_exception!(_cairn, StorageFullError, CheckpointError, "The store is out of space; free some and save again.");
create_exception!(_cairn, UnavailableError, CheckpointError, "The store failed or timed out; retrying may succeed.");

/// A duration given in seconds as the argument `name`; negative or non-finite is invalid.
fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| InvalidArgumentError::new_err(format!("invalid {name}={value}")))
}

fn to_py_err(err: cairn::Error) -> PyErr {
    let message = err.full_message();
    match err.kind() {
        ErrorKind::Invalid => InvalidArgumentError::new_err(message),
        ErrorKind::NotFound => CheckpointNotFoundError::new_err(message),
        ErrorKind::AlreadyExists => AlreadyExistsError::new_err(message),
        ErrorKind::Corrupt => CorruptCheckpointError::new_err(message),
        ErrorKind::Incompatible => IncompatibleError::new_err(message),
        ErrorKind::Permission => PermissionDeniedError::new_err(message),
        ErrorKind::StorageFull => StorageFullError::new_err(message),
        ErrorKind::Unavailable => UnavailableError::new_err(message),
        ErrorKind::Internal => CheckpointError::new_err(format!("internal error in cairn (please report): {message}")),
        _ => CheckpointError::new_err(message),
    }
}

/// Runs `f`, turning a Rust panic into a `CheckpointError` instead of letting it out.
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(CheckpointError::new_err(format!("internal error in cairn (please report): {what}")))
    })
}

/// Keeps a Python buffer alive while Rust reads it (no copy).
struct BorrowedBuffer(PyBuffer<u8>);

impl AsRef<[u8]> for BorrowedBuffer {
    fn as_ref(&self) -> &[u8] {
        let len = self.0.len_bytes();
        if len == 0 {
            return &[];
        }
        // SAFETY: the buffer is C-contiguous (checked on creation), stays valid while the
        // PyBuffer is held, and is only read.
        unsafe { std::slice::from_raw_parts(self.0.buf_ptr() as *const u8, len) }
    }
}

/// A contiguous byte buffer of a Python object, held without a copy.
fn byte_buffer(obj: &Bound<'_, PyAny>, key: &str) -> PyResult<PyBuffer<u8>> {
    let buffer = PyBuffer::<u8>::get(obj)
        .map_err(|e| InvalidArgumentError::new_err(format!("tensor is not a byte buffer key=`{key}`: {e}")))?;
    if !buffer.is_c_contiguous() {
        return Err(InvalidArgumentError::new_err(format!("tensor buffer is not contiguous key=`{key}`")));
    }
    Ok(buffer)
}

/// The private host buffers that Python staged a state's tensors into (see
/// `cairn/_staging.py`). The tensors become slices of them, so a save that keeps the state
/// keeps these few buffers alive rather than one Python object per tensor.
struct Staging {
    /// Each buffer's start address and bytes.
    buffers: Vec<(usize, Bytes)>,
}

impl Staging {
    fn new(objs: &[Bound<'_, PyAny>]) -> PyResult<Staging> {
        let buffers = objs
            .iter()
            .map(|obj| {
                let buffer = byte_buffer(obj, "<staging>")?;
                Ok((buffer.buf_ptr() as usize, Bytes::from_owner(BorrowedBuffer(buffer))))
            })
            .collect::<PyResult<_>>()?;
        Ok(Staging { buffers })
    }

    /// The part of a staging buffer that `view` covers; refuses a view outside them.
    fn slice_of(&self, view: &PyBuffer<u8>, key: &str) -> PyResult<Bytes> {
        let len = view.len_bytes();
        if len == 0 {
            return Ok(Bytes::new());
        }
        let at = view.buf_ptr() as usize;
        for (start, bytes) in &self.buffers {
            let offset = at.wrapping_sub(*start);
            if offset.checked_add(len).is_some_and(|end| end <= bytes.len()) {
                return Ok(bytes.slice(offset..offset + len));
            }
        }
        Err(InvalidArgumentError::new_err(format!("tensor is not inside the staging buffers key=`{key}`")))
    }
}

/// Builds one Rust tensor from a Python leaf: borrowing its buffer, or as a slice of a
/// staging buffer.
fn tensor_from_py(
    key: &str,
    dtype: &str,
    shape: Vec<u64>,
    array: &Bound<'_, PyAny>,
    staging: Option<&Staging>,
) -> PyResult<Tensor> {
    let dtype = DType::from_name(dtype).map_err(to_py_err)?;
    let buffer = byte_buffer(array, key)?;
    let data = match staging {
        None => Bytes::from_owner(BorrowedBuffer(buffer)),
        Some(staging) => staging.slice_of(&buffer, key)?,
    };
    Tensor::new(dtype, shape, data).map_err(|e| InvalidArgumentError::new_err(format!("{} key=`{key}`", e.message())))
}

/// A tensor leaf from Python: `(key, dtype, shape, uint8 buffer)`, plus `(offsets,
/// global_shape)` for a slice of a sharded tensor.
type TensorLeaf<'py> = (String, String, Vec<u64>, Bound<'py, PyAny>, Option<(Vec<u64>, Vec<u64>)>);

/// Builds the Rust state from Python's flattened leaves; with `staging`, every tensor must
/// lie inside one of its buffers.
fn state_from_py(
    tensors: Vec<TensorLeaf<'_>>,
    values: Vec<(String, Bound<'_, PyAny>)>,
    structure: Option<String>,
    staging: Option<&Staging>,
) -> PyResult<State> {
    let mut state = State::new();
    for (key, dtype, shape, array, slice) in tensors {
        let tensor = tensor_from_py(&key, &dtype, shape, &array, staging)?;
        match slice {
            None => state.insert_tensor(key, tensor),
            Some((offsets, global_shape)) => state.insert_slice(key, Slice { tensor, offsets, global_shape }),
        }
    }
    for (key, value) in values {
        let value = value_from_py(&value, &key)?;
        state.insert_value(key, value);
    }
    state.set_structure(structure);
    Ok(state)
}

fn value_from_py(obj: &Bound<'_, PyAny>, key: &str) -> PyResult<Value> {
    if obj.is_none() {
        Ok(Value::Null)
    } else if let Ok(b) = obj.cast::<PyBool>() {
        Ok(Value::Bool(b.is_true()))
    } else if obj.is_instance_of::<PyInt>() {
        obj.extract::<i64>()
            .map(Value::Int)
            .map_err(|_| InvalidArgumentError::new_err(format!("integer does not fit in 64 bits key=`{key}`")))
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        Ok(Value::Float(f.value()))
    } else if let Ok(s) = obj.cast::<PyString>() {
        Ok(Value::Str(s.to_str()?.to_string()))
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        Ok(Value::Bytes(b.as_bytes().to_vec()))
    } else if let Ok(list) = obj.cast::<PyList>() {
        list.iter().map(|item| value_from_py(&item, key)).collect::<PyResult<_>>().map(Value::List)
    } else if let Ok(dict) = obj.cast::<PyDict>() {
        let mut map = BTreeMap::new();
        for (k, v) in dict.iter() {
            let k: String = k
                .extract()
                .map_err(|_| InvalidArgumentError::new_err(format!("map keys must be strings key=`{key}`")))?;
            map.insert(k, value_from_py(&v, key)?);
        }
        Ok(Value::Map(map))
    } else {
        let type_name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        Err(InvalidArgumentError::new_err(format!(
            "cannot store a value of type `{type_name}` key=`{key}`: cairn stores arrays, tensors and plain values only, never pickles"
        )))
    }
}

fn value_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::Float(f) => PyFloat::new(py, *f).into_any(),
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::Bytes(b) => PyBytes::new(py, b).into_any(),
        Value::List(items) => {
            PyList::new(py, items.iter().map(|v| value_to_py(py, v)).collect::<PyResult<Vec<_>>>()?)?.into_any()
        }
        Value::Map(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, value_to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

/// Read-back tensor memory exported through the buffer protocol (no copy). Writable when
/// the memory is a private mapping of a local file (writes never reach the file) or when
/// this buffer is its only owner (a tensor read from a remote store); otherwise shared
/// with other tensors and read-only.
#[pyclass(frozen, module = "cairn._cairn")]
struct TensorBuffer {
    data: Bytes,
    writable: bool,
}

#[pymethods]
impl TensorBuffer {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut pyo3::ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        let this = slf.get();
        if !this.writable && (flags & pyo3::ffi::PyBUF_WRITABLE) == pyo3::ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("buffer is read-only"));
        }
        // SAFETY: `view` is a valid Py_buffer to fill; the memory stays alive as long as
        // `view.obj` (this object) is referenced.
        unsafe {
            (*view).buf = this.data.as_ptr() as *mut c_void;
            (*view).len = this.data.len() as isize;
            (*view).readonly = if this.writable { 0 } else { 1 };
            (*view).itemsize = 1;
            (*view).format = if (flags & pyo3::ffi::PyBUF_FORMAT) == pyo3::ffi::PyBUF_FORMAT {
                CString::new("B").map_or(std::ptr::null_mut(), CString::into_raw)
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if (flags & pyo3::ffi::PyBUF_ND) == pyo3::ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if (flags & pyo3::ffi::PyBUF_STRIDES) == pyo3::ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
            (*view).obj = slf.into_any().into_ptr();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, view: *mut pyo3::ffi::Py_buffer) {
        // SAFETY: `format` was created by CString::into_raw in __getbuffer__ (or is null).
        unsafe {
            if !(*view).format.is_null() {
                drop(CString::from_raw((*view).format));
            }
        }
    }
}

type PyLeaves<'py> = (Vec<Bound<'py, PyAny>>, Option<String>, Bound<'py, PyDict>);

/// Converts a loaded state for Python: a list of leaves `(key, "tensor", dtype, shape,
/// buffer)` or `(key, "value", object)`, the structure JSON, and the info dict. `mapped`:
/// whether tensors are private mappings of local files, which may be handed out writable.
fn state_to_py<'py>(py: Python<'py>, state: State, info: &CheckpointInfo, mapped: bool) -> PyResult<PyLeaves<'py>> {
    let structure = state.structure().map(|s| s.to_string());
    let mut leaves = Vec::with_capacity(state.len());
    for (key, entry) in state.into_entries() {
        let leaf = match entry {
            Entry::Tensor(t) => {
                let (dtype, shape, data) = t.into_parts();
                let writable = mapped || data.is_unique();
                let buffer = Bound::new(py, TensorBuffer { data, writable })?;
                (key.as_str(), "tensor", dtype.name(), shape, buffer).into_pyobject(py)?.into_any()
            }
            Entry::Value(v) => (key.as_str(), "value", value_to_py(py, &v)?).into_pyobject(py)?.into_any(),
        };
        leaves.push(leaf);
    }
    Ok((leaves, structure, info_to_py(py, info)?))
}

fn info_to_py<'py>(py: Python<'py>, info: &CheckpointInfo) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("step", info.step)?;
    dict.set_item("created_unix_ms", info.created_unix_ms)?;
    dict.set_item("temporary", info.temporary)?;
    let metrics = PyDict::new(py);
    for (k, v) in &info.metrics {
        metrics.set_item(k, value_to_py(py, v)?)?;
    }
    dict.set_item("metrics", metrics)?;
    dict.set_item("metadata_json", info.metadata.to_string())?;
    dict.set_item("save_id", &info.save_id)?;
    dict.set_item("uri", &info.uri)?;
    dict.set_item("num_tensors", info.num_tensors)?;
    dict.set_item("tensor_bytes", info.tensor_bytes)?;
    Ok(dict)
}

fn metrics_from_py(metrics: Option<Vec<(String, Bound<'_, PyAny>)>>) -> PyResult<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for (name, value) in metrics.unwrap_or_default() {
        let value = if value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>() {
            Value::Int(value.extract()?)
        } else {
            Value::Float(
                value
                    .extract::<f64>()
                    .map_err(|_| InvalidArgumentError::new_err(format!("metric must be a number metric=`{name}`")))?,
            )
        };
        out.insert(name, value);
    }
    Ok(out)
}

fn metadata_from_json(metadata: Option<String>) -> PyResult<serde_json::Value> {
    metadata
        .map(|m| serde_json::from_str(&m))
        .transpose()
        .map(Option::unwrap_or_default)
        .map_err(|e| InvalidArgumentError::new_err(format!("metadata is not json-serializable: {e}")))
}

fn load_options(
    prefix: Option<Vec<String>>,
    keys: Option<Vec<String>>,
    rename: Option<Vec<(String, String)>>,
) -> PyResult<LoadOptions> {
    let mut opts = LoadOptions { prefixes: prefix.unwrap_or_default(), keys, ..Default::default() };
    for (pattern, replacement) in rename.unwrap_or_default() {
        opts.rename.push(RenameRule::new(&pattern, replacement).map_err(to_py_err)?);
    }
    Ok(opts)
}

/// Saves flattened leaves to `uri` (a run when `step` is given, else a checkpoint folder).
#[pyfunction]
#[pyo3(signature = (uri, tensors, values, structure=None, step=None, metrics=None, metadata=None, storage_options=None, rank=0, world_size=1, all_gather=None, timeout=600.0))]
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
) -> PyResult<Bound<'py, PyDict>> {
    guarded(|| {
        let state = state_from_py(tensors, values, structure, None)?;
        let opts = SaveOptions {
            step,
            metrics: metrics_from_py(metrics)?,
            metadata: metadata_from_json(metadata)?,
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
type SliceRequest = (Vec<u64>, Vec<u64>);

/// Calls a Python all-gather: `f(bytes) -> list[bytes]`, one entry per rank.
fn call_all_gather(f: &Py<PyAny>, payload: Vec<u8>) -> cairn::Result<Vec<Vec<u8>>> {
    Python::attach(|py| {
        let got = f.call1(py, (PyBytes::new(py, &payload),))?;
        got.extract::<Vec<Vec<u8>>>(py)
    })
    .map_err(|e| cairn::Error::new(ErrorKind::Unavailable, format!("all_gather callback failed: {e}")))
}

/// Loads `uri` (a checkpoint folder, or the latest or given `step` of a run).
#[pyfunction]
#[pyo3(signature = (uri, prefix=None, keys=None, rename=None, step=None, storage_options=None, slices=None))]
#[allow(clippy::too_many_arguments)]
fn load<'py>(
    py: Python<'py>,
    uri: &str,
    prefix: Option<Vec<String>>,
    keys: Option<Vec<String>>,
    rename: Option<Vec<(String, String)>>,
    step: Option<u64>,
    storage_options: Option<StoreOptions>,
    slices: Option<BTreeMap<String, SliceRequest>>,
) -> PyResult<PyLeaves<'py>> {
    guarded(|| {
        let mut opts = load_options(prefix, keys, rename)?;
        for (key, (offsets, shape)) in slices.unwrap_or_default() {
            opts = opts.with_slice(key, offsets, shape);
        }
        let (state, info, local) = py
            .detach(|| {
                let location = Location::with_options(uri, false, &storage_options.unwrap_or_default())?;
                let ckpt = match step {
                    Some(step) => Run::at(location).checkpoint(step)?,
                    None => cairn::open_at(location)?,
                };
                let local = ckpt.location().local_dir().is_some();
                Ok((ckpt.load(&opts)?, ckpt.info(), local))
            })
            .map_err(to_py_err)?;
        state_to_py(py, state, &info, local)
    })
}

/// The manager behind `cairn.CheckpointManager`.
#[pyclass(module = "cairn._cairn")]
struct Manager {
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
type PyState<'py> =
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
#[pyo3(signature = (uri, keep_last=None, keep_every=None, keep_best=None, metric=None, mode="min", grace=3600.0, dry_run=false, storage_options=None))]
#[allow(clippy::too_many_arguments)]
fn prune(
    py: Python<'_>,
    uri: &str,
    keep_last: Option<usize>,
    keep_every: Option<u64>,
    keep_best: Option<usize>,
    metric: Option<String>,
    mode: &str,
    grace: f64,
    dry_run: bool,
    storage_options: Option<StoreOptions>,
) -> PyResult<PruneTuple> {
    guarded(|| {
        let grace = seconds("grace", grace)?;
        let retention =
            Retention::from_flags(keep_last, keep_every, keep_best, metric, mode.parse().map_err(to_py_err)?)
                .map_err(to_py_err)?;
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
#[pyo3(signature = (src, dst, src_options=None, dst_options=None))]
fn copy<'py>(
    py: Python<'py>,
    src: &str,
    dst: &str,
    src_options: Option<StoreOptions>,
    dst_options: Option<StoreOptions>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    guarded(|| {
        let infos = py
            .detach(|| {
                let from = Location::with_options(src, false, &src_options.unwrap_or_default())?;
                let to = Location::with_options(dst, true, &dst_options.unwrap_or_default())?;
                match cairn::runtime::block_on(cairn::Checkpoint::open_at(from.clone())) {
                    Ok(ckpt) => Ok(vec![cairn::transfer::copy_checkpoint(&ckpt, &to)?]),
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        cairn::transfer::copy_run(&Run::at(from), &Run::at(to))
                    }
                    Err(e) => Err(e),
                }
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
fn as_directory(py: Python<'_>, uri: &str, cache_dir: std::path::PathBuf) -> PyResult<std::path::PathBuf> {
    guarded(|| py.detach(|| cairn::transfer::as_directory(uri, &cache_dir)).map_err(to_py_err))
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
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(list_checkpoints, m)?)?;
    m.add_function(wrap_pyfunction!(prune, m)?)?;
    m.add_function(wrap_pyfunction!(copy, m)?)?;
    m.add_function(wrap_pyfunction!(to_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(from_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(as_directory, m)?)?;
    m.add_function(wrap_pyfunction!(register_scheme, m)?)?;
    m.add_function(wrap_pyfunction!(unregister_scheme, m)?)?;
    m.add_class::<Manager>()?;
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
