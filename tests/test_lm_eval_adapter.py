"""llm.lm_eval_adapter: a chinchax run as an lm-evaluation-harness model. Log-likelihoods (plain, empty
context, rolling windows) against the model run by hand; the harness's own evaluator on a local YAML
task with a local JSONL dataset (no downloads), its outputs equal to chinchax's Evaluator's, its
metrics equal to values fixed by construction. Skipped without the optional harness."""

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before datasets is imported; nothing is downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="optional: pip install -e '.[lm_eval]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llm.evaluation import Evaluator, load_run  # noqa: E402
from llm.lm_eval_adapter import ChinchaxLM  # noqa: E402

PROMPTS = ["Q: What is 3 plus 4?\nA:", "Q: What is 8 plus 1?\nA:", "Q: What is 5 plus 5?\nA:", "Q: What is 2 plus 7?\nA:"]


@pytest.fixture(scope="module")
def run_dir(tiny_eval_run):
    return tiny_eval_run  # tests/conftest.py: seq_len 64, 20 steps on 1-digit addition, shared with test_evaluation


@pytest.fixture(scope="module")
def loaded(run_dir):
    """(ChinchaxLM, chinchax's own Evaluator, log_softmax of unpadded ids) of the run's final step."""
    cfg, graphdef, params, step, tok = load_run(run_dir)
    assert step == 20
    fn = jax.jit(lambda ids: jax.nn.log_softmax(nnx.merge(graphdef, params)(ids)[0].astype(jnp.float32), axis=-1))
    forward = lambda ids: np.asarray(fn(jnp.asarray([ids], jnp.int32)))[0]  # noqa: E731
    lm = ChinchaxLM.from_run(run_dir, batch_size=8)
    return lm, Evaluator(graphdef, params, tok, max_length=64, batch_size=8), forward


def requests(kind, *args_list):
    """The harness's Instance objects for (args) tuples."""
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args_list]


def hand_logprob(forward, ids, first):
    """Sum of log p(ids[t] | ids[:t]) for t >= first, from one unpadded forward pass."""
    lp = forward(ids)
    return sum(float(lp[t - 1, ids[t]]) for t in range(first, len(ids)))


def test_loglikelihood_matches_the_model_by_hand(loaded):
    lm, _, forward = loaded
    eot = lm.eot_token_id
    enc = lambda s: lm.tok_encode(s, add_special_tokens=False)  # noqa: E731
    pairs = requests("loglikelihood", (PROMPTS[0], " 7"), ("", "abc"))
    (ll, greedy), (ll_empty, _) = lm.loglikelihood(pairs, disable_tqdm=True)
    ids = [eot, *enc(PROMPTS[0] + " 7")]
    assert ll == pytest.approx(hand_logprob(forward, ids, len(ids) - 2), abs=1e-4)  # " " and "7" both scored
    assert ll_empty == pytest.approx(hand_logprob(forward, [eot, *enc("abc")], 1), abs=1e-4)
    lp = forward(ids)
    assert greedy == all(int(np.argmax(lp[t - 1])) == ids[t] for t in range(len(ids) - 2, len(ids)))


def test_loglikelihood_rolling_scores_disjoint_windows(loaded):
    lm, _, forward = loaded
    eot, m = lm.eot_token_id, lm.max_length
    short = "Q: What is 1 plus 1?"
    long = "\n\n".join(f"Q: What is {a} plus 1?\nA: {a + 1}" for a in range(1, 5))  # 106 tokens
    got_short, got_long = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (short,), (long,)))
    assert got_short == pytest.approx(hand_logprob(forward, [eot, *lm.tok_encode(short, False)], 1), abs=1e-4)
    ids = lm.tok_encode(long, add_special_tokens=False)
    n = len(ids)
    assert m < n <= 2 * m - 2  # two windows
    # Windows of up to m - 1 predicted tokens, m tokens in a sequence: tokens 0..m-2 after the eot id, then
    # the remaining n - m + 1 after the tokens before them that fit.
    want = hand_logprob(forward, [eot, *ids[: m - 1]], 1) + hand_logprob(forward, ids[n - m :], 2 * m - 1 - n)
    assert got_long == pytest.approx(want, abs=1e-3)


def test_generate_until_cuts_at_stop_strings(loaded):
    lm, ev, _ = loaded
    want = ev.generate_until([(p, [], 4) for p in PROMPTS])  # chinchax's path: eot prefix, encode
    assert lm.generate_until(requests("generate_until", *[(p, {"max_gen_toks": 4}) for p in PROMPTS])) == want
    stop = next(w[1] for w in want if len(w) > 1)
    cut = lm.generate_until(requests("generate_until", *[(p, {"until": [stop], "max_gen_toks": 4}) for p in PROMPTS]))
    assert cut == [w.split(stop)[0] for w in want]


def test_the_harness_evaluates_a_local_task_file(run_dir, loaded, tmp_path):
    """A generate_until task and a multiple-choice task from YAML + JSONL in tmp_path, run by the harness's
    simple_evaluate with the model by name (model_args) and bootstrap_iters=0 (no forked workers).
    Targets are chosen from chinchax's own Evaluator so that exact match and accuracy are 0.5 by
    construction."""
    from lm_eval.tasks import TaskManager

    _, ev, _ = loaded
    outputs = ev.generate_until([(p, ["\n"], 4) for p in PROMPTS])
    gen_docs = [{"question": p, "answer": out if i % 2 == 0 else out + "x"}
                for i, (p, out) in enumerate(zip(PROMPTS, outputs))]  # fmt: skip
    choices = ["1", "2", "3"]
    lls = np.array([ll for ll, _ in ev.loglikelihood([(p, " " + c) for p in PROMPTS for c in choices])]).reshape(4, 3)
    best = lls.argmax(axis=1)
    mc_docs = [{"question": p, "choices": choices, "gold": int(b if i % 2 == 0 else (b + 1) % 3)}
               for i, (p, b) in enumerate(zip(PROMPTS, best))]  # fmt: skip
    for name, docs in (("gen", gen_docs), ("mc", mc_docs)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def write_task(name, body):
        (tmp_path / f"{name}.yaml").write_text(
            f"task: chinchax_test_{name}\ndataset_path: json\ntest_split: test\ndoc_to_text: '{{{{question}}}}'\n"
            f"dataset_kwargs: {{data_files: {{test: '{tmp_path / name}.jsonl'}}, cache_dir: '{tmp_path / 'hf'}'}}\n" + body
        )

    write_task("gen", "output_type: generate_until\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ' '\n"
                      'generation_kwargs: {until: ["\\n"], max_gen_toks: 4}\nmetric_list: [{metric: exact_match}]\n')
    write_task("mc", "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
                     "metric_list: [{metric: acc}]\n")
    out = lm_eval.simple_evaluate(model="chinchax", model_args=f"run_dir={run_dir},batch_size=8",
                                  tasks=["chinchax_test_gen", "chinchax_test_mc"], num_fewshot=0, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  log_samples=True)  # fmt: skip
    results = out["results"]
    assert results["chinchax_test_gen"]["exact_match,none"] == 0.5
    assert results["chinchax_test_mc"]["acc,none"] == 0.5
    gen = sorted(out["samples"]["chinchax_test_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in gen] == outputs
    mc = sorted(out["samples"]["chinchax_test_mc"], key=lambda s: s["doc_id"])
    got = [[float(r[0]) for r in s["filtered_resps"]] for s in mc]
    np.testing.assert_allclose(got, lls, atol=1e-4)
