"""A process's random generators as a plain state Cairn stores (no pickle): Python's,
numpy's global one, torch's CPU and CUDA ones. Shared by the Trainer and Accelerate
integrations."""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch


def get() -> dict[str, Any]:
    """This process's random generators: Python's, numpy's global one, torch's CPU and
    CUDA ones."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(words), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def set(state: dict[str, Any]) -> None:
    """Restores what `get` recorded."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.random.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.random.set_rng_state_all([s.cpu() for s in state["cuda"]])
        except (IndexError, RuntimeError) as e:  # fewer GPUs than the run saved with
            warnings.warn(f"the CUDA random generators were not restored ({e}); the run is not reproducible from here")
