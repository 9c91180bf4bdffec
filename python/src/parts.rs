//! What the framework integrations need beyond `save`/`load`: checkpoints whose ranks a
//! framework coordinates (`cairn.dcp`: each rank writes its part, the coordinator
//! commits the parts, `cairn::parts`), and removing a whole run (`cairn.lightning`).

use cairn::parts::{commit_parts as commit_all, write_part as write_one, Part};
use cairn::{Location, Run, SaveOptions, StoreOptions};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::convert::*;
use crate::errors::*;

/// Writes this rank's tensors and pieces, uncommitted, into the checkpoint folder `uri`
/// (or the `step` folder of the run `uri`); returns the part (bytes) to hand to the
/// coordinator.
#[pyfunction]
#[pyo3(signature = (uri, tensors, rank, step=None, storage_options=None))]
pub(crate) fn write_part<'py>(
    py: Python<'py>,
    uri: &str,
    tensors: Vec<TensorLeaf<'py>>,
    rank: u32,
    step: Option<u64>,
    storage_options: Option<StoreOptions>,
) -> PyResult<Bound<'py, PyBytes>> {
    guarded(|| {
        let state = state_from_py(tensors, Vec::new(), None, None)?;
        let opts = SaveOptions { step, ..Default::default() };
        let bytes = py
            .detach(|| {
                let location = Location::with_options(uri, true, &storage_options.unwrap_or_default())?;
                write_one(&location, &state, rank, &opts)?.to_bytes()
            })
            .map_err(to_py_err)?;
        Ok(PyBytes::new(py, &bytes))
    })
}

/// Commits what `write_part` wrote with the same `uri` and `step` from every rank's part,
/// with the coordinator's plain values and structure; returns its info.
#[pyfunction]
#[pyo3(signature = (uri, parts, values, structure, world_size, step=None, metadata=None, storage_options=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn commit_parts<'py>(
    py: Python<'py>,
    uri: &str,
    parts: Vec<Vec<u8>>,
    values: Vec<(String, Bound<'py, PyAny>)>,
    structure: Option<String>,
    world_size: u32,
    step: Option<u64>,
    metadata: Option<String>,
    storage_options: Option<StoreOptions>,
) -> PyResult<Bound<'py, PyDict>> {
    guarded(|| {
        let skeleton = state_from_py(Vec::new(), values, structure, None)?;
        let opts = SaveOptions { step, metadata: metadata_from_json(metadata)?, ..Default::default() };
        let info = py
            .detach(|| {
                let parts = parts
                    .iter()
                    .enumerate()
                    .map(|(i, bytes)| Part::from_bytes(bytes, &format!("part {i}")))
                    .collect::<cairn::Result<Vec<Part>>>()?;
                let location = Location::with_options(uri, true, &storage_options.unwrap_or_default())?;
                commit_all(&location, &skeleton, &opts, world_size, parts)
            })
            .map_err(to_py_err)?;
        info_to_py(py, &info)
    })
}

/// Removes the whole run at `uri`: every checkpoint (manifest first), what unfinished
/// saves left, and on local disk its folder once empty (`cairn::Run::remove`).
#[pyfunction]
#[pyo3(signature = (uri, storage_options=None))]
pub(crate) fn remove_run(py: Python<'_>, uri: &str, storage_options: Option<StoreOptions>) -> PyResult<()> {
    guarded(|| {
        py.detach(|| Run::at(Location::with_options(uri, false, &storage_options.unwrap_or_default())?).remove())
            .map_err(to_py_err)
    })
}
