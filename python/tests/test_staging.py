"""Device tensors reach the manager through one staged host buffer: nothing is gathered on
steps that save nothing, the staged copy is the snapshot (no second copy), and what is
written is what the state held at the call."""

import numpy as np
import pytest
import torch

import cairn
from cairn import _cairn, _staging, _tree


def test_on_step_does_not_look_at_the_state_on_steps_that_save_nothing(run_dir, monkeypatch):
    flattened = []
    flatten = _tree.flatten
    monkeypatch.setattr(_tree, "flatten", lambda state, *casts: flattened.append(state) or flatten(state, *casts))
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(10)]) as mgr:
        saved = [s for s in range(1, 31) if mgr.on_step(s, {"w": torch.full((3,), float(s))})]
        assert mgr.on_step(31, {"w": torch.zeros(3)}, force=True)
    assert saved == [10, 20, 30]
    assert len(flattened) == 4


def test_a_refused_leaf_only_fails_the_steps_that_save(run_dir):
    bad = {"w": torch.zeros(2), "opaque": object()}
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(5)]) as mgr:
        assert not mgr.on_step(4, bad)
        with pytest.raises(cairn.InvalidArgumentError, match="key=`opaque`"):
            mgr.on_step(5, bad)


def test_stage_copies_every_kind_of_leaf_into_one_aligned_buffer():
    items = [
        ("bf16", torch.arange(7, dtype=torch.float32).to(torch.bfloat16)),
        ("strided", torch.arange(12, dtype=torch.int64).reshape(3, 4).t()),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("empty", torch.zeros((0, 5), dtype=torch.int16)),
        ("mask", torch.tensor([True, False, True])),
        ("numpy", np.arange(5, dtype=np.uint32)),
    ]
    buffers, staged = _staging.stage(items)
    assert [(name, shape) for name, shape, _ in staged] == [
        ("BF16", [7]),
        ("I64", [4, 3]),
        ("F64", []),
        ("I16", [0, 5]),
        ("BOOL", [3]),
        ("U32", [5]),
    ]
    for (key, source), (name, shape, raw) in zip(items, staged):
        if raw.size:
            starts = [raw.ctypes.data - b.ctypes.data for b in buffers if 0 <= raw.ctypes.data - b.ctypes.data < b.size]
            assert len(starts) == 1 and starts[0] % 64 == 0, key
        expected = cairn._arrays.to_raw(key, source)[2]
        assert raw.tobytes() == expected.tobytes(), key


@pytest.mark.parametrize("seed", range(20))
def test_packing_places_every_size_once_without_overlap_and_wastes_little(seed):
    rng = np.random.default_rng(seed)
    kinds = [rng.integers(1, 1 << 12), rng.integers(1 << 20, 1 << 24), rng.integers(1 << 24, 1 << 28)]
    sizes = [int(rng.choice(kinds)) for _ in range(int(rng.integers(1, 400)))]
    places, bins = _staging.pack(sizes)
    assert all(b & (b - 1) == 0 for b in bins)
    spans = sorted((b, offset, offset + n) for (b, offset), n in zip(places, sizes))
    for (b1, _, end1), (b2, start2, _) in zip(spans, spans[1:]):
        assert b1 != b2 or end1 <= start2
    assert all(offset % 64 == 0 and end <= bins[b] for b, offset, end in spans)
    # All bins but the last are more than three quarters full.
    aligned = sum(-(-n // 64) * 64 for n in sizes)
    assert sum(bins) <= 4 / 3 * aligned + max(bins)


def test_a_tensor_without_data_is_refused_with_its_key(run_dir):
    state = {"model": {"w": torch.empty(4, device="meta")}}
    with pytest.raises(cairn.InvalidArgumentError, match="key=`model.w`"):
        cairn.save(run_dir / "ckpt", state)
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)]) as mgr:
        with pytest.raises(cairn.InvalidArgumentError, match="key=`model.w`"):
            mgr.on_step(1, state)


def test_a_staged_save_writes_the_state_as_it_was_at_the_call(run_dir):
    w = torch.arange(1 << 16, dtype=torch.float32)
    leaves = _tree.flatten({"w": w, "step": 3})
    leaves.staging, raws = _staging.stage([("w", w)])
    leaves.tensors = [("w", dtype, shape, raw, None) for dtype, shape, raw in raws]
    native = _cairn.Manager(str(run_dir), [(1, None)])
    native.on_step(3, lambda: (leaves, None, None))
    w.fill_(-1)  # the caller's tensor changes at once; the staged copy is what gets written
    del leaves, raws
    native.wait()
    state, info = cairn.CheckpointManager(run_dir).restore(framework="torch")
    assert info.step == 3 and state["step"] == 3
    assert torch.equal(state["w"], torch.arange(1 << 16, dtype=torch.float32))


def test_a_tensor_outside_the_staging_buffer_is_refused(run_dir):
    buffers, staged = _staging.stage([("w", torch.zeros(4))])
    elsewhere = np.zeros(16, np.uint8)
    native = _cairn.Manager(str(run_dir), [(1, None)])
    leaves = _tree.Leaves()
    leaves.tensors = [("w", "F32", [4], staged[0][2], None), ("v", "F32", [4], elsewhere, None)]
    leaves.staging = buffers
    with pytest.raises(cairn.InvalidArgumentError, match="not inside the staging buffers key=`v`"):
        native.save(1, lambda: (leaves, None, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_round_trips_through_the_manager_and_save(run_dir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(16, 64, device="cuda")).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "half": model[0].weight.to(torch.bfloat16)}
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)]) as mgr:
        assert mgr.on_step(1, state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the device tensors change while the save runs
    restored, _ = cairn.CheckpointManager(run_dir).restore(framework="torch")
    for key, value in expected.items():
        assert torch.equal(restored["model"][key], value), key
    assert torch.equal(restored["half"], expected["0.weight"].to(torch.bfloat16))
    cairn.save(run_dir / "direct", state)
    again = cairn.load(run_dir / "direct", framework="torch")
    assert torch.equal(again["model"]["0.weight"], model[0].weight.cpu())


def test_an_unsupported_dtype_is_refused_with_its_key_on_both_paths(run_dir):
    with pytest.raises(cairn.InvalidArgumentError, match="unsupported dtype .* key=`opt.c`"):
        cairn.save(run_dir / "ckpt", {"opt": {"c": np.zeros(2, np.complex128)}})
    with pytest.raises(cairn.InvalidArgumentError, match="unsupported dtype .* key=`c`"):
        _staging.stage([("w", torch.zeros(2)), ("c", torch.zeros(2, dtype=torch.complex128))])
    assert not (run_dir / "ckpt").exists()
