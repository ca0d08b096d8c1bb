"""Synthetic evaluation records and run directories, for tests and demos of the emergence analysis.

Per-token correctness is drawn independently with probability p (so exact match is p^L in
expectation, the Schaeffer et al. 2023 mirage), and p rises smoothly with log N. No JAX.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis.emergence_load import write_eval_records
from rundir import CONFIG, METRICS, RESULT, write_json_atomic, write_text_atomic

VOCAB = 10  # token ids 0..9, rendered as the digits themselves


def token_records(task: str, n_items: int, length: int, p_token: float, rng: np.random.Generator, shots: int = 2,
                  n_choices: int | None = None, mc_skill: float = 0.0) -> list[dict]:  # fmt: skip
    """``n_items`` records of a task with ``length``-token targets, each target token right
    (teacher-forced and in the greedy output) independently with probability ``p_token``.

    With ``n_choices``, adds K-way choices whose answer gets ``mc_skill`` nats of extra log-probability.
    """
    records = []
    for i in range(n_items):
        target = rng.integers(0, VOCAB, size=length)
        correct = rng.random(length) < p_token
        output = np.where(correct, target, (target + rng.integers(1, VOCAB, size=length)) % VOCAB)
        lp_right, lp_wrong = np.log(max(p_token, 1e-6)), np.log(max(1 - p_token, 1e-6) / (VOCAB - 1))
        lps = np.where(correct, lp_right, lp_wrong)
        rec = {
            "task": task, "item": i, "shots": shots, "prompt": f"Q: item {i}\nA:", "target": "".join(map(str, target)),
            "output": "".join(map(str, output)), "target_tokens": target.tolist(), "output_tokens": output.tolist(),
            "token_correct": correct.tolist(), "token_logprobs": lps.tolist(), "target_logprob": float(lps.sum()),
        }  # fmt: skip
        if n_choices:
            answer = int(rng.integers(n_choices))
            clp = rng.normal(size=n_choices)
            clp[answer] += mc_skill
            rec |= {"choices": [f"c{k}" for k in range(n_choices)], "choice_logprobs": clp.tolist(), "answer_index": answer}
        records.append(rec)
    return records


def p_token_of(n_params: float, n_half: float = 2e4, width_dex: float = 0.5, floor: float = 0.1) -> float:
    """Per-token accuracy rising smoothly from ``floor`` to 1 around N = ``n_half`` (logistic in log10 N)."""
    s = 1.0 / (1.0 + np.exp(-(np.log10(n_params) - np.log10(n_half)) / (width_dex / 4)))
    return float(floor + (1 - floor) * s)


def write_run(run_dir, n_params: float, tokens: float, seed: int, evals: dict, eval_loss: float, status: str = "done",
              steps: int = 100, losses_by_step: dict | None = None) -> Path:  # fmt: skip
    """A run directory with result.json, config.yaml (train.seed), metrics.jsonl and evals/.

    evals: {(task, step): (records, baseline dict)}. FLOPs: 6 N D (and 7 N D as "6N+attention").
    losses_by_step: {step: eval loss} logged in metrics.jsonl (tokens, FLOPs linear in step).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = {"status": status, "run_name": run_dir.name, "step": steps, "steps": steps, "tokens": tokens,
              "n_params_total": n_params, "n_params_nonembed": n_params * 0.8, "final_eval_loss": eval_loss,
              "flops": {"6N": 6.0 * n_params * tokens, "6N+attention": 7.0 * n_params * tokens}}  # fmt: skip
    write_text_atomic(run_dir / CONFIG, f"train:\n  seed: {seed}\n")
    lines = []
    for s, loss in sorted((losses_by_step or {}).items()):
        d = tokens * s / steps
        lines.append(json.dumps({"step": s, "tokens": d, "eval_loss": loss,
                                 "flops": {"6N": 6.0 * n_params * d, "6N+attention": 7.0 * n_params * d}}))  # fmt: skip
    write_text_atomic(run_dir / METRICS, "".join(line + "\n" for line in lines))
    for (task, step), (records, baseline) in evals.items():
        write_eval_records(run_dir, task, step, records, shots=2, baseline=baseline)
    write_json_atomic(run_dir / RESULT, result)
    return run_dir


def fake_sweep(out, sizes=(2e3, 7e3, 2e4, 6e4, 2e5), seeds=(0, 1), n_items=64, length=6, checkpoints=(),
               seed: int = 0, tasks=("facts", "larger")) -> Path:  # fmt: skip
    """A sweep directory of runs with two tasks: "facts" (generation, ``length`` tokens) and
    "larger" (2-way multiple choice). Tokens 20 N; eval loss 5 - log10(N)/2; ``checkpoints``:
    extra evaluation steps (fractions of 100 steps, e.g. (25, 50)) with less skill than the end;
    ``tasks``: which of the two to write."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for n in sizes:
        for s in seeds:
            loss = 5.0 - 0.5 * np.log10(n)
            evals, losses = {}, {100: loss}
            for step in (*checkpoints, 100):
                eff = n * step / 100  # a checkpoint at step s acts like a smaller model
                p = p_token_of(eff)
                if "facts" in tasks:
                    evals[("facts", step)] = (token_records("facts", n_items, length, p, rng), {"exact_match": 0.0})
                if "larger" in tasks:
                    evals[("larger", step)] = (token_records("larger", n_items, 1, p, rng, n_choices=2, mc_skill=4 * (p - 0.1)),
                                               {"exact_match": 0.1})  # fmt: skip
                losses[step] = 5.0 - 0.5 * np.log10(eff)
            write_run(out / f"n{int(n)}_s{s}", n, 20 * n, s, evals, loss, losses_by_step=losses)
    return out
