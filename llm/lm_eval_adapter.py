"""A chinchax model as an EleutherAI lm-evaluation-harness model (its ``TemplateLM`` interface).

Optional: needs the harness (``pip install -e ".[lm_eval]"``; it pulls Hugging Face ``datasets``
but not torch). ``ChinchaxLM`` answers the harness's three request types with
``llm.evaluation.Evaluator`` (jitted, bucketed, batched)::

    import lm_eval
    from llm.lm_eval_adapter import ChinchaxLM

    lm = ChinchaxLM.from_run("runs/d128")                   # final step; step=S for a checkpoint
    out = lm_eval.simple_evaluate(model=lm, tasks=["my_task"], num_fewshot=2,
                                  task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks/"),
                                  bootstrap_iters=0)          # see below
    out["results"]["my_task"]

Importing this module also registers the class as the harness model ``"chinchax"``
(``simple_evaluate(model="chinchax", model_args="run_dir=runs/d128,step=400")``).

Conventions: every sequence starts with the tokenizer's end-of-text id (the document separator in
pre-training), as ``chinchax eval`` does; ``tok_encode`` adds it unless ``add_special_tokens`` is
False, which is how the harness encodes a continuation after an empty context (then the
end-of-text id is the context). Contexts longer than ``max_length`` lose their oldest tokens.
``loglikelihood_rolling`` scores documents in disjoint windows of up to ``max_length - 1`` tokens,
each after as much of the preceding text as fits (the harness's rolling windows).

Bootstrap standard errors: the harness computes them in a pool of forked processes, and a process
forked from one running JAX can hang. Pass ``bootstrap_iters=0`` (no bootstrap standard errors; a
mean's closed-form one is still reported), or keep bootstraps and let them run in this process:
constructing a ``ChinchaxLM`` sets ``DISABLE_MULTIPROC=1`` (the harness's switch) unless it is set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # one line, with the fix
    raise ImportError(
        f"llm.lm_eval_adapter needs EleutherAI's lm-evaluation-harness ({err}): pip install -e '.[lm_eval]'"
    ) from None

from llm.evaluation import Evaluator, generation_request, load_run

__all__ = ["ChinchaxLM"]


@register_model("chinchax")
class ChinchaxLM(TemplateLM):
    """lm-evaluation-harness model backed by an ``llm.evaluation.Evaluator`` (log-likelihoods and greedy
    generation of one chinchax model). Build it with ``ChinchaxLM.from_run(run_dir, step=None)`` or
    ``ChinchaxLM(evaluator)``; the evaluator should have ``prefix_id=None`` (``tok_encode`` puts the
    end-of-text id in front itself)."""

    backend = "causal"

    def __init__(self, evaluator: Evaluator):
        super().__init__()
        if evaluator.prefix:
            raise ValueError("ChinchaxLM needs an Evaluator with prefix_id=None (tok_encode adds the end-of-text id)")
        if evaluator.eot_id is None:
            raise ValueError("ChinchaxLM needs a tokenizer with an end-of-text id (eot_id)")
        self.evaluator = evaluator
        self.tokenizer = evaluator.tokenizer
        os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstraps in this process, not a forked pool

    @classmethod
    def from_model(cls, model, tokenizer, *, max_length: int, batch_size: int = 64) -> ChinchaxLM:
        """From an in-memory ``llm.model.Transformer`` and its tokenizer (max_length in tokens)."""
        return cls(Evaluator.from_model(model, tokenizer, max_length=max_length, batch_size=batch_size, prefix_id=None))

    @classmethod
    def from_run(cls, run_dir, step: int | None = None, *, batch_size: int = 64,
                 max_length: int | None = None) -> ChinchaxLM:  # fmt: skip
        """The model of a finished run directory at checkpoint ``step`` (default: its final step), with the
        run's tokenizer; max_length (tokens) defaults to the model's seq_len. ConfigError (one line) for
        a run that is not finished or lacks that checkpoint."""
        cfg, graphdef, params, _, tokenizer = load_run(run_dir, step)
        max_length = int(max_length or cfg.model.seq_len)
        return cls(Evaluator(graphdef, params, tokenizer, max_length=max_length, batch_size=batch_size, prefix_id=None))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> ChinchaxLM:
        """The harness's constructor by name (``model="chinchax"``): ``run_dir`` (required), ``step``,
        ``max_length`` and ``batch_size``; the harness's ``device`` and ``max_batch_size`` are ignored."""
        args = {**{k: v for k, v in (additional_config or {}).items() if v is not None}, **arg_dict}
        if "run_dir" not in args:
            raise ValueError("the chinchax model needs model_args run_dir=RUN_DIR (and optionally step=S)")
        unknown = set(args) - {"run_dir", "step", "max_length", "batch_size", "device", "max_batch_size"}
        if unknown:
            raise ValueError(f"unknown chinchax model_args {sorted(unknown)}; it takes run_dir, step, max_length, batch_size")
        as_int = {k: int(args[k]) for k in ("step", "max_length") if args.get(k) is not None}
        batch = args.get("batch_size")
        batch_size = int(batch) if batch is not None and str(batch).isdigit() else 64  # "auto": our default
        return cls.from_run(args["run_dir"], batch_size=batch_size, **as_int)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ChinchaxLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return int(self.evaluator.eot_id)

    @property
    def max_length(self) -> int:
        return self.evaluator.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``, after the end-of-text id unless add_special_tokens is False."""
        ids = self.evaluator.encode(string)
        return ids if add_special_tokens is False else [self.eot_token_id, *ids]

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, all greedy) of each ``((context, continuation), context ids,
        continuation ids)`` request."""
        scores = self.evaluator.score([(ctx, cont) for _, ctx, cont in requests])
        return [(float(lp.sum()), bool(ok.all())) for lp, ok in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document (``(text,)`` requests), the first token after the
        end-of-text id; documents longer than max_length are scored in windows (module docstring)."""
        docs, pairs = [], []
        for request in requests:
            (text,) = tuple(getattr(request, "args", request))
            windows = get_rolling_token_windows(self.tok_encode(text, add_special_tokens=False),
                                                prefix_token=self.eot_token_id, max_seq_len=self.max_length - 1,
                                                context_len=1)  # fmt: skip
            windows = [make_disjoint_window(w) for w in windows]
            docs.append(len(windows))
            pairs += windows
        totals, at = [], 0
        scores = self.evaluator.score(pairs)
        for n in docs:
            totals.append(float(sum(lp.sum() for lp, _ in scores[at : at + n])))
            at += n
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each ``(context, {"until": [...], "max_gen_toks": n})`` request, cut before
        its first stop string (the end-of-text id always stops)."""
        parsed = [generation_request(r, self.max_length) for r in requests]
        return self.evaluator.generate_text([(self.tok_encode(c), until, m) for c, until, m in parsed])
