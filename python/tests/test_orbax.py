"""Cairn as an Orbax checkpoint handler (`cairn.orbax`): a Flax NNX model and its optax
state in a real `ocp.CheckpointManager`, restored with their pytree types."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import cairn
import cairn.orbax


class Model(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)


def trained(seed):
    model = Model(nnx.Rngs(seed))
    tx = optax.adam(1e-2)
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: p * 0.5, params)
    opt_state = tx.init(params)
    _, opt_state = tx.update(grads, opt_state, params)
    return model, opt_state


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_an_nnx_model_and_optax_state_round_trip_in_a_checkpoint_manager(tmp_path):
    model, opt_state = trained(0)
    state = {"model": nnx.state(model), "opt": opt_state}
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
        for step in (10, 20, 30):
            mngr.save(step, args=ocp.args.Composite(state=cairn.orbax.Save(state)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [20, 30]  # Orbax's retention, over Cairn items

        other, _ = trained(1)
        target = {"model": abstract(nnx.state(other)), "opt": abstract(opt_state)}
        restored = mngr.restore(30, args=ocp.args.Composite(state=cairn.orbax.Restore(target)))["state"]
    assert type(restored["model"]) is type(state["model"])
    assert type(restored["opt"][0]) is type(opt_state[0])  # optax's ScaleByAdamState
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restored, state)
    assert all(jax.tree.leaves(same))
    nnx.update(other, restored["model"])
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(other), state["model"])
    assert all(jax.tree.leaves(same))

    # The item folder is an ordinary Cairn checkpoint, verified on load.
    plain = cairn.load(tmp_path / "30" / "state")
    assert np.array_equal(plain["model"]["l1"]["kernel"]["value"], np.asarray(state["model"]["l1"]["kernel"][...]))
    meta = cairn.orbax.CheckpointHandler().metadata(tmp_path / "30" / "state")
    assert meta["model.l1.kernel.value"].shape == (3, 8)

    # Without a target: nested dicts, as Orbax gives a tree without one.
    with ocp.CheckpointManager(tmp_path) as mngr:
        bare = mngr.restore(30, args=ocp.args.Composite(state=cairn.orbax.Restore()))["state"]
    mu = np.asarray(opt_state[0].mu["l2"]["bias"][...])
    assert np.array_equal(np.asarray(bare["opt"]["0"]["mu"]["l2"]["bias"]["value"]), mu)

    # A target of another shape is refused, naming the key.
    def reshaped(path, leaf):
        kernel = jax.tree_util.keystr(path).startswith("['model']['l1']['kernel']")
        return jax.ShapeDtypeStruct((4, 8), np.float32) if kernel else leaf

    wrong = jax.tree_util.tree_map_with_path(reshaped, target)
    with ocp.CheckpointManager(tmp_path) as mngr, pytest.raises(Exception, match="model.l1.kernel.value"):
        mngr.restore(30, args=ocp.args.Composite(state=cairn.orbax.Restore(wrong)))
