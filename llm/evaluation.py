"""Evaluation of a trained model: log-likelihoods of continuations and greedy generation, jitted and batched.

One jitted scoring primitive (``Evaluator.score``) runs the model teacher-forced on a batch of
token sequences padded to bucketed shapes (batch and length rounded up to powers of two, so a
whole evaluation compiles a handful of times) and returns, for every target token, its
log-probability and whether it is the argmax (greedy) token. Padding sits after each row's real
tokens (causal attention never looks at it) and whole padding rows are marked invalid, so bucketing
does not change any result. On it, with the request and response shapes of EleutherAI's
lm-evaluation-harness:

- ``loglikelihood([(context, continuation), ...]) -> [(log p(continuation | context), is_greedy)]``
- ``generate_until([(context, until, max_tokens), ...]) -> [continuation text]`` (greedy; the
  harness's ``(context, {"until": [...], "max_gen_toks": n})`` is accepted too).

Generation runs on the device in one ``lax.while_loop`` per batch, with a key/value cache: one
forward pass over the padded prompts fills it, then each step feeds one token per row at its own
position (``kv_cache=False``: each new token re-runs the full forward pass over the padded buffer;
both equal step-by-step argmax decoding of the unpadded sequences). The loop stops as soon as
every row has emitted a single-token stop string or the end-of-text token; stop strings are
applied exactly on the host afterwards.

Every sequence starts with the tokenizer's end-of-text id (documents are joined by it in
pre-training, so a prompt reads as the start of a document). Contexts longer than
``max_length`` (default: the model's ``seq_len``) lose their oldest tokens, as in the harness;
``Evaluator.n_truncated`` counts them.

``evaluate_tasks(run_dir, tasks, shots, ...)`` restores a finished run (its final step or a
checkpoint), evaluates generated tasks (``llm.tasks``) few-shot and writes per-item records
into ``run_dir/evals/`` (``rundir.write_eval_records``), from which ``analysis`` computes
every metric without JAX.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.config import ConfigError

MIN_LENGTH_BUCKET = 16
MAX_STOP_IDS = 8  # single-token stop ids checked on the device per row (more are applied on the host)


def bucket(n: int, low: int = 1, high: int | None = None) -> int:
    """The smallest power of two >= max(n, low), capped at ``high`` (itself a bucket) when n <= high."""
    need = max(int(n), int(low), 1)
    size = 1
    while size < need:
        size *= 2
    return size if high is None else min(size, max(int(high), int(n)))


# --------------------------------------------------------------------------- tokenizers


def tokenizer_from_manifest(manifest: dict):
    """The tokenizer of a prepared dataset (``TokenDataset.manifest``): bytes or the run's BPE file.

    ConfigError for sources without text (synthetic token ids): tasks are text.
    """
    from llm.data.tokenizers import BPETokenizer, ByteTokenizer

    tok = manifest.get("tokenizer") or {}
    if tok.get("name") == "bytes":
        return ByteTokenizer()
    if tok.get("name") == "bpe":
        from tokenizers import Tokenizer

        path = tok.get("file")
        if not path or not Path(path).is_file():
            raise ConfigError(f"the run's BPE tokenizer file {path} is missing (the token cache was cleared?)")
        return BPETokenizer(Tokenizer.from_file(str(path)), tok.get("hash", ""))
    raise ConfigError(
        f"{manifest.get('source', 'the data source')} has no text tokenizer (synthetic token ids): "
        "tasks are text, so evaluate a run trained on a text source (builtin:, text:, tfds:)"
    )


# --------------------------------------------------------------------------- jitted primitives


@functools.lru_cache(maxsize=16)  # one compiled function per architecture, shared by every Evaluator
def make_score_fn(graphdef: nnx.GraphDef) -> Callable:
    """Jitted (params, tokens_BT, valid_BT) -> (logprob_BT1, correct_BT1), both [B, T-1].

    Position t holds log p(tokens[t+1] | tokens[:t+1]) (float32) and whether tokens[t+1] is the
    argmax of the model's logits there.
    """

    def score(params, tokens_BT, valid_BT):
        model = nnx.merge(graphdef, params)
        logits_BTV, _ = model(tokens_BT, valid_BT=valid_BT)
        logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
        targets_BT = tokens_BT[:, 1:]
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
        correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
        return logp_BT, correct_BT

    return jax.jit(score)


@functools.lru_cache(maxsize=16)  # one compiled function per architecture, shared by every Evaluator
def make_generate_fn(graphdef: nnx.GraphDef) -> Callable:
    """Jitted greedy decoding (params, tokens_BT, lengths_B, out_BM, n_new, stop_BS, done_B) -> (out_BM, n).

    Row b's prompt is tokens_BT[b, :lengths_B[b]]; up to ``n_new`` (<= M, and lengths + n_new <= T)
    tokens are appended, each the argmax after a full forward pass over the buffer. The loop ends
    early once every row has produced one of its stop ids (stop_BS, -1 = none) or started done.
    Returns the generated ids [B, M] and the number of steps run.
    """

    def generate(params, tokens_BT, lengths_B, out_BM, n_new, stop_BS, done_B):
        model = nnx.merge(graphdef, params)
        rows_B = jnp.arange(tokens_BT.shape[0])
        positions_T = jnp.arange(tokens_BT.shape[1])

        def cond(carry):
            i, _, _, done = carry
            return (i < n_new) & ~jnp.all(done)

        def body(carry):
            i, tokens, out, done = carry
            pos_B = lengths_B + i  # where the new token goes
            valid_BT = positions_T[None, :] < pos_B[:, None]
            logits_BTV, _ = model(tokens, valid_BT=valid_BT)
            next_B = jnp.argmax(logits_BTV[rows_B, pos_B - 1].astype(jnp.float32), axis=-1).astype(tokens.dtype)
            tokens = tokens.at[rows_B, pos_B].set(next_B)
            out = out.at[:, i].set(next_B)
            done = done | jnp.any(next_B[:, None] == stop_BS, axis=-1)
            return i + 1, tokens, out, done

        i, _, out_BM, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), tokens_BT, out_BM, done_B))
        return out_BM, i

    return jax.jit(generate)


def _rope_at(x_BSNH, sin_BSH2, cos_BSH2):
    """llm.layers.apply_rope with a position per row (GPT-NeoX layout: halves (i, i + H/2) rotate)."""
    x1, x2 = jnp.split(x_BSNH.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_BSH2[:, :, None, :], cos_BSH2[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BSNH.dtype)


def _cached_forward(model, tokens_BS, pos_BS, valid_BS, cache):
    """Logits [B, S, V] of tokens at positions pos_BS, attending to the cached keys/values at positions
    <= their own; writes this step's keys/values into the cache (a list of per-layer (k, v) [B, T, K, H]).

    The same computation as ``Transformer.__call__`` (llm.model), step by step: embedding, per block
    attention (RoPE at absolute positions) and the MLP slot, final norm, unembedding.
    """
    from llm.layers import rope_tables, token_matmul
    from llm.model import layer_blocks

    cfg, cdt = model.cfg, model.compute_dtype
    t_max = cache[0][0].shape[1]
    sin_TH2, cos_TH2 = rope_tables(t_max, cfg.d_model // cfg.n_heads, cfg.rope_theta)
    sin_BSH2, cos_BSH2 = sin_TH2[pos_BS], cos_TH2[pos_BS]
    rows_B1 = jnp.arange(tokens_BS.shape[0])[:, None]
    mask_B1ST = (jnp.arange(t_max)[None, None, :] <= pos_BS[:, :, None])[:, None]
    x_BSD = jnp.take(model.embed_VD[...], tokens_BS, axis=0).astype(cdt)
    new_cache = []
    for block, (k_cache, v_cache) in zip(layer_blocks(model), cache):
        attn = block.attn
        h_BSD = block.attn_norm(x_BSD).astype(cdt)
        q = _rope_at(token_matmul(h_BSD, attn.w_q_DNH[...].astype(cdt)), sin_BSH2, cos_BSH2)
        k = _rope_at(token_matmul(h_BSD, attn.w_k_DKH[...].astype(cdt)), sin_BSH2, cos_BSH2)
        v = token_matmul(h_BSD, attn.w_v_DKH[...].astype(cdt))
        k_cache = k_cache.at[rows_B1, pos_BS].set(k.astype(k_cache.dtype))
        v_cache = v_cache.at[rows_B1, pos_BS].set(v.astype(v_cache.dtype))
        new_cache.append((k_cache, v_cache))
        o_BSNH = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask_B1ST, implementation="xla")
        x_BSD = x_BSD + token_matmul(o_BSNH, attn.w_o_NHD[...].astype(cdt), n_in=2)
        if block.is_moe:
            h_BSD, _ = block.mlp(block.mlp_norm(x_BSD), valid_BS)
        else:
            h_BSD = block.mlp(block.mlp_norm(x_BSD))
        x_BSD = x_BSD + h_BSD
    x_BSD = model.final_norm(x_BSD)
    logits_BSV = token_matmul(x_BSD, model.unembedding(), preferred_element_type=jnp.float32)
    return logits_BSV, new_cache


@functools.lru_cache(maxsize=16)  # one compiled function per architecture, shared by every Evaluator
def make_cached_generate_fn(graphdef: nnx.GraphDef) -> Callable:
    """``make_generate_fn`` with a key/value cache: one forward pass over the prompts (prefill), then one
    token per step attending to the cached keys and values. Same signature and results."""

    def generate(params, tokens_BT, lengths_B, out_BM, n_new, stop_BS, done_B):
        model = nnx.merge(graphdef, params)
        cfg = model.cfg
        b, t = tokens_BT.shape
        kv_heads, head_dim = cfg.n_kv_heads or cfg.n_heads, cfg.d_model // cfg.n_heads
        cache = [(jnp.zeros((b, t, kv_heads, head_dim), model.compute_dtype),) * 2 for _ in range(cfg.n_layers)]
        rows_B = jnp.arange(b)
        pos_BT = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
        logits_BTV, cache = _cached_forward(model, tokens_BT, pos_BT, pos_BT < lengths_B[:, None], cache)
        next_B = jnp.argmax(logits_BTV[rows_B, lengths_B - 1], axis=-1).astype(tokens_BT.dtype)
        out_BM = out_BM.at[:, 0].set(next_B)
        done_B = done_B | jnp.any(next_B[:, None] == stop_BS, axis=-1)

        def cond(carry):
            i, _, _, _, done = carry
            return (i < n_new) & ~jnp.all(done)

        def body(carry):
            i, prev_B, cache, out, done = carry
            pos_B1 = (lengths_B + i - 1)[:, None]  # the previous token's position
            logits_B1V, cache = _cached_forward(model, prev_B[:, None], pos_B1, jnp.ones_like(pos_B1, bool), cache)
            next_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(prev_B.dtype)
            out = out.at[:, i].set(next_B)
            done = done | jnp.any(next_B[:, None] == stop_BS, axis=-1)
            return i + 1, next_B, cache, out, done

        init = (jnp.ones((), jnp.int32), next_B, cache, out_BM, done_B)
        i, _, _, out_BM, _ = jax.lax.while_loop(cond, body, init)
        return out_BM, i

    return jax.jit(generate)


# --------------------------------------------------------------------------- the evaluator


def _args(request) -> tuple:
    """The argument tuple of a request: a plain tuple, or an lm-eval ``Instance`` (its ``.args``)."""
    return tuple(getattr(request, "args", request))


def generation_request(request, max_length: int) -> tuple[str, list[str], int]:
    """(context, stop strings, max new tokens) of a generate_until request: ``(context, until, max_tokens)``
    or the harness's ``(context, {"until": [...], "max_gen_toks": n})`` (max_gen_toks defaults to 256);
    max new tokens is capped at max_length - 1."""
    a = _args(request)
    if len(a) == 2 and isinstance(a[1], dict):
        until, max_tokens = a[1].get("until", []), a[1].get("max_gen_toks", 256)
    else:
        _, until, max_tokens = a
    until = [until] if isinstance(until, str) else list(until or [])
    return a[0], until, min(int(max_tokens), max_length - 1)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of each non-empty stop string in turn."""
    for s in until:
        if s and s in text:
            text = text[: text.index(s)]
    return text


class Evaluator:
    """Batched, jit-compiled teacher-forced scoring and greedy generation of one model.

    Args:
      graphdef, params: the model as ``nnx.split`` gives it (``Evaluator.from_model`` splits one).
      tokenizer: has ``encode(str) -> ids``, ``decode(ids) -> str`` and ``eot_id``.
      max_length: longest sequence the model sees (prefix + context + continuation or new tokens);
        longer contexts lose their oldest tokens.
      batch_size: sequences per forward pass (the largest batch bucket).
      prefix_id: token put before every context (default the tokenizer's end-of-text id; None: none,
        except that an empty context always gets the end-of-text id, as in the harness).
      kv_cache: generate with a key/value cache (prefill, then one token per step); False re-runs the
        full forward pass over the padded buffer for every new token (the reference path).
    """

    def __init__(self, graphdef, params, tokenizer, *, max_length: int, batch_size: int = 64, prefix_id: Any = "eot",
                 kv_cache: bool = True):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.eot_id = getattr(tokenizer, "eot_id", None)
        self.prefix = [] if prefix_id is None else [int(self.eot_id if prefix_id == "eot" else prefix_id)]
        self.n_truncated = 0  # requests whose context lost tokens to max_length
        self._score = make_score_fn(graphdef)
        self._generate = (make_cached_generate_fn if kv_cache else make_generate_fn)(graphdef)

    @classmethod
    def from_model(cls, model: nnx.Module, tokenizer, **kwargs) -> Evaluator:
        graphdef, params = nnx.split(model)
        return cls(graphdef, params, tokenizer, **kwargs)

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation): the continuation's ids are those of the whole text after
        the context's (so a BPE merge across the boundary is not split), or its own encoding where the
        whole text does not start with the context's ids."""
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, self.encode(continuation)

    def _context(self, ctx: list[int], room: int) -> list[int]:
        """prefix + ctx, keeping at most ``room`` tokens (the newest); counts truncations."""
        ids = (self.prefix or ([self.eot_id] if not ctx else [])) + list(ctx)
        if not ids:
            raise ValueError("an empty context needs a prefix token (the tokenizer has no eot_id)")
        if len(ids) > room:
            self.n_truncated += 1
            ids = ids[len(ids) - room :]
        return ids

    # ------------------------------------------------------------------ scoring

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Teacher-forced (log-probabilities float64 [L], argmax-correct bool [L]) of each continuation's
        L tokens after its context (token ids). Batched longest first; results in input order."""
        rows = []
        for ctx, cont in pairs:
            cont = [int(t) for t in cont]
            if not cont:
                raise ValueError("a continuation must have at least one token")
            if len(cont) >= self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            rows.append((self._context(list(ctx), self.max_length - len(cont)), cont))
        out: list[Any] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(rows[i][0]) + len(rows[i][1]) for i in chunk)
            b, t = bucket(len(chunk), high=self.batch_size), bucket(width, MIN_LENGTH_BUCKET, self.max_length)
            tokens = np.zeros((b, t), np.int32)
            valid = np.zeros((b, t), bool)
            for r, i in enumerate(chunk):
                seq = rows[i][0] + rows[i][1]
                tokens[r, : len(seq)] = seq
                valid[r, : len(seq)] = True
            logp, correct = jax.device_get(self._score(self.params, tokens, valid))
            for r, i in enumerate(chunk):
                n_ctx, n_cont = len(rows[i][0]), len(rows[i][1])
                sl = slice(n_ctx - 1, n_ctx - 1 + n_cont)
                out[i] = (np.asarray(logp[r, sl], np.float64), np.asarray(correct[r, sl], bool))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | context), whether every one is the greedy token), per
        (context, continuation) request: the harness's ``loglikelihood``."""
        pairs = [self.encode_pair(*_args(r)[:2]) for r in requests]
        return [(float(lp.sum()), bool(c.all())) for lp, c in self.score(pairs)]

    # ------------------------------------------------------------------ generation

    def _stop_ids(self, until: Sequence[str]) -> list[int]:
        ids = [] if self.eot_id is None else [int(self.eot_id)]
        for s in until:
            enc = self.encode(s)
            if len(enc) == 1:
                ids.append(enc[0])
        return list(dict.fromkeys(ids))[:MAX_STOP_IDS]

    def generate_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[str], int]]) -> list[list[int]]:
        """Greedy new token ids for (context ids, stop strings, max_tokens) requests, cut at the end-of-text
        id but not yet at stop strings (see ``generate_until``)."""
        rows = []
        for ctx, until, max_tokens in requests:
            max_tokens = int(max_tokens)
            if not 1 <= max_tokens < self.max_length:
                raise ValueError(f"max_tokens must be in [1, max_length={self.max_length}), got {max_tokens}")
            rows.append((self._context(list(ctx), self.max_length - max_tokens), max_tokens, self._stop_ids(until)))
        out: list[Any] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + rows[i][1]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(rows[i][0]) + rows[i][1] for i in chunk)
            n_new = max(rows[i][1] for i in chunk)
            b, t = bucket(len(chunk), high=self.batch_size), bucket(width, MIN_LENGTH_BUCKET, self.max_length)
            m = bucket(n_new, 4, t)
            tokens = np.zeros((b, t), np.int32)
            lengths = np.ones(b, np.int32)
            stops = np.full((b, MAX_STOP_IDS), -1, np.int32)
            done = np.ones(b, bool)  # padding rows start done
            for r, i in enumerate(chunk):
                ctx, _, stop = rows[i]
                tokens[r, : len(ctx)] = ctx
                lengths[r] = len(ctx)
                stops[r, : len(stop)] = stop
                done[r] = False
            new, n_run = jax.device_get(
                self._generate(self.params, tokens, lengths, np.zeros((b, m), np.int32), np.int32(n_new), stops, done)
            )
            for r, i in enumerate(chunk):
                ids = [int(x) for x in new[r, : min(rows[i][1], int(n_run))]]
                if self.eot_id is not None and self.eot_id in ids:
                    ids = ids[: ids.index(self.eot_id)]
                out[i] = ids
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy continuation text of each (context, until, max_tokens) request, cut before the first stop
        string: the harness's ``generate_until`` (its ``(context, {"until": [...], "max_gen_toks": n})``
        form is accepted; max_gen_toks defaults to 256, capped below max_length)."""
        parsed = [generation_request(r, self.max_length) for r in requests]
        return self.generate_text([(self.encode(c), until, m) for c, until, m in parsed])

    def generate_text(self, requests: Sequence[tuple[Sequence[int], Sequence[str], int]]) -> list[str]:
        """``generate_tokens`` decoded and cut before each request's first stop string."""
        outputs = self.generate_tokens(requests)
        return [cut_at_stop(self.tokenizer.decode(ids), until) for (_, until, _), ids in zip(requests, outputs)]


# --------------------------------------------------------------------------- run directories


def load_run(run_dir, step: int | None = None, *, check_only: bool = False):
    """(config, graphdef, params, step, tokenizer) of a finished run at ``step`` (default: its final step).

    ConfigError (one line) when the run is not finished or has no checkpoint at that step.
    check_only: stop after those checks and return (config, None, None, step, None).
    """
    from llm.checkpoint import Checkpoints
    from llm.config import load_config, total_steps
    from llm.layer_stack import restore_state
    from rundir import CHECKPOINTS, CONFIG, read_result

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    result = read_result(run_dir)
    if result is None or result.get("status") != "done":
        status = "no result.json" if result is None else f"result.json status {result.get('status')!r}"
        raise ConfigError(f"{run_dir}: not a finished run ({status}); evaluate a run whose result.json says done")
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG}")
    cfg = load_config(run_dir / CONFIG)
    final = int(result.get("step") or total_steps(cfg))
    step = final if step is None else int(step)
    if not (run_dir / CHECKPOINTS).is_dir():
        raise ConfigError(f"{run_dir}: no {CHECKPOINTS}/ folder to restore from")
    with Checkpoints(run_dir / CHECKPOINTS, keep=cfg.train.keep_checkpoints) as ckpts:
        steps = ckpts.all_steps()
        if step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise ConfigError(f"{run_dir}: no checkpoint at step {step}; checkpoints kept: {have}")
        if check_only:
            return cfg, None, None, step, None
        from llm.model import Transformer
        from llm.optim import make_optimizer

        model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
        graphdef, params = nnx.split(model)
        optimizer = make_optimizer(cfg.optim, total_steps(cfg))
        like = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
                "step": jnp.zeros((), jnp.int32)}  # fmt: skip
        state, _ = restore_state(ckpts, step, like, cfg.model)  # either layer layout (llm.layer_stack)
    from llm.data import load_dataset

    dataset = load_dataset(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.model.seq_len,
                           eval_tokens=cfg.train.eval_tokens, progress=False)  # fmt: skip
    return cfg, graphdef, state["params"], step, tokenizer_from_manifest(dataset.manifest)


def resolve_tasks(tasks, cfg=None, params=None) -> list:
    """Task objects from names (``"facts"``), (name, params) pairs or Task objects. A name the run mixed
    into pre-training (``data.tasks``) gets the params it was trained with, so memorised facts are the
    same facts; ``params`` ({name: {parameter: value}}) are applied over those, key by key.
    ConfigError for unknown names (with a did-you-mean) and bad params."""
    from llm.tasks import Task, get_task

    mixed = getattr(getattr(cfg, "data", None), "tasks", None) if cfg is not None else None
    mixed_params = dict(getattr(mixed, "params", None) or {}) if mixed is not None else {}
    params = params or {}
    out = []
    for t in tasks:
        if isinstance(t, Task):
            out.append(t)
        elif isinstance(t, str):
            out.append(get_task(t, **{**dict(mixed_params.get(t) or {}), **dict(params.get(t) or {})}))
        else:
            name, params = t
            out.append(get_task(name, **dict(params or {})))
    return out


def evaluate_items(evaluator: Evaluator, task, items, shots: int, seed: int, max_new_tokens: int | None = None) -> list[dict]:
    """Per-item records (the ``evals/`` format of ``rundir.write_eval_records``) of ``items`` of ``task``."""
    prompts = [task.few_shot_prompt(it, shots, seed) for it in items]
    pairs = [evaluator.encode_pair(p, it.target) for p, it in zip(prompts, items)]
    scores = evaluator.score(pairs)
    longest = max((len(c) for _, c in pairs), default=1)
    max_tokens = min(max_new_tokens or longest + 4, evaluator.max_length - 1)
    outputs = evaluator.generate_tokens([(ctx, task.stop, max_tokens) for ctx, _ in pairs])
    # Multiple choice: every choice scored as a continuation of the same prompt.
    mc = [(i, c) for i, it in enumerate(items) for c in it.choices]
    mc_scores = evaluator.score([evaluator.encode_pair(prompts[i], c) for i, c in mc]) if mc else []
    choice_lp: dict[int, list[float]] = {}
    for (i, _), (lp, _) in zip(mc, mc_scores):
        choice_lp.setdefault(i, []).append(float(lp.sum()))
    prefix = len(evaluator.prefix) or 1
    records = []
    for i, (it, prompt, (ctx, cont), (lp, correct), new) in enumerate(zip(items, prompts, pairs, scores, outputs)):
        text = cut_at_stop(evaluator.tokenizer.decode(new), task.stop)
        rec = {
            "task": task.name, "item": i, "key": it.key, "shots": int(shots), "prompt": prompt, "target": it.target,
            "output": text, "target_tokens": cont, "output_tokens": evaluator.encode(text) if text else [],
            "token_correct": [bool(c) for c in correct], "token_logprobs": [float(x) for x in lp],
            "target_logprob": float(lp.sum()),
            "truncated": prefix + len(ctx) + max(len(cont), max_tokens) > evaluator.max_length,
        }  # fmt: skip
        if it.choices:
            rec.update(choices=list(it.choices), choice_logprobs=choice_lp[i], answer_index=int(it.answer_index))
        records.append(rec)
    return records


def evaluate_tasks(run_dir, tasks, shots: int, step: int | None = None, n_items: int = 500, seed: int = 0, *,
                   params: dict | None = None, batch_size: int = 64, max_length: int | None = None,
                   max_new_tokens: int | None = None, log: Callable[[str], None] | None = None) -> list[dict]:  # fmt: skip
    """Evaluate a finished run on generated tasks, few-shot, and write its ``evals/`` records.

    run_dir: a run directory whose result.json says done. tasks: names (``"add3_reversed"``),
    (name, params) pairs or ``llm.tasks.Task`` objects; a name the run mixed into pre-training uses
    the params of its ``data.tasks``, with ``params`` ({name: {parameter: value}}, e.g.
    ``{"facts": {"n_keys": 512}}``) applied over them. shots: demonstrations before each query. step: a kept
    checkpoint (default the final step). n_items: test items per task (fewer when the test split is
    smaller), drawn with ``seed`` (which also picks the demonstrations). max_length: longest sequence
    scored (default the model's seq_len; longer prompts lose their oldest tokens and the summary
    counts them). max_new_tokens: greedy tokens generated per item (default longest target + 4).

    Writes ``evals/<task>.step<S>.jsonl`` and ``.summary.json`` per task (the summary records the
    task's params; evaluating the task again with other params replaces both) and returns the
    summaries (each with its ``records`` path). Bad input raises ConfigError before anything is written.
    """
    from llm.tasks import Task, check_task_params
    from rundir import write_eval_records

    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    if int(shots) < 0 or int(n_items) < 1:
        raise ConfigError(f"shots must be >= 0 and n_items >= 1, got shots={shots}, n_items={n_items}")
    names = [getattr(t, "name", t if isinstance(t, str) else t[0]) for t in tasks]
    params = check_task_params(params, names)
    cfg, _, _, step, _ = load_run(run_dir, step, check_only=True)  # cheap checks first
    task_objs = resolve_tasks(tasks, cfg, params)
    items = {}
    for task in task_objs:  # draw items and check that the demonstrations exist, before loading the model
        try:
            items[task.name] = task.test_items(int(n_items), int(seed))
            if not items[task.name]:
                raise ValueError("its test split is empty")
            task.few_shot_prompt(items[task.name][0], int(shots), int(seed))
        except ValueError as err:
            raise ConfigError(f"task {task.name!r}: {err}") from None
    cfg, graphdef, params, step, tokenizer = load_run(run_dir, step)
    max_length = int(max_length or cfg.model.seq_len)
    evaluator = Evaluator(graphdef, params, tokenizer, max_length=max_length, batch_size=batch_size)
    summaries = []
    for task in task_objs:
        began = time.perf_counter()
        records = evaluate_items(evaluator, task, items[task.name], int(shots), int(seed), max_new_tokens)
        seconds = time.perf_counter() - began
        extra = {"params": dict(task.params), "seed": int(seed), "max_length": max_length,
                 "n_truncated": sum(r["truncated"] for r in records), "eval_seconds": seconds}  # fmt: skip
        path, summary_path = write_eval_records(run_dir, task.name, step, records, shots=int(shots),
                                                baseline=task.baseline, memorisation=task.memorisation, **extra)  # fmt: skip
        summary = {"task": task.name, "step": step, "shots": int(shots), "n_items": len(records), **extra,
                   "records": str(path), "summary": str(summary_path)}  # fmt: skip
        summaries.append(summary)
        if log is not None:
            log(f"{task.name}: {len(records)} items at step {step} in {seconds:.1f}s -> {path}")
    return summaries
