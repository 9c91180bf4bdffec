"""Stores from Python: S3 on a real SeaweedFS server (scripts/with-seaweedfs.sh sets
CAIRN_TEST_S3_URI and the AWS_* environment), explicit storage options, user schemes,
copies between stores, byte bundles and local directories, plain HTTP."""

import functools
import http.server
import io
import os
import re
import threading

import numpy as np
import pytest

import cairn


def state(step):
    return {"model": {"w": np.arange(64, dtype=np.float32) * step}, "step": step}


def test_manager_on_s3_saves_restores_and_retains(s3_run):
    with cairn.CheckpointManager(s3_run, policies=[cairn.Every(2)], keep=cairn.KeepLast(2)) as mgr:
        for step in range(1, 9):
            mgr.on_step(step, state(step))
    assert [i.step for i in mgr.list()] == [6, 8]
    restored, info = mgr.restore()
    assert info.step == 8 and restored["model"]["w"].tolist() == state(8)["model"]["w"].tolist()


def test_arrays_loaded_from_s3_are_writable_views_not_copies(s3_run):
    rng = np.random.default_rng(0)
    saved = {f"w{i}": rng.random(300_000, dtype=np.float32) for i in range(6)}  # several requests
    cairn.save(s3_run, saved, step=1)
    loaded = cairn.load(s3_run)
    for key, arr in loaded.items():
        assert np.array_equal(arr, saved[key])
        assert arr.flags.writeable and not arr.flags.owndata, key
    loaded["w0"][0] = 5.0
    assert cairn.load(s3_run)["w0"][0] == saved["w0"][0]


def test_explicit_storage_options_override_the_environment(s3_run, monkeypatch, tmp_path):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    options = {
        "aws_endpoint": endpoint,
        "aws_allow_http": "true",
        "aws_region": "us-east-1",
        "aws_access_key_id": "cairn",
        "aws_secret_access_key": "cairn-secret",
    }
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    cairn.save(s3_run, state(3), step=3, storage_options=options)
    assert cairn.load(s3_run, storage_options=options)["step"] == 3
    with pytest.raises(cairn.InvalidArgumentError, match="no_such_option"):
        cairn.load(s3_run, storage_options={"no_such_option": "1"})
    # as_directory takes them too (it had no way to before).
    local = cairn.as_directory(s3_run, cache_dir=tmp_path / "cache", storage_options=options)
    assert cairn.load(local)["step"] == 3


def test_copy_local_to_s3_and_back_is_verified(tmp_path, s3_run):
    for step in (1, 2):
        cairn.save(tmp_path / "run", state(step), step=step)
    told = []
    copied = cairn.copy(tmp_path / "run", s3_run, progress=lambda stage, n: told.append((stage, n)))
    assert [i.step for i in copied] == [1, 2]
    # Every byte of the data files was reported copied, then verified at the destination.
    data = sum(f.stat().st_size for f in (tmp_path / "run").rglob("*.safetensors"))
    assert sum(n for s, n in told if s == "copying") == data
    assert sum(n for s, n in told if s == "verifying") == data
    cairn.copy(f"{s3_run}/step-000000000002", tmp_path / "back")
    assert cairn.load(tmp_path / "back")["step"] == 2


def test_user_scheme_resolves_through_a_callable(tmp_path):
    cairn.register_scheme("team://", lambda uri: str(tmp_path / uri.removeprefix("team://")))
    try:
        cairn.save("team://exp1", state(4), step=4)
        assert (tmp_path / "exp1" / "step-000000000004" / "manifest.json").exists()
        assert cairn.load("team://exp1")["step"] == 4
    finally:
        assert cairn.unregister_scheme("team://")


def test_bundle_and_as_directory(tmp_path):
    cairn.save("memory://pytest-bundle/run", state(5), step=5)
    bundle = cairn.to_bytes("memory://pytest-bundle/run")
    info = cairn.from_bytes(bundle, tmp_path / "unpacked")
    assert info.step == 5 and cairn.load(tmp_path / "unpacked")["step"] == 5
    directory = cairn.as_directory("memory://pytest-bundle/run", cache_dir=tmp_path / "cache")
    assert os.path.isfile(os.path.join(directory, "manifest.json"))
    assert cairn.as_directory(tmp_path / "unpacked") == str(tmp_path / "unpacked")
    with pytest.raises(cairn.CorruptCheckpointError):
        cairn.from_bytes(bundle[: len(bundle) // 2], tmp_path / "half")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers `Range: bytes=a-b` requests (206), as object
    stores and CDNs do; `http.server` alone ignores them."""

    def log_message(self, *args):
        pass

    def send_head(self):
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not ranged or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(ranged[1]), min(int(ranged[2] or size - 1), size - 1)
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Last-Modified", self.date_time_string(int(os.path.getmtime(path))))
        self.end_headers()
        return io.BytesIO(f.read(end - start + 1))


@pytest.mark.parametrize("ranges", [True, False], ids=["range_server", "plain_file_server"])
def test_a_checkpoint_served_over_plain_http_loads_without_storage_options(tmp_path, ranges):
    # A server without Range support (http.server as it is) answers with whole files:
    # each file is then read once, in one pass, whatever parts of it are needed.
    state = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(7, np.int64), "step": 3}
    cairn.save(tmp_path / "ckpt", state)
    handler = functools.partial(_RangeHandler if ranges else http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            loaded = cairn.load(f"http://127.0.0.1:{server.server_port}/ckpt")
            part = cairn.load(f"http://127.0.0.1:{server.server_port}/ckpt", keys=["w"], boxes={"w": ((10,), (5,))})
        finally:
            server.shutdown()
    assert np.array_equal(loaded["w"], state["w"]) and loaded["step"] == 3
    assert np.array_equal(loaded["b"], state["b"])
    assert np.array_equal(part["w"], state["w"][10:15])


def test_the_latest_checkpoint_of_a_run_served_over_plain_http_is_the_one_its_hint_names(tmp_path):
    # A plain file server cannot list a run: the LATEST hint (a folder name, relative to
    # the run) names its newest checkpoint, which is then opened and checked as any other.
    with cairn.CheckpointManager(tmp_path / "run", policies=[cairn.Every(1)], preemption_signal=None) as mgr:
        for step in (1, 2):
            mgr.on_step(step, {"w": np.full(4, step, np.float32)})
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "step-000000000002"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}/run"
        try:
            assert cairn.load(base)["w"][0] == 2
            assert cairn.load(base, step=1)["w"][0] == 1
            # A hint naming a checkpoint that is not there is not believed.
            (tmp_path / "run" / "LATEST").write_text("step-000000000009\n")
            with pytest.raises(cairn.CheckpointError):
                cairn.load(base)
        finally:
            server.shutdown()
