"""Shards are plain safetensors files; the manifest follows the published JSON Schema."""

import json
import pathlib

import jsonschema
import numpy as np
import safetensors.numpy
import safetensors.torch

import cairn

SCHEMA = pathlib.Path(__file__).resolve().parents[2] / "docs" / "manifest.schema.json"


def test_shards_open_with_the_safetensors_package(tmp_path):
    import ml_dtypes
    import torch

    state = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(5, dtype=np.int64),
        "c": np.array(2.5, dtype=np.float64),
        "__metadata__": np.ones(2, np.uint8),
        "h": np.ones(3, dtype=ml_dtypes.bfloat16),
    }
    cairn.save(tmp_path / "c", state)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    seen = {}
    for file in manifest["files"]:
        seen.update(safetensors.torch.load_file(tmp_path / "c" / file))
    assert seen["a"].numpy().tolist() == state["a"].tolist()
    assert seen["b"].numpy().tolist() == state["b"].tolist()
    assert seen["c"].item() == 2.5 and seen["c"].shape == ()
    assert seen["__metadata__@"].numpy().tolist() == [1, 1]
    assert seen["h"].dtype == torch.bfloat16 and seen["h"].float().tolist() == [1.0, 1.0, 1.0]


def test_shards_open_with_safetensors_numpy(tmp_path):
    state = {"x": np.linspace(0, 1, 7), "y": np.arange(6, dtype=np.int16).reshape(2, 3)}
    cairn.save(tmp_path / "c", state)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (file,) = manifest["files"]
    loaded = safetensors.numpy.load_file(tmp_path / "c" / file)
    for key, arr in state.items():
        assert loaded[key].dtype == arr.dtype and loaded[key].tobytes() == arr.tobytes()


def test_manifest_matches_the_json_schema(tmp_path):
    cairn.save(
        tmp_path / "run",
        {"w": np.ones((2, 2), np.float16), "nan": float("nan"), "b": b"x", "n": None, "l": [1, "s"]},
        step=7,
        metrics={"loss": 0.5, "n": 3},
        metadata={"config": {"lr": 0.1}},
    )
    manifest = json.loads((tmp_path / "run" / "step-000000000007" / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
