"""Hugging Face: a model trained with Cairn checkpoints becomes a sharded Hugging Face
folder (`cairn export --max-shard-size`) that `from_pretrained` loads with identical
logits."""

import json
import os
import pathlib
import stat
import subprocess

import pytest
import torch
import transformers

import cairn

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli() -> str:
    binary = pathlib.Path(os.environ.get("CAIRN_CLI", ROOT / "target" / "debug" / "cairn"))
    subprocess.run(["cargo", "build", "-q", "-p", "cairn-cli"], cwd=ROOT, check=True, timeout=1800)
    return str(binary)


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=16)
    return config, transformers.GPT2LMHeadModel(config).eval()


def test_cairn_export_writes_a_sharded_folder_from_pretrained_loads(tmp_path, cli):
    config, model = tiny_gpt2()
    cairn.save(tmp_path / "run", {"model": model.state_dict(), "step": 7}, step=7)
    out = tmp_path / "hf"
    done = subprocess.run(
        [cli, "export", str(tmp_path / "run"), str(out), "--prefix", "model.", "--strip-prefix",
         "--max-shard-size", "40KB"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    for name in shards + ["model.safetensors.index.json"]:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    config.save_pretrained(out)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    # Everything within one shard: a single model.safetensors, as save_pretrained writes.
    one = tmp_path / "one"
    done = subprocess.run([cli, "export", str(tmp_path / "run"), str(one), "--prefix", "model.", "--strip-prefix",
                           "--max-shard-size", "5GB"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    config.save_pretrained(one)
    with torch.no_grad():
        assert torch.equal(transformers.GPT2LMHeadModel.from_pretrained(one).eval()(ids).logits, model(ids).logits)

    bad = subprocess.run([cli, "export", str(tmp_path / "run"), str(tmp_path / "x"), "--max-shard-size", "5 parsecs"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "size" in bad.stderr
    # A folder that holds something already is refused: its old files would mix in.
    again = subprocess.run([cli, "export", str(tmp_path / "run"), str(out), "--prefix", "model.", "--strip-prefix",
                            "--max-shard-size", "5GB"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert not (out / "model.safetensors").exists()


def test_export_casts_to_fp8_exactly_as_ml_dtypes(tmp_path, cli):
    import ml_dtypes
    import numpy as np
    import safetensors.torch

    edges = [448, 464, 465, 480, 1e9, -1e9, np.inf, -np.inf, 57344, 61440, 2**-9, 2**-10, 1.5 * 2**-10, -0.0, 0.1, -3.3]
    w = np.concatenate([np.array(edges, np.float32), np.random.default_rng(0).normal(0, 30, 2000).astype(np.float32)])
    cairn.save(tmp_path / "ckpt", {"w": w, "n": np.arange(5)})
    for spelling, dtype in (("fp8", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)):
        out = tmp_path / f"{spelling}.safetensors"
        done = subprocess.run([cli, "export", str(tmp_path / "ckpt"), str(out), "--dtype", spelling],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        got = safetensors.torch.load_file(str(out))
        assert str(got["w"].dtype) == f"torch.{dtype.__name__}"
        assert np.array_equal(got["w"].view(torch.uint8).numpy(), w.astype(dtype).view(np.uint8)), spelling
        assert np.array_equal(got["n"].numpy(), np.arange(5))  # integers are not cast
