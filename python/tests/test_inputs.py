"""What a new user hands Cairn first: dtype spellings and casts on save and load, the
device tensors load onto, and inputs Cairn cannot store, refused with the key named."""

import numpy as np
import pytest
import torch

import cairn


def test_save_casts_floating_point_tensors_and_keeps_the_rest(tmp_path):
    state = {"w": np.linspace(0, 1, 6, dtype=np.float32), "t": torch.ones(3, dtype=torch.float64),
             "n": np.arange(3), "z": np.ones(2, np.complex64), "step": 7}
    cairn.save(tmp_path / "ckpt", state, dtype="bf16")
    loaded = cairn.load(tmp_path / "ckpt", framework="torch")
    assert loaded["w"].dtype == torch.bfloat16 and loaded["t"].dtype == torch.bfloat16
    assert torch.equal(loaded["w"], torch.from_numpy(state["w"]).to(torch.bfloat16))
    assert loaded["n"].dtype == torch.int64 and loaded["z"].dtype == torch.complex64 and loaded["step"] == 7


def test_save_casts_only_the_keys_under_the_given_prefixes_and_keeps_scalars(tmp_path):
    state = {"model": {"w": torch.ones(4)}, "optim": {"m": torch.ones(4), "step": torch.tensor(300.0)}}
    cairn.save(tmp_path / "ckpt", state, dtype={"model.": "bf16"})
    loaded = cairn.load(tmp_path / "ckpt", framework="torch")
    assert loaded["model"]["w"].dtype == torch.bfloat16 and loaded["optim"]["m"].dtype == torch.float32
    cairn.save(tmp_path / "all", state, dtype="bf16")
    step = cairn.load(tmp_path / "all", framework="torch")["optim"]["step"]
    assert step.dtype == torch.float32 and step.item() == 300.0  # a 0-d count stays exact


def test_conjugated_and_negated_complex_views_are_saved_as_their_values(tmp_path):
    x = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    cairn.save(tmp_path / "ckpt", {"conj": x.conj(), "neg_imag": x.conj().imag})
    loaded = cairn.load(tmp_path / "ckpt", framework="torch")
    assert torch.equal(loaded["conj"], x.conj().resolve_conj()) and torch.equal(loaded["neg_imag"], -x.imag)


@pytest.mark.parametrize("spelling,expected", [
    ("fp16", np.float16), ("half", np.float16), ("float16", np.float16), ("F16", np.float16),
    ("bf16", "bfloat16"), ("fp32", np.float32), ("double", np.float64), ("fp64", np.float64),
    ("fp8", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2"), (np.float16, np.float16), (torch.bfloat16, "bfloat16"),
])
def test_load_accepts_the_common_spellings_of_a_cast(tmp_path, spelling, expected):
    cairn.save(tmp_path / "ckpt", {"w": np.ones(4, np.float32)})
    got = cairn.load(tmp_path / "ckpt", dtype=spelling)["w"]
    assert got.dtype.name == np.dtype(expected).name


@pytest.mark.parametrize("bad", ["int8", "fp13", np.int32, torch.int64, "complex64"])
def test_a_cast_to_a_dtype_that_is_not_floating_point_is_refused_clearly(tmp_path, bad):
    cairn.save(tmp_path / "ckpt", {"w": np.ones(4, np.float32)})
    with pytest.raises(cairn.InvalidArgumentError, match="floating-point"):
        cairn.load(tmp_path / "ckpt", dtype=bad)
    with pytest.raises(cairn.InvalidArgumentError, match="floating-point"):
        cairn.save(tmp_path / "other", {"w": np.ones(2)}, dtype=bad)
    assert not (tmp_path / "other").exists()


def test_load_puts_tensors_on_the_device_asked_for(tmp_path):
    import jax

    cairn.save(tmp_path / "ckpt", {"w": np.ones(4, np.float32)})
    assert cairn.load(tmp_path / "ckpt", framework="torch", map_location="cpu")["w"].device == torch.device("cpu")
    assert cairn.load(tmp_path / "ckpt", framework="torch", device=torch.device("meta"))["w"].is_meta
    device = jax.devices()[0]
    assert cairn.load(tmp_path / "ckpt", framework="jax", device=device)["w"].devices() == {device}
    with pytest.raises(cairn.InvalidArgumentError, match="framework"):
        cairn.load(tmp_path / "ckpt", device="cpu")
    with pytest.raises(cairn.InvalidArgumentError, match="not both"):
        cairn.load(tmp_path / "ckpt", framework="torch", device="cpu", map_location="cpu")


def test_the_manager_casts_its_saves_and_restores_onto_a_device(tmp_path):
    with cairn.CheckpointManager(tmp_path / "run", policies=[cairn.Every(1)], preemption_signal=None, dtype="fp16") as mgr:
        mgr.on_step(1, {"w": torch.ones(3)})
        mgr.wait()
        state, info = mgr.restore(framework="torch", map_location="cpu")
    assert info.step == 1 and state["w"].dtype == torch.float16


def test_inputs_cairn_cannot_store_are_refused_naming_the_key(tmp_path):
    import jax

    cases = {
        "fnuz": (torch.zeros(2, dtype=torch.float8_e4m3fnuz), "unsupported dtype"),
        "sparse": (torch.eye(3).to_sparse(), "to_dense"),
        "meta": (torch.empty(2, device="meta"), "meta tensor"),
        "prng": (jax.random.key(0), "key_data"),
    }
    for key, (value, why) in cases.items():
        with pytest.raises(cairn.InvalidArgumentError, match=f"{why}.*key=`{key}`"):
            cairn.save(tmp_path / key, {key: value})
        assert not (tmp_path / key).exists(), key
    with pytest.raises(cairn.InvalidArgumentError, match="to_dense.*key=`piece`"):
        cairn.save(tmp_path / "piece", {"piece": cairn.Piece(torch.eye(2).to_sparse(), (0, 0), (4, 2))})
    # What the messages advise works.
    key = jax.random.key(3)
    cairn.save(tmp_path / "ok", {"sparse": torch.eye(3).to_sparse().to_dense(), "prng": jax.random.key_data(key)})
    back = cairn.load(tmp_path / "ok", framework="jax")
    assert (jax.random.wrap_key_data(back["prng"]) == key).all()
