"""Errors: refused objects name their key, corrupt files are detected, no pickle ever."""

import json
import pathlib

import numpy as np
import pytest

import cairn


class Opaque:
    pass


def test_arbitrary_objects_are_refused_with_their_key(tmp_path):
    with pytest.raises(cairn.InvalidArgumentError, match=r"key=`model.layers.1.custom`"):
        cairn.save(tmp_path / "c", {"model": {"layers": [np.ones(1), {"custom": Opaque()}]}})
    with pytest.raises(cairn.InvalidArgumentError, match="never pickles"):
        cairn.save(tmp_path / "c", {"f": lambda: 1})
    with pytest.raises(cairn.InvalidArgumentError, match=r"object.*key=`o`"):
        cairn.save(tmp_path / "c", {"o": np.array([Opaque()], dtype=object)})
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_out_of_range_int_is_refused(tmp_path):
    with pytest.raises(cairn.InvalidArgumentError, match="64 bits key=`big`"):
        cairn.save(tmp_path / "c", {"big": 2**70})


def test_flipped_byte_is_a_corrupt_error_naming_tensor_and_file(tmp_path):
    cairn.save(tmp_path / "c", {"w": np.arange(100, dtype=np.float32)})
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    piece = manifest["tensors"]["w"]["pieces"][0]
    shard = tmp_path / "c" / piece["file"]
    data = bytearray(shard.read_bytes())
    data[piece["range"][0] + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(cairn.CorruptCheckpointError, match=r"checksum mismatch tensor=`w`.*safetensors"):
        cairn.load(tmp_path / "c")


def test_unknown_format_version_is_incompatible(tmp_path):
    cairn.save(tmp_path / "c", {"w": np.ones(1)})
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(cairn.IncompatibleError, match="format version 99"):
        cairn.load(tmp_path / "c")


def test_missing_checkpoint_is_not_found(tmp_path):
    with pytest.raises(cairn.CheckpointNotFoundError):
        cairn.load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(cairn.CheckpointNotFoundError, match="no committed checkpoint"):
        cairn.load(tmp_path / "empty")


def test_committed_step_is_never_overwritten(tmp_path):
    cairn.save(tmp_path / "run", {"w": np.ones(1)}, step=5)
    with pytest.raises(cairn.AlreadyExistsError, match="step=5"):
        cairn.save(tmp_path / "run", {"w": np.zeros(1)}, step=5)
    assert cairn.load(tmp_path / "run")["w"][0] == 1


def test_missing_key_in_key_selection(tmp_path):
    cairn.save(tmp_path / "c", {"w": np.ones(1)})
    with pytest.raises(cairn.CheckpointNotFoundError, match="key=`nope`"):
        cairn.load(tmp_path / "c", keys=["nope"])


def test_errors_share_one_base_class():
    for cls in (cairn.InvalidArgumentError, cairn.CorruptCheckpointError, cairn.AlreadyExistsError,
                cairn.CheckpointNotFoundError, cairn.IncompatibleError, cairn.StateDictMismatchError):
        assert issubclass(cls, cairn.CheckpointError)
