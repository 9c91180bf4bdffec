import os
import pathlib
import subprocess

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
