"""Fixtures shared by several test files (one session-scoped copy each, to keep CI short)."""

import os
import shutil
import tempfile

import pytest

# One persistent XLA compilation cache for the whole test session, fresh each session: the
# tests train the same tiny shapes many times (in this process, in xdist workers and in the
# runs they launch, which inherit the variable), and each compile is paid once instead of per
# test (test_train.py: 153 -> 71 CPU s). Set here, before any test imports jax, which reads it
# at import. xdist workers inherit the controller's variable, so all share one folder.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="chinchax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# The suite is compile-bound: hundreds of tiny models compiled for a few steps each. XLA's backend
# optimisations cost more compile time than they save in those steps (test_train.py and
# test_moe.py: 191 -> 130 CPU s), and every comparison a test makes (two code paths, a resumed
# run against an uninterrupted one) compiles both sides under the same flags. Runs the tests
# launch inherit the variable; tests/test_sweep_quickstart.py runs at the default level, as users do.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


# The fit's helper process (analysis.helper) costs about 2 CPU s of imports per fit; xdist fills
# the cores already, so the session fits in one process (the same numbers: the helper's own tests
# in test_analysis_end_to_end.py turn it back on and compare).
os.environ.setdefault("CHINCHAX_FIT_HELPER", "0")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):  # the controller made it
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_eval_run(tmp_path_factory):
    """A finished run directory: 2-layer d_model 32 byte-level model, seq_len 64, 20 steps on 1-digit addition
    text, checkpoints kept at steps 10 and 20. Tests may add evals/ records; do not change the rest."""
    from llm.config import load_config
    from llm.tasks import get_task
    from llm.training import train

    root = tmp_path_factory.mktemp("eval_run")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(get_task("add1").pretraining_text(400, seed=0)))
    cfg = load_config(None, [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.seq_len=64",
        "train.batch_size=8", "train.steps=20", "train.log_every=5", "train.eval_every=10", "train.eval_tokens=512",
        "train.checkpoint_every=10", "train.progress=false", "train.tensorboard=false", "optim.warmup_steps=2",
        f"data.source=text:{corpus}", f"data.cache_dir={root / 'cache'}", "data.eval_fraction=0.1",
    ])  # fmt: skip
    result = train(cfg, root / "run")
    assert result.status == "done", result.error
    return root / "run"


class CheckpointWrites:
    """Hooks into the background half of every checkpoint write, where orbax serialises the arrays
    it copied to the host inside ``save``. Once the step's temporary folder exists and before
    writing into it, the hook waits for ``gate`` (an Event, open unless a test clears it), sleeps
    ``delay`` seconds, records in ``seen`` whether it runs off the main thread and what ``probe()``
    returns (None without a probe), then raises ``fail`` if set."""

    def __init__(self):
        import threading

        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.fail: BaseException | None = None
        self.probe = None
        self.seen: list[tuple[bool, object]] = []


@pytest.fixture
def checkpoint_writes(monkeypatch):
    import threading
    import time

    from orbax.checkpoint._src.serialization import jax_array_handlers

    writes = CheckpointWrites()
    real = jax_array_handlers._async_serialize_replica_slices

    async def serialize(values, infos, *args, **kwargs):
        await infos[0].await_path_creation()  # the step's temporary folder exists (orbax makes it in the background)
        assert writes.gate.wait(timeout=60), "checkpoint_writes: the gate was never opened"
        time.sleep(writes.delay)
        writes.seen.append((threading.current_thread() is not threading.main_thread(), writes.probe and writes.probe()))
        if writes.fail is not None:
            raise writes.fail
        return await real(values, infos, *args, **kwargs)

    monkeypatch.setattr(jax_array_handlers, "_async_serialize_replica_slices", serialize)
    yield writes
    writes.gate.set()  # never leave a background write waiting
