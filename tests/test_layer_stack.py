"""The layer scan's stacked storage (llm.layer_stack, issue 13): the same initial parameters as the
unrolled model, one exact conversion between the layouts for the whole train state, the same weight
decay, checkpoints that resume across layouts, and the key/value-cache decoder on a scanned model.

The model: MoE every 2nd block of 5, so two (dense, MoE) units are stacked and one dense block is
left over; its parameters differ layer by layer, so a layer put in the wrong place shows.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.config import ModelConfig, MoEConfig, OptimConfig, load_config
from llm.data.tokenizers import ByteTokenizer
from llm.evaluation import Evaluator
from llm.layer_stack import is_stacked, to_layout
from llm.model import Transformer, layer_blocks
from llm.optim import _decay_mask, make_optimizer

MOE = ModelConfig(d_model=16, n_layers=5, n_heads=2, d_ff=32, seq_len=32, compute_dtype="float32",
                  moe=MoEConfig(n_experts=4, top_k=2, every=2, d_ff_expert=16))  # fmt: skip


@pytest.fixture(scope="module")
def models():
    """{scan_layers: the model}, built from one seed."""
    return {scan: Transformer(dataclasses.replace(MOE, scan_layers=scan), rngs=nnx.Rngs(0)) for scan in (False, True)}


@pytest.fixture(scope="module")
def states(models):
    """The initial train state in each layout: {scan_layers: state}."""
    optimizer = make_optimizer(OptimConfig(), 10)
    params = {scan: nnx.state(model) for scan, model in models.items()}
    return {scan: {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32)} for scan, p in params.items()}


def assert_same_tree(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)  # logical names ("layers") included
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_scanned_model_starts_from_the_unrolled_parameters_stacked(states):
    plain, scanned = states[False]["params"], states[True]["params"]
    assert is_stacked(scanned) and not is_stacked(plain)
    assert sorted(scanned["stacked"]) == [0, 1] and sorted(scanned["blocks"]) == [0]  # unit positions; the leftover
    router = scanned["stacked"][1]["mlp"]["router_DE"]  # position 1 of a unit: the MoE block, layers 1 and 3
    assert router.shape == (2, 16, 4) and router.get_metadata()["out_sharding"] == ("layers", "embed", None)
    np.testing.assert_array_equal(router[...][1], plain["blocks"][3]["mlp"]["router_DE"][...])
    np.testing.assert_array_equal(scanned["blocks"][0]["mlp"]["w_in_DF"][...], plain["blocks"][4]["mlp"]["w_in_DF"][...])
    assert_same_tree(to_layout(states[False], MOE, stacked=True), states[True])
    assert_same_tree(to_layout(states[True], MOE, stacked=False), states[False])


def test_conversion_round_trips_a_whole_train_state_exactly(states):
    # Every leaf distinct (Adam's moments included, which start at zero), so no two entries can swap unseen.
    leaves, treedef = jax.tree.flatten(states[False])
    start = np.cumsum([0] + [np.size(x) for x in leaves])
    distinct = jax.tree.unflatten(treedef, [np.arange(s, s + np.size(x), dtype=np.asarray(x).dtype).reshape(np.shape(x))
                                            for s, x in zip(start, leaves)])  # fmt: skip
    stacked = to_layout(distinct, MOE, stacked=True)
    assert jax.tree.structure(stacked) == jax.tree.structure(states[True])
    mu = stacked["opt_state"][1][0].mu  # clip, then AdamW's scale_by_adam
    np.testing.assert_array_equal(mu["stacked"][0]["attn"]["w_q_DNH"][...][1],
                                  distinct["opt_state"][1][0].mu["blocks"][2]["attn"]["w_q_DNH"][...])  # fmt: skip
    assert_same_tree(to_layout(stacked, MOE, stacked=False), distinct)
    assert_same_tree(to_layout(stacked, MOE, stacked=True), stacked)  # already in the asked layout: unchanged


def test_both_layouts_decay_the_same_parameters(states):
    def decayed_entries(state):  # the decay mask of every entry, per block
        params = state["params"]
        entries = jax.tree.map(lambda decay, p: np.full(np.shape(p), decay), _decay_mask(params), params)
        return to_layout(entries, MOE, stacked=False)

    plain, scanned = decayed_entries(states[False]), decayed_entries(states[True])
    assert_same_tree(scanned, plain)
    assert not plain["blocks"][0]["attn_norm"]["scale_D"][...].any()  # norm gains: never (stacked, they are 2-D)
    assert plain["blocks"][1]["mlp"]["router_DE"][...].all() and plain["embed_VD"][...].all()


def test_layer_blocks_of_a_scanned_model_are_the_unrolled_blocks_in_order(models):
    got = [nnx.state(block) for block in layer_blocks(models[True])]  # what llm.evaluation's decoder walks
    assert [block.is_moe for block in layer_blocks(models[True])] == [False, True, False, True, False]
    assert_same_tree(got, [nnx.state(block) for block in models[False].blocks])


def test_scanned_model_scores_and_generates_as_the_unrolled_one():
    """Three dense layers (the MoE blocks' order is checked above, and they cost the most to compile)."""
    tok = ByteTokenizer()
    cfg = dataclasses.replace(MOE, moe=None, n_layers=3)
    models = [Transformer(dataclasses.replace(cfg, scan_layers=scan), rngs=nnx.Rngs(3)) for scan in (False, True)]
    evaluators = [Evaluator.from_model(m, tok, max_length=32, batch_size=4) for m in models]  # the key/value cache
    requests = [("abc", " d"), ("4+5=", "9")]  # one length bucket: one compilation each
    (plain, scanned) = [ev.loglikelihood(requests) for ev in evaluators]
    np.testing.assert_allclose([ll for ll, _ in scanned], [ll for ll, _ in plain], rtol=1e-5)
    generated = [ev.generate_until([(c, [], 4) for c, _ in requests]) for ev in evaluators]
    assert generated[1] == generated[0] and any(generated[0])


def test_a_checkpoint_resumes_in_the_other_layout_to_the_uninterrupted_run(tmp_path):
    """Scanned run to step 4; resumed unrolled from its step-2 checkpoint (stacked -> per block), the
    losses are the uninterrupted run's; its step-4 checkpoint (per block) restores into the scanned
    layout as the uninterrupted run's step-4 state."""
    from llm.checkpoint import Checkpoints
    from llm.layer_stack import restore_state
    from llm.sharding import make_mesh
    from llm.training import init_state, train

    def cfg(scan):
        return load_config(None, [
            "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.d_ff=32", "model.seq_len=16",
            "model.compute_dtype=float32", f"model.scan_layers={str(scan).lower()}", "data.source=synthetic:markov",
            "train.batch_size=4", "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
            "train.eval_every=100", "train.eval_tokens=64", "train.keep_checkpoints=3", "train.progress=false",
            "train.tensorboard=false", "optim.warmup_steps=1",
        ])  # fmt: skip

    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert train(cfg(True), run_dir).status == "done"
    straight = (run_dir / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "straight").mkdir()
    shutil.move(checkpoints / "4", tmp_path / "straight" / "4")  # back to the step-2 checkpoint, saved stacked
    (run_dir / "result.json").unlink()
    assert train(cfg(False), run_dir).status == "done"
    resumed = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(resumed) == 4 and resumed[:2] == straight[:2]  # resumed (steps 1-2 and their timings kept), not restarted
    losses = [[json.loads(line)["train_loss"] for line in lines[2:]] for lines in (resumed, straight)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)  # steps 3-4, trained unrolled

    scan = cfg(True)
    _, like, _ = init_state(scan, make_optimizer(scan.optim, 4), make_mesh(scan))  # the arrays as `train` lays them out
    with Checkpoints(checkpoints, keep=None) as per_block:
        got, _ = restore_state(per_block, 4, like, scan.model)
    with Checkpoints(tmp_path / "straight", keep=None) as stacked:
        want, _ = stacked.restore(4, like)
    assert jax.tree.structure(got) == jax.tree.structure(want) and is_stacked(got)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
