"""Cairn as an Orbax checkpoint handler: a Cairn item inside an `ocp.CheckpointManager`.

```python
import orbax.checkpoint as ocp
import cairn.orbax

mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=3))
mngr.save(step, args=ocp.args.Composite(state=cairn.orbax.Save(state)))
restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=cairn.orbax.Restore(abstract_state)))
```

The item is any jax pytree (Flax NNX `State`, optax states, dicts, NamedTuples, ...): its
leaves are stored under their pytree paths (`model.l1.kernel.value`) as a Cairn
checkpoint in the item's folder, checksummed, committed by its manifest, readable by
`cairn.load`. Restored into a target (arrays or abstract `jax.ShapeDtypeStruct`s with
their shardings), it comes back with the target's pytree types, each process reading only
the boxes its devices hold; without one, as nested dicts. Orbax keeps deciding steps,
retention and where the item lives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import orbax.checkpoint as ocp

from . import _api, _arrays
from ._cairn import InvalidArgumentError
from ._cairn import open as _open

__all__ = ["CheckpointHandler", "Save", "Restore"]


class CheckpointHandler(ocp.CheckpointHandler):
    """Saves and restores a pytree item as a Cairn checkpoint."""

    def save(self, directory: Any, args: "Save") -> None:
        _api.save(str(directory), _nested(args.item))

    def restore(self, directory: Any, args: "Restore | None" = None) -> Any:
        if args is None or args.item is None:
            return _api.load(str(directory), framework="jax")
        paths, treedef = jax.tree_util.tree_flatten_with_path(args.item)
        loaded = _api.load(str(directory), target=_nested(args.item), step=None)
        return jax.tree_util.tree_unflatten(treedef, [_at(loaded, path) for path, _ in paths])

    def metadata(self, directory: Any) -> dict[str, jax.ShapeDtypeStruct]:
        """Every tensor of the item by its Cairn key, as a `jax.ShapeDtypeStruct`."""
        tensors, _, _ = _open(str(directory)).describe(None)
        return {key: jax.ShapeDtypeStruct(tuple(shape), _arrays.NUMPY_DTYPES[dtype]) for key, dtype, shape in tensors}


@ocp.args.register_with_handler(CheckpointHandler, for_save=True)
@dataclasses.dataclass
class Save(ocp.args.CheckpointArgs):
    """Saves `item` (a jax pytree) with `cairn.orbax.CheckpointHandler`."""

    item: Any


@ocp.args.register_with_handler(CheckpointHandler, for_restore=True)
@dataclasses.dataclass
class Restore(ocp.args.CheckpointArgs):
    """Restores with `cairn.orbax.CheckpointHandler`: into `item` (arrays or abstract
    `jax.ShapeDtypeStruct`s, its pytree types kept), or as nested dicts without one."""

    item: Any = None


def _name(key: Any) -> str:
    """One pytree path entry as a key part."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise InvalidArgumentError(f"unsupported pytree path entry `{key!r}`")


def _nested(tree: Any) -> dict[str, Any]:
    """The leaves of the pytree `tree` as nested dicts keyed by their path entries."""
    root: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not path:
            raise InvalidArgumentError("the item is a single leaf: save a dict or another pytree")
        node = root
        for key in path[:-1]:
            node = node.setdefault(_name(key), {})
        node[_name(path[-1])] = leaf
    return root


def _at(nested: dict[str, Any], path: tuple) -> Any:
    """The leaf of `nested` at the pytree path `path`."""
    node: Any = nested
    for key in path:
        node = node[_name(key)]
    return node
