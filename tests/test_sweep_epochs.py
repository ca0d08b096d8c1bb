"""Epochs at plan time: `sweep plan` shows D over the unique training tokens per run, and a run
that would pass its data more than max_epochs (4) times is a plan error unless the spec says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.config import ConfigError
from sweeps.plan import BUILTIN_TRAIN_TOKENS, expand, format_plan, unique_train_tokens
from sweeps.spec import load_spec, spec_from_dict

REPO = Path(__file__).resolve().parent.parent
KJV = 4_191_688  # unique training tokens of builtin:kjv (bytes, eval_fraction 0.01)


def _spec(tokens, data=None, **extra):
    return spec_from_dict({
        "name": "epochs",
        "base": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "seq_len": 64},
                 "data": {"source": "builtin:kjv", **(data or {})}, "train": {"batch_size": 16}},
        "grid": {"train.tokens": list(tokens)},
        **extra,
    })  # fmt: skip


def test_plan_shows_epochs_per_run():
    spec = _spec([1024 * 1000, 1024 * 4000])  # whole steps of 16 x 64 tokens
    runs = expand(spec)
    assert [r.epochs for r in runs] == [pytest.approx(1_024_000 / KJV), pytest.approx(4_096_000 / KJV)]
    table = format_plan(spec, runs).splitlines()
    assert table[0].split()[7] == "epochs"
    assert [line.split()[7] for line in table[1:3]] == ["0.24", "0.98"]


def test_more_than_four_epochs_is_a_plan_error_naming_the_run():
    spec = _spec([1024 * 1000, 1024 * 20_000])  # 20.48M tokens = 4.9 passes over kjv
    with pytest.raises(ConfigError, match=r"run N\S+-D2e7-\S+: D=2.05e\+07 tokens is 4.9 epochs .*max_epochs=4"):
        expand(spec)


def test_repetition_on_purpose_passes():
    allowed = expand(_spec([1024 * 20_000], max_epochs=5))
    assert allowed[0].epochs == pytest.approx(20_480_000 / KJV)
    pool = expand(_spec([1024 * 20_000], data={"dataset_tokens": 1_000_000}))  # a small pool, repeated on purpose
    assert pool[0].epochs == pytest.approx(20.48)
    with pytest.raises(ConfigError, match="max_epochs must be > 0"):
        _spec([1024], max_epochs=0)


@pytest.mark.parametrize("name", ["quickstart", "chinchilla_isoflop", "kaplan_grid", "moe_vs_dense"])
def test_shipped_specs_stay_within_four_epochs(name):
    runs = expand(load_spec(REPO / "experiments" / f"{name}.yaml"))
    assert all(r.epochs is not None and r.epochs <= 4 for r in runs)


def test_unknown_pool_shows_a_question_mark_until_a_cache_manifest_knows_it(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    data = {"source": f"text:{corpus}", "cache_dir": str(tmp_path / "cache")}
    spec = _spec([1024 * 1000], data=data)
    run = expand(spec)[0]
    assert run.epochs is None and format_plan(spec, [run]).splitlines()[1].split()[7] == "?"
    (tmp_path / "cache" / "datasets").mkdir(parents=True)
    manifest = {"source": data["source"], "tokenizer": {"name": "bytes"}, "vocab_size": 256, "eval_fraction": 0.01,
                "tokens": {"train": 200_000, "eval": 10}}  # fmt: skip
    (tmp_path / "cache" / "datasets" / "abc.json").write_text(json.dumps(manifest))
    (tmp_path / "cache" / "datasets" / "abc.docs.json").write_text(json.dumps({"train": [], "eval": []}))
    with pytest.raises(ConfigError, match="5.1 epochs of the 2e\\+05 unique training tokens"):
        expand(spec)


def test_recorded_kjv_size_matches_the_corpus():
    """Recount kjv as llm.data tokenises it with bytes: each training document plus one end-of-text id."""
    from llm.data.builtin import builtin_corpus
    from llm.data.store import split_documents

    train, _ = split_documents(builtin_corpus("kjv")[1], 0.01, "builtin:kjv")
    assert BUILTIN_TRAIN_TOKENS["builtin:kjv"] == KJV == sum(len(text.encode("utf-8")) + 1 for _, text in train)


def test_recorded_sizes_match_the_token_cache_when_present():
    from llm.data.store import default_cache_dir

    checked = 0
    for path in (default_cache_dir() / "datasets").glob("*.json"):
        try:
            m = json.loads(path.read_text())
            key = (m["source"], m["tokenizer"]["name"], m["eval_fraction"])
        except (ValueError, KeyError, TypeError):
            continue
        if key[1:] == ("bytes", 0.01) and key[0] in BUILTIN_TRAIN_TOKENS:
            assert m["tokens"]["train"] == BUILTIN_TRAIN_TOKENS[key[0]], f"{path}: {key[0]} changed size"
            checked += 1
    if not checked:
        pytest.skip("no builtin corpus in the token cache")


def test_unique_tokens_of_a_synthetic_source_are_unknown():
    from llm.config import config_from_dict

    cfg = config_from_dict({"data": {"source": "synthetic:markov"}, "model": {"vocab_size": 64}})
    assert unique_train_tokens(cfg) is None
