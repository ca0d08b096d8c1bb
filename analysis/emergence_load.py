"""Read evaluation records (``evals/``) of run directories, or a published table, into one tidy table.

The record format (part of the run-directory contract), in ``<run>/evals/``:

- ``<task>.step<S>.jsonl``: one JSON object per evaluated item: task, item (int), shots (int),
  prompt, target, output (str), target_tokens, output_tokens ([int]), token_correct ([bool]:
  greedy argmax == target token at each target position, teacher-forced), token_logprobs
  ([float], nats), target_logprob (their sum), and optionally choices ([str]),
  choice_logprobs ([float]) and answer_index (int) for multiple choice.
- ``<task>.step<S>.summary.json``: task, step, shots, n_items, baseline ({metric: value}, the
  random baseline), memorisation (bool: the task's items were seen in pre-training).

The tidy table (``COLUMNS``) has one row per (run, task, step, metric); ``model`` names a
model size (all seeds of a size share it), ``final`` marks each run's last evaluated step.
A published table (CSV/TSV with columns model, n_params, flops, task, metric, value and
optional baseline, n_items, eval_loss, seed, step, ci_lo, ci_hi, tokens, and family: each model
family becomes its own series, "<table> [<family>]") loads into the same table.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.emergence_metrics import chance_baselines, score_records
from analysis.load import AnalysisError, AnalysisWarning, read_json, sweep_members

# eval_file and write_eval_records live in rundir (llm writes the records, analysis reads them);
# they are re-exported here (`from analysis.emergence_load import write_eval_records`).
from rundir import (  # noqa: F401
    CONFIG,
    EVAL_RECORDS_RE,
    EVALS,
    METRICS,
    RESULT,
    eval_file,
    eval_summary_file,
    write_eval_records,
)

COLUMNS = (
    "source", "run", "model", "n_params", "flops", "flops_convention", "tokens", "eval_loss", "seed", "task",
    "step", "final", "shots", "memorisation", "metric", "value", "ci_lo", "ci_hi", "n_items", "baseline",
)  # fmt: skip
RECORD_KEYS = ("target", "output", "target_tokens", "token_correct", "target_logprob")
EXTERNAL_REQUIRED = ("model", "n_params", "flops", "task", "metric", "value")
EXTERNAL_OPTIONAL = ("baseline", "n_items", "eval_loss", "seed", "step", "ci_lo", "ci_hi", "tokens", "family")
_TEXT_OPTIONAL = ("seed", "family")
TABLE_SUFFIXES = (".csv", ".tsv")
_EVAL_FILE = EVAL_RECORDS_RE


def read_eval_records(path) -> list[dict]:
    """The records of one evals/*.jsonl file; AnalysisError naming file:line for a bad record."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AnalysisError(f"cannot read {path}: {err}") from err
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnalysisError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(rec, dict):
            raise AnalysisError(f"{path}:{lineno}: a record must be a JSON object")
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            raise AnalysisError(f"{path}:{lineno}: record lacks {', '.join(missing)}")
        if len(rec["token_correct"]) != len(rec["target_tokens"]):
            raise AnalysisError(
                f"{path}:{lineno}: token_correct has {len(rec['token_correct'])} entries for "
                f"{len(rec['target_tokens'])} target tokens"
            )
        records.append(rec)
    return records


def list_evals(run_dir) -> list[tuple[str, int, Path]]:
    """(task, step, records path) of every evals/<task>.step<S>.jsonl in a run directory, sorted."""
    folder = Path(run_dir) / EVALS
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _EVAL_FILE.match(p.name)
        if m and p.is_file():
            found.append((m["task"], int(m["step"]), p))
    return sorted(found)


def _seed(run_dir: Path):
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
        return (cfg.get("train") or {}).get("seed")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _curve(run_dir: Path) -> dict:
    """step -> (tokens, flops dict, eval_loss) from metrics.jsonl (unreadable lines skipped)."""
    out = {}
    path = run_dir / METRICS
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a cut last line; the loss loader reports worse
        if isinstance(rec, dict) and "step" in rec:
            out[int(rec["step"])] = (rec.get("tokens"), rec.get("flops") or {}, rec.get("eval_loss"))
    return out


def _at_step(curve: dict, step: int, final_step, result: dict, flops_key: str):
    """(tokens, flops, eval_loss) at ``step``: the run's final values at its final step, else the
    last logged values at or before ``step`` (eval loss: the last evaluation at or before it)."""
    if (final_step is not None and step >= final_step) or not curve:
        return result.get("tokens"), (result.get("flops") or {}).get(flops_key), result.get("final_eval_loss")
    before = [s for s in curve if s <= step]
    if not before:
        return math.nan, math.nan, math.nan
    tokens, flops, _ = curve[max(before)]
    losses = [s for s in before if curve[s][2] is not None]
    return tokens, flops.get(flops_key), curve[max(losses)][2] if losses else math.nan


def _flops_key(results: list[dict], flops: str) -> str:
    if flops != "auto":
        return flops
    for conv in ("6N+attention", "6N"):
        if results and all((r.get("flops") or {}).get(conv) is not None for r in results):
            return conv
    return "6N"


def _run_rows(run_dir: Path, result: dict, source: str, n_params: str, flops_key: str, n_bootstrap: int,
              seed: int) -> list[dict]:  # fmt: skip
    run = result.get("run_name") or run_dir.name
    n = result.get(n_params)
    tokens_final = result.get("tokens")
    curve = _curve(run_dir)
    final_step = result.get("step") or result.get("steps")
    evals = list_evals(run_dir)
    last = {}
    for task, step, _ in evals:
        last[task] = max(last.get(task, -1), step)
    rows = []
    for task, step, path in evals:
        summary_path = eval_summary_file(path)
        summary = read_json(summary_path) if summary_path.is_file() else {}
        records = read_eval_records(path)
        if not records:
            warnings.warn(f"{path}: no records; left out", AnalysisWarning, stacklevel=4)
            continue
        baseline = dict(summary.get("baseline") or {})
        n_choices = {len(r["choices"]) for r in records if r.get("choices")}
        if len(n_choices) == 1:  # the chance level of a K-way choice is known without the summary
            for k, v in chance_baselines(n_choices.pop()).items():
                baseline.setdefault(k, v)
        tokens, c, loss = _at_step(curve, step, final_step, result, flops_key)
        scores = score_records(records, n_bootstrap=n_bootstrap, seed=seed)
        base = {
            "source": source, "run": run, "model": f"N={n:.3g} D={tokens_final:.3g}" if n and tokens_final else run,
            "n_params": n, "flops": c, "flops_convention": flops_key, "tokens": tokens, "eval_loss": loss,
            "seed": _seed(run_dir), "task": task, "step": step, "final": step == last[task],
            "shots": summary.get("shots", records[0].get("shots")), "memorisation": bool(summary.get("memorisation")),
        }  # fmt: skip
        for metric, s in scores.items():
            rows.append(base | {"metric": metric, **s, "baseline": baseline.get(metric, math.nan)})
    return rows


def load_run_evals(path, n_params: str = "n_params_total", flops: str = "auto", n_bootstrap: int = 1000,
                   seed: int = 0, include_stale: bool = False, source: str | None = None) -> pd.DataFrame:  # fmt: skip
    """Score every evals/ record set of a run directory, or of the runs of a sweep directory.

    Only finished runs (result.json status "done") count; others, and runs without evals/,
    are left out with an AnalysisWarning. A sweep's index.json restricts it to its runs.
    n_params: the result.json N field (n_params_total, n_params_nonembed, ...). flops: "auto"
    (6N+attention when every run has it, else 6N), "6N" or "6N+attention". Returns the tidy table.
    """
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"{path}: no such directory")
    if (path / RESULT).is_file() or (path / EVALS).is_dir():
        run_dirs = [path]
    else:
        run_dirs = sorted(p for p in path.iterdir() if p.is_dir() and ((p / RESULT).is_file() or (p / METRICS).is_file()))
        run_dirs = sweep_members(path, run_dirs, include_stale)
    if not run_dirs:
        raise AnalysisError(f"{path}: no run directories (folders with {RESULT}) inside")
    done, skipped = [], []
    for d in run_dirs:
        res = read_json(d / RESULT) if (d / RESULT).is_file() else {}
        if res.get("status") != "done":
            skipped.append(f"{d.name} (status {res.get('status', 'unfinished')})")
        elif not list_evals(d):
            skipped.append(f"{d.name} (no {EVALS}/ records)")
        else:
            done.append((d, res))
    if skipped:
        warnings.warn(f"left out {len(skipped)} run(s): {', '.join(skipped[:10])}", AnalysisWarning, stacklevel=2)
    if not done:
        raise AnalysisError(f"{path}: no finished run with {EVALS}/ records (evaluate runs first: chinchax eval RUN_DIR)")
    bad = [d.name for d, r in done if not (isinstance(r.get(n_params), (int, float)) and r[n_params] > 0)]
    if bad:
        raise AnalysisError(f"{n_params} must be a number > 0 in result.json; bad in {bad[:10]}")
    key = _flops_key([r for _, r in done], flops)
    rows = []
    for d, res in done:
        rows += _run_rows(d, res, source or str(path), n_params, key, n_bootstrap, seed)
    return _tidy(pd.DataFrame(rows))


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    for col in COLUMNS:
        if col not in df:
            df[col] = math.nan
    df = df[list(COLUMNS)].copy()
    for col in ("n_params", "flops", "tokens", "eval_loss", "value", "ci_lo", "ci_hi", "n_items", "baseline", "step"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def _bad_rows(mask) -> str:
    rows = (np.flatnonzero(np.asarray(mask)) + 2).tolist()  # CSV line numbers: header is line 1
    return ", ".join(map(str, rows[:10])) + (f" ... ({len(rows)} rows)" if len(rows) > 10 else "")


def load_external_table(path, source: str | None = None) -> pd.DataFrame:
    """A published table of task results (one row per model, task and metric) as the tidy table.

    Required columns: model, n_params, flops, task, metric, value; optional: baseline, n_items,
    eval_loss, seed, step, ci_lo, ci_hi, tokens, family (each family is its own series: its
    source is "<table> [<family>]"). FLOPs are taken as given (convention
    "external"). One-line AnalysisErrors name missing columns and bad rows (CSV line numbers).
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"{path}: no such file")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise AnalysisError(f"{path}: expected a {'/'.join(TABLE_SUFFIXES)} table of model, n_params, flops, task, metric, value")
    try:
        t = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", encoding="utf-8")
    except (ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AnalysisError(f"{path}: not a readable UTF-8 CSV/TSV table ({reason})") from err
    t.columns = [str(c).strip() for c in t.columns]
    missing = [c for c in EXTERNAL_REQUIRED if c not in t]
    if missing:
        raise AnalysisError(f"{path}: missing column(s) {', '.join(missing)} (have {', '.join(t.columns)}); "
                            f"required: {', '.join(EXTERNAL_REQUIRED)}")  # fmt: skip
    if t.empty:
        raise AnalysisError(f"{path}: the table has no rows")
    for col in ("model", "task", "metric"):
        blank = t[col].isna() | (t[col].astype(str).str.strip() == "")
        if blank.any():
            raise AnalysisError(f"{path}: column {col} is empty on line(s) {_bad_rows(blank)}")
        t[col] = t[col].astype(str).str.strip()
    for col in ("n_params", "flops", "value") + tuple(c for c in EXTERNAL_OPTIONAL if c in t and c not in _TEXT_OPTIONAL):
        raw = t[col]
        vals = pd.to_numeric(raw, errors="coerce")
        # required: every row needs a number; optional: blanks are allowed, text and inf are not
        unparsed = vals.isna() if col in EXTERNAL_REQUIRED else (vals.isna() & raw.notna())
        bad = unparsed | ~np.isfinite(vals.fillna(0.0))
        if col in ("n_params", "flops"):
            bad |= vals <= 0
        if bad.any():
            rule = "a finite number > 0" if col in ("n_params", "flops") else "a finite number"
            raise AnalysisError(f"{path}: {col} must be {rule}; bad on line(s) {_bad_rows(bad)}")
        t[col] = vals.astype(float)
    keys = ["model", "task", "metric"] + [c for c in ("seed", "step", "family") if c in t]
    dup = t.duplicated(keys, keep=False)
    if dup.any():
        raise AnalysisError(f"{path}: line(s) {_bad_rows(dup)} repeat the same {', '.join(keys)}; "
                            "give each seed or step its own value in a seed/step column")  # fmt: skip
    t["source"] = source or str(path)
    if "family" in t:  # one series per model family (Wei et al. draw GPT-3, LaMDA, ... separately)
        fam = t["family"].fillna("").astype(str).str.strip()
        t["source"] = t["source"].where(fam == "", t["source"] + " [" + fam + "]")
    t["run"] = t["model"] + (" seed=" + t["seed"].astype(str) if "seed" in t else "")
    t["flops_convention"] = "external"
    if "step" not in t:
        t["step"] = math.nan
    t["final"] = True
    if "step" in t and t["step"].notna().any():  # several checkpoints per model: the last one is final
        t["final"] = t["step"] == t.groupby(["run", "task"])["step"].transform("max")
    t["memorisation"] = False
    return _tidy(t)


def load_emergence(path, **kwargs) -> pd.DataFrame:
    """The tidy table of a sweep/run directory (see load_run_evals) or an external CSV/TSV table."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such file or directory")
    if path.is_file():
        return load_external_table(path, source=kwargs.get("source"))
    return load_run_evals(path, **kwargs)
