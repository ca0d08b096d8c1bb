"""One run over many devices (issue 14): the mesh config, the logical-axis rules, and training
on 8 fake CPU devices.

The fake devices exist only if XLA is told before JAX starts, so the multi-device checks run
in subprocesses: tests/mesh_equivalence.py (every layout, one process) and `chinchax train`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_devices import cpu_devices_env

from llm import sharding
from llm.config import Config, ConfigError, MeshConfig, dump_config, load_config

REPO = Path(__file__).resolve().parent.parent

# Float32 over 3 steps: the losses agree to a few ulps (5.56 has an ulp of 4.8e-7). Parameters
# move by lr * Adam's m / sqrt(v): a gradient entry near zero amplifies summation-order noise
# there, so the parameter bound is looser than the loss bound.
LOSS_TOLERANCE = 1e-5
PARAM_TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def layouts():
    """tests/mesh_equivalence.py's JSON: case -> layout -> losses, differences, bytes, specs."""
    done = subprocess.run([sys.executable, str(REPO / "tests" / "mesh_equivalence.py")], capture_output=True,
                          text=True, env=cpu_devices_env(8), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# --------------------------------------------------------------------------- 8 fake devices


def test_every_layout_gives_the_one_device_losses_and_parameters(layouts):
    dense = layouts["dense"]
    assert set(dense) == {"1", "data8", "fsdp8", "data2_fsdp4", "data4_tensor2", "fsdp4_tensor2"}
    assert "fsdp4_tensor2" in layouts["dense_scan"]  # the scan path, against the plain path's one device
    for case, runs in layouts.items():
        for name, run in runs.items():
            assert run["max_loss_diff"] <= LOSS_TOLERANCE, (case, name, run["losses"])
            assert run["max_param_diff"] <= PARAM_TOLERANCE, (case, name)
    one = dense["1"]
    assert one["mesh"] == {"axes": {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, "n_devices": 1}
    assert dense["data2_fsdp4"]["mesh"] == {"axes": {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}, "n_devices": 8}
    assert len(set(one["losses"])) == 3 and all(np.isfinite(one["losses"]))  # three real steps


def test_parameters_and_optimiser_state_shrink_in_proportion_to_fsdp(layouts):
    runs = layouts["dense"]
    params, opt = runs["1"]["param_bytes_per_device"], runs["1"]["opt_bytes_per_device"]
    scalars = 64  # Adam's step counts stay replicated
    assert 0 <= opt - 2 * params <= scalars  # two moments per parameter
    assert runs["data8"]["param_bytes_per_device"] == params  # data parallel replicates
    for name, fsdp in (("fsdp8", 8), ("data2_fsdp4", 4)):
        assert runs[name]["param_bytes_per_device"] == params // fsdp
        assert 0 <= runs[name]["opt_bytes_per_device"] - 2 * params // fsdp <= scalars
    # tensor parallel splits every matrix; the norm scales (embed only) are split by fsdp alone
    assert params / 2 <= runs["data4_tensor2"]["param_bytes_per_device"] < params / 2 * 1.02
    assert params / 8 <= runs["fsdp4_tensor2"]["param_bytes_per_device"] < params / 8 * 1.02
    assert 2 * params / 8 <= runs["fsdp4_tensor2"]["opt_bytes_per_device"] < 2 * params / 8 * 1.02 + scalars


def test_moe_layouts_drop_nothing_and_split_the_experts(layouts):
    moe = layouts["moe"]  # every layout checked against one device above
    assert set(moe) == {"1", "fsdp4_tensor2", "expert8", "data2_expert4", "fsdp2_expert4"}
    assert all(run["drop_fraction"] == 0.0 for run in moe.values())  # the default all-to-all capacity
    w_in = "['blocks'][0]['mlp']['w_in_EDF'].value"
    assert moe["expert8"]["specs"][w_in] == ["expert", None, None]
    assert moe["fsdp2_expert4"]["specs"][w_in] == ["expert", "fsdp", None]
    assert moe["fsdp4_tensor2"]["specs"][w_in] == [None, "fsdp", "tensor"]
    # w_in, w_gate, w_out: 8 experts x d_model 32 x d_ff_expert 32, float32; the rest is replicated over expert
    experts = 3 * 8 * 32 * 32 * 4
    rest = moe["1"]["param_bytes_per_device"] - experts
    assert moe["expert8"]["param_bytes_per_device"] == rest + experts // 8
    assert moe["data2_expert4"]["param_bytes_per_device"] == rest + experts // 4
    assert moe["fsdp2_expert4"]["param_bytes_per_device"] == rest // 2 + experts // 8


def test_partition_specs_follow_the_rules(layouts):
    expected = {  # by hand from sharding.RULES: embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor
        "fsdp4_tensor2": {
            "['embed_VD'].value": ["tensor", "fsdp"],
            "['unembed_DV'].value": ["fsdp", "tensor"],
            "['blocks'][0]['attn']['w_q_DNH'].value": ["fsdp", "tensor", None],
            "['blocks'][0]['attn']['w_k_DKH'].value": ["fsdp", "tensor", None],
            "['blocks'][1]['attn']['w_o_NHD'].value": ["tensor", None, "fsdp"],
            "['blocks'][0]['mlp']['w_in_DF'].value": ["fsdp", "tensor"],
            "['blocks'][1]['mlp']['w_out_FD'].value": ["tensor", "fsdp"],
            "['final_norm']['scale_D'].value": ["fsdp"],
        },
        "data4_tensor2": {"['embed_VD'].value": ["tensor", None], "['blocks'][0]['mlp']['w_gate_DF'].value": [None, "tensor"],
                          "['final_norm']['scale_D'].value": [None]},  # fmt: skip
        "fsdp8": {"['embed_VD'].value": [None, "fsdp"], "['blocks'][0]['attn']['w_v_DKH'].value": ["fsdp", None, None]},
    }
    # the scan's stacked parameters: the same split behind a whole "layers" axis
    assert layouts["dense_scan"]["fsdp4_tensor2"]["specs"]["['stacked'][0]['attn']['w_q_DNH'].value"] == [None, "fsdp", "tensor", None]
    runs = layouts["dense"]
    for name, specs in expected.items():
        for path, spec in specs.items():
            assert runs[name]["specs"][path] == spec, (name, path)
    for name in ("1", "data8"):
        assert all(all(axis is None for axis in spec) for spec in runs[name]["specs"].values())
    for name, run in runs.items():
        for path, spec in run["specs"].items():
            axes = [a for part in spec if part for a in (part if isinstance(part, list) else [part])]
            assert len(axes) == len(set(axes)), (name, path, spec)


def test_chinchax_train_on_8_devices_with_fsdp(tmp_path):
    run_dir = tmp_path / "run"  # mesh.fsdp=8 alone: mesh.data stays -1, the one device left
    args = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.seq_len=16",
            "data.source=synthetic:markov", "train.steps=2", "train.batch_size=8", "train.eval_tokens=64",
            "train.progress=false", "train.tensorboard=false", "mesh.fsdp=8"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "sweeps.cli", "train", *args, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=cpu_devices_env(8), cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done" and result["step"] == 2 and np.isfinite(result["final_eval_loss"])
    assert result["mesh"] == {"axes": {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}, "n_devices": 8}
    assert result["tokens_per_s_per_device"] == pytest.approx(result["tokens_per_s"] / 8)
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["tokens_per_s_per_device"] == pytest.approx(line["tokens_per_s"] / 8)


# --------------------------------------------------------------------------- the config and the rules (in process)


@pytest.mark.parametrize(
    "mesh, devices, fragment",
    [
        ({"data": -1, "fsdp": -1}, 8, "mesh.data and mesh.fsdp are both -1"),
        ({"data": 2, "fsdp": 2}, 8, "needs 4 devices but 8 are visible"),
        ({"data": -1, "fsdp": 3}, 8, "does not divide the 8 devices"),
        ({"data": 0}, 8, "mesh.data must be -1 (the rest of the devices) or > 0, got 0"),
        ({"data": -1, "tensor": 2}, 8, "cannot be split evenly over mesh.data=4 = 4 devices"),  # batch 6
    ],
)
def test_bad_meshes_are_refused_naming_the_problem(mesh, devices, fragment):
    cfg = Config(mesh=dataclasses.replace(MeshConfig(), **mesh))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=6 if "split" in fragment else 16))
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        sharding.mesh_shape(cfg, devices)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["mesh.fsdp=-1"], "mesh.data and mesh.fsdp are both -1"),
        (["mesh.data=0"], "mesh.data must be -1 or > 0, got 0"),
        (["mesh.data=1", "mesh.fsdp=4", "train.batch_size=12", "train.grad_accum=2"],
         "6 sequences per micro-batch cannot be split evenly over mesh.fsdp=4 = 4 devices"),
        (["mesh.date=2"], "did you mean"),
    ],
)
def test_bad_mesh_config_is_a_config_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_mesh_sizes_resolve_the_rest_of_the_devices():
    cfg = load_config(None, ["mesh.tensor=2"])
    assert sharding.mesh_shape(cfg, 8) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    assert sharding.mesh_shape(Config(), 1) == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=-1"])
    assert sharding.mesh_shape(cfg, 8)["fsdp"] == 4


def test_logical_spec_drops_repeated_size_one_and_uneven_axes():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2, "expert": 1}
    P = jax.sharding.PartitionSpec
    assert sharding.logical_spec(("batch", "seq", "embed"), sizes) == P(("data", "fsdp"))  # fsdp used by batch
    assert sharding.logical_spec(("embed", "mlp"), sizes) == P("fsdp", "tensor")
    assert sharding.logical_spec(("expert", "embed", "mlp"), sizes) == P(None, "fsdp", "tensor")  # expert size 1
    assert sharding.logical_spec(("embed", "kv_heads", "head_dim"), sizes, (32, 1, 8)) == P("fsdp")  # 1 kv head
    assert sharding.logical_spec(("batch", "seq"), sizes, (6, 16)) == P("data")  # 6 rows: not over data x fsdp
    assert sharding.logical_spec(("batch",), {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}) == P()
    with pytest.raises(ValueError, match="unknown logical axis name 'embd'"):
        sharding.logical_spec(("embd",), sizes)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.arange(12.0).reshape(2, 3, 2)
    assert sharding.constrain(x, ("batch", "seq", "embed")) is x
    assert jnp.array_equal(jax.jit(lambda v: sharding.constrain(v, ("batch", "seq", "embed")))(x), x)


def test_the_mesh_is_how_a_run_executes_not_what_it_is(tmp_path):
    """Changing the mesh neither renames a run nor trips the resume check (the losses agree: above)."""
    from llm.training import _check_same_config
    from sweeps.plan import config_hash

    one = load_config(None, [])
    sharded = load_config(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    assert config_hash(one) == config_hash(sharded)
    (tmp_path / "config.yaml").write_text(dump_config(sharded))
    _check_same_config(tmp_path, one)  # resumes on another mesh
    with pytest.raises(ConfigError, match="different config"):
        _check_same_config(tmp_path, load_config(None, ["mesh.data=2", "optim.lr=1e-3"]))
