"""A model of power loss on local disk: the syscalls of a real save (traced with strace)
are replayed against a model in which only fsynced data and fsynced directory entries
survive. At every moment of the trace a durable manifest implies durable shards (no
visible checkpoint can point at lost data), and once `save` has returned, the checkpoint
(run folder included) survives a power loss."""

import json
import re
import shutil
import subprocess
import sys

import pytest

CALL = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")
PATH_ARG = re.compile(r'"([^"]*)"')
FD_PATH = re.compile(r"^\d+<([^>]*)>")

SAVER = """
import sys, numpy as np, cairn
cairn.save(sys.argv[1], {"w": np.ones(5000, np.float32), "b": np.arange(40)}, step=3)
print("CAIRN-SAVE-RETURNED", flush=True)
"""


def trace_save(run_dir, log):
    if shutil.which("strace") is None:
        pytest.fail("strace is needed for the power-loss model (it ships with the machine image)")
    calls = "openat,write,pwrite64,writev,fsync,fdatasync,rename,renameat,renameat2,link,linkat,mkdir,mkdirat,unlink,unlinkat"
    subprocess.run(["strace", "-f", "-y", "-qq", "-s", "64", "-e", f"trace={calls}", "-o", str(log),
                    sys.executable, "-c", SAVER, str(run_dir)], check=True, capture_output=True)
    return log.read_text().splitlines()


class Disk:
    """What survives a power loss: a name is durable once its parent directory was
    fsynced after the name was created; content is durable once the file was fsynced
    after its last write (a hard link or rename carries the content of its source)."""

    def __init__(self):
        self.dirty = set()           # files written since their last fsync
        self.synced_content = set()  # files whose content is on disk
        self.pending_names = {}      # name -> parent dir, created but parent not fsynced
        self.durable_names = set()
        self.alias = {}              # final name -> file that holds the content

    def content(self, path):
        return self.alias.get(path, path)

    def apply(self, call, args, ret):
        if ret < 0:
            return
        paths = PATH_ARG.findall(args)
        fd = FD_PATH.match(args)
        if call in ("write", "pwrite64", "writev") and fd:
            self.dirty.add(fd.group(1))
            self.synced_content.discard(fd.group(1))
        elif call in ("fsync", "fdatasync") and fd:
            target = fd.group(1)
            self.dirty.discard(target)
            self.synced_content.add(target)
            for name, parent in list(self.pending_names.items()):
                if parent == target:
                    self.durable_names.add(name)
                    del self.pending_names[name]
        elif call in ("mkdir", "mkdirat") and paths:
            self.create(paths[-1])
        elif call == "openat" and "O_CREAT" in args and paths:
            self.create(paths[-1])
        elif call in ("rename", "renameat", "renameat2", "link", "linkat") and len(paths) >= 2:
            src, dst = paths[0], paths[-1]
            self.alias[dst] = self.content(src)
            self.create(dst)
        elif call in ("unlink", "unlinkat") and paths:
            self.durable_names.discard(paths[-1])

    def create(self, path):
        self.pending_names[path] = path.rsplit("/", 1)[0]
        self.durable_names.discard(path)

    def survives(self, path, root):
        # Every name from the first pre-existing directory down to `path` must be durable.
        parts = path[len(root):].strip("/").split("/")
        for i in range(1, len(parts) + 1):
            name = root.rstrip("/") + "/" + "/".join(parts[:i])
            if name not in self.durable_names:
                return False
        leaf = self.content(path)
        return leaf in self.synced_content and leaf not in self.dirty


def test_a_returned_save_survives_power_loss_and_no_manifest_outlives_its_data(tmp_path):
    run = tmp_path / "new" / "run"
    lines = trace_save(run, tmp_path / "strace.log")
    ckpt = run / "step-000000000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    shards = [str(ckpt / f) for f in manifest["files"]]
    disk = Disk()
    root = str(tmp_path)
    returned = False
    checked = 0
    for line in lines:
        m = CALL.match(line)
        if not m:
            continue
        call, args, ret = m.group(1), m.group(2), int(m.group(3))
        if call == "write" and "CAIRN-SAVE-RETURNED" in args:
            returned = True
            break
        disk.apply(call, args, ret)
        # Power loss right after this call:
        if disk.survives(str(ckpt / "manifest.json"), root):
            lost = [s for s in shards if not disk.survives(s, root)]
            assert not lost, f"after `{line[:120]}` a durable manifest points at lost data: {lost}"
        checked += 1
    assert returned, "the save never returned"
    assert disk.survives(str(ckpt / "manifest.json"), root), "the returned save's manifest would be lost"
    for s in shards:
        assert disk.survives(s, root), f"the returned save's shard would be lost: {s}"
    assert checked > 10
