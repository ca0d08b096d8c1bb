"""The ``chinchax`` command line: train one run, run sweeps, fit and plot scaling laws.

Exit codes: 0 success; 1 a run or sweep failed, or an output could not be written (disk full,
no permission: one line naming the file, temporary files removed); 2 bad input (config, spec,
path, table, argument), reported before anything is written.
"""

from __future__ import annotations

import contextlib
import argparse
import math
import sys
from pathlib import Path

from llm.config import ConfigError
from rundir import WriteError, interrupt_on_sigterm, not_a_folder


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written; appends a default only where the help does not state one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # `is` checks: a default of 0 (e.g. --seed) equals False but is worth showing.
        if "default" in text or any(action.default is d for d in (None, False, argparse.SUPPRESS)) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _fail(message: str, code: int = 2) -> int:
    print(f"chinchax: error: {message}", file=sys.stderr)
    return code


def _int_at_least(low: int):
    """argparse type: an integer >= low (checked by the parser, before any work or writing)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


def _flops(text: str) -> float:
    """argparse type: a FLOP count, finite and > 0 (nan, inf, 0 and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a FLOP count such as 1e21, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite FLOP count > 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), not the usage block then the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_folder(flag: str, path: Path) -> None:
    """ConfigError now, before any work, when ``path`` cannot be a folder (it or a parent is a file)."""
    problem = not_a_folder(path)
    if problem:
        raise ConfigError(f"{flag} {path}: {problem}")


# --------------------------------------------------------------------------- train


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one model (a sweep of one run)",
        description=(
            "Train one decoder-only language model and write its run directory\n"
            "(config.yaml, metrics.jsonl, result.json, checkpoints/).\n"
            "Re-running the same command in the same --run-dir resumes from the latest checkpoint.\n\n"
            "Examples:\n"
            "  chinchax train --run-dir runs/default\n"
            "  chinchax train experiments/configs/dense_small.yaml model.d_model=256 train.steps=500 --run-dir runs/d256"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("config", nargs="?", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layers=6 optim.lr=1e-3")
    p.add_argument("--run-dir", required=True, type=Path, help="run directory to write (or resume)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train)


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # `chinchax train model.d_model=64 ...` without a file
        config = None
    return config, overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from llm.config import dump_config, load_config

    config, overrides = _split_config_and_overrides(args)
    cfg = load_config(config, overrides)
    _check_folder("--run-dir", args.run_dir)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from llm import distributed
    from sweeps.lock import run_lock_path

    # Before anything touches a device; with several processes (srun, a TPU slice) only process 0
    # locks and writes the run directory, the others train alongside it.
    main_process = distributed.initialize() == 0
    locks_dir = run_lock_path(args.run_dir).parent
    new_locks_dir = main_process and not locks_dir.exists()
    lock = _lock_run_dir(args.run_dir) if main_process else None
    try:
        from llm.training import train

        interrupt_on_sigterm()  # `kill` checkpoints and stops like Ctrl-C
        result = train(cfg, args.run_dir)
    finally:
        if lock is not None:
            lock.release()
        if new_locks_dir:  # bad input found by train() leaves nothing behind, the lock folder included
            with contextlib.suppress(OSError):
                locks_dir.rmdir()
    return 0 if result.status == "done" else _fail(f"run failed: {result.error} (see {args.run_dir / 'result.json'})", 1)


def _lock_run_dir(run_dir: Path):
    """Take the run directory's lock (the one sweep workers take); ConfigError naming the holder."""
    from sweeps.lock import LockHeld, RunLock, run_lock_path

    try:
        return RunLock(run_lock_path(run_dir)).acquire()
    except LockHeld as held:
        raise ConfigError(
            f"--run-dir {run_dir} is being trained by pid {held.owner.get('pid')} on {held.owner.get('host')} "
            f"(lock {held.path}); wait for it to finish or stop that process"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot lock --run-dir {run_dir}: {err.strerror or err}") from None


# --------------------------------------------------------------------------- fit / plot (analysis)


def _add_fit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit Kaplan and Chinchilla laws to a sweep directory or a table",
        description=(
            "Fit Chinchilla Approaches 1-3 (with bootstrap intervals) and Kaplan laws to a sweep directory,\n"
            "a run directory, or a CSV/Parquet table with the same column names (a table of\n"
            "n_params_total, tokens, loss is enough). Writes fits.json, compute_optimal.md/.csv,\n"
            "figures (PNG + PDF) and report.md into the sweep directory (or <table>_fits/ next to a table).\n"
            "Unfinished or failed runs are excluded with a warning naming them.\n\n"
            "Examples:\n"
            "  chinchax fit sweeps_out/isoflop\n"
            "  chinchax fit points.csv --approach 3 --flops 6ND --budgets 1e21 1e23 --bootstrap 200"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("path", type=Path, help="sweep directory, run directory, or CSV/Parquet table")
    p.add_argument("--out-dir", type=Path, default=None, help="where to write (default: the sweep dir, or <table>_fits/)")
    p.add_argument("--approach", action="append", choices=["1", "2", "3", "all", "none"], default=None,
                   help="Chinchilla approach(es) to fit; repeat for several; 'none' for none (default: all)")  # fmt: skip
    p.add_argument("--law", action="append", default=None,
                   help="law(s) to fit: kaplan_N, kaplan_D, kaplan_C, kaplan_ND, kaplan_NS, saturating_C, chinchilla; "
                        "append +E for an irreducible term (e.g. kaplan_N+E); 'none' for no laws "
                        "(default: all kaplan_* and saturating_C). On request only: data_constrained (repeated data, "
                        "needs dataset_tokens), overtraining (L(C, M), M = D / N), lr_scaling (eta_opt(C), B_opt(C), "
                        "needs lr and batch_tokens; writes lr_rule.yaml)")  # fmt: skip
    p.add_argument("--budgets", type=_flops, nargs="+", default=None,
                   help="compute budgets (FLOPs) for the compute-optimal table (default: decades up to 1000x the largest run)")  # fmt: skip
    p.add_argument("--isoflop-budgets", type=_flops, nargs="+", default=None,
                   help="Approach-2 IsoFLOP budgets (default: runs grouped by final FLOPs)")  # fmt: skip
    p.add_argument("--approach2", default="local", choices=["local", "akima", "parabola"],
                   help="Approach 2: how each IsoFLOP minimum is located: local (quadratic weighted around the "
                        "minimum), akima (minimum of an Akima interpolant, Porian et al. 2024), parabola (whole "
                        "profile, Hoffmann et al. 2022)")  # fmt: skip
    p.add_argument("--interpolate", default="auto", choices=["auto", "always", "never"],
                   help="Approach 2: interpolate training curves onto a budget (auto: only where < 3 runs end at it)")  # fmt: skip
    p.add_argument("--flops", default="auto", choices=["auto", "6N", "6N+attention", "6ND"],
                   help="FLOP convention of C; 6ND derives C = 6 N D; a table's bare 'flops' column needs 6N or 6N+attention")  # fmt: skip
    p.add_argument("--n-params", default="n_params_total",
                   help="column used as N (n_params_total, n_params_nonembed, n_params_active, ...)")  # fmt: skip
    p.add_argument("--loss", default="final_eval_loss", choices=["final_eval_loss", "best_eval_loss"], help="loss per run")
    p.add_argument("--exclude", nargs="+", default=(), metavar="RUN", help="run names to leave out")
    p.add_argument("--bootstrap", type=_count, default=1000, help="bootstrap resamples of runs (0: no intervals)")
    p.add_argument("--seed", type=_count, default=0, help="bootstrap seed")
    p.add_argument("--holdout-flops", type=_flops, default=None,
                   help="extrapolation check: fit runs below this compute, test on the rest (default: hold out the largest budget)")  # fmt: skip
    p.add_argument("--no-extrapolation", action="store_true", help="skip the extrapolation check")
    p.add_argument("--no-figures", action="store_true", help="write fits and report only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--include-stale", action="store_true",
                   help="in a sweep directory, also fit the finished run folders its index.json does not list (runs of an "
                        "earlier version of the spec; left out with a warning by default)")  # fmt: skip
    p.set_defaults(func=_cmd_fit)


def _cmd_fit(args: argparse.Namespace) -> int:
    import warnings

    import analysis

    approaches = args.approach or ["all"]
    approaches = ("1", "2", "3") if "all" in approaches else tuple(a for a in dict.fromkeys(approaches) if a != "none")
    laws = args.law
    if laws is None:
        laws = analysis.DEFAULT_LAWS
    elif "none" in laws:
        laws = ()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", analysis.AnalysisWarning)
            fits = analysis.fit_path(
                args.path, args.out_dir, approaches=approaches, laws=laws, budgets=args.budgets,
                isoflop_budgets=args.isoflop_budgets, interpolate=args.interpolate, flops=args.flops,
                n_params=args.n_params, loss=args.loss,
                exclude=args.exclude, n_bootstrap=args.bootstrap, seed=args.seed, holdout_flops=args.holdout_flops,
                extrapolation=not args.no_extrapolation, figures_=not args.no_figures, progress=not args.quiet,
                include_stale=args.include_stale, approach2=args.approach2,
            )  # fmt: skip
    except analysis.AnalysisError as err:
        return _fail(str(err))
    for w in caught:
        print(f"chinchax: warning: {w.message}", file=sys.stderr)
    print(f"wrote {fits['outputs']['report']}")
    for a, res in fits["approaches"].items():
        exp = res["a"] if a != "3" else res["derived"]["a"]
        alt = "".join(f"; {m}: {v:.3f}" for m, v in res.get("compare", {}).items() if v is not None)
        print(f"  approach {a}: N_opt ~ C^{exp:.3f}" + (f" ({res['approach2_method']}{alt})" if a == "2" else ""))
    for name, res in fits.get("beyond", {}).items():
        print(f"  {name}: " + ", ".join(f"{k} = {v:.4g}" for k, v in res["params"].items()))
    return 0


def _add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="redraw the figures of a fitted sweep or table",
        description="Redraw the figures from the fits.json that `chinchax fit` wrote (no refitting).",
        formatter_class=_Formatter,
    )
    p.add_argument("path", type=Path, help="sweep directory, run directory, or CSV/Parquet table")
    p.add_argument("--out-dir", type=Path, default=None, help="where fits.json is and figures go (default: as for fit)")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    import warnings

    import analysis

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", analysis.AnalysisWarning)  # fit already reported them
            paths = analysis.plot_path(args.path, args.out_dir)
    except analysis.AnalysisError as err:
        return _fail(str(err))
    print(f"wrote {len(paths)} figure files to {Path(paths[0]).parent if paths else args.out_dir}")
    return 0


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (tokens, loss)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 2.1 or 1e12, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _add_allocate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "allocate",
        help="choose N and D from a law: compute budgets, a target loss with inference, a unique-data limit",
        description=(
            "Print N (parameters) and D (training tokens) from a law, one row per request:\n"
            "  --budgets C ...          compute-optimal N, D at training compute C = 6 N D;\n"
            "  --loss L [--inference-tokens T]\n"
            "                           the N, D reaching loss L with the least 6 N D + 2 N T (Sardana et al. 2023);\n"
            "  --unique-tokens U        with the data-constrained law (Muennighoff et al. 2023): at most U unique\n"
            "                           tokens, repeated as needed.\n"
            "Columns: tokens per parameter, and the compute saved against the compute-optimal choice (for --loss:\n"
            "the compute-optimal model of that loss, served for the same T; for --unique-tokens: Chinchilla's\n"
            "allocation, blind to the limit, reaching the same loss). C is 6 N D with N the law's N.\n"
            "LAW is a fits.json (or a folder holding one) written by `chinchax fit`, or a published law:\n"
            "hoffmann2022, besiroglu2024, muennighoff2023.\n\n"
            "Examples:\n"
            "  chinchax allocate hoffmann2022 --budgets 1e21 1e23\n"
            "  chinchax allocate besiroglu2024 --loss 2.0 --inference-tokens 1e13\n"
            "  chinchax allocate muennighoff2023 --budgets 1e22 --unique-tokens 1e11 --json\n"
            "  chinchax allocate sweeps_out/quickstart/fits.json --budgets 1e12"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("law", metavar="LAW", help="fits.json (or its folder), or hoffmann2022, besiroglu2024, muennighoff2023")
    p.add_argument("--budgets", type=_flops, nargs="+", default=None, help="training compute budgets C in FLOPs")
    p.add_argument("--loss", type=_positive_float, nargs="+", default=None, help="target loss(es) in nats per token")
    p.add_argument("--inference-tokens", type=_count_float, default=None,
                   help="tokens the model will generate or read in deployment (with --loss)")  # fmt: skip
    p.add_argument("--unique-tokens", type=_positive_float, default=None,
                   help="unique training tokens available (data-constrained law)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    p.set_defaults(func=_cmd_allocate)


def _count_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a token count; 1e13 allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 1e13, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite token count >= 0, got {text}")
    return value


def _cmd_allocate(args: argparse.Namespace) -> int:
    import json

    from analysis import AnalysisError
    from analysis.allocate import allocate, format_table

    if not args.budgets and not args.loss:
        return _fail("give compute budgets (--budgets C ...) or a target loss (--loss L), or both")
    try:
        rows, described = allocate(args.law, budgets=args.budgets or (), losses=args.loss or (),
                                   inference_tokens=args.inference_tokens, unique_tokens=args.unique_tokens)  # fmt: skip
    except AnalysisError as err:
        return _fail(str(err))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, described))
    return 0


# --------------------------------------------------------------------------- eval / emergence


def _task_list(text: str) -> list[str]:
    """argparse type: comma-separated task names (checked against the registry when the command runs)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected task names such as add3_reversed,facts, got {text!r}")
    return names


def _task_params(text: str) -> dict:
    """argparse type: a YAML/JSON mapping of task name to parameters (checked against the tasks when the command runs)."""
    from llm.typed_yaml import load_yaml_text

    try:
        value = load_yaml_text(text, "--task-params")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{facts: {{n_keys: 512}}}}', got {text!r}")
    return value


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a finished run on generated tasks (few-shot), writing evals/ records",
        description=(
            "Evaluate a finished run (result.json status done) on generated tasks, few-shot: for each held-out\n"
            "test item, the target's teacher-forced per-token log-probabilities and argmax correctness, and the\n"
            "greedy output up to the task's stop string. Writes RUN_DIR/evals/<task>.step<S>.jsonl (one record\n"
            "per item) and <task>.step<S>.summary.json; `chinchax emergence` scores them.\n"
            "A task the run mixed into pre-training (data.tasks) is built with the params it was trained with;\n"
            "--task-params sets parameters of any task (over the trained ones, key by key).\n\n"
            "Tasks: add1..add5, sub1..sub5, mul1, mul2 (each also _reversed), modadd, copy, recall, facts,\n"
            "unscramble, larger.\n\n"
            "Examples:\n"
            "  chinchax eval runs/d128 --tasks add3_reversed,facts --shots 4\n"
            "  chinchax eval runs/d128 --tasks facts --shots 0 --step 400 --items 200\n"
            "  chinchax eval runs/d128 --tasks recall,copy --shots 2 --task-params '{recall: {n_pairs: 10}, copy: {length: 12}}'"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="finished run directory")
    p.add_argument("--tasks", type=_task_list, required=True, help="comma-separated task names, e.g. add3_reversed,facts")
    p.add_argument("--shots", type=_count, required=True, help="demonstrations before each query")
    p.add_argument("--step", type=_count, default=None, help="checkpoint step to evaluate (default: the final step)")
    p.add_argument("--items", type=_positive_int, default=500, help="test items per task (fewer when the test split is smaller)")
    p.add_argument("--seed", type=_count, default=0, help="seed of the test items and their demonstrations")
    p.add_argument("--task-params", type=_task_params, default=None, metavar="MAPPING",
                   help="task parameters as YAML/JSON, e.g. '{recall: {n_pairs: 10}}'; over a task's trained ones")  # fmt: skip
    p.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per forward pass")
    p.add_argument("--max-length", type=_int_at_least(2), default=None,
                   help="longest sequence scored; longer prompts lose their oldest tokens (default: the model's seq_len)")  # fmt: skip
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from llm.evaluation import evaluate_tasks

    from llm.tasks import check_task_params

    _check_folder("RUN_DIR", args.run_dir)
    check_task_params(args.task_params, args.tasks, "--task-params")
    summaries = evaluate_tasks(args.run_dir, args.tasks, args.shots, step=args.step, n_items=args.items,
                               seed=args.seed, params=args.task_params, batch_size=args.batch_size,
                               max_length=args.max_length)  # fmt: skip
    from analysis.emergence_load import read_eval_records
    from analysis.emergence_metrics import item_scores

    for s in summaries:
        scores = item_scores(read_eval_records(s["records"])).mean(numeric_only=True)
        rate = s["n_items"] / s["eval_seconds"] if s["eval_seconds"] > 0 else float("nan")
        print(f"{s['task']} step {s['step']}: {s['n_items']} items, exact match {scores['exact_match']:.3f}, "
              f"token accuracy {scores['token_accuracy']:.3f} ({rate:.0f} items/s) -> {s['records']}")  # fmt: skip
        if s["n_truncated"]:
            print(f"chinchax: warning: {s['task']}: {s['n_truncated']} of {s['n_items']} prompts longer than "
                  f"max_length={s['max_length']} lost their oldest tokens (raise --max-length or use fewer --shots)",
                  file=sys.stderr)  # fmt: skip
    return 0


def _add_emergence_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "emergence",
        help="score evals/ records (or a published table) and draw emergence figures, table and report",
        description=(
            "Score the evals/ records of a sweep or run directory (written by `chinchax eval`), or read a\n"
            "published CSV/TSV table (columns model, n_params, flops, task, metric, value; optional baseline,\n"
            "n_items, ...), and write emergence_metrics.csv, emergence.json, emergence.md and figures (PNG + PDF):\n"
            "metric against training FLOPs and N (random baseline drawn), exact match next to per-token\n"
            "metrics with the p^L predictions, metric against eval loss, metric against training step.\n\n"
            "Examples:\n"
            "  chinchax emergence sweeps_out/emergence\n"
            "  chinchax emergence sweeps_out/emergence --overlay gpt3_arithmetic.csv --out-dir figs"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("path", type=Path, metavar="PATH", help="sweep directory, run directory, or CSV/TSV table")
    p.add_argument("--overlay", type=Path, action="append", default=[], metavar="CSV",
                   help="another sweep/run directory or table drawn alongside; repeat for several")  # fmt: skip
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where to write (default: <dir>/emergence, or <table>_emergence/ next to a table)")  # fmt: skip
    p.add_argument("--bootstrap", type=_count, default=1000, help="bootstrap resamples of items for the intervals")
    p.add_argument("--seed", type=_count, default=0, help="bootstrap seed")
    p.add_argument("--no-figures", action="store_true", help="write the table and report only")
    p.add_argument("--include-stale", action="store_true",
                   help="in a sweep directory, also score finished run folders its index.json does not list")  # fmt: skip
    p.set_defaults(func=_cmd_emergence)


def _cmd_emergence(args: argparse.Namespace) -> int:
    import warnings

    import analysis
    from analysis.emergence_report import emergence_path

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", analysis.AnalysisWarning)
            result = emergence_path(args.path, args.out_dir, overlay=args.overlay, n_bootstrap=args.bootstrap,
                                    seed=args.seed, include_stale=args.include_stale, figures_=not args.no_figures)  # fmt: skip
    except analysis.AnalysisError as err:
        return _fail(str(err))
    for w in caught:
        if issubclass(w.category, analysis.AnalysisWarning):
            print(f"chinchax: warning: {w.message}", file=sys.stderr)
    print(f"wrote {result['outputs']['emergence.md']} ({result['n_runs']} runs, tasks: {', '.join(result['tasks'])}, "
          f"{len(result['outputs']['figures'])} figure files)")  # fmt: skip
    return 0


# --------------------------------------------------------------------------- sweep



def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="plan, run and inspect sweeps of many runs",
        description=(
            "Expand a sweep spec (experiments/*.yaml) into runs, train them, and fit the laws.\n"
            "Re-running `sweep run` skips finished runs and resumes interrupted ones.\n\n"
            "Examples:\n"
            "  chinchax sweep plan experiments/quickstart.yaml\n"
            "  chinchax sweep run experiments/quickstart.yaml --parallel 2\n"
            "  chinchax sweep run experiments/chinchilla_isoflop.yaml isoflop.budgets=[1e18] --out sweeps_out/one\n"
            "  chinchax sweep status experiments/quickstart.yaml"
        ),
        formatter_class=_Formatter,
    )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    actions = p.add_subparsers(dest="sweep_command", metavar="ACTION")

    def common(q: argparse.ArgumentParser, out: bool = True) -> None:
        q.add_argument("spec", type=Path, help="sweep spec YAML")
        q.add_argument("overrides", nargs="*", help="spec overrides, e.g. isoflop.budgets=[1e12,3e12] base.train.batch_size=32")
        if out:
            q.add_argument("--out", type=Path, default=None, help="sweep directory (default: sweeps_out/<spec name>)")

    q = actions.add_parser("plan", help="print the runs of a spec without training", formatter_class=_Formatter)
    common(q, out=False)
    q.set_defaults(func=_cmd_sweep_plan)

    from sweeps.backends import DEFAULT_MAX_RETRIES

    q = actions.add_parser("run", help="train the unfinished runs of a spec, then fit", formatter_class=_Formatter)
    common(q)
    q.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local subprocesses, or Ray tasks on a cluster (then --out must be on storage every node "
                        "sees, e.g. NFS or Lustre: runs, logs and locks are written there)")  # fmt: skip
    q.add_argument("--parallel", type=_positive_int, default=None,
                   help="runs at a time (default: one per GPU group; one on a TPU host; on CPU one per core, at most 4)")
    q.add_argument("--gpus-per-run", type=_positive_int, default=1,
                   help="GPUs (or, on Ray, TPU chips) given to each run, which it uses as its mesh; a local TPU "
                        "host gives each run all its chips")  # fmt: skip
    q.add_argument("--address", default=None,
                   help="with --backend ray: the cluster to join, e.g. 10.0.0.5:6379, or auto on one of its nodes "
                        "(default: $RAY_ADDRESS, else a local Ray instance)")  # fmt: skip
    q.add_argument("--cpus-per-run", type=_positive_float, default=1.0, help="with --backend ray: CPUs each run asks for")
    q.add_argument("--max-retries", type=_count, default=DEFAULT_MAX_RETRIES,
                   help="with --backend ray: times a run whose worker process or node died is started again (it "
                        "resumes from its checkpoint); a run that fails on its own is not retried")  # fmt: skip
    q.add_argument("--retry-failed", action="store_true", help="also retry runs whose result.json says failed")
    q.add_argument("--no-fit", action="store_true", help="skip the spec's fit step")
    q.add_argument("--include-stale", action="store_true",
                   help="also fit the finished runs in the sweep directory that are not runs of this spec "
                        "(left by an earlier version of it; left out with a warning by default)")  # fmt: skip
    q.add_argument("--no-compile-cache", action="store_true", help="do not share JAX's persistent compilation cache")
    q.add_argument("--population", choices=("auto", "off"), default="auto",
                   help="auto: train runs that differ only in train.seed, data.seed, optim.lr or optim.weight_decay "
                        "together, in populations of at most --max-population runs that fit a slot's memory, at least "
                        "one per slot (one process each; vmapped on a GPU/TPU, in turn on CPU); off: every run in its "
                        "own process")  # fmt: skip
    q.add_argument("--max-population", type=_positive_int, default=16, help="most runs trained as one population")
    q.add_argument("--process-per-run", action="store_true",
                   help="local backend: start a fresh process for every run (default: one resident worker per slot "
                        "trains its runs in turn, paying imports and compilation once)")  # fmt: skip
    q.add_argument("--train-fn", default="llm.training:train", help=argparse.SUPPRESS)
    q.add_argument("--population-fn", default="llm.population:train_population", help=argparse.SUPPRESS)
    q.set_defaults(func=_cmd_sweep_run)

    q = actions.add_parser("status", help="rebuild and print the sweep index", formatter_class=_Formatter)
    common(q)
    q.add_argument("--fit", action="store_true", help="also run the spec's fit step on the finished runs")
    q.add_argument("--include-stale", action="store_true",
                   help="with --fit: also fit finished runs in the sweep directory that are not runs of this spec")
    q.set_defaults(func=_cmd_sweep_status)


def _cmd_sweep_plan(args: argparse.Namespace) -> int:
    from sweeps.plan import expand, format_plan
    from sweeps.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    print(format_plan(spec, expand(spec)))
    return 0


def _cmd_sweep_run(args: argparse.Namespace) -> int:
    from sweeps.runner import default_sweep_dir, run_sweep
    from sweeps.spec import read_spec

    spec, raw = read_spec(args.spec, args.overrides)
    _check_folder("--out", args.out if args.out is not None else default_sweep_dir(spec))
    # `kill` (SIGTERM) stops the sweep like Ctrl-C: running runs are stopped cleanly and resume later.
    interrupt_on_sigterm()
    report = run_sweep(
        spec,
        args.out,
        backend=args.backend,
        parallel=args.parallel,
        gpus_per_run=args.gpus_per_run,
        address=args.address,
        cpus_per_run=args.cpus_per_run,
        max_retries=args.max_retries,
        retry_failed=args.retry_failed,
        train_fn=args.train_fn,
        population=args.population,
        max_population=args.max_population,
        population_fn=args.population_fn,
        resident=not args.process_per_run,
        fit=not args.no_fit,
        include_stale=args.include_stale,
        raw_spec=raw,
        cache_dir=None if args.no_compile_cache else "default",
    )
    return 0 if report.ok else 1


def _cmd_sweep_status(args: argparse.Namespace) -> int:
    from sweeps.runner import default_sweep_dir, sweep_status
    from sweeps.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    sweep_dir = args.out if args.out is not None else default_sweep_dir(spec)
    _check_folder("--out", sweep_dir)
    rows = sweep_status(spec, sweep_dir)
    width = max(len(r["name"]) for r in rows)
    print(f"{'name'.ljust(width)}  {'status':11}  {'N':>8}  {'D':>8}  {'C':>8}  {'eval_loss':>9}  error")
    for r in rows:
        loss = r["final_eval_loss"]
        print(
            f"{r['name'].ljust(width)}  {r['status']:11}  {r['n_params']:8.3g}  {r['tokens']:8.3g}  {r['flops']:8.3g}  "
            f"{'' if loss is None else f'{loss:9.4f}':>9}  {r['error'] or ''}"
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    fit_status = "not requested"
    if args.fit:
        from sweeps.runner import run_fit

        fit_status = run_fit(spec, sweep_dir, rows, include_stale=args.include_stale)
        print(f"fit: {fit_status}")
    fitted = (sweep_dir / "fits.json").exists()
    print(f"{len(rows)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; fits.json {'present' if fitted else 'absent'} in {sweep_dir}")
    return 1 if fit_status.startswith("failed") else 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The full ``chinchax`` argument parser."""
    parser = _Parser(
        prog="chinchax",
        description="Language-model scaling laws in JAX: train grids of models, fit Kaplan and Chinchilla laws, plot them.",
        epilog=("exit codes: 0 success; 1 a run or sweep failed, or an output could not be written (disk full, no\n"
                "permission: one line naming the file); 2 bad input (config, spec, path, table, argument), found before\n"
                "anything is written"),
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    _add_sweep_parser(sub)
    _add_fit_parser(sub)
    _add_plot_parser(sub)
    _add_allocate_parser(sub)
    _add_eval_parser(sub)
    _add_emergence_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chinchax`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills the `overrides` positional before options, so `train CFG --run-dir X a.b=1`
    # would leave a.b=1 unrecognised: key=value words after an option are overrides too.
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if overrides and isinstance(getattr(args, "overrides", None), list):
        args.overrides.extend(overrides)
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        return _fail(str(err))
    except OSError as err:
        # Disk full, no permission: the writers removed their temp files; one line naming the file.
        if isinstance(err, WriteError) or not err.filename:
            return _fail(str(err), 1)
        return _fail(f"{err.filename}: {err.strerror or err}", 1)
    except Exception as err:
        # Checkpoint and data problems are the user's to fix: one line, not a traceback.
        if type(err).__name__ == "CheckpointError":
            return _fail(str(err), 1)
        raise
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
