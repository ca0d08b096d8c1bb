"""One run over several devices and processes: checkpoints restored onto another mesh, jax.distributed
start-up from the environment, and two processes of 4 CPU devices training like one of 8.

The device count is fixed before JAX starts, so the sharded runs are child processes
(tests/sharded_child.py), each with a timeout so that a hung collective fails the test instead of CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm.distributed import Launch, launch_from_env
from llm.typed_yaml import ConfigError

CHILD = Path(__file__).with_name("sharded_child.py")
REPO = CHILD.parent.parent
TIMEOUT_S = 300  # per child; a healthy one takes ~15 s of CPU


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "CHINCHAX_"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **extra)  # fmt: skip
    return env


def _start(mode: str, out: Path, mesh: str, devices: int, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), mode, str(out), mesh], env=_env(devices, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _finish(*procs: subprocess.Popen) -> None:
    """Wait for every child (killing all of them past TIMEOUT_S); fail with the output of any that failed."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"a sharded child ran past {TIMEOUT_S} s (a collective waiting for a peer?)")
    failed = [(p.returncode, out[-3000:]) for p, out in zip(procs, outputs) if p.returncode != 0]
    assert not failed, failed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp8_run(tmp_path_factory):
    """Steps 1-4 on 8 devices under fsdp 8, a checkpoint after step 2 (save.json, reference.npz)."""
    out = tmp_path_factory.mktemp("fsdp8")
    _finish(_start("save", out, "fsdp=8", 8))
    return out


@pytest.mark.slow
def test_a_checkpoint_saved_under_fsdp8_restores_under_data2_tensor2_on_4_devices(fsdp8_run):
    saved = json.loads((fsdp8_run / "save.json").read_text())
    assert saved["n_devices"] == 8
    assert all(spec in ("P()", "P('fsdp',)") or "'fsdp'" in spec for spec in saved["specs"].values())
    assert sum("'fsdp'" in spec for spec in saved["specs"].values()) >= 20  # params and moments really split

    _finish(_start("restore", fsdp8_run, "data=2,tensor=2", 4))
    restored = json.loads((fsdp8_run / "restore.json").read_text())
    assert restored["n_devices"] == 4 and restored["step"] == 2 and restored["meta_step"] == 2
    assert restored["keys_equal"] and restored["mu_keys"] > 0
    assert restored["params"] == 0.0 and restored["moments"] == 0.0  # a copy, bit for bit
    specs = restored["specs"].values()
    assert not any("fsdp" in spec for spec in specs) and sum("'tensor'" in spec for spec in specs) >= 20
    # Steps 3 and 4 continue as on the 8-device mesh, up to float32 reduction order.
    np.testing.assert_allclose(restored["losses"], saved["losses"][2:], rtol=0, atol=2e-5)


@pytest.mark.slow
def test_two_processes_of_4_cpu_devices_train_like_one_of_8(fsdp8_run, tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        _start("train3", tmp_path, "fsdp=8", 4, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))  # fmt: skip
        for i in range(2)
    ]
    _finish(*procs)
    reference = json.loads((fsdp8_run / "save.json").read_text())["losses"][:3]
    for i in range(2):
        got = json.loads((tmp_path / f"train3.{i}.json").read_text())
        assert (got["process_count"], got["n_devices"], got["n_local_devices"]) == (2, 8, 4)
        np.testing.assert_allclose(got["losses"], reference, rtol=0, atol=2e-5)
        assert got["params_changed"] > 1e-3  # it trained
        assert got["restored_max_abs_diff"] == 0.0  # the checkpoint both processes wrote reads back whole
        assert got["checkpoint_steps"] == ["3"]


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


def test_a_process_other_than_0_writes_no_run_files_but_takes_part_in_checkpoints(tmp_path, monkeypatch):
    from llm import training
    from llm.config import load_config

    monkeypatch.setattr(training, "is_main_process", lambda: False)
    cfg = load_config(None, [
        "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "model.seq_len=16",
        "train.batch_size=2", "train.steps=2", "train.checkpoint_every=1", "train.eval_tokens=64",
        "train.progress=false", "train.tensorboard=false", "data.source=synthetic:markov", "data.dataset_tokens=65536",
        "model.vocab_size=32",
    ])  # fmt: skip
    result = training.train(cfg, tmp_path / "run")
    assert result.status == "done" and result.result["step"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "2"]
