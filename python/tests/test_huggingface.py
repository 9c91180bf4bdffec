"""Hugging Face: the Trainer checkpointing through Cairn (`cairn.huggingface.Trainer`),
SIGKILLed and resumed bit-exact; and a model trained with Cairn checkpoints becoming a
sharded Hugging Face folder (`cairn export --max-shard-size`) that `from_pretrained` loads
with identical logits."""

import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

import cairn
import cairn.huggingface



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


# ---- The Trainer checkpointing through Cairn (cairn.huggingface) ----

WORKER = str(pathlib.Path(__file__).with_name("hf_worker.py"))


def trainer_run(output_dir, kind, kill_at=None, processes=1):
    """Runs hf_worker.py (under torchrun with several `processes`: DDP); returns its final
    weights (None when it was to be killed)."""
    launch = [sys.executable] if processes == 1 else [
        str(pathlib.Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={processes}"]
    args = launch + [WORKER, str(output_dir), kind] + ([str(kill_at)] if kill_at else [])
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    if kill_at:
        assert done.returncode == (-9 if processes == 1 else 1), done.stderr[-3000:]
        return None
    assert done.returncode == 0, done.stderr[-4000:]
    return safetensors.torch.load_file(output_dir / "final.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final weights of the run with the Trainer's own checkpoints, never stopped."""
    return trainer_run(tmp_path_factory.mktemp("plain") / "out", "plain")


def assert_same(weights, reference):
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(weights[key], tensor), key


def test_a_killed_trainer_resumes_bit_exact_from_the_newest_committed_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "out"
    trainer_run(out, "cairn", kill_at=7)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    # A save killed mid-write: its folder and trainer_state.json are there, its checkpoint
    # never committed. The plain Trainer's choice would be this folder; Cairn's passes it over.
    torn = out / "checkpoint-9"
    (torn / "step-000000000009" / "shards").mkdir(parents=True)
    (torn / "step-000000000009" / "shards" / "r00000-00000-of-00001-0.safetensors").write_bytes(b"\0" * 100)
    (torn / "trainer_state.json").write_text((out / "checkpoint-6" / "trainer_state.json").read_text())
    # Killed after the Trainer's json files, before Cairn's first file: no weights at all.
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "trainer_state.json").write_text(
        (out / "checkpoint-6" / "trainer_state.json").read_text())
    assert transformers.trainer_utils.get_last_checkpoint(str(out)) == str(out / "checkpoint-10")
    assert cairn.huggingface.last_checkpoint(out) == str(out / "checkpoint-6")

    final = trainer_run(out, "cairn")
    assert_same(final, uninterrupted)
    # save_total_limit=2 kept the newest two; each is one committed Cairn checkpoint
    # beside the Trainer's json files, and nothing in them is a pickle.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-12", "checkpoint-9", "final.safetensors"]
    for folder in (out / "checkpoint-9", out / "checkpoint-12"):
        assert [i.step for i in cairn.list_checkpoints(folder)] == [int(folder.name.split("-")[1])]
        assert {p.suffix for p in folder.rglob("*") if p.is_file()} == {".json", ".safetensors"}
    saved = cairn.load(out / "checkpoint-12", framework="torch")
    assert set(saved) == {"model", "optimizer", "scheduler", "rng"}
    assert_same({k: v for k, v in saved["model"].items() if k != "lm_head.weight"}, final)


def test_ddp_ranks_save_together_and_resume_bit_exact(tmp_path):
    reference = trainer_run(tmp_path / "plain", "plain", processes=2)
    out = tmp_path / "out"
    trainer_run(out, "cairn", kill_at=7, processes=2)
    assert_same(trainer_run(out, "cairn", processes=2), reference)
    manifest = json.loads(next((out / "checkpoint-12").glob("step-*/manifest.json")).read_text())
    assert manifest["writer"]["world_size"] == 2


def test_a_plain_trainer_checkpoint_resumes_under_cairn(tmp_path, uninterrupted):
    out = tmp_path / "out"
    trainer_run(out, "plain", kill_at=7)
    assert (out / "checkpoint-6" / "optimizer.pt").exists()
    assert_same(trainer_run(out, "cairn"), uninterrupted)
    assert cairn.list_checkpoints(out / "checkpoint-12")


def test_the_best_model_is_loaded_back_through_cairn(tmp_path):
    sys.path.insert(0, str(pathlib.Path(WORKER).parent))
    import hf_worker

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=97, n_positions=16)
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4, learning_rate=5e-2,
        save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, save_total_limit=1,
        load_best_model_at_end=True, metric_for_best_model="loss", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    data = hf_worker.Tokens()
    trainer = cairn.huggingface.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and cairn.list_checkpoints(best)
    stored = cairn.load(best, prefix="model.", framework="torch")["model"]
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored[key]), key
    # The Trainer's final save_model still writes a folder from_pretrained loads.
    trainer.save_model(str(tmp_path / "final"))
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "final")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
