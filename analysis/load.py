"""Read a sweep directory, a run directory, or a CSV/Parquet table into two pandas tables.

runs:   one row per run: run, status, error, n_params_total, n_params_nonembed, n_params_active,
        n_params_active_nonembed, tokens (D), dataset_tokens, steps, flops_6N, flops_6N+attention (C),
        final_eval_loss, best_eval_loss, final_train_loss, entropy_rate, data, lr (peak learning rate),
        batch_tokens (tokens per optimiser step) (whatever is known).
        ``data`` is "source tokenizer vocab" from the run's config.yaml: losses are per token,
        so runs on different data or tokenizers are not comparable and fitting them together
        warns.
curves: one row per logged step: run, step, tokens, flops_6N, flops_6N+attention,
        loss (eval loss; NaN on steps without evaluation), train_loss.

The run-directory layout is the project contract (config.yaml, metrics.jsonl, result.json;
a run is done iff result.json says status "done"). A table may hold only a few columns, e.g.
``n_params_total, tokens, loss``: ``loss`` is read as the final eval loss, a missing ``run``
column names rows ``row0, row1, ...``, and a missing ``status`` means "done".
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from rundir import FLOP_CONVENTIONS, read_json_object

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
RUN_COLUMNS = (
    "run", "status", "error", "n_params_total", "n_params_nonembed", "n_params_active",
    "n_params_active_nonembed", "tokens", "dataset_tokens", "steps", "flops_6N", "flops_6N+attention",
    "final_eval_loss", "best_eval_loss", "final_train_loss", "entropy_rate", "data", "lr", "batch_tokens",
)  # fmt: skip
CURVE_COLUMNS = ("run", "step", "tokens", "flops_6N", "flops_6N+attention", "loss", "train_loss")


class AnalysisError(ValueError):
    """Input the analysis cannot fit honestly; the message names the rows or columns at fault."""


class AnalysisWarning(UserWarning):
    """Something the user should know about the fit (excluded runs, extrapolated minima)."""


# Written by the sweep runner: the runs that belong to the sweep (the folder listing may
# hold folders left by an earlier version of its spec). Part of the run-directory contract.
SWEEP_INDEX = "index.json"


def sweep_members(sweep_dir: Path, run_dirs: list[Path], include_stale: bool = False) -> list[Path]:
    """The run folders of a sweep directory that its index.json lists.

    Folders the index does not list are stale (left by an earlier version of the spec, with
    another learning rate or batch size, say): they are left out with an AnalysisWarning
    naming them, or kept when ``include_stale``. Without an index every folder counts.
    """
    index_path = Path(sweep_dir) / SWEEP_INDEX
    if include_stale or not index_path.exists():
        return run_dirs
    index = read_json_object(index_path)
    if index is None or not isinstance(index.get("runs"), list):
        raise AnalysisError(
            f"{index_path} is unreadable: rebuild it with `chinchax sweep status SPEC --out {sweep_dir}`, "
            "or fit every run folder with --include-stale (include_stale=True)"
        )
    listed = {str(r.get("run_dir") or r.get("name")) for r in index["runs"] if isinstance(r, dict)}
    stale = [p.name for p in run_dirs if p.name not in listed]
    if stale:
        shown = ", ".join(stale[:10]) + (f", ... ({len(stale) - 10} more)" if len(stale) > 10 else "")
        warnings.warn(
            f"left out {len(stale)} run folder(s) of {sweep_dir} that are not in its {SWEEP_INDEX} (not runs of the "
            f"sweep's current spec, e.g. left by an earlier version of it): {shown}; fit them too with "
            "--include-stale (include_stale=True)",
            AnalysisWarning,
            stacklevel=3,
        )
    return [p for p in run_dirs if p.name in listed]


def _is_run_dir(path: Path) -> bool:
    return (path / "result.json").is_file() or (path / "metrics.jsonl").is_file()


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; AnalysisError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnalysisError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise AnalysisError(f"{path} holds a JSON {type(data).__name__}, not an object: the file is damaged")
    return data


def _read_metrics(path: Path, run: str) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # the last line of a run killed mid-write may be truncated; anything else is corrupt
            if lineno == len(path.read_text().splitlines()):
                continue
            raise AnalysisError(f"{path}:{lineno}: not valid JSON")
        flops = rec.get("flops") or {}
        rows.append(
            {
                "run": run,
                "step": rec.get("step"),
                "tokens": rec.get("tokens"),
                "flops_6N": flops.get("6N", math.nan),
                "flops_6N+attention": flops.get("6N+attention", math.nan),
                "loss": rec.get("eval_loss", math.nan),
                "train_loss": rec.get("train_loss", math.nan),
            }
        )
    return rows


def _data_key(config_path: Path) -> str | None:
    """"source tokenizer vocab=V" of a run's config.yaml; None when it is absent or unreadable."""
    import yaml

    try:
        cfg = yaml.safe_load(config_path.read_text()) or {}
        data, model = cfg.get("data") or {}, cfg.get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not data.get("source"):
        return None
    return f"{data['source']} {data.get('tokenizer', '?')} vocab={model.get('vocab_size', '?')}"


def _optimiser_columns(config_path: Path) -> dict:
    """lr (optim.lr) and batch_tokens (train.batch_size x model.seq_len) of a run's config.yaml; NaN when unknown."""
    import yaml

    try:
        cfg = yaml.safe_load(config_path.read_text()) or {}
        lr = float((cfg.get("optim") or {}).get("lr"))
        batch = float((cfg.get("train") or {}).get("batch_size")) * float((cfg.get("model") or {}).get("seq_len"))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return {"lr": math.nan, "batch_tokens": math.nan}
    return {"lr": lr, "batch_tokens": batch}


def _read_run_dir(path: Path) -> tuple[dict, list[dict]]:
    run = path.name
    curve = _read_metrics(path / "metrics.jsonl", run)
    if (path / "result.json").is_file():
        res = read_json(path / "result.json")
        run = res.get("run_name") or run
        for rec in curve:
            rec["run"] = run
        row = {k: res.get(k) for k in RUN_COLUMNS if k not in ("run", "flops_6N", "flops_6N+attention")}
        row["run"] = run
        for conv in FLOP_CONVENTIONS:
            row[f"flops_{conv}"] = (res.get("flops") or {}).get(conv, math.nan)
        row["run_dir"] = str(path)
    else:  # still running or killed before the end: known only from its metrics
        last = curve[-1] if curve else {}
        row = {"run": run, "status": "unfinished", "error": "no result.json", "run_dir": str(path)}
        row.update({k: last.get(k) for k in ("tokens", "flops_6N", "flops_6N+attention")})
    row["data"] = _data_key(path / "config.yaml")
    row.update(_optimiser_columns(path / "config.yaml"))
    return row, curve


def _read_table(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    parquet = path.suffix.lower() in (".parquet", ".pq")
    try:
        if parquet:
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", encoding="utf-8")
    except ImportError as err:
        raise AnalysisError(f"{path}: reading Parquet needs pyarrow (pip install 'chinchax[parquet]'): {err}") from err
    except (ValueError, OSError) as err:  # empty, not UTF-8, not Parquet (pandas and pyarrow raise ValueErrors)
        kind = "Parquet" if parquet else "UTF-8 CSV/TSV"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AnalysisError(f"{path}: not a readable {kind} table ({reason})") from err
    if table.empty:
        raise AnalysisError(f"{path}: the table has no rows")
    table = table.copy()
    if "final_eval_loss" not in table and "loss" in table:
        table["final_eval_loss"] = table["loss"]
    if "run" not in table:
        table["run"] = [f"row{i}" for i in range(len(table))]
    table["run"] = table["run"].astype(str)
    if "status" not in table:
        table["status"] = "done"
    dupes = table["run"][table["run"].duplicated()].tolist()
    if dupes:
        raise AnalysisError(f"{path}: run names repeat: {dupes[:10]}")
    if "flops_convention" in table and table["flops_convention"].nunique() > 1:
        first = table["flops_convention"].iloc[0]
        other = table.loc[table["flops_convention"] != first, "run"].tolist()
        raise AnalysisError(
            f"{path}: mixed FLOP conventions in one table ({sorted(table['flops_convention'].unique())}); "
            f"rows {other[:10]} differ from {first!r}. Fit one convention at a time."
        )
    if "step" in table and table.groupby("run").size().max() > 1:
        raise AnalysisError(f"{path}: a runs table has one row per run; found several rows per run name")
    cols = ["run"] + [c for c in ("step", "tokens", "flops", "flops_6N", "flops_6N+attention") if c in table]
    curves = table[cols].copy()
    curves["loss"] = table["final_eval_loss"] if "final_eval_loss" in table else math.nan
    curves["train_loss"] = table["final_train_loss"] if "final_train_loss" in table else math.nan
    return table, curves


def load_runs(path, include_stale: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load runs and their loss curves from a sweep directory, a run directory or a table.

    Returns (runs, curves) as described in the module docstring. Runs whose status is not
    "done" are kept (with their status) so callers can report them; fits exclude them.
    In a sweep directory with an index.json only the runs it lists are loaded; the other
    folders are left out with a warning unless ``include_stale`` (see ``sweep_members``).
    """
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise AnalysisError(f"{path}: expected a sweep/run directory or a {'/'.join(TABLE_SUFFIXES)} table")
        return _read_table(path)
    if _is_run_dir(path):
        run_dirs = [path]
    else:
        run_dirs = sorted(p for p in path.iterdir() if p.is_dir() and _is_run_dir(p))
        run_dirs = sweep_members(path, run_dirs, include_stale)
    if not run_dirs:
        raise AnalysisError(f"{path}: no run directories (folders with result.json or metrics.jsonl) inside")
    rows, curves = [], []
    for run_dir in run_dirs:
        row, curve = _read_run_dir(run_dir)
        rows.append(row)
        curves.extend(curve)
    runs = pd.DataFrame(rows)
    for col in RUN_COLUMNS:
        if col not in runs:
            runs[col] = math.nan
    curves_df = pd.DataFrame(curves, columns=list(CURVE_COLUMNS))
    for col in CURVE_COLUMNS[1:]:
        curves_df[col] = pd.to_numeric(curves_df[col], errors="coerce").astype(float)
    return runs, curves_df


def finished(runs: pd.DataFrame, curves: pd.DataFrame, exclude=()) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Keep runs with status "done" (and not in ``exclude``); warn naming the others.

    Returns (runs, curves, messages) where messages describe what was dropped.
    """
    messages = []
    exclude = set(map(str, exclude))
    unknown = exclude - set(runs["run"].astype(str))
    if unknown:
        raise AnalysisError(f"exclude names unknown runs: {sorted(unknown)}")
    not_done = runs.loc[runs["status"].astype(str) != "done", "run"].astype(str).tolist()
    if not_done:
        messages.append(f"excluded {len(not_done)} unfinished or failed runs: {not_done}")
    if exclude:
        messages.append(f"excluded by request: {sorted(exclude)}")
    for msg in messages:
        warnings.warn(msg, AnalysisWarning, stacklevel=3)
    keep = (runs["status"].astype(str) == "done") & ~runs["run"].astype(str).isin(exclude)
    kept = runs[keep].reset_index(drop=True)
    if "data" in kept and kept["data"].dropna().nunique() > 1:
        groups = {key: group["run"].astype(str).tolist() for key, group in kept.groupby("data")}
        listed = "; ".join(f"{key}: {len(names)} runs, e.g. {names[:3]}" for key, names in groups.items())
        msg = (f"runs trained on different data or tokenizers are fitted together ({listed}); their "
               "losses are not in the same units: exclude one group")
        messages.append(msg)
        warnings.warn(msg, AnalysisWarning, stacklevel=3)
    return kept, curves[curves["run"].isin(set(kept["run"]))].reset_index(drop=True), messages


def select_flops(runs: pd.DataFrame, curves: pd.DataFrame, flops: str = "auto") -> tuple[str, np.ndarray, pd.Series]:
    """Choose the compute column C: returns (convention, C per run, C per curve row).

    flops: "auto" (6N+attention, else 6N, else C = 6 N D when no FLOP column exists),
    "6N" or "6N+attention" (a generic ``flops`` column is read as this convention), or
    "6ND" (derive C = 6 * n_params * tokens, e.g. for a table of N, D, loss).
    A generic ``flops`` column with flops="auto" is an error: its convention is unknown.
    """
    allowed = ("auto", "6ND") + FLOP_CONVENTIONS
    if flops not in allowed:
        raise AnalysisError(f"flops={flops!r}; expected one of {allowed}")

    def has(col):
        return col in runs and runs[col].notna().any()

    if flops == "auto":
        for conv in ("6N+attention", "6N"):
            if has(f"flops_{conv}"):
                return conv, runs[f"flops_{conv}"].to_numpy(float), curves[f"flops_{conv}"]
        if has("flops"):
            raise AnalysisError(
                "the table has a 'flops' column but no convention: say which it is with --flops 6N or "
                "--flops 6N+attention (flops=... in Python), or --flops 6ND to recompute C = 6 N D"
            )
        flops = "6ND"
    if flops == "6ND":
        return "6ND", None, None  # caller derives C = 6 N D with its chosen N
    col = f"flops_{flops}"
    if has(col):
        return flops, runs[col].to_numpy(float), curves[col] if col in curves else None
    if has("flops"):
        return flops, runs["flops"].to_numpy(float), curves["flops"] if "flops" in curves else None
    raise AnalysisError(f"no FLOP column for convention {flops!r} (looked for {col!r} and 'flops')")


def check_positive(runs: pd.DataFrame, columns) -> None:
    """Raise naming the runs whose values in ``columns`` are missing, NaN, infinite or <= 0."""
    for col in columns:
        if col not in runs:
            raise AnalysisError(f"column {col!r} is missing (have {list(runs.columns)})")
        vals = pd.to_numeric(runs[col], errors="coerce").to_numpy(float)
        bad = ~(np.isfinite(vals) & (vals > 0))
        if bad.any():
            names = runs.loc[bad, "run"].astype(str).tolist()
            raise AnalysisError(
                f"{col} must be finite and > 0; bad in {len(names)} runs: {names[:10]}"
                " (fix the data or leave them out with --exclude RUN ... / exclude=[...])"
            )
