"""Flattening nested training state (dicts, lists, tuples) into keyed leaves and back.

Leaves are arrays/tensors (stored in shards) and plain values (int, float, str, bool,
None, bytes; stored in the manifest). Keys are the path components joined with dots, as
in a torch `state_dict` (`model.layers.0.weight`). The nesting itself is recorded as a
small JSON structure so that dicts (with their key types and order), lists and tuples
come back exactly. Anything else is refused with an error naming its key: no pickle.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import _arrays, _cairn, _sharded, _staging
from ._cairn import CorruptCheckpointError, InvalidArgumentError

_PLAIN = (type(None), bool, int, float, str, bytes)


class Piece:
    """This rank's piece of a tensor sharded across ranks: `local` holds the elements of
    the box at `offsets` (one per dimension) of a tensor of `global_shape`. Save it with
    `cairn.save(..., rank=r, world_size=n)`; it loads back as part of the whole tensor."""

    __slots__ = ("local", "offsets", "global_shape")

    def __init__(self, local: Any, offsets: Sequence[int], global_shape: Sequence[int]) -> None:
        self.local = local
        self.offsets = [int(o) for o in offsets]
        self.global_shape = [int(d) for d in global_shape]

    def __repr__(self) -> str:
        return f"Piece(offsets={self.offsets}, global_shape={self.global_shape})"


class Shard(Piece):
    """Deprecated name of `Piece` (a shard is a file of pieces): kept so existing code
    runs, with a `DeprecationWarning`."""

    __slots__ = ()

    def __init__(self, local: Any, offsets: Sequence[int], global_shape: Sequence[int]) -> None:
        warnings.warn("cairn.Shard is now cairn.Piece", DeprecationWarning, stacklevel=2)
        super().__init__(local, offsets, global_shape)


class Leaves:
    """A state flattened for the native layer. When some tensors were on a device, every
    tensor was copied into `staging` (see `_staging`) and the tensors are views of it."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, str, list[int], Any, tuple[list[int], list[int]] | None]] = []
        self.values: list[tuple[str, Any]] = []
        self.structure: str | None = None
        self.staging: Any = None
        # Whether some leaf was a framework's sharded array (DTensor, ShardedTensor, jax).
        self.sharded = False
        self._keys: set[str] = set()
        # (key, array, piece) of each tensor leaf, converted once the whole state is known.
        self._arrays: list[tuple[str, Any, tuple[list[int], list[int]] | None]] = []

    def _claim(self, key: str) -> None:
        if key in self._keys:
            raise InvalidArgumentError(f"two entries flatten to the same key key=`{key}`")
        self._keys.add(key)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while a state is converted: conversion
    makes a few objects per tensor (none of them cyclic), and every 700 of them the
    collector ran, over all of them again: 40% of saving 100,000 small tensors."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def flatten(state: Any, casts: dict[str, Any] | None = None) -> Leaves:
    """Flattens `state` (a mapping, list/tuple, or a single leaf) into `Leaves`, its
    floating-point tensors cast as `casts` (from `_arrays.cast_plan`) says, if given,
    each on its own device."""
    with gc_paused():
        return _flatten_all(state, casts)


def _flatten_all(state: Any, casts: dict[str, Any] | None) -> Leaves:
    leaves = Leaves()
    node = _walk(state, (), lambda key, obj: _leaf(key, obj, leaves))
    leaves.structure = json.dumps(node, separators=(",", ":"))
    if casts:
        leaves._arrays = [
            (key, array if (to := _arrays.cast_for(casts, key)) is None else _arrays.cast_leaf(array, to), piece)
            for key, array, piece in leaves._arrays
        ]
    _convert(leaves)
    return leaves


def from_pieces(pieces: Sequence[tuple[str, Any, tuple[list[int], list[int]]]]) -> Leaves:
    """The leaves of `(key, array, (offsets, global_shape))` pieces that a framework
    already flattened and planned (`cairn.dcp`), checked as `flatten` checks a state."""
    leaves = Leaves()
    with gc_paused():
        for key, array, piece in pieces:
            _arrays.check_storable(key, array)
            leaves._arrays.append((key, array, piece))
        _convert(leaves)
    return leaves


def _convert(leaves: Leaves) -> None:
    """Converts the arrays of `leaves` for the native layer (staged to host first when
    some are on a device)."""
    items = [(key, array) for key, array, _ in leaves._arrays]
    if _staging.needed(array for _, array in items):
        leaves.staging, raws = _staging.stage(items)
    else:
        _arrays.prefetch(array for _, array in items)
        raws = [_arrays.to_raw(key, array) for key, array in items]
    leaves.tensors = [(key, dtype, shape, raw, piece) for (key, _, piece), (dtype, shape, raw) in zip(leaves._arrays, raws)]


def _key(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "_"


# Deepest nesting of dicts, lists and tuples saved: loading rebuilds it recursively, so
# saving refuses what loading could not rebuild (and commits nothing).
MAX_NESTING = 100


def _walk(obj: Any, path: tuple[str, ...], leaf: Callable[[str, Any], Any]) -> Any:
    """The structure node of `obj`, calling `leaf(key, obj)` for the node of each leaf."""
    if len(path) > MAX_NESTING and isinstance(obj, (dict, list, tuple)):
        raise InvalidArgumentError(f"state nested deeper than {MAX_NESTING} levels key=`{_key(path)}`")
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise InvalidArgumentError(
                    f"dict keys must be str or int, got `{type(k).__name__}` key=`{_key(path)}`"
                )
            # A plain array (most leaves of a state) goes to `leaf` without a call of
            # its own here.
            node = leaf(_key(path + (str(k),)), v) if type(v) is np.ndarray else _walk(v, path + (str(k),), leaf)
            items.append([k, node])
        return {"dict": items}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [_walk(v, path + (str(i),), leaf) for i, v in enumerate(obj)]}
    return leaf(_key(path), obj)


def _leaf(key: str, obj: Any, leaves: Leaves) -> Any:
    """Records the leaf `obj` under `key` in `leaves`; returns its structure node."""
    if type(obj) is np.ndarray:  # the common case, checked first
        leaves._claim(key)
        leaves._arrays.append((key, obj, None))
        return {"tensor": key}
    if isinstance(obj, Piece):
        leaves._claim(key)
        _arrays.check_storable(key, obj.local)
        leaves._arrays.append((key, obj.local, (obj.offsets, obj.global_shape)))
        return {"tensor": key}
    if _sharded.is_sharded(obj):
        leaves._claim(key)
        leaves.sharded = True
        for local, offsets, global_shape in _sharded.pieces(key, obj):
            _arrays.check_storable(key, local)
            leaves._arrays.append((key, local, (offsets, global_shape)))
        return {"tensor": key}
    if _arrays.is_array(obj):
        leaves._claim(key)
        if type(obj) is not np.ndarray:
            _arrays.check_storable(key, obj)
        leaves._arrays.append((key, obj, None))
        return {"tensor": key}
    if isinstance(obj, _PLAIN):
        leaves._claim(key)
        leaves.values.append((key, obj))
        return {"value": key}
    raise InvalidArgumentError(
        f"cannot store an object of type `{type(obj).__module__}.{type(obj).__qualname__}` key=`{key}`: "
        "cairn stores arrays, tensors and plain values (int, float, str, bool, None, bytes) "
        "in dicts, lists and tuples, and never pickles"
    )


def rebuild(target: Any, filled: dict[str, Any], path: tuple[str, ...] = ()) -> Any:
    """`target` with the leaf under each key replaced by `filled[key]`, walked as
    `flatten` walks a state, its containers rebuilt with their own types (dict subclasses,
    NamedTuples)."""
    if isinstance(target, dict):
        items = {k: rebuild(v, filled, path + (str(k),)) for k, v in target.items()}
        if type(target) is dict:
            return items
        out = copy.copy(target)
        out.clear()
        out.update(items)
        return out
    if isinstance(target, list):
        return [rebuild(v, filled, path + (str(i),)) for i, v in enumerate(target)]
    if isinstance(target, tuple):
        children = [rebuild(v, filled, path + (str(i),)) for i, v in enumerate(target)]
        if hasattr(target, "_fields"):
            return type(target)(*children)
        return tuple(children) if type(target) is tuple else type(target)(children)
    return filled[_key(path)]


def leaves_of(target: Any) -> dict[str, Any]:
    """The leaves of `target` by key, as they are (to load into; see `rebuild`)."""
    found: dict[str, Any] = {}

    def leaf(key: str, obj: Any) -> None:
        if key in found:
            raise InvalidArgumentError(f"two entries flatten to the same key key=`{key}`")
        found[key] = obj

    with gc_paused():
        _walk(target, (), leaf)
    return found


def unflatten(structure: str | None, leaves: dict[str, Any], checkpoint: str = "") -> Any:
    """Rebuilds the nested state from `leaves` (key -> loaded leaf). Leaves absent from
    `leaves` (not selected) are dropped with their empty containers; without a structure
    (a checkpoint written by another frontend) the flat dict is returned. A structure
    that is not what `flatten` writes raises CorruptCheckpointError naming `checkpoint`."""
    if structure is None:
        return dict(leaves)
    # Read natively (100,000 leaves in a fraction of the time); what that parser does
    # not read (too deep, say) is read below, which also says what is malformed.
    parsed, built = _cairn.unflatten(structure, leaves)
    if parsed:
        return built
    try:
        node = json.loads(structure)
        built = _unflatten(node, leaves)
        if built is not _MISSING:
            return built
        return {"dict": {}, "list": [], "tuple": ()}.get(next(iter(node)), None)
    except (TypeError, AttributeError, StopIteration, KeyError, IndexError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"the manifest's structure is malformed ({type(e).__name__}) checkpoint=`{checkpoint}`"
        ) from None


_MISSING = object()


def _unflatten(node: Any, leaves: dict[str, Any]) -> Any:
    key = node.get("tensor")  # leaves first: most nodes are
    if key is not None:
        return leaves.get(key, _MISSING)
    if "dict" in node:
        out = {}
        for k, child in node["dict"]:
            # A tensor child is looked up here, without a call (most children are).
            leaf = child.get("tensor")
            value = leaves.get(leaf, _MISSING) if leaf is not None else _unflatten(child, leaves)
            if value is not _MISSING:
                out[k] = value
        return out if out or not node["dict"] else _MISSING
    for kind, ctor in (("list", list), ("tuple", tuple)):
        if kind in node:
            items = [_unflatten(child, leaves) for child in node[kind]]
            kept = [v for v in items if v is not _MISSING]
            if node[kind] and not kept:
                return _MISSING
            return ctor(kept)
    key = node.get("tensor", node.get("value"))
    return leaves.get(key, _MISSING)
