"""The ``chinchax`` command line: train one run, run sweeps, fit and plot scaling laws.

Exit codes: 0 success, 1 a run or sweep failed, 2 bad input (config, spec, path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm.config import ConfigError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _fail(message: str, code: int = 2) -> int:
    print(f"chinchax: error: {message}", file=sys.stderr)
    return code


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
            "  chinchax train experiments/configs/small.yaml model.d_model=256 train.steps=500 --run-dir runs/d256"
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
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from llm.training import train

    result = train(cfg, args.run_dir)
    return 0 if result.status == "done" else 1


# --------------------------------------------------------------------------- fit / plot (analysis)


def _add_fit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit Kaplan and Chinchilla laws to a sweep directory or a table",
        formatter_class=_Formatter,
    )
    p.add_argument("path", type=Path, help="sweep directory, run directory, or CSV/Parquet table")
    p.set_defaults(func=_cmd_fit)


def _cmd_fit(args: argparse.Namespace) -> int:
    import analysis

    analysis.fit_path(args.path)
    return 0


def _add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="redraw the figures of a fitted sweep or table", formatter_class=_Formatter)
    p.add_argument("path", type=Path, help="sweep directory, run directory, or CSV/Parquet table")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    import analysis

    analysis.plot_path(args.path)
    return 0


# --------------------------------------------------------------------------- sweep


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="plan, run and inspect sweeps of many runs", formatter_class=_Formatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The full ``chinchax`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="chinchax",
        description="Language-model scaling laws in JAX: train grids of models, fit Kaplan and Chinchilla laws, plot them.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    _add_sweep_parser(sub)
    _add_fit_parser(sub)
    _add_plot_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chinchax`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        return _fail(str(err))
    except Exception as err:
        # Checkpoint and data problems are the user's to fix: one line, not a traceback.
        if type(err).__name__ == "CheckpointError":
            return _fail(str(err), 1)
        raise
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
