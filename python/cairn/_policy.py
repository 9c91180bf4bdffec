"""When to save and what to keep, as objects that mirror `cairn::policy` in Rust.

    CheckpointManager(run, policies=[Every(500, until=5000), Every(1000)],
                      keep=[KeepLast(3), KeepEvery(10_000), KeepBest(2, "loss", "min")])

A checkpoint is kept if any rule keeps it (every one is kept when there is no rule); the
latest is never deleted. The defaults are Rust's: the save rules above, no retention.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence, Union

from ._cairn import InvalidArgumentError


@dataclass(frozen=True)
class Every:
    """Save every `interval` steps, up to and including step `until` (forever if None).

    `[Every(500, until=5000), Every(1000)]` saves every 500 steps until 5,000, then every
    1,000 (the default)."""

    interval: int
    until: int | None = None


@dataclass(frozen=True)
class KeepLast:
    """Keep the newest `count` permanent checkpoints."""

    count: int


@dataclass(frozen=True)
class KeepEvery:
    """Keep every checkpoint whose step is a multiple of `interval`, forever."""

    interval: int


@dataclass(frozen=True)
class KeepBest:
    """Keep the best `count` checkpoints by the metric `metric` (recorded with
    `metrics={...}` at save time), lowest first with `mode="min"`, highest with `"max"`."""

    count: int
    metric: str
    mode: str = "min"


Keep = Union[KeepLast, KeepEvery, KeepBest]


def retention(keep: Keep | Sequence[Keep], legacy: dict[str, Any]) -> tuple[Any, Any, Any]:
    """`keep` (one rule or several, at most one of each kind) as the native layer takes
    it: `(keep_last, keep_every, (count, metric, mode) or None)`. `legacy` holds the old
    flat flags (`keep_last=`, `keep_every=`, `keep_best=`, `metric=`, `mode=`), still
    accepted with a `DeprecationWarning`."""
    rules = [keep] if isinstance(keep, (KeepLast, KeepEvery, KeepBest)) else list(keep)
    given = {k: v for k, v in legacy.items() if v is not None and not (k == "mode" and v == "min")}
    if given:
        warnings.warn(
            f"retention flags ({', '.join(sorted(given))}) are deprecated: pass keep=[cairn.KeepLast(n), "
            "cairn.KeepEvery(k), cairn.KeepBest(n, metric, mode)]",
            DeprecationWarning,
            stacklevel=4,
        )
        if legacy.get("keep_last") is not None:
            rules.append(KeepLast(legacy["keep_last"]))
        if legacy.get("keep_every") is not None:
            rules.append(KeepEvery(legacy["keep_every"]))
        if legacy.get("keep_best") is not None:
            if legacy.get("metric") is None:
                raise InvalidArgumentError("keep_best needs a metric to rank by")
            rules.append(KeepBest(legacy["keep_best"], legacy["metric"], legacy.get("mode") or "min"))
    last = every = best = None
    for rule in rules:
        if isinstance(rule, KeepLast) and last is None:
            last = rule.count
        elif isinstance(rule, KeepEvery) and every is None:
            every = rule.interval
        elif isinstance(rule, KeepBest) and best is None:
            best = (rule.count, rule.metric, rule.mode)
        elif isinstance(rule, (KeepLast, KeepEvery, KeepBest)):
            raise InvalidArgumentError(f"two retention rules of one kind rule=`{type(rule).__name__}`")
        else:
            raise InvalidArgumentError(
                f"retention rules are cairn.KeepLast, cairn.KeepEvery or cairn.KeepBest, got `{type(rule).__name__}`"
            )
    return last, every, best
