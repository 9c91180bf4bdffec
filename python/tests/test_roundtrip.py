"""Round-trips of numpy, torch and jax state: structure, dtypes and values bit-exact."""

import math

import ml_dtypes
import numpy as np
import pytest

import cairn

NUMPY_DTYPES = [
    np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
    np.int64, np.int32, np.int16, np.int8, np.uint64, np.uint32, np.uint16, np.uint8, np.bool_, np.complex64,
]
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 2)]


def random_array(rng, dtype, shape):
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    arr = raw.view(dtype).reshape(shape)
    return arr.astype(np.bool_) if dtype is np.bool_ else arr


def assert_bit_exact(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_numpy_dtype_and_shape_round_trips(tmp_path, dtype):
    rng = np.random.default_rng(0)
    state = {f"t{i}": random_array(rng, dtype, shape) for i, shape in enumerate(SHAPES)}
    cairn.save(tmp_path / "ckpt", state)
    loaded = cairn.load(tmp_path / "ckpt")
    assert list(loaded) == list(state)
    for key in state:
        assert_bit_exact(loaded[key], state[key])


def test_nested_structure_and_plain_values_round_trip(tmp_path):
    state = {
        "model": {"layer.0.weight": np.ones((2, 2), np.float32), "layer.0.bias": np.zeros(2, np.float32)},
        "optim": {"state": {0: {"exp_avg": np.full(3, 0.5)}, 1: {}}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}]},
        "step": 1234,
        "nan": math.nan,
        "inf": -math.inf,
        "rng": b"\x00\xff\x10",
        "name": "résumé",
        "flag": True,
        "nothing": None,
        "big": -(2**63),
        "empty_list": [],
        "empty_dict": {},
    }
    cairn.save(tmp_path / "ckpt", state)
    loaded = cairn.load(tmp_path / "ckpt")
    assert loaded.keys() == state.keys()
    assert loaded["optim"]["state"][0]["exp_avg"].tolist() == [0.5] * 3
    assert list(loaded["optim"]["state"].keys()) == [0, 1]
    assert loaded["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert math.isnan(loaded["nan"]) and loaded["inf"] == -math.inf
    for key in ("step", "rng", "name", "flag", "nothing", "big", "empty_list", "empty_dict"):
        assert loaded[key] == state[key] and type(loaded[key]) is type(state[key])
    assert_bit_exact(loaded["model"]["layer.0.weight"], state["model"]["layer.0.weight"])


def test_non_contiguous_and_big_endian_arrays_are_copied_correctly(tmp_path):
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    state = {"t": base.T, "s": base[::2, 1::2], "be": np.arange(5, dtype=">f8")}
    cairn.save(tmp_path / "ckpt", state)
    loaded = cairn.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(loaded["t"], base.T)
    np.testing.assert_array_equal(loaded["s"], base[::2, 1::2])
    np.testing.assert_array_equal(loaded["be"], np.arange(5, dtype=np.float64))


def test_loaded_arrays_are_writable_and_never_touch_the_file(tmp_path):
    cairn.save(tmp_path / "ckpt", {"w": np.zeros(4, np.float32)})
    first = cairn.load(tmp_path / "ckpt")
    first["w"][0] = 7.0
    assert cairn.load(tmp_path / "ckpt")["w"][0] == 0.0


def test_selection_by_prefix_keys_and_rename(tmp_path):
    state = {"module": {"model": {"a": np.ones(1), "b": np.zeros(1)}}, "optim": {"m": np.ones(2)}}
    cairn.save(tmp_path / "run", state, step=1)
    only_model = cairn.load(tmp_path / "run", prefix="module.model.")
    assert list(only_model) == ["module"] and list(only_model["module"]["model"]) == ["a", "b"]
    just_m = cairn.load(tmp_path / "run", keys=["optim.m"])
    assert list(just_m) == ["optim"]
    renamed = cairn.load(tmp_path / "run", prefix="module.", rename=[(r"^module\.", "")])
    assert sorted(renamed) == ["model.a", "model.b"]


def test_dtype_cast_on_load(tmp_path):
    cairn.save(tmp_path / "ckpt", {"w": np.linspace(0, 1, 5, dtype=np.float32), "i": np.arange(3)})
    loaded = cairn.load(tmp_path / "ckpt", dtype="bf16")
    assert loaded["w"].dtype == ml_dtypes.bfloat16
    assert loaded["i"].dtype == np.int64


def test_garbage_collector_is_paused_only_while_converting(tmp_path):
    import gc

    from cairn import _tree

    seen = []
    real = _tree._flatten_all
    _tree._flatten_all = lambda *args: seen.append(gc.isenabled()) or real(*args)
    try:
        cairn.save(tmp_path / "a", {"w": np.ones(3)})
        assert seen == [False] and gc.isenabled()
        gc.disable()
        cairn.save(tmp_path / "b", {"w": np.ones(3)})
        cairn.load(tmp_path / "b")
        assert not gc.isenabled()  # a caller's own pause is kept
    finally:
        _tree._flatten_all = real
        gc.enable()
    with pytest.raises(cairn.CheckpointNotFoundError):
        cairn.load(tmp_path / "missing")
    assert gc.isenabled()  # restored after an error too


def test_memory_store_round_trip():
    state = {"w": np.arange(10, dtype=np.float16)}
    cairn.save("memory://pytest/run", state, step=3)
    loaded = cairn.load("memory://pytest/run")
    assert_bit_exact(loaded["w"], state["w"])
    # Writable and not a copy: the tensor owns the buffer it was read into.
    assert loaded["w"].flags.writeable and not loaded["w"].flags.owndata




def test_torch_tensors_of_every_dtype_round_trip(tmp_path):
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {}
    for dtype in [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool]:
        state[str(dtype)] = (torch.rand(3, 4, generator=gen) * 100).to(dtype)
    for dtype in [torch.float8_e4m3fn, torch.float8_e5m2]:
        state[str(dtype)] = torch.rand(5, generator=gen).to(dtype)
    state["complex64"] = torch.randn(3, 4, dtype=torch.complex64, generator=gen)
    state["scalar"] = torch.tensor(3.5)
    state["grad"] = torch.ones(2, requires_grad=True)
    state["transposed"] = torch.arange(6.0).reshape(2, 3).t()
    cairn.save(tmp_path / "ckpt", {"model": state})
    loaded = cairn.load(tmp_path / "ckpt", framework="torch")["model"]
    for key, tensor in state.items():
        got = loaded[key]
        assert isinstance(got, torch.Tensor) and got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.detach().contiguous().reshape(-1).view(torch.uint8)), key


def test_numpy_rng_state_with_128_bit_integers_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(1234)
    rng.standard_normal(10)
    state = {"rng": rng.bit_generator.state, "wide": [2**64, -(2**100), 2**63 - 1, -(2**63), 10**4299]}
    assert state["rng"]["state"]["state"] >= 2**64 or state["rng"]["state"]["inc"] >= 2**64
    cairn.save(tmp_path / "ckpt", state)
    loaded = cairn.load(tmp_path / "ckpt")
    assert loaded == state
    resumed = np.random.default_rng()
    resumed.bit_generator.state = loaded["rng"]
    assert np.array_equal(resumed.standard_normal(5), rng.standard_normal(5))


def test_complex128_and_integers_past_the_limit_are_refused_naming_the_key(tmp_path):
    with pytest.raises(cairn.InvalidArgumentError, match=r"key=`z`.*cast to complex64"):
        cairn.save(tmp_path / "a", {"z": np.zeros(2, np.complex128)})
    import torch

    with pytest.raises(cairn.InvalidArgumentError, match=r"key=`t`.*cast to complex64"):
        cairn.save(tmp_path / "b", {"t": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(cairn.InvalidArgumentError, match=r"key=`n`"):
        cairn.save(tmp_path / "c", {"n": 10**4300})
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_torch_model_and_optimizer_state_dicts_round_trip(tmp_path):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    cairn.save(tmp_path / "ckpt", {"model": model.state_dict(), "optim": opt.state_dict()})
    loaded = cairn.load(tmp_path / "ckpt", framework="torch")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fresh.load_state_dict(loaded["model"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(loaded["optim"])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_jax_arrays_on_an_accelerator_round_trip_through_the_manager(tmp_path):
    import jax
    import jax.numpy as jnp

    if all(d.platform == "cpu" for d in jax.devices()):
        pytest.skip("needs a jax accelerator")
    state = {f"w{i}": jnp.full((256, 64), i, dtype=jnp.bfloat16) for i in range(8)}
    with cairn.CheckpointManager(tmp_path / "run", policies=[cairn.Every(1)]) as mgr:
        assert mgr.on_step(1, state)
    loaded, _ = cairn.CheckpointManager(tmp_path / "run").restore(framework="jax")
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and bool(jnp.all(loaded[key] == value)), key


def test_large_tensors_load_64_byte_aligned_and_jax_uses_them_in_place(tmp_path):
    import jax

    from cairn import _arrays

    state = {"bias": np.ones(3, np.float16), "w": np.ones((64, 48), np.float32), "v": np.ones(1000, np.float64)}
    cairn.save(tmp_path / "ckpt", state)
    loaded = cairn.load(tmp_path / "ckpt")
    assert loaded["w"].ctypes.data % 64 == 0 and loaded["v"].ctypes.data % 64 == 0
    if jax.devices()[0].platform == "cpu":
        assert _arrays.to_framework(loaded["w"], "jax").unsafe_buffer_pointer() == loaded["w"].ctypes.data


def test_jax_arrays_round_trip(tmp_path):
    import jax.numpy as jnp

    state = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3), "b": jnp.ones(3, dtype=jnp.float32)}
    cairn.save(tmp_path / "ckpt", state)
    loaded = cairn.load(tmp_path / "ckpt", framework="jax")
    for key in state:
        assert loaded[key].dtype == state[key].dtype
        assert bool(jnp.all(loaded[key] == state[key]))


def test_a_load_reports_its_progress_in_bytes(tmp_path):
    state = {f"layer{i}": np.full((1 << 20,), i, dtype=np.float32) for i in range(6)}  # 24 MiB
    info = cairn.save(tmp_path / "run", state, step=1)
    told = []
    loaded = cairn.load(tmp_path / "run", progress=lambda stage, n: told.append((stage, n)))
    # Every byte of the tensors, read and checked (in steps of a few MiB; here one file).
    assert {s for s, _ in told} == {"reading"}
    assert sum(n for _, n in told) == info.tensor_bytes
    assert all(np.array_equal(loaded[k], v) for k, v in state.items())
    # A load into a target reads in batches; together they tell every byte once.
    told.clear()
    target = {k: np.zeros_like(v) for k, v in state.items()}
    cairn.load(tmp_path / "run", target=target, progress=lambda stage, n: told.append((stage, n)))
    assert sum(n for _, n in told) == info.tensor_bytes
    assert all(np.array_equal(target[k], v) for k, v in state.items())


def test_the_native_reading_of_the_structure_builds_what_the_python_reading_does():
    """`_tree.unflatten` reads the saved structure natively; every selection of every
    kind of nesting (int keys, tuples, empty containers, None values) is built exactly as
    the Python reading (the reference, and what reads structures the native one does
    not: nested deeper than its parser goes) builds it."""
    import itertools
    import json

    from cairn import _cairn, _tree

    deep = current = {}
    for _ in range(_tree.MAX_NESTING):
        current["d"] = {}
        current = current["d"]
    current["leaf"] = np.zeros(1)
    states = [
        {"a": {0: np.ones(2), 1: {}, "t": (np.zeros(1), [], None)}, "b": [1, "x", np.ones(3)], "c": {"d": {"e": 5}}},
        [np.ones(1), {"k": None}],
        (),
        np.ones(2),
        deep,
    ]
    for state in states:
        leaves = _tree.flatten(state)
        keys = [t[0] for t in leaves.tensors] + [v[0] for v in leaves.values]
        everything = {k: f"leaf:{k}" for k in keys}
        for n in range(len(keys) + 1):
            for chosen in itertools.islice(itertools.combinations(keys, n), 20):
                selected = {k: everything[k] for k in chosen}
                want = _tree._unflatten(json.loads(leaves.structure), selected)
                if want is _tree._MISSING:
                    want = {"dict": {}, "list": [], "tuple": ()}.get(next(iter(json.loads(leaves.structure))))
                parsed, got = _cairn.unflatten(leaves.structure, selected)
                if state is deep:
                    assert not parsed  # deeper than the native parser goes: Python reads it
                    continue
                assert parsed and got == want and repr(got) == repr(want), (state, chosen, got, want)
        assert _tree.unflatten(leaves.structure, everything) is not None
    # Not a structure the native parser reads: Python's reading says what is wrong.
    assert _cairn.unflatten('{"dict": [[["unhashable"], {"tensor": "w"}]]}', {"w": 1}) == (False, None)
    with pytest.raises(cairn.CorruptCheckpointError, match="structure is malformed"):
        _tree.unflatten('{"dict": [[["unhashable"], {"tensor": "w"}]]}', {"w": 1})
