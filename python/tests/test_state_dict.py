"""load_state_dict reports for torch modules and plain dicts."""

import numpy as np
import pytest
import torch

import cairn


def make_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_ddp_prefix_is_stripped_and_weights_copied(tmp_path):
    model = make_model()
    cairn.save(tmp_path / "ckpt", {f"module.{k}": v for k, v in model.state_dict().items()})
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    report = cairn.load_state_dict(fresh, cairn.load(tmp_path / "ckpt", framework="torch"))
    assert report.ok, str(report)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_missing_unexpected_and_mismatched_keys_are_reported(tmp_path):
    model = make_model()
    sd = model.state_dict()
    state = {"0.weight": sd["0.weight"], "0.bias": sd["0.bias"].double(), "1.weight": torch.zeros(9), "extra": torch.ones(1)}
    report = cairn.load_state_dict(model, state)
    assert report.missing_keys == ["1.bias"]
    assert report.unexpected_keys == ["extra"]
    assert {m.key for m in report.mismatched} == {"0.bias", "1.weight"}
    bias = next(m for m in report.mismatched if m.key == "0.bias")
    assert (bias.expected_dtype, bias.got_dtype) == ("float32", "float64")
    assert not report.ok


def test_strict_mode_raises_and_copies_nothing(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"0.weight": torch.zeros(4, 3)}
    with pytest.raises(cairn.StateDictMismatchError, match="missing keys") as info:
        cairn.load_state_dict(model, state, strict=True)
    assert "1.bias" in info.value.report.missing_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_plain_dict_target_is_updated_in_place(tmp_path):
    target = {"model": {"w": np.zeros(3, np.float32)}, "b": np.zeros(2)}
    cairn.save(tmp_path / "ckpt", {"model": {"w": np.ones(3, np.float32)}, "b": np.ones(2)})
    w = target["model"]["w"]
    report = cairn.load_state_dict(target, cairn.load(tmp_path / "ckpt"))
    assert report.ok
    assert w.tolist() == [1.0, 1.0, 1.0] and target["b"].tolist() == [1.0, 1.0]
