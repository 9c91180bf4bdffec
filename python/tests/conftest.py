import os
import pathlib
import subprocess
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture(scope="session")
def cli() -> str:
    """The `cairn` command-line tool: `CAIRN_CLI` (scripts/test.sh points it at the one
    its Rust tests built), else `target/debug/cairn`, built here if missing."""
    if "CAIRN_CLI" in os.environ:
        return os.environ["CAIRN_CLI"]
    binary = ROOT / "target" / "debug" / "cairn"
    if not binary.exists():
        subprocess.run(["cargo", "build", "-q", "-p", "cairn-cli"], cwd=ROOT, check=True, timeout=1800)
    return str(binary)


@pytest.fixture
def s3_run():
    """A fresh run on the S3 server of scripts/with-seaweedfs.sh (CAIRN_TEST_S3_URI)."""
    base = os.environ.get("CAIRN_TEST_S3_URI")
    if not base:
        if os.environ.get("CI"):
            pytest.fail("CAIRN_TEST_S3_URI is not set: run under scripts/with-seaweedfs.sh")
        pytest.skip("no S3 server: run under scripts/with-seaweedfs.sh")
    return f"{base}/pytest-{uuid.uuid4().hex[:12]}"
