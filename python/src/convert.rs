//! Moving states, values and infos between Python and Rust without copies: borrowed
//! buffers in, exported buffers out, staging buffers for device tensors.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void, CString};

use bytes::Bytes;
use cairn::policy::{KeepBest, Retention};
use cairn::{CheckpointInfo, DType, Entry, LoadOptions, Piece, RenameRule, State, Tensor, Value};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyBufferError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::errors::*;

/// Keeps a Python buffer alive while Rust reads it (no copy).
pub(crate) struct BorrowedBuffer(PyBuffer<u8>);

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
pub(crate) fn byte_buffer(obj: &Bound<'_, PyAny>, key: &str) -> PyResult<PyBuffer<u8>> {
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
pub(crate) struct Staging {
    /// Each buffer's start address and bytes.
    buffers: Vec<(usize, Bytes)>,
}

impl Staging {
    pub(crate) fn new(objs: &[Bound<'_, PyAny>]) -> PyResult<Staging> {
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
pub(crate) fn tensor_from_py(
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
/// global_shape)` for a piece of a sharded tensor.
pub(crate) type TensorLeaf<'py> = (String, String, Vec<u64>, Bound<'py, PyAny>, Option<(Vec<u64>, Vec<u64>)>);

/// Builds the Rust state from Python's flattened leaves; with `staging`, every tensor must
/// lie inside one of its buffers.
pub(crate) fn state_from_py(
    tensors: Vec<TensorLeaf<'_>>,
    values: Vec<(String, Bound<'_, PyAny>)>,
    structure: Option<String>,
    staging: Option<&Staging>,
) -> PyResult<State> {
    let mut state = State::new();
    for (key, dtype, shape, array, piece) in tensors {
        let tensor = tensor_from_py(&key, &dtype, shape, &array, staging)?;
        match piece {
            None => state.insert_tensor(key, tensor),
            Some((offsets, global_shape)) => state.insert_piece(key, Piece { tensor, offsets, global_shape }),
        }
    }
    for (key, value) in values {
        let value = value_from_py(&value, &key)?;
        state.insert_value(key, value);
    }
    state.set_structure(structure);
    Ok(state)
}

pub(crate) fn value_from_py(obj: &Bound<'_, PyAny>, key: &str) -> PyResult<Value> {
    if obj.is_none() {
        Ok(Value::Null)
    } else if let Ok(b) = obj.cast::<PyBool>() {
        Ok(Value::Bool(b.is_true()))
    } else if obj.is_instance_of::<PyInt>() {
        if let Ok(small) = obj.extract::<i64>() {
            return Ok(Value::Int(small));
        }
        // Wider ints (numpy's PCG64 state) exactly, as their decimal text.
        let text = obj.str().and_then(|t| Ok(t.to_str()?.to_string())).map_err(|e| {
            InvalidArgumentError::new_err(format!("cannot store an integer of this size key=`{key}`: {e}"))
        })?;
        Value::int(&text).ok_or_else(|| {
            InvalidArgumentError::new_err(format!(
                "an integer of {} digits is over the limit of {} key=`{key}`",
                text.trim_start_matches('-').len(),
                cairn::state::MAX_BIG_INT_DIGITS
            ))
        })
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

pub(crate) fn value_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::BigInt(text) => py.get_type::<PyInt>().call1((text.as_str(),))?,
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
pub(crate) struct TensorBuffer {
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

pub(crate) type PyLeaves<'py> = (Bound<'py, PyAny>, Option<String>, Bound<'py, PyDict>);

/// How a load's tensors reach Python: numpy's `ndarray` type and its dtypes by Cairn's
/// dtype names (`_arrays.NUMPY_DTYPES`), when the caller wants numpy arrays as loaded.
pub(crate) type Arrays<'py> = (Bound<'py, PyAny>, Bound<'py, PyDict>);

/// Converts a loaded state for Python: the leaves, the structure JSON, and the info dict.
/// The leaves are a list of `(key, "tensor", dtype, shape, buffer)` and `(key, "value",
/// object)`; with `arrays`, a dict of key -> numpy array (over the buffer, or a copy
/// when it is read-only) or value. `mapped`: whether tensors are private mappings of
/// local files, which may be handed out writable.
pub(crate) fn state_to_py<'py>(
    py: Python<'py>,
    state: State,
    info: &CheckpointInfo,
    mapped: bool,
    arrays: Option<Arrays<'py>>,
) -> PyResult<PyLeaves<'py>> {
    let structure = state.structure().map(|s| s.to_string());
    if let Some((ndarray, dtypes)) = arrays {
        let out = PyDict::new(py);
        for (key, entry) in state.into_entries() {
            let leaf = match entry {
                Entry::Tensor(t) => {
                    let (dtype, shape, buffer) = exported(py, t, mapped)?;
                    let writable = buffer.get().writable;
                    let dtype = dtypes.get_item(dtype.name())?.ok_or_else(|| {
                        InvalidArgumentError::new_err(format!("no numpy dtype for {} key=`{key}`", dtype.name()))
                    })?;
                    let array = ndarray.call1((PyTuple::new(py, shape)?, dtype, buffer))?;
                    match writable {
                        true => array,
                        false => array.call_method0("copy")?,
                    }
                }
                Entry::Value(v) => value_to_py(py, &v)?,
            };
            out.set_item(key, leaf)?;
        }
        return Ok((out.into_any(), structure, info_to_py(py, info)?));
    }
    let mut leaves = Vec::with_capacity(state.len());
    for (key, entry) in state.into_entries() {
        let leaf = match entry {
            Entry::Tensor(t) => {
                let (dtype, shape, buffer) = exported(py, t, mapped)?;
                (key.as_str(), "tensor", dtype.name(), shape, buffer).into_pyobject(py)?.into_any()
            }
            Entry::Value(v) => (key.as_str(), "value", value_to_py(py, &v)?).into_pyobject(py)?.into_any(),
        };
        leaves.push(leaf);
    }
    Ok((PyList::new(py, leaves)?.into_any(), structure, info_to_py(py, info)?))
}

/// A loaded tensor's dtype, shape and its data as a buffer for Python: writable when
/// `mapped` (a private mapping of a local file) or when the buffer is its data's only
/// owner, read-only otherwise.
fn exported<'py>(
    py: Python<'py>,
    tensor: Tensor,
    mapped: bool,
) -> PyResult<(DType, Vec<u64>, Bound<'py, TensorBuffer>)> {
    let (dtype, shape, data) = tensor.into_parts();
    let writable = mapped || data.is_unique();
    Ok((dtype, shape, Bound::new(py, TensorBuffer { data, writable })?))
}

pub(crate) fn info_to_py<'py>(py: Python<'py>, info: &CheckpointInfo) -> PyResult<Bound<'py, PyDict>> {
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
    dict.set_item("written_bytes", info.written_bytes)?;
    let timings = PyDict::new(py);
    if let Some(t) = info.timings {
        if let Some(snapshot) = t.snapshot_ms {
            timings.set_item("snapshot", snapshot as f64 / 1000.0)?;
        }
        timings.set_item("write", t.write_ms as f64 / 1000.0)?;
    }
    dict.set_item("timings", timings)?;
    Ok(dict)
}

pub(crate) fn metrics_from_py(metrics: Option<Vec<(String, Bound<'_, PyAny>)>>) -> PyResult<BTreeMap<String, Value>> {
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

pub(crate) fn metadata_from_json(metadata: Option<String>) -> PyResult<serde_json::Value> {
    metadata
        .map(|m| serde_json::from_str(&m))
        .transpose()
        .map(Option::unwrap_or_default)
        .map_err(|e| InvalidArgumentError::new_err(format!("metadata is not json-serializable: {e}")))
}

pub(crate) fn load_options(
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

/// The retention Python's `KeepLast`, `KeepEvery` and `KeepBest` describe, with keep-best
/// as `(count, metric, mode)`.
pub(crate) fn retention(
    keep_last: Option<usize>,
    keep_every: Option<u64>,
    keep_best: Option<(usize, String, String)>,
) -> PyResult<Retention> {
    let keep_best = keep_best
        .map(|(count, metric, mode)| Ok::<_, PyErr>(KeepBest { count, metric, mode: mode.parse().map_err(to_py_err)? }))
        .transpose()?;
    Ok(Retention { keep_last, keep_every, keep_best })
}

/// A Python progress callback, `progress(stage, bytes)`, told in steps of at least
/// [`Told::STEP`] bytes (and at each change of stage), so that a copy of many small
/// chunks takes the GIL a few hundred times, not once per chunk. A callback that raises
/// is not called again.
pub(crate) struct Told {
    callback: Py<PyAny>,
    pending: std::sync::Mutex<Option<(cairn::progress::Stage, u64)>>,
    broken: std::sync::atomic::AtomicBool,
}

impl Told {
    const STEP: u64 = 8 << 20;

    pub(crate) fn new(callback: Py<PyAny>) -> Told {
        Told { callback, pending: std::sync::Mutex::new(None), broken: std::sync::atomic::AtomicBool::new(false) }
    }

    /// `bytes` more done in `stage`.
    pub(crate) fn advance(&self, stage: cairn::progress::Stage, bytes: u64) {
        let due = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.as_mut() {
                Some((now, sum)) if *now == stage => {
                    *sum += bytes;
                    (*sum >= Self::STEP).then(|| pending.take()).flatten()
                }
                _ => pending.replace((stage, bytes)),
            }
        };
        if let Some((stage, sum)) = due {
            self.call(stage, sum);
        }
    }

    /// A progress callback telling `told`, if there is one.
    pub(crate) fn tell(told: &Option<Told>) -> impl Fn(cairn::progress::Stage, u64) + Sync + '_ {
        move |stage, bytes| {
            if let Some(told) = told {
                told.advance(stage, bytes);
            }
        }
    }

    /// Tells what is still pending.
    pub(crate) fn flush(&self) {
        let due = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((stage, sum)) = due {
            self.call(stage, sum);
        }
    }

    fn call(&self, stage: cairn::progress::Stage, bytes: u64) {
        if bytes == 0 || self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        Python::attach(|py| {
            if let Err(err) = self.callback.call1(py, (stage.name(), bytes)) {
                self.broken.store(true, std::sync::atomic::Ordering::Relaxed);
                err.print(py);
            }
        });
    }
}
