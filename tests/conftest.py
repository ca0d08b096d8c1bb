"""Fixtures shared by several test files (one session-scoped copy each, to keep CI short)."""

import pytest


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
