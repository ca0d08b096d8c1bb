"""One run over several devices and processes: a run checkpointed under one mesh resumes under
another, jax.distributed starts from the environment, and two processes of 4 CPU devices train
like one process of 8.

Each sharded run is a ``chinchax train`` child process: the device count is fixed before JAX
starts. Every child has a timeout, so a collective waiting for a peer fails the test, not CI.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_devices import cpu_devices_env

from llm.distributed import Launch, launch_from_env
from llm.typed_yaml import ConfigError

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # per child: ~20 s of CPU when healthy, minutes on a crowded machine; never forever
TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.d_ff=64", "model.seq_len=16",
    "model.vocab_size=32", "model.compute_dtype=float32", "data.source=synthetic:markov", "data.dataset_tokens=65536",
    "train.batch_size=8", "train.steps=4", "train.log_every=1", "train.eval_every=4", "train.eval_tokens=256",
    "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.progress=false", "train.tensorboard=false",
    "optim.warmup_steps=1", "optim.lr=1e-2",
]  # fmt: skip
FSDP8 = ["mesh.data=1", "mesh.fsdp=8"]


def _train(run_dir: Path, overrides: list[str], devices: int, **extra: str) -> subprocess.Popen:
    """``chinchax train TINY overrides --run-dir run_dir`` on ``devices`` CPU devices, started."""
    cmd = [sys.executable, "-m", "sweeps.cli", "train", *TINY, *overrides, "--run-dir", str(run_dir)]
    env = cpu_devices_env(devices, drop=("JAX_", "SLURM_", "TPU_", "CHINCHAX_"), **extra)  # not a cluster's process
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _finish(*procs: subprocess.Popen) -> None:
    """Wait for every child (killing all of them past TIMEOUT_S); fail with the output of any that failed."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"a chinchax train child ran past {TIMEOUT_S} s (a collective waiting for a peer?)")
    failed = [(p.returncode, out[-3000:]) for p, out in zip(procs, outputs) if p.returncode != 0]
    assert not failed, failed


def _losses(run_dir: Path, key: str = "train_loss") -> dict[int, float]:
    """Step -> ``key`` of metrics.jsonl, for the steps that have it."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len({r["step"] for r in lines}), "one metrics line per step (process 0 writes alone)"
    return {r["step"]: r[key] for r in lines if r.get(key) is not None}


def _checkpoint(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """The state a run checkpointed after ``step``, restored onto this process's one device."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llm.checkpoint import Checkpoints
    from llm.config import load_config, total_steps
    from llm.model import Transformer
    from llm.optim import make_optimizer

    cfg = load_config(run_dir / "config.yaml")
    optimizer = make_optimizer(cfg.optim, total_steps(cfg))

    def init():
        params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)))
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), jax.eval_shape(init))
    with Checkpoints(run_dir / "checkpoints", keep=None) as checkpoints:
        state, _ = checkpoints.restore(step, targets)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], part: str) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a if k.startswith(part))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp8_run(tmp_path_factory):
    """The tiny run, uninterrupted, on 8 devices under fsdp 8: checkpoints after steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("fsdp8") / "run"
    _finish(_train(run_dir, FSDP8, 8))
    return run_dir


@pytest.mark.slow
def test_a_run_checkpointed_under_fsdp8_resumes_under_data2_tensor2_on_4_devices(fsdp8_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp8_run, run_dir)
    (run_dir / "result.json").unlink()  # killed after its step-2 checkpoint
    shutil.rmtree(run_dir / "checkpoints" / "4")
    _finish(_train(run_dir, ["mesh.data=2", "mesh.tensor=2"], 4))  # not refused as a "different config"

    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done" and result["mesh"]["n_devices"] == 4
    assert {k: v for k, v in result["mesh"]["axes"].items() if v > 1} == {"data": 2, "tensor": 2}
    reference, resumed = _losses(fsdp8_run), _losses(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    np.testing.assert_allclose([resumed[s] for s in (3, 4)], [reference[s] for s in (3, 4)], rtol=0, atol=2e-5)
    # After two more steps on the other mesh, the state is the uninterrupted run's, up to float32 order.
    a, b = _checkpoint(fsdp8_run, 4), _checkpoint(run_dir, 4)
    assert _max_diff(a, b, "['params']") < 1e-5 and _max_diff(a, b, "['opt_state']") < 1e-5
    assert _max_diff(_checkpoint(fsdp8_run, 2), a, "['params']") > 1e-3  # it trained


@pytest.mark.slow
def test_two_processes_of_4_cpu_devices_train_like_one_of_8(fsdp8_run, tmp_path):
    # Both share the run directory: had process 1 taken the run's lock, its chinchax train would
    # have failed; had it logged, metrics.jsonl would hold each step twice (_losses).
    run_dir, coordinator = tmp_path / "run", f"127.0.0.1:{_free_port()}"
    _finish(*[
        _train(run_dir, FSDP8, 4, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        for i in range(2)
    ])  # fmt: skip
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done" and result["mesh"]["n_devices"] == 8
    reference, got = _losses(fsdp8_run), _losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in got], [reference[s] for s in got], rtol=0, atol=2e-5)
    evals, reference_evals = _losses(run_dir, "eval_loss"), _losses(fsdp8_run, "eval_loss")
    assert sorted(evals) == sorted(reference_evals) == [1, 2, 4]  # each host placed its rows of the held-out set
    np.testing.assert_allclose(list(evals.values()), list(reference_evals.values()), rtol=0, atol=2e-5)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
    # the checkpoint both processes wrote their shards of reads back whole, equal to one process's
    a, b = _checkpoint(fsdp8_run, 4), _checkpoint(run_dir, 4)
    assert _max_diff(a, b, "['params']") < 1e-5 and _max_diff(a, b, "['opt_state']") < 1e-5


# --------------------------------------------------------------------------- when to start jax.distributed


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, {}),
    # the batch script of a 4-task job is one process: waiting for 3 peers would hang
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, {}),
    ({"CHINCHAX_DISTRIBUTED": "1"}, {}),
    ({"CHINCHAX_DISTRIBUTED": "0", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"}, None),
])  # fmt: skip
def test_the_environment_decides_whether_and_how_to_start_jax_distributed(environ, expected):
    launch = launch_from_env(environ)
    assert (launch.kwargs if isinstance(launch, Launch) else None) == expected


def test_a_sweep_worker_ignores_an_inherited_cluster_but_not_explicit_variables():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}
    assert launch_from_env(slurm, cluster=False) is None
    assert launch_from_env({"TPU_WORKER_HOSTNAMES": "a,b"}, cluster=False) is None
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert launch_from_env({**slurm, **explicit}, cluster=False).kwargs["num_processes"] == 2


@pytest.mark.parametrize(("environ", "message"), [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, r"JAX_PROCESS_ID not"),
    ({"JAX_PROCESS_ID": "0"}, r"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"0 <= JAX_PROCESS_ID <"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, r"JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, r"host:port"),
    ({"CHINCHAX_DISTRIBUTED": "yes"}, r"CHINCHAX_DISTRIBUTED='yes'"),
])  # fmt: skip
def test_incomplete_or_malformed_launch_variables_are_errors_naming_them(environ, message):
    with pytest.raises(ConfigError, match=message):
        launch_from_env(environ)
