"""`cairn report` opened in a real headless browser (Chromium from the distribution's
packages; scripts/test.sh installs it): the page of a two-tier run renders, light and
dark, without console errors, with an element for every checkpoint."""

import os
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

import cairn


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no headless browser: install Debian's chromium (scripts/test.sh does)")


def chromium(*args: str) -> subprocess.CompletedProcess:
    base = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=120, check=True)


def png_pixels(path) -> tuple[int, int, bytes]:
    """Width, height and the raw (filtered) scanlines of a PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, size = 8, b"", None
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        body = data[at + 8 : at + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        at += 12 + length
    return size[0], size[1], zlib.decompress(idat)


def make_run(tmp_path):
    durable, local = tmp_path / "durable", tmp_path / "local"
    with cairn.CheckpointManager(
        durable, local=local, local_policies=[cairn.Every(2)], policies=[cairn.Every(6)], keep_local=3,
        keep=cairn.KeepLast(10), preemption_signal=None,
    ) as mgr:
        base = np.random.default_rng(0).random(1 << 16, dtype=np.float32)
        for step in range(1, 25):
            mgr.on_step(step, {"base": base, "head": np.full(1 << 12, step, np.float32)},
                        metrics={"loss": 2.0 / step, "lr": 1e-3 * (1 - step / 30)})
        mgr.save(25, {"base": base, "head": np.zeros(1 << 12, np.float32)}, temporary=True, metrics={"loss": 0.07})
        mgr.wait()
        listed = mgr.list()
    return durable, local, listed


def test_the_report_of_a_two_tier_run_renders_every_checkpoint_light_and_dark(tmp_path, cli):
    durable, local, listed = make_run(tmp_path)
    page = tmp_path / "report.html"
    out = subprocess.run([cli, "report", str(durable), "--local", str(local), "-o", str(page), "--keep-last", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    url = page.resolve().as_uri()

    dom = chromium("--dump-dom", url)
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    for info in listed:
        tier = "local" if info.uri.startswith(local.resolve().as_uri()) or info.uri.startswith(str(local)) else "durable"
        assert f'data-step="{info.step}" data-tier="{tier}"' in dom.stdout, (info.step, tier)
    assert dom.stdout.count('<circle class="ckpt') == len(listed)
    assert dom.stdout.count('<tr class="row"') == len(listed)
    assert "temporary" in dom.stdout and "deleted next" in dom.stdout
    assert dom.stdout.count("<polyline") == 2  # loss and lr

    shots = {}
    for scheme, flags in {"light": [], "dark": ["--force-dark-mode", "--blink-settings=preferredColorScheme=0"]}.items():
        shot = tmp_path / f"{scheme}.png"
        chromium(*flags, "--window-size=1280,1400", f"--screenshot={shot}", url)
        width, height, pixels = png_pixels(shot)
        assert (width, height) == (1280, 1400)
        # Not blank: many distinct byte values, and most rows differ from the first.
        assert len(set(pixels)) > 64, scheme
        shots[scheme] = pixels
    assert shots["light"] != shots["dark"]
    if os.environ.get("CAIRN_REPORT_SHOT"):
        shutil.copy(tmp_path / "light.png", os.environ["CAIRN_REPORT_SHOT"])
