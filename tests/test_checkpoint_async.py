"""Asynchronous checkpoint saves (llm.checkpoint): the values at save time survive the donated steps
that follow, a kill mid-write resumes from the previous checkpoint, a failed background write names
its own step. Tiny states, no model: each test runs in about a second."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.checkpoint import CheckpointError, Checkpoints


def _ones():
    return {"params": {"w_DF": jnp.ones((64, 128))}, "opt_state": {"mu_DF": jnp.ones((64, 128))}, "step": jnp.ones((), jnp.int32)}


def _step_dirs(folder):
    return sorted(p.name for p in folder.iterdir())


def test_an_async_save_keeps_the_values_at_save_time_while_donated_steps_run(tmp_path, checkpoint_writes, capsys):
    """The train step donates the state it is given; the save returned before the write and the
    steps run while the write is held, yet step 2's checkpoint holds the values after step 2."""
    step = jax.jit(lambda state: jax.tree.map(lambda a: a + 1, state), donate_argnums=0)
    state = _ones()
    with Checkpoints(tmp_path, keep=1, asynchronous=True) as checkpoints:
        checkpoints.save(1, state, {"step": 1})
        checkpoints.wait()
        state = step(state)  # all 2
        checkpoint_writes.gate.clear()
        checkpoints.save(2, state, {"step": 2})  # returns with its write held
        for _ in range(3):
            state = step(state)
        assert float(state["params"]["w_DF"][0, 0]) == 5.0 and int(state["step"]) == 5
        # A kill now leaves step 1 complete (keep=1 drops it only once step 2 is committed) and
        # step 2 half-written: a rerun resumes from step 1 and says so.
        assert not (tmp_path / "2").exists() and len(list(tmp_path.glob("2.orbax-checkpoint-tmp*"))) == 1
        with Checkpoints(tmp_path, keep=1) as rerun:
            assert rerun.resume_step() == 1
        assert "was never completed" in capsys.readouterr().err
        checkpoint_writes.gate.set()
    assert _step_dirs(tmp_path) == ["2"]
    assert all(background for background, _ in checkpoint_writes.seen)
    with Checkpoints(tmp_path, keep=1) as checkpoints:
        restored, meta = checkpoints.restore(2, _ones())
    assert meta == {"step": 2}
    for leaf in jax.tree.leaves(restored):
        np.testing.assert_array_equal(np.asarray(leaf), 2)


@pytest.mark.parametrize("found_by", ["the next save", "close"])
def test_a_failed_background_write_fails_naming_its_own_step(tmp_path, checkpoint_writes, found_by):
    state = _ones()
    checkpoints = Checkpoints(tmp_path, keep=1, asynchronous=True)
    checkpoints.save(1, state, {"step": 1})
    checkpoints.wait()
    checkpoint_writes.fail = OSError("No space left on device")
    checkpoints.save(2, state, {"step": 2})  # returns: the write fails in the background
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoint {tmp_path}/2: OSError: No space left on device"):
        checkpoints.save(3, state, {"step": 3}) if found_by == "the next save" else checkpoints.close()
    # step 2's half-written folder is gone, step 1 kept despite keep=1, step 3 never started
    assert _step_dirs(tmp_path) == ["1"]
    if found_by == "the next save":
        checkpoints.close()  # reported once: closing is quiet
    with Checkpoints(tmp_path, keep=1) as rerun:
        assert rerun.resume_step() == 1


def test_a_synchronous_save_returns_with_the_checkpoint_complete(tmp_path, checkpoint_writes):
    checkpoint_writes.delay = 0.2
    with Checkpoints(tmp_path, keep=2, asynchronous=False) as checkpoints:
        checkpoints.save(1, _ones(), {"step": 1})
        assert _step_dirs(tmp_path) == ["1"]


def test_async_checkpoint_is_an_execution_key_a_resume_may_change():
    from llm.config import load_config, without_execution_keys
    from llm.typed_yaml import to_dict

    assert load_config(None, []).train.async_checkpoint is True
    off = to_dict(load_config(None, ["train.async_checkpoint=false"]))
    assert without_execution_keys(off) == without_execution_keys(to_dict(load_config(None, [])))
