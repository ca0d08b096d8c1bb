"""data.tasks: generated tasks mixed into the training stream (issue 10)."""

import json
import math

import numpy as np
import pytest

from llm.config import ConfigError, load_config
from llm.data import load_dataset
from llm.tasks import get_task

SEQ = 64
PARAGRAPHS = [f"Paragraph {i}: the cat sat on the mat and looked at the {i % 7} birds outside." for i in range(300)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_corpus")
    (root / "a.txt").write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return root


def _cfg(corpus, *extra):
    base = [f"data.source=text:{corpus}/*.txt", f"data.cache_dir={corpus}/cache", "data.eval_fraction=0.1",
            f"model.seq_len={SEQ}"]  # fmt: skip
    return load_config(None, base + list(extra))


def _load(cfg):
    return load_dataset(cfg.data, vocab_size=256, seq_len=cfg.model.seq_len, eval_tokens=512, progress=False)


def _mixed(corpus, *extra):
    return _load(_cfg(corpus, "data.tasks.pool_tokens=50000", *extra))


def _task_rows(mixed, plain, steps, batch_size):
    """Per step, the rows where the mixed batch differs from the corpus-only one (= task rows)."""
    return [np.flatnonzero((mixed.train_batch(s, batch_size) != plain.train_batch(s, batch_size)).any(axis=1))
            for s in range(steps)]  # fmt: skip


def _texts(ds, steps, batch_size):
    """Every training window of the first ``steps`` batches, decoded, one per line-separated chunk."""
    return "\x01".join(ds.decode(row) for s in range(steps) for row in ds.train_batch(s, batch_size))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.tasks.names=[add3_reversd]"], "data.tasks.names: unknown task 'add3_reversd' (did you mean 'add3_reversed'?)"),
        (["data.tasks.names=[facts]", "data.tasks.fraction=0"], "data.tasks.fraction must be in (0, 1), got 0.0"),
        (["data.tasks.names=[facts]", "data.tasks.fraction=1.5"], "data.tasks.fraction must be in (0, 1), got 1.5"),
        (["data.tasks.names=[facts]", "data.tasks.fraction=nan"], "data.tasks.fraction: expected a finite number"),
        (["data.tasks.fraction=0.2"], "data.tasks.names is empty"),
        (["data.tasks.names=[facts, facts]"], "data.tasks.names lists 'facts' twice"),
        (["data.tasks.names=[facts]", "data.tasks.params.facts.nkeys=3"],
         "data.tasks.params.facts: task 'facts' has no parameter 'nkeys' (did you mean 'n_keys'?)"),
        (["data.tasks.names=[facts]", "data.tasks.params.facts.n_keys=0"], "data.tasks.params.facts: task 'facts': n_keys"),
        (["data.tasks.names=[facts]", "data.tasks.params.add2.test_fraction=0.1"],
         "data.tasks.params.add2: not one of data.tasks.names"),
        (["data.tasks.names=[facts]", "data.tasks.params.facts=3"], "data.tasks.params.facts: expected a mapping"),
        (["data.tasks.names=[facts]", "data.tasks.seed=-1"], "data.tasks.seed must be in [0, 2**63)"),
        (["data.tasks.names=[facts]", "data.tasks.pool_tokens=0"], "data.tasks.pool_tokens must be > 0"),
        (["data.tasks.names=[facts]", "data.source=synthetic:markov"], "data.tasks needs a text source"),
    ],
)  # fmt: skip
def test_bad_task_mix_is_a_one_line_error_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_task_mix_config_loads_from_yaml_and_round_trips(tmp_path):
    from llm.config import dump_config

    path = tmp_path / "run.yaml"
    path.write_text("data:\n  tasks:\n    names: [facts, add3_reversed]\n    params: {facts: {n_keys: 96}}\n"
                    "    fraction: 0.25\n")  # fmt: skip
    cfg = load_config(path)
    mix = cfg.data.tasks
    assert mix.names == ("facts", "add3_reversed") and mix.params == {"facts": {"n_keys": 96}}
    assert mix.fraction == 0.25 and mix.seed == 0
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg
    assert load_config(None).data.tasks is None  # off by default


def test_run_names_without_tasks_are_unchanged():
    from sweeps.plan import config_hash, identity_changes

    plain = load_config(None)
    assert "data.tasks" not in identity_changes(plain)
    mixed = load_config(None, ["data.tasks.names=[facts]"])
    assert identity_changes(mixed)["data.tasks"] == "on" and config_hash(mixed) != config_hash(plain)


# --------------------------------------------------------------------------- mixing


def test_mixed_batches_are_a_pure_function_of_data_seed_task_seed_and_step(corpus):
    a = _mixed(corpus, "data.tasks.names=[add2, facts]", "data.tasks.fraction=0.3")
    b = _mixed(corpus, "data.tasks.names=[add2, facts]", "data.tasks.fraction=0.3")
    for step in (7, 0, 123, 7):
        assert np.array_equal(a.train_batch(step, 16), b.train_batch(step, 16))
    assert a.train_batch(5, 16).dtype == np.int32 and a.train_batch(5, 16).shape == (16, SEQ + 1)
    other_task_seed = _mixed(corpus, "data.tasks.names=[add2, facts]", "data.tasks.fraction=0.3", "data.tasks.seed=1")
    other_data_seed = _mixed(corpus, "data.tasks.names=[add2, facts]", "data.tasks.fraction=0.3", "data.seed=1")
    for other in (other_task_seed, other_data_seed):
        assert not np.array_equal(a.train_batch(5, 16), other.train_batch(5, 16))


def test_each_host_builds_its_rows_of_the_batch_the_whole_batch_would_have(corpus):
    """A multi-host run builds only its rows (llm.sharding.Layout.host_rows): corpus and task rows alike."""
    mixed = _mixed(corpus, "data.tasks.names=[add2, facts]", "data.tasks.fraction=0.3")
    for step in (0, 5, 9):
        whole = mixed.train_batch(step, 16)
        parts = [mixed.train_batch(step, 16, slice(first, first + 4)) for first in range(0, 16, 4)]
        assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("fraction, batch_size", [(0.3, 16), (0.05, 8), (0.5, 3)])
def test_achieved_fraction_matches_the_request(corpus, fraction, batch_size):
    plain = _load(_cfg(corpus))
    mixed = _mixed(corpus, "data.tasks.names=[add2]", f"data.tasks.fraction={fraction}")
    steps = 200
    rows = _task_rows(mixed, plain, steps, batch_size)
    counted = sum(len(r) for r in rows) / (steps * batch_size)
    assert counted == pytest.approx(mixed.task_fraction(steps, batch_size), abs=1e-12)
    assert abs(counted - fraction) <= 1 / (steps * batch_size)
    assert mixed.task_fraction(steps, batch_size) == math.floor(steps * batch_size * fraction) / (steps * batch_size)
    # task rows are spread over the batch, not always the first ones
    assert len({int(i) for r in rows for i in r}) > 1
    assert plain.task_fraction(steps, batch_size) == 0.0 and plain.tasks is None


def test_eval_windows_stay_corpus_text(corpus):
    plain = _load(_cfg(corpus))
    mixed = _mixed(corpus, "data.tasks.names=[add2]", "data.tasks.fraction=0.5")
    for p, m in zip(plain.eval_batches(8), mixed.eval_batches(8), strict=True):
        assert np.array_equal(p, m)
    assert "Q: What is" not in "".join(mixed.decode(w) for b in mixed.eval_batches(8) for w in b)


def test_held_out_test_items_never_appear_in_the_mixed_stream(corpus):
    task = get_task("add2")
    assert not task.memorisation
    test_texts = {it.text for it in task.test_items(10_000, seed=0)}
    assert len(test_texts) == task.split_size("test") > 1000
    ds = _mixed(corpus, "data.tasks.names=[add2]", "data.tasks.fraction=0.5", "data.tasks.pool_tokens=200000")
    pool = ds.decode(ds.tasks.tokens)
    stream = _texts(ds, 400, 16)  # 3200 task windows
    for text in test_texts:
        assert text not in pool and text not in stream, text
    # the search works: most train items do appear in the stream
    train_texts = [it.text for it in task.train_items(10_000, seed=0)]
    seen = sum(t in stream for t in train_texts[:300])
    assert seen > 60


def test_memorisation_task_items_do_appear(corpus):
    task = get_task("facts", n_keys=64)
    assert task.memorisation and task.test_fraction == 0.0
    ds = _mixed(corpus, "data.tasks.names=[facts]", "data.tasks.params.facts.n_keys=64", "data.tasks.fraction=0.3")
    assert ds.tasks.memorisation == ("facts",) and ds.tasks.params["facts"]["n_keys"] == 64
    stream = _texts(ds, 100, 16)
    test_texts = [it.text for it in task.test_items(64, seed=0)]
    assert len(test_texts) == 64 and all(t in stream for t in test_texts)


def test_two_tasks_share_the_pool_equally(corpus):
    ds = _mixed(corpus, "data.tasks.names=[add2, facts]")
    per = ds.tasks.n_tokens_per_task
    assert set(per) == {"add2", "facts"} and all(n >= 25_000 for n in per.values())
    assert sum(per.values()) == ds.tasks.n_tokens


def test_bpe_runs_encode_tasks_with_the_run_tokenizer(corpus):
    cfg = _cfg(corpus, "data.tokenizer=bpe", "model.vocab_size=300", "data.tasks.names=[add1]",
               "data.tasks.fraction=0.5", "data.tasks.pool_tokens=5000")  # fmt: skip
    ds = load_dataset(cfg.data, vocab_size=300, seq_len=SEQ, eval_tokens=512, progress=False)
    assert int(ds.tasks.tokens.max()) < 300
    assert "Q: What is" in ds.decode(ds.tasks.tokens[:200])


# --------------------------------------------------------------------------- training


def test_tiny_training_run_records_the_mix(corpus, tmp_path):
    from llm.training import train

    cfg = _cfg(corpus, "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
               "train.batch_size=8", "train.steps=6", "train.log_every=3", "train.eval_every=6",
               "train.eval_tokens=256", "train.progress=false", "train.tensorboard=false", "optim.warmup_steps=1",
               "data.tasks.names=[facts, add1]", "data.tasks.params.facts.n_keys=32", "data.tasks.fraction=0.3",
               "data.tasks.pool_tokens=20000")  # fmt: skip
    result = train(cfg, tmp_path / "run")
    assert result.status == "done", result.error
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    mix = saved["data_tasks"]
    assert mix["names"] == ["facts", "add1"] and mix["fraction"] == 0.3 and mix["seed"] == 0
    assert mix["params"]["facts"]["n_keys"] == 32 and mix["memorisation"] == ["facts"]
    assert mix["fraction_achieved"] == math.floor(6 * 8 * 0.3) / 48
    assert saved["tokens"] == 6 * 8 * SEQ  # D counts task and corpus tokens
    assert math.isfinite(saved["final_eval_loss"])
