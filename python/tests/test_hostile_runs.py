"""Hostile and messy run folders through the Python API and every CLI command, each in a
process of its own under a 4 GiB address-space cap and a time limit: a typed error or a
correct result, no abort, no hang, and nothing outside the run read, listed, changed or
deleted (a canary tree beside the run, checked by content and access times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cairn

CAP = "--as=4294967296"
TIMEOUT = 120
TWO_DAYS = 2 * 86400


class Canary:
    """A tree of user files whose access times are aged, so any read or listing shows."""

    def __init__(self, root: Path):
        self.root = root
        (root / "nested").mkdir(parents=True, exist_ok=True)
        (root / "notes.txt").write_bytes(b"user data, not Cairn's")
        (root / "passwd").write_bytes(b"x" * 1221)
        (root / "nested" / "keep.bin").write_bytes(bytes(64))

    def seal(self) -> None:
        old = time.time() - TWO_DAYS
        paths = [self.root, *sorted(self.root.rglob("*"))]
        self.contents = {p: p.read_bytes() for p in paths if p.is_file() and not p.is_symlink()}
        for p in paths:
            st = os.lstat(p)
            os.utime(p, ns=(int(old * 1e9), st.st_mtime_ns), follow_symlinks=False)
        self.stats = {p: (os.lstat(p).st_atime_ns, os.lstat(p).st_mtime_ns) for p in paths}
        # On a noatime mount reads move nothing: then only changes can be checked.
        probe = self.root.parent / ".atime-probe"
        probe.write_bytes(b"x")
        os.utime(probe, (old, old))
        before = os.stat(probe).st_atime_ns
        probe.read_bytes()
        self.atime_tracked = os.stat(probe).st_atime_ns != before
        probe.unlink()

    def assert_untouched(self) -> None:
        for p, (atime, mtime) in self.stats.items():
            st = os.lstat(p)
            assert st.st_mtime_ns == mtime, f"changed: {p}"
            assert not self.atime_tracked or st.st_atime_ns == atime, f"read or listed outside the run: {p}"
        for p, content in self.contents.items():
            assert p.read_bytes() == content, f"changed: {p}"
        assert {self.root, *self.root.rglob("*")} == set(self.stats), "files outside the run added or deleted"


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"model": {"w": rng.standard_normal((4, 4)).astype(np.float32)}, "step": step}


def _edit(manifest: Path, edit) -> None:
    doc = json.loads(manifest.read_bytes())
    edit(doc)
    manifest.write_text(json.dumps(doc))


def _step(run: Path, step: int) -> Path:
    return run / f"step-{step:012d}"


# Each case turns a healthy run (steps 1 and 2) and a canary folder into a hostile run.
def symlinked_step_folder(run: Path, out: Path) -> None:
    cairn.save(str(out), _state(3), step=3)
    os.symlink(_step(out, 3), _step(run, 3))


def symlinked_shards_folder(run: Path, out: Path) -> None:
    shards = _step(run, 2) / "shards"
    (out / "shards").mkdir()
    for f in shards.iterdir():
        f.rename(out / "shards" / f.name)
    shards.rmdir()
    os.symlink(out / "shards", shards)


def manifest_naming_an_outside_file(run: Path, out: Path) -> None:
    ckpt = _step(run, 2)
    for f in (ckpt / "shards").iterdir():
        f.unlink()
    (ckpt / "shards").rmdir()
    os.symlink(out, ckpt / "shards")

    def edit(m):
        (name, record), = m["files"].items()
        m["files"] = {"shards/passwd": record}
        for t in m["tensors"].values():
            for p in t["pieces"]:
                p["file"] = "shards/passwd"
    _edit(ckpt / "manifest.json", edit)


def fifo_manifest(run: Path, out: Path) -> None:
    _step(run, 7).mkdir()
    os.mkfifo(_step(run, 7) / "manifest.json")


def stray_names_and_loops(run: Path, out: Path) -> None:
    (run / os.fsdecode(b"stray-\xff.bin")).write_bytes(b"x")
    os.symlink("loop", run / "loop")
    os.symlink("..", _step(run, 1) / "shards" / "up")


def damaged_old_manifest(run: Path, out: Path) -> None:
    (_step(run, 1) / "manifest.json").write_bytes(b"{ not json")


def step_mismatch(run: Path, out: Path) -> None:
    cairn.save(str(out / "pretrain"), _state(999), step=999)
    _step(out / "pretrain", 999).rename(_step(run, 3))


def giant_metadata(run: Path, out: Path) -> None:
    bomb = "[" + '{"":0},' * (100 * 2**20 // 7) + "{}]"
    text = (_step(run, 2) / "manifest.json").read_text()
    (_step(run, 2) / "manifest.json").write_text(text.replace('"metadata":null', f'"metadata":{bomb}', 1))


def deep_metadata(run: Path, out: Path) -> None:
    _edit(_step(run, 2) / "manifest.json", lambda m: m.update(metadata=None))
    text = (_step(run, 2) / "manifest.json").read_text()
    deep = "[" * 100_000 + "]" * 100_000
    (_step(run, 2) / "manifest.json").write_text(text.replace('"metadata":null', f'"metadata":{deep}', 1))


def hundred_thousand_pieces(run: Path, out: Path) -> None:
    def edit(m):
        t = m["tensors"]["model.w"]
        p = t["pieces"][0]
        t["pieces"] = [dict(p, offsets=[0, 0]) for _ in range(100_000)]
    _edit(_step(run, 2) / "manifest.json", edit)


def hostile_structure(run: Path, out: Path) -> None:
    _edit(_step(run, 2) / "manifest.json", lambda m: m.update(structure={"dict": [[["unhashable"], {"tensor": "model.w"}]]}))


CORRUPT = "error:CorruptCheckpointError"
# Each case with what loading the run's latest checkpoint gives: the newest healthy one
# ("ok") where the hostile part is not a readable checkpoint, a typed error where the
# newest readable checkpoint itself is unusable.
CASES = [(symlinked_step_folder, "ok"), (symlinked_shards_folder, CORRUPT), (manifest_naming_an_outside_file, CORRUPT),
         (fifo_manifest, "ok"), (stray_names_and_loops, "ok"), (damaged_old_manifest, "ok"), (step_mismatch, "ok"),
         (giant_metadata, "ok"), (deep_metadata, "ok"), (hundred_thousand_pieces, "ok"), (hostile_structure, CORRUPT)]

PYTHON_PROBE = r"""
import json, sys
import cairn
run = sys.argv[1]
out = {}
def probe(name, f):
    try:
        f()
        out[name] = "ok"
    except cairn.CheckpointError as e:
        out[name] = "error:" + type(e).__name__
    except BaseException as e:
        out[name] = f"BAD:{type(e).__name__}: {e}"[:300]
probe("load", lambda: cairn.load(run))
probe("load_step_2", lambda: cairn.load(run, step=2))
probe("list", lambda: cairn.list_checkpoints(run))
def manager():
    with cairn.CheckpointManager(run, keep=cairn.KeepLast(1)) as m:
        m.restore()
probe("manager", manager)
print(json.dumps(out))
"""


def _capped(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["prlimit", CAP, "--", *args], capture_output=True, text=True, timeout=TIMEOUT, **kw)


@pytest.mark.parametrize("make, loaded", CASES, ids=[c.__name__ for c, _ in CASES])
def test_hostile_run_gives_typed_errors_and_touches_nothing_outside(tmp_path, make, loaded, cli):
    run, out = tmp_path / "run", tmp_path / "outside"
    cairn.save(str(run), _state(1), step=1)
    cairn.save(str(run), _state(2), step=2)
    canary = Canary(out)
    make(run, out)
    canary.seal()

    py = _capped([sys.executable, "-c", PYTHON_PROBE, str(run)])
    assert py.returncode == 0, py.stderr[-2000:]
    results = json.loads(py.stdout.strip().splitlines()[-1])
    assert not [r for r in results.values() if r.startswith("BAD")], results
    assert (results["load"], results["list"]) == (loaded, "ok"), results

    for args in (["ls", "run"], ["ls", "run", "--json"], ["latest", "run"], ["inspect", "run"],
                 ["inspect", "run/step-000000000002", "--json"], ["verify", "run"],
                 ["diff", "run/step-000000000001", "run/step-000000000002"], ["cp", "run", "copy"],
                 ["export", "run", "model.safetensors"], ["prune", "run", "--keep-last", "1", "--grace", "0s"]):
        done = _capped([cli, *args], cwd=tmp_path)
        assert done.returncode in (0, 1, 2), f"{args}: exit {done.returncode}\n{done.stderr[-2000:]}"
        assert "panicked" not in done.stderr, f"{args}: {done.stderr[-2000:]}"
    canary.assert_untouched()
