"""`load_state_dict`: put loaded tensors into a torch module or a dict, with a report of
missing keys, unexpected keys and shape/dtype mismatches (like torch's, plus dtypes)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import _arrays
from ._errors import CheckpointError


@dataclass(frozen=True)
class Mismatch:
    """A key present on both sides whose shape or dtype differs."""

    key: str
    expected_shape: tuple[int, ...]
    expected_dtype: str
    got_shape: tuple[int, ...]
    got_dtype: str


@dataclass(frozen=True)
class LoadReport:
    """What `load_state_dict` found. `ok` when nothing is missing, unexpected or mismatched."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched)

    def __str__(self) -> str:
        parts = []
        if self.missing_keys:
            parts.append("missing keys: " + ", ".join(f"`{k}`" for k in self.missing_keys))
        if self.unexpected_keys:
            parts.append("unexpected keys: " + ", ".join(f"`{k}`" for k in self.unexpected_keys))
        for m in self.mismatched:
            parts.append(
                f"mismatch key=`{m.key}`: expected {m.expected_dtype}{list(m.expected_shape)}, "
                f"got {m.got_dtype}{list(m.got_shape)}"
            )
        return "; ".join(parts) or "all keys match"


class StateDictMismatchError(CheckpointError):
    """`load_state_dict(..., strict=True)` found missing, unexpected or mismatched keys.
    Nothing was copied. The report is in `.report`."""

    def __init__(self, report: LoadReport) -> None:
        super().__init__(f"state dict does not match: {report}")
        self.report = report


def _flat(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for k, v in state.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(_flat(v, key + "."))
            else:
                out[key] = v
        return out
    raise TypeError(f"state must be a dict, got `{type(state).__name__}`")


def _describe(value: Any) -> tuple[tuple[int, ...], str]:
    torch = _arrays._torch()
    if torch is not None and isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")
    arr = np.asarray(value)
    return tuple(arr.shape), str(arr.dtype)


def load_state_dict(
    target: Any,
    state: Any,
    *,
    strict: bool = False,
    revise_keys: Sequence[tuple[str, str]] = ((r"^module\.", ""),),
) -> LoadReport:
    """Copies the tensors of `state` into `target` (a torch `nn.Module` or a dict of arrays)
    after renaming keys with `revise_keys` (regex, replacement). Keys whose shape or dtype
    differ are reported and not copied. With `strict=True` any difference raises
    `StateDictMismatchError` before anything is copied."""
    incoming: dict[str, Any] = {}
    for key, value in _flat(state).items():
        for pattern, replacement in revise_keys:
            key = re.sub(pattern, replacement, key)
        incoming[key] = value

    torch = _arrays._torch()
    is_module = torch is not None and isinstance(target, torch.nn.Module)
    expected = target.state_dict() if is_module else _flat(target)

    missing = [k for k in expected if k not in incoming]
    unexpected = [k for k in incoming if k not in expected]
    mismatched = []
    for key in expected:
        if key not in incoming:
            continue
        want, got = _describe(expected[key]), _describe(_as_target_kind(incoming[key], is_module))
        if want != got:
            mismatched.append(Mismatch(key, want[0], want[1], got[0], got[1]))
    report = LoadReport(missing, unexpected, mismatched)
    if strict and not report.ok:
        raise StateDictMismatchError(report)

    bad = {m.key for m in mismatched}
    matched = {k: _as_target_kind(incoming[k], is_module) for k in expected if k in incoming and k not in bad}
    if is_module:
        with torch.no_grad():
            for key, value in matched.items():
                expected[key].copy_(value)
    else:
        _assign(target, matched)
    return report


def _as_target_kind(value: Any, is_module: bool) -> Any:
    if is_module:
        torch = _arrays._torch()
        if isinstance(value, torch.Tensor):
            return value
        return _arrays.to_framework(np.asarray(value), "torch")
    return value


def _slots(target: dict, prefix: str = "") -> dict[str, tuple[dict, Any]]:
    """Flat key -> (the dict holding the leaf, its key there), for assigning in place."""
    out: dict[str, tuple[dict, Any]] = {}
    for k, v in target.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_slots(v, key + "."))
        else:
            out[key] = (target, k)
    return out


def _assign(target: dict, flat: dict[str, Any]) -> None:
    slots = _slots(target)
    for key, value in flat.items():
        holder, k = slots[key]
        if isinstance(holder[k], np.ndarray) and holder[k].flags.writeable:
            holder[k][...] = value
        else:
            holder[k] = value
