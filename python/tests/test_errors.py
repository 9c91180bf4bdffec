"""Errors: refused objects name their key, corrupt files are detected, no pickle ever."""

import json
import subprocess
import sys
import textwrap

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


def test_errors_cross_process_boundaries(tmp_path):
    # Frameworks send a rank's exception to the others pickled (torch DCP, Ray,
    # multiprocessing): every Cairn error class must survive it, as itself.
    import pickle

    for cls in (cairn.CheckpointError, cairn.InvalidArgumentError, cairn.CheckpointNotFoundError,
                cairn.AlreadyExistsError, cairn.CorruptCheckpointError, cairn.IncompatibleError,
                cairn.PermissionDeniedError, cairn.StorageFullError, cairn.UnavailableError):
        back = pickle.loads(pickle.dumps(cls("what key=`k`")))
        assert type(back) is cls and str(back) == "what key=`k`"
    with pytest.raises(cairn.CheckpointNotFoundError) as raised:
        cairn.load(tmp_path / "nothing")
    assert type(pickle.loads(pickle.dumps(raised.value))) is cairn.CheckpointNotFoundError


def test_an_int_past_the_digit_limit_is_refused(tmp_path):
    # Ints wider than 64 bits are stored exactly (test_roundtrip), up to 4,300 digits.
    with pytest.raises(cairn.InvalidArgumentError, match="key=`big`"):
        cairn.save(tmp_path / "c", {"big": 10**4300})


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


def test_a_commit_the_disk_refuses_leaves_no_shards_and_says_storage_full(tmp_path):
    # A real filesystem refusal at the commit: the file-size limit lets the tiny shard
    # through and stops the (large) manifest, as a full disk would.
    script = textwrap.dedent(
        """
        import json, resource, signal, sys
        import numpy as np
        import cairn
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        try:
            cairn.save(sys.argv[1], {"w": np.ones(4, np.float32)}, step=1, metadata={"notes": "x" * 900_000})
        except cairn.CheckpointError as e:
            print(json.dumps([type(e).__name__, str(e)]))
        """
    )
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kind, message = json.loads(out.stdout.strip().splitlines()[-1])
    assert kind == "StorageFullError", message
    assert "step-000000000001" in message and message.count("File too large") == 1, message
    leftovers = [p for p in run.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
    assert cairn.list_checkpoints(str(run)) == []


def test_non_finite_metadata_is_refused_at_save_naming_its_key(tmp_path):
    with pytest.raises(cairn.InvalidArgumentError, match="key=`eval.scores.1`"):
        cairn.save(str(tmp_path / "run"), {"w": np.ones(2)}, step=1, metadata={"eval": {"scores": [1.0, float("nan")]}})
    assert not (tmp_path / "run").exists() or cairn.list_checkpoints(str(tmp_path / "run")) == []
    cairn.save(str(tmp_path / "ok"), {"w": np.ones(2)}, step=1, metadata={"lr": 1e-3})


def test_nesting_is_refused_at_save_exactly_where_load_could_not_rebuild_it(tmp_path):
    def nested(depth):
        state = {"w": np.ones(2)}
        for _ in range(depth):
            state = {"k": state}
        return state

    deepest = nested(cairn._tree.MAX_NESTING)
    cairn.save(str(tmp_path / "ok"), deepest, step=1)
    loaded = cairn.load(str(tmp_path / "ok"))
    for _ in range(cairn._tree.MAX_NESTING):
        loaded = loaded["k"]
    assert loaded["w"].tolist() == [1, 1]
    with pytest.raises(cairn.InvalidArgumentError, match="nested deeper") as err:
        cairn.save(str(tmp_path / "deep"), nested(cairn._tree.MAX_NESTING + 1), step=1)
    assert "key=`k.k." in str(err.value)
    assert not (tmp_path / "deep").exists() or cairn.list_checkpoints(str(tmp_path / "deep")) == []


BAD_CALLS = {
    "path of the wrong type": lambda run: cairn.save(123, {"w": np.ones(2)}, step=1),
    "no path": lambda run: cairn.load(None),
    "unknown dtype": lambda run: cairn.load(run, dtype="nope"),
    "prefix not a string": lambda run: cairn.load(run, prefix=3),
    "malformed rename": lambda run: cairn.load(run, rename="bad"),
    "step not a number": lambda run: cairn.load(run, step="x"),
    "negative step": lambda run: cairn.save(run, {"w": np.ones(2)}, step=-5),
    "keep last not a number": lambda run: cairn.CheckpointManager(run, keep=cairn.KeepLast("3")),
    "negative keep last": lambda run: cairn.CheckpointManager(run, keep=cairn.KeepLast(-1)),
    "unknown retention rule": lambda run: cairn.CheckpointManager(run, keep=[3]),
    "two rules of one kind": lambda run: cairn.prune(run, keep=[cairn.KeepLast(1), cairn.KeepLast(2)]),
    "unknown keep-best mode": lambda run: cairn.CheckpointManager(run, keep=cairn.KeepBest(1, "loss", "lowest")),
    "policies not Every": lambda run: cairn.CheckpointManager(run, policies=[3]),
    "bundle not bytes": lambda run: cairn.from_bytes("abc", run + "-x"),
    "malformed box": lambda run: cairn.load(run, boxes={"w": "bad"}),
    "store option not a string": lambda run: cairn.load(run, storage_options={"x": 1}),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_raise_only_checkpoint_errors(tmp_path, call):
    run = str(tmp_path / "run")
    cairn.save(run, {"w": np.ones(2)}, step=1)
    with pytest.raises(cairn.InvalidArgumentError):
        call(run)


def test_every_error_class_derives_from_the_one_checkpoint_error():
    classes = [getattr(cairn, n) for n in cairn.__all__ if n.endswith("Error") and n != "CheckpointError"]
    native = [getattr(cairn._cairn, n) for n in dir(cairn._cairn) if n.endswith("Error")]
    for cls in classes + native:
        assert issubclass(cls, cairn.CheckpointError), cls
