"""Cairn as a storage backend of torch Distributed Checkpoint (DCP).

`torch.distributed.checkpoint.save(state, storage_writer=cairn.dcp.Writer(path))` writes
a Cairn checkpoint: DCP plans which rank writes which box of which tensor (each box once),
every rank writes its boxes as checksummed safetensors shards, and the coordinator
commits the manifest last, once every rank's data is durable; what DCP reports as saved
is committed, a save that failed on any rank is not visible. The checkpoint is an
ordinary Cairn one: `cairn.load`, `cairn verify`, `cairn ls`, retention and every store
Cairn opens (local disk, `s3://`, `gs://`, `az://`, ...) work on it.
`torch.distributed.checkpoint.load(state, storage_reader=cairn.dcp.Reader(path))` fills
`state` in place on any number of ranks (each reading only the boxes it needs, every
checksum verified), from a checkpoint written this way or by `cairn.save`.

Plain values (an epoch, a learning-rate schedule's state, an optimizer's `param_groups`)
go into the manifest as JSON, never pickled: anything else is refused naming its key.
DCP's default planners pickle them in memory on the way (the writer reads back only what
this process just pickled, with `torch.load(weights_only=True)`, so only plain values
pass); `SavePlanner` and `LoadPlanner` hand them over as they are.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import (
    BytesStorageMetadata,
    DefaultLoadPlanner,
    DefaultSavePlanner,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import _api, _arrays, _tree
from ._api import CheckpointInfo
from ._cairn import InvalidArgumentError
from ._cairn import commit_parts as _commit_parts
from ._cairn import open as _open
from ._cairn import write_part as _write_part

__all__ = ["Writer", "Reader", "SavePlanner", "LoadPlanner"]


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner, except that plain values reach the writer as they
    are, not pickled."""

    def transform_object(self, write_item: Any, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return object
        return super().transform_object(write_item, object)


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that plain values are set as they are, never
    unpickled."""

    def load_value(self, read_item: Any, value: Any) -> None:
        """Puts the plain value of `read_item` into the state being loaded."""
        from torch.distributed.checkpoint._traverse import set_element

        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value


class _Where:
    """Where a `Writer` or `Reader` works: `path` (replaced by a `checkpoint_id` given to
    `dcp.save` / `dcp.load`), `step`, and the store's `storage_options`."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        step: int | None = None,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.step = step
        self.storage_options = storage_options

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = checkpoint_id

    def _uri(self) -> str:
        if self.path is None:
            raise InvalidArgumentError(f"cairn.dcp.{type(self).__name__} needs a path (or a checkpoint_id)")
        return _api._uri(self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


class Writer(_Where, StorageWriter):
    """Writes a DCP save as a Cairn checkpoint: into the folder `path` (a `checkpoint_id`
    passed to `dcp.save` replaces it), or with `step` into that step's folder of the run
    `path`. `storage_options` are the store's settings, as for `cairn.save`."""

    _rank = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._uri()  # a path is given
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if kwargs.get("use_collectives") is False and world > 1:
            # Each rank would then commit alone, a checkpoint holding only its own part.
            raise InvalidArgumentError(
                "cairn.dcp.Writer needs dcp.save's collectives in a job of several ranks "
                "(use_collectives=False would commit each rank's part alone)"
            )
        rank = kwargs.get("rank")
        if rank is None:
            rank = dist.get_rank() if world > 1 else 0
        self._rank = int(rank)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: Any) -> Future[list[WriteResult]]:
        pieces: list[tuple[str, Any, tuple[list[int], list[int]]]] = []
        results: list[WriteResult] = []
        for item in plan.items:
            fqn = item.index.fqn
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                value = _plain(fqn, data)
                results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=("value", value)))
                continue
            tensor = data.detach()
            chunk = item.tensor_data.chunk
            pieces.append((fqn, tensor, ([int(o) for o in chunk.offsets], [int(d) for d in item.tensor_data.size])))
            results.append(
                WriteResult(index=item.index, size_in_bytes=tensor.numel() * tensor.element_size(), storage_data=None)
            )
        if pieces:
            leaves = _tree.from_pieces(pieces)
            part = _write_part(self._uri(), leaves.tensors, self._rank, self.step, self.storage_options)
            del leaves
            results.append(WriteResult(index=MetadataIndex(_PART), size_in_bytes=0, storage_data=("part", part)))
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        parts: list[bytes] = []
        values: dict[str, Any] = {}
        written: set[str] = set()
        for rank_results in results:
            for result in rank_results:
                if result.storage_data is None:
                    written.add(result.index.fqn)
                    continue
                kind, payload = result.storage_data
                if kind == "part":
                    parts.append(payload)
                else:
                    values[result.index.fqn] = payload
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and fqn not in written:
                raise InvalidArgumentError(f"no rank wrote the tensor key=`{fqn}`; nothing was committed")
        mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
        root: dict[Any, Any] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata) and fqn not in values:
                raise InvalidArgumentError(f"no rank wrote the value key=`{fqn}`; nothing was committed")
            _set(root, tuple(mappings.get(fqn, (fqn,))), values[fqn] if fqn in values else _TENSOR)
        plain: list[tuple[str, Any]] = []
        keys: set[str] = set()

        def leaf(key: str, obj: Any) -> Any:
            if key in keys:
                # e.g. a tuple `t` (kept whole by DCP, its items `t.0`, ...) beside a key `t.0`
                raise InvalidArgumentError(f"two entries flatten to the same key key=`{key}`; nothing was committed")
            keys.add(key)
            if obj is _TENSOR:
                return {"tensor": key}
            plain.append((key, obj))
            return {"value": key}

        structure = json.dumps(_tree._walk(root, (), leaf), separators=(",", ":"))
        info = _commit_parts(
            self._uri(), parts, plain, structure, len(results), self.step, None, self.storage_options
        )
        self.info = CheckpointInfo._from_native(info)


class Reader(_Where, StorageReader):
    """Reads a Cairn checkpoint into a DCP load: the checkpoint folder `path` (a
    `checkpoint_id` passed to `dcp.load` replaces it), or the latest (or `step`)
    checkpoint of the run `path`. Pass the same `step` on every rank of a job."""

    _opened: Any = None
    _chosen: tuple[int, str] | None = None
    _nodes: dict[str, Any]  # set by read_metadata

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self._opened = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self._opened = _open(self._uri(), self.step, self.storage_options)
        self._chosen = _identity(self._opened)
        tensors, value_keys, structure = self._opened.describe(_api._own_rank(None))
        shapes = {key: (dtype, shape) for key, dtype, shape in tensors}
        if structure is None:
            node: Any = {"dict": [[k, {"tensor": k}] for k in shapes] + [[k, {"value": k}] for k in value_keys]}
        else:
            node = json.loads(structure)
        found: dict[str, Any] = {}
        mappings: dict[str, tuple] = {}
        self._nodes = {}
        for path, sub in _dcp_items(node, ()):
            fqn = ".".join(map(str, path))
            mappings[fqn] = path
            key = sub.get("tensor") if isinstance(sub, dict) else None
            if key is not None and key in shapes:
                dtype, shape = shapes[key]
                found[fqn] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=_arrays.torch_dtype(dtype)),
                    size=torch.Size(shape),
                    # Any box of a Cairn tensor is read from the pieces it overlaps: DCP
                    # sees each tensor as one chunk and asks for the boxes it needs.
                    chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=torch.Size(shape))],
                )
            else:
                found[fqn] = BytesStorageMetadata()
                self._nodes[fqn] = sub
        return Metadata(state_dict_metadata=found, planner_data=mappings)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        # Every rank reads the checkpoint the coordinator opened (a run's latest may
        # change while the ranks open it).
        return [dataclasses.replace(plan, storage_data=self._chosen) for plan in plans]

    def read_data(self, plan: LoadPlan, planner: Any) -> Future[None]:
        rank = _api._own_rank(None)
        if plan.storage_data is not None and plan.storage_data != self._chosen:
            step, save_id = plan.storage_data
            self._opened = _open(self._uri(), step, self.storage_options)
            if _identity(self._opened) != plan.storage_data:
                raise InvalidArgumentError(
                    f"the checkpoint the coordinator loads (step {step}) is gone or was replaced path=`{self.path}`"
                )
            self._chosen = plan.storage_data
        boxes: dict[str, list[Any]] = {}
        values: list[Any] = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                values.append(item)
            else:
                boxes.setdefault(item.storage_index.fqn, []).append(item)
        if values:
            self._read_values(values, planner, rank)
        # One read per round: the i-th box of every tensor (a rank may need several
        # boxes of one tensor).
        while boxes:
            batch = {fqn: items.pop(0) for fqn, items in boxes.items()}
            boxes = {fqn: items for fqn, items in boxes.items() if items}
            requests = {}
            for fqn, item in batch.items():
                base = item.storage_index.offset or [0] * len(item.lengths)
                offsets = [int(a) + int(b) for a, b in zip(base, item.storage_offsets)]
                requests[fqn] = (offsets, [int(n) for n in item.lengths])
            native = self._opened.load(None, list(batch), None, requests, None, rank)
            got = _api._raw(native)
            for fqn, item in batch.items():
                loaded = _arrays.torch_source(got[fqn])
                target = planner.resolve_tensor(item)
                if target.shape != loaded.shape:
                    raise InvalidArgumentError(
                        f"read a box of shape {tuple(loaded.shape)} for one of {tuple(target.shape)} key=`{fqn}`"
                    )
                target.copy_(loaded)
                planner.commit_tensor(item, target)
            del native, got
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_values(self, items: list[Any], planner: Any, rank: int | None) -> None:
        """Hands each plain value (or subtree of them) to the planner: as it is to a
        `LoadPlanner`, else as the bytes DCP's planners read (pickled here, from the
        manifest's JSON: nothing stored is ever unpickled)."""
        keys: list[str] = []
        for item in items:
            keys.extend(_leaf_keys(self._nodes[item.storage_index.fqn]))
        got = _api._raw(self._opened.load(None, keys, None, None, None, rank))
        got = {k: _arrays.to_framework(v, "torch") if isinstance(v, np.ndarray) else v for k, v in got.items()}
        for item in items:
            value = _tree._unflatten(self._nodes[item.storage_index.fqn], got)
            if isinstance(planner, LoadPlanner):
                planner.load_value(item, value)
            else:
                buffer = io.BytesIO()
                torch.save(value, buffer)
                buffer.seek(0)
                planner.load_bytes(item, buffer)


# The index of the result that carries a rank's written part (not a state key).
_PART = "\0cairn-part"


class _Tensor:
    """Marks where a tensor lies in the structure the coordinator builds."""


_TENSOR = _Tensor()


def _identity(opened: Any) -> tuple[int, str]:
    """The step and save id of an opened checkpoint."""
    info = opened.load(None, [], None, None, None, None)[2]
    return int(info["step"]), str(info["save_id"])


def _plain(fqn: str, data: Any) -> Any:
    """The plain value DCP handed over for `fqn` (as it is, or pickled in memory by one of
    DCP's own planners); refused, naming the key, unless it is nested dicts, lists and
    tuples of int, float, str, bool, None and bytes."""
    if isinstance(data, io.BytesIO):
        data.seek(0)
        try:
            data = torch.load(data, weights_only=True)
        except Exception as e:
            raise InvalidArgumentError(
                f"cannot store key=`{fqn}` without pickle ({type(e).__name__}): cairn keeps plain values "
                "(int, float, str, bool, None, bytes in dicts, lists and tuples) and tensors"
            ) from None

    def leaf(key: str, obj: Any) -> Any:
        if not isinstance(obj, _tree._PLAIN):
            where = f"{fqn}.{key}" if key != "_" else fqn
            raise InvalidArgumentError(
                f"cannot store an object of type `{type(obj).__module__}.{type(obj).__qualname__}` key=`{where}`: "
                "cairn keeps plain values (int, float, str, bool, None, bytes in dicts, lists and tuples) "
                "and tensors, and never pickles"
            )

    _tree._walk(data, (), leaf)
    return data


def _set(root: dict, path: tuple, value: Any) -> None:
    """Puts `value` at `path` in `root`, making dicts (str steps) and lists (int steps,
    padded with None) on the way, as DCP unflattens."""
    node: Any = root
    for step, after in zip(path, path[1:] + (None,)):
        if after is None:
            child_default: Any = None
        else:
            child_default = [] if isinstance(after, int) else {}
        if isinstance(node, list):
            node.extend([None] * (step + 1 - len(node)))
            if after is None:
                node[step] = value
            elif node[step] is None:
                node[step] = child_default
            node = node[step]
        else:
            if after is None:
                node[step] = value
            else:
                node = node.setdefault(step, child_default)


def _dcp_items(node: Any, path: tuple) -> Any:
    """The items DCP flattens a state into, walking a Cairn structure node as DCP walks a
    state: `(path, node)` for each tensor and for each value or container DCP keeps
    whole (a tuple, or a list holding neither tensors nor containers that do)."""
    if "dict" in node:
        for k, child in node["dict"]:
            yield from _dcp_items(child, path + (str(k),))
    elif "list" in node and not _terminal(node):
        for i, child in enumerate(node["list"]):
            yield from _dcp_items(child, path + (i,))
    else:
        yield path, node


def _leaf_keys(node: Any) -> list[str]:
    """The keys of the leaves under the structure node `node`."""
    if "tensor" in node or "value" in node:
        return [node.get("tensor", node.get("value"))]
    children = node.get("dict") or []
    children = [child for _, child in children] if "dict" in node else node.get("list", node.get("tuple", []))
    return [key for child in children for key in _leaf_keys(child)]


def _terminal(node: Any) -> bool:
    """Whether DCP keeps the list `node` whole: it holds no tensor, and no dict or list
    that DCP would walk into."""
    for child in node["list"]:
        if "tensor" in child or "dict" in child or ("list" in child and not _terminal(child)):
            return False
    return True
