"""llm.evaluation: jitted, bucketed scoring and greedy generation checked against the model run directly,
evals/ records read back by analysis, and `chinchax eval` / `chinchax emergence` on a tiny trained run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.config import load_config
from llm.data.tokenizers import ByteTokenizer
from llm.evaluation import Evaluator, bucket, evaluate_items
from llm.model import Transformer
from llm.tasks import get_task
from sweeps.cli import main as cli_main

TOK = ByteTokenizer()
# Two context lengths (3 and 24 characters), so the unpadded reference compiles few shapes.
CONTEXTS = ["abc", "Q: What is 4 plus 5?\nA: ", "xyz", "Q: What is 9 less 2?\nA: "]


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
                             "model.seq_len=64", "model.compute_dtype=float32"]).model  # fmt: skip
    return Transformer(cfg, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def forward(model):
    """Unpadded [B, T] ids -> float32 log_softmax of the model's logits (row t predicts ids[t+1])."""
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda ids: jax.nn.log_softmax(nnx.merge(graphdef, params)(ids)[0].astype(jnp.float32), axis=-1))
    return lambda ids: np.asarray(fn(jnp.asarray(ids, jnp.int32)))


def reference_generate(forward, contexts, max_tokens):
    """Greedy decoding one token at a time, re-running the model on the whole unpadded sequences (no
    cache); the contexts have one length, so they run as one batch."""
    ids = [[TOK.eot_id] + list(TOK.encode(c)) for c in contexts]
    assert len({len(i) for i in ids}) == 1
    new = [[] for _ in contexts]
    for _ in range(max_tokens):
        nxt = forward(ids)[:, -1].argmax(-1)
        for row, n in zip(ids, nxt):
            row.append(int(n))
        for out, n in zip(new, nxt):
            out.append(int(n))
    return [TOK.decode(n[: n.index(TOK.eot_id)] if TOK.eot_id in n else n) for n in new]


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket(3, low=16) == 16 and bucket(40, 16, high=48) == 48 and bucket(20, 16, high=64) == 32


def test_loglikelihood_is_the_sum_of_per_token_log_softmax(model, forward):
    ev = Evaluator.from_model(model, TOK, max_length=64, batch_size=4)
    requests = [(c, t) for c in CONTEXTS for t in ("7", "\n", " 12", "abc")]
    got = ev.loglikelihood(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        ids = [TOK.eot_id] + list(TOK.encode(ctx + cont))
        lp = forward([ids])[0]
        positions = range(len(TOK.encode(ctx)), len(ids) - 1)  # row t predicts ids[t+1], the continuation's
        want = sum(lp[t, ids[t + 1]] for t in positions)
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == all(int(np.argmax(lp[t])) == ids[t + 1] for t in positions)


def test_bucketing_and_batching_do_not_change_scores(model):
    pairs = [(list(TOK.encode(c)), list(TOK.encode(t))) for c in CONTEXTS for t in ("7", "12", " nine")]
    alone = [Evaluator.from_model(model, TOK, max_length=64, batch_size=1).score([p])[0] for p in pairs]
    batched = Evaluator.from_model(model, TOK, max_length=64, batch_size=8).score(pairs)
    for (lp1, c1), (lp2, c2) in zip(alone, batched):
        np.testing.assert_allclose(lp1, lp2, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_generate_until_equals_step_by_step_argmax_decoding(model, forward, kv_cache):
    ev = Evaluator.from_model(model, TOK, max_length=64, batch_size=2, kv_cache=kv_cache)  # lengths mixed per batch
    want = [None] * 4
    want[0::2] = reference_generate(forward, CONTEXTS[0::2], 5)
    want[1::2] = reference_generate(forward, CONTEXTS[1::2], 5)
    assert ev.generate_until([(c, [], 5) for c in CONTEXTS]) == want
    # A stop string the model does emit cuts the text before it (harness form of the request too).
    stop = next(w[2] for w in want if len(w) > 2)
    cut = [w.split(stop)[0] for w in want]
    assert ev.generate_until([(c, [stop], 5) for c in CONTEXTS]) == cut
    assert ev.generate_until([(c, {"until": [stop], "max_gen_toks": 5}) for c in CONTEXTS]) == cut


def test_records_are_read_back_by_analysis(model, tmp_path):
    from analysis.emergence_load import list_evals, read_eval_records
    from analysis.emergence_metrics import item_scores
    from rundir import write_eval_records

    ev = Evaluator.from_model(model, TOK, max_length=64, batch_size=8)
    for name in ("add1", "larger"):
        task = get_task(name)
        records = evaluate_items(ev, task, task.test_items(5, seed=0), shots=1, seed=0)
        write_eval_records(tmp_path, name, 7, records, shots=1, baseline=task.baseline, params=task.params)
        back = read_eval_records(tmp_path / "evals" / f"{name}.step7.jsonl")
        assert back == json.loads(json.dumps(records))
        summary = json.loads((tmp_path / "evals" / f"{name}.step7.summary.json").read_text())
        assert summary["n_items"] == 5 and summary["params"] == task.params and summary["baseline"] == task.baseline
        for r in back:
            assert r["target_tokens"] == list(TOK.encode(r["target"]))
            assert r["output_tokens"] == list(TOK.encode(r["output"]))
            assert r["target_logprob"] == pytest.approx(sum(r["token_logprobs"]))
            assert len(r["token_correct"]) == len(r["target_tokens"])
            assert "\n" not in r["output"] and r["prompt"].endswith("A: ") or name == "larger"
        scores = item_scores(back)
        assert scores["exact_match"].between(0, 1).all()
    assert [(t, s) for t, s, _ in list_evals(tmp_path)] == [("add1", 7), ("larger", 7)]
    mc = read_eval_records(tmp_path / "evals" / "larger.step7.jsonl")
    assert all(len(r["choice_logprobs"]) == len(r["choices"]) == 2 for r in mc)
    # a choice's log-likelihood is the target's when the choice is the answer
    assert all(r["choice_logprobs"][r["answer_index"]] == pytest.approx(r["target_logprob"], abs=1e-4) for r in mc)


# --------------------------------------------------------------------------- a tiny trained run, through the CLI


@pytest.fixture(scope="module")
def run_dir(tiny_eval_run):
    return tiny_eval_run  # tests/conftest.py: 20 steps, checkpoints at 10 and 20


def test_cli_eval_then_emergence(run_dir, capsys):
    assert cli_main(["eval", str(run_dir), "--tasks", "add1,larger", "--shots", "1", "--items", "8"]) == 0
    out = capsys.readouterr().out
    assert "add1 step 20: 8 items, exact match" in out and "larger step 20" in out
    assert cli_main(["eval", str(run_dir), "--tasks", "add1", "--shots", "1", "--items", "8", "--step", "10"]) == 0
    summary = json.loads((run_dir / "evals" / "add1.step10.summary.json").read_text())
    assert summary["step"] == 10 and summary["shots"] == 1 and summary["n_items"] == 8
    assert {"baseline", "memorisation", "params", "seed"} <= set(summary)
    out_dir = run_dir.parent / "emergence"
    assert cli_main(["emergence", str(run_dir), "--out-dir", str(out_dir), "--bootstrap", "20", "--no-figures"]) == 0
    report = json.loads((out_dir / "emergence.json").read_text())
    assert report["tasks"] == ["add1", "larger"] and report["n_runs"] == 1
    table = (out_dir / "emergence_metrics.csv").read_text()
    assert "exact_match" in table and "token_accuracy" in table and "mc_accuracy" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "ad1", "--shots", "1"], "unknown task 'ad1' (did you mean 'add1'?)"),
        (["--tasks", "add1", "--shots", "1", "--step", "7"], "no checkpoint at step 7; checkpoints kept: 10, 20"),
        (["--tasks", "add1", "--shots", "-1"], "argument --shots: expected an integer >= 0, got -1"),
        (["--tasks", ",", "--shots", "1"], "expected task names such as add3_reversed,facts"),
        (["--tasks", "recall", "--shots", "1", "--task-params", "{recal: {n_pairs: 3}}"],
         "--task-params: 'recal' is not among the tasks evaluated (recall) (did you mean 'recall'?)"),
        (["--tasks", "recall", "--shots", "1", "--task-params", "{recall: {n_pair: 3}}"],
         "--task-params: task 'recall' has no parameter 'n_pair' (did you mean 'n_pairs'?)"),
        (["--tasks", "recall", "--shots", "1", "--task-params", "{recall: {n_pairs: 99}}"], "--task-params: task 'recall'"),
        (["--tasks", "recall", "--shots", "1", "--task-params", "[3]"], "argument --task-params: expected a mapping"),
    ],
)
def test_cli_eval_bad_input_is_one_line_and_exit_2(run_dir, capsys, argv, message):
    try:
        code = cli_main(["eval", str(run_dir), *argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_eval_refuses_an_unfinished_run(run_dir, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert cli_main(["eval", str(tmp_path), "--tasks", "add1", "--shots", "0"]) == 2
    assert "not a finished run (no result.json)" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "nope"), "--tasks", "add1", "--shots", "0"]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_cli_eval_task_params_for_a_task_the_run_was_not_trained_with(run_dir, tmp_path, capsys):
    import shutil

    from sweeps.evals import missing_evals
    from sweeps.spec import EvalSpec

    run = shutil.copytree(run_dir, tmp_path / "run")  # records of other params, without touching the shared run
    argv = ["eval", str(run), "--tasks", "recall", "--shots", "1", "--items", "4", "--task-params", '{"recall": {"n_pairs": 3}}']
    assert cli_main(argv) == 0
    summary = json.loads((run / "evals" / "recall.step20.summary.json").read_text())
    assert summary["params"] == {"n_pairs": 3, "value_len": 1, "test_fraction": 0.2}
    for r in (json.loads(line) for line in (run / "evals" / "recall.step20.jsonl").read_text().splitlines()):
        query = r["prompt"].rsplit("Q: ", 1)[1]
        assert query.count("=") == 3  # three key-value pairs before the question
    # A sweep's eval section with the same params counts the evaluation as done; other params redo it.
    assert missing_evals(run, EvalSpec(tasks=("recall",), shots=1, params={"recall": {"n_pairs": 3}})) == []
    assert missing_evals(run, EvalSpec(tasks=("recall",), shots=1, params={"recall": {"n_pairs": 4}})) == [("recall", 20)]
    assert missing_evals(run, EvalSpec(tasks=("recall",), shots=1)) == []


def test_resolve_tasks_applies_params_over_the_trained_ones():
    from types import SimpleNamespace

    from llm.evaluation import resolve_tasks

    cfg = SimpleNamespace(data=SimpleNamespace(tasks=SimpleNamespace(params={"facts": {"n_keys": 64, "value_len": 4}})))
    facts, add1 = resolve_tasks(["facts", "add1"], cfg, {"facts": {"value_len": 6}, "add1": {"test_fraction": 0.5}})
    assert (facts.params["n_keys"], facts.params["value_len"]) == (64, 6)
    assert add1.params == {"test_fraction": 0.5}
    assert resolve_tasks(["facts"], cfg)[0].params["value_len"] == 4
