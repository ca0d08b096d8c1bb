"""Write fits.json, the compute-optimal table (markdown + CSV) and report.md."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis import references
from analysis.numbers import fmt as _g
from analysis.parametric import derived
from rundir import write_json_atomic, write_text_atomic

APPROACH_NAMES = {"1": "Approach 1 (envelope)", "2": "Approach 2 (IsoFLOP)", "3": "Approach 3 (parametric)"}


def compute_optimal_table(fits: dict) -> pd.DataFrame:
    """One row per (budget, approach): N_opt, D_opt, tokens per parameter, with bootstrap intervals."""
    rows = []
    for a, res in fits.get("approaches", {}).items():
        at = res.get("intervals_at_budgets") or [None] * len(fits["budgets"])
        for j, c in enumerate(fits["budgets"]):
            row = {"flops": c, "approach": a, "N_opt": res["N_opt"][j], "D_opt": res["D_opt"][j],
                   "tokens_per_param": res["tokens_per_param"][j]}  # fmt: skip
            for q in ("N_opt", "D_opt", "tokens_per_param"):
                iv = at[j][q] if at[j] else {}
                row[f"{q}_low"], row[f"{q}_high"] = iv.get("low"), iv.get("high")
            rows.append(row)
    return pd.DataFrame(rows)


def _iv(res, key, digits=3):
    iv = (res.get("intervals") or {}).get(key)
    if not iv or iv.get("low") is None:
        return ""
    return f" ({_g(iv['low'], digits)}, {_g(iv['high'], digits)})"


def table_markdown(table: pd.DataFrame, fits: dict) -> str:
    pct = fits.get("percentiles", [10, 90])
    lines = [
        f"| FLOPs ({fits['flops_convention']}) | approach | N_opt | N_opt {pct[0]:g}-{pct[1]:g}% | D_opt (tokens) "
        f"| D_opt {pct[0]:g}-{pct[1]:g}% | tokens / parameter |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in table.iterrows():
        lo_hi = lambda q: "" if r[f"{q}_low"] is None or pd.isna(r[f"{q}_low"]) else f"{_g(r[f'{q}_low'])} – {_g(r[f'{q}_high'])}"  # noqa: E731
        lines.append(
            f"| {r['flops']:.2e} | {r['approach']} | {_g(r['N_opt'])} | {lo_hi('N_opt')} | {_g(r['D_opt'])} | "
            f"{lo_hi('D_opt')} | {r['tokens_per_param']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def report_markdown(fits: dict, table_md: str, figures: list[str]) -> str:
    """report.md: data, exponents (like Chinchilla Table 2), parameters, laws, table, checks, figures."""
    out = [f"# Scaling-law fits: `{fits.get('source', '')}`", ""]
    out += [
        f"- runs fitted: {fits['n_runs']}; N = `{fits['n_params_column']}` (Kaplan laws: `{fits['kaplan_n_column']}`);"
        f" loss = `{fits['loss_column']}`; C convention: `{fits['flops_convention']}`",
        f"- bootstrap: {fits['n_bootstrap']} resamples of runs, seed {fits['seed']}, intervals are the "
        f"{fits['percentiles'][0]:g}th–{fits['percentiles'][1]:g}th percentiles",
    ]
    a2 = fits.get("approaches", {}).get("2", {})
    if a2.get("bootstrap_method"):
        out.append(f"- Approach 2 resamples differently: {a2['bootstrap_method']}")
    out += [""]
    if fits.get("warnings"):
        out += ["## Warnings", ""] + [f"- {w}" for w in fits["warnings"]] + [""]
    epoch = derived(references.EPOCH_APPROACH3)  # a = beta/(alpha+beta) of the published refit
    out += ["## Compute-optimal exponents (N_opt ∝ C^a, D_opt ∝ C^b)", "",
            "| approach | a | b | method |", "| --- | --- | --- | --- |"]  # fmt: skip
    for a, res in fits.get("approaches", {}).items():
        ea, eb = (res["a"], res["b"]) if a != "3" else (res["derived"]["a"], res["derived"]["b"])
        method = res.get("method", res.get("loss", ""))
        out.append(f"| {APPROACH_NAMES[a]} | {ea:.3f}{_iv(res, 'a')} | {eb:.3f}{_iv(res, 'b')} | {method} |")
    out += [
        "| Hoffmann et al. 2022, Table 2 (published) | 0.50 / 0.49 / 0.46 | 0.50 / 0.51 / 0.54 | Approaches 1 / 2 / 3 |",
        f"| Besiroglu et al. 2024 refit of Approach 3 | {epoch['a']:.2f} | {epoch['b']:.2f} | summed Huber terms |",
        f"| Kaplan et al. 2020 | {references.KAPLAN_N_OPT['exponent']} | 0.27 | N non-embedding |",
        "",
    ]
    if a2.get("compare"):
        others = ", ".join(f"{m} a = {_g(v)}" for m, v in a2["compare"].items())
        out += [f"- Approach 2 located each IsoFLOP minimum with `{a2['approach2_method']}` (`--approach2`); the same "
                f"budgets give {others} (parabola: the whole-profile fit of Hoffmann et al. 2022)", ""]  # fmt: skip
    a3 = fits.get("approaches", {}).get("3")
    if a3:
        p = a3["params"]
        out += ["## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", "",
                "| parameter | value | interval |", "| --- | --- | --- |"]  # fmt: skip
        for k in ("E", "A", "B", "alpha", "beta"):
            out.append(f"| {k} | {_g(p[k], 5)} | {_iv(a3, k, 4)} |")
        out.append(f"| G | {_g(a3['derived']['G'], 4)} | {_iv(a3, 'G', 4)} |")
        out += [
            "",
            f"- objective {a3['objective']:.6g} ({a3['loss']}); converged: {a3['converged']}; "
            f"{a3['n_converged']}/{a3['n_starts']} starts converged, {a3['n_starts_at_optimum']} reached the optimum "
            f"(all of them on the grid edge: {a3['start_on_grid_edge']}); optimum outside the grid box: "
            f"{a3['optimum_outside_grid']}",
        ]
        if "bootstrap_starts" in a3:
            out.append(f"- bootstrap refits: {a3['bootstrap_starts']}; converged fraction {a3['bootstrap_converged_fraction']:.3f}")
        fpt = a3.get("flops_per_token")
        out.append("- a, b and G above are for C = 6 N D, as in Hoffmann et al. 2022")
        if fpt:
            out.append(
                f"- the table allocates budgets in the data's convention: C / D = {fpt['k']:.4g} N^{fpt['c']:.4f} fitted "
                f"on the runs (max relative error {fpt['max_rel_error']:.2%}), so N_opt ~ C^"
                f"{a3['params']['beta'] / (a3['params']['alpha'] + fpt['c'] * a3['params']['beta']):.3f} there"
            )
        out.append("")
    if fits.get("laws"):
        out += ["## Other laws (least squares on log loss)", "",
                "| law | formula | parameters | RMS log residual | points | fitted on |",
                "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, f in fits["laws"].items():
            prm = ", ".join(f"{k} = {_g(v, 4)}{_iv(f, k)}" for k, v in f["params"].items())
            out.append(f"| {name} | {f['formula']} | {prm} | {f['rmse_log_loss']:.4f} | {f['n_points']} | "
                       f"{f.get('fitted_on', '')} |")  # fmt: skip
        out.append("")
        floorless = [name for name, f in fits["laws"].items() if 0 <= f["params"].get("E", 1.0) < 1e-6]
        if floorless:
            out += [f"- E went to its bound 0 in {', '.join(floorless)}: these runs show no irreducible loss "
                    "floor, so E is not identified here", ""]
    if fits.get("laws_unsupported"):
        out += ["## Laws these runs cannot support (not fitted)", ""]
        out += [f"- {name} ({f['formula']}): {f['reason']}" for name, f in fits["laws_unsupported"].items()] + [""]
    from analysis.beyond import report_lines  # imports this module's helpers

    out += report_lines(fits)
    out += ["## Compute-optimal allocation (cf. Hoffmann et al. 2022, Table 3)", "", table_md]
    ex = fits.get("extrapolation")
    if ex:
        out += ["## Extrapolation check (Approach 3 fitted below a compute threshold)", ""]
        if "skipped" in ex:
            out.append(f"- skipped: {ex['skipped']}")
        else:
            out.append(
                f"- fitted on {ex['n_fit']} runs with C < {ex['threshold_flops']:.3g}; {ex['n_heldout']} held-out runs: "
                f"mean |relative loss error| {ex['mean_abs_relative_error']:.4f}, max {ex['max_abs_relative_error']:.4f}"
            )
        out.append("")
    if figures:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures if f.endswith(".png")]
    return "\n".join(out) + "\n"


def write_outputs(out_dir: Path, fits: dict, figures: list[str]) -> dict:
    """fits.json, compute_optimal.{md,csv}, report.md in out_dir; returns their paths."""
    table = compute_optimal_table(fits)
    md = table_markdown(table, fits)
    paths = {"fits": out_dir / "fits.json", "table_md": out_dir / "compute_optimal.md",
             "table_csv": out_dir / "compute_optimal.csv", "report": out_dir / "report.md"}  # fmt: skip
    write_json_atomic(paths["fits"], fits)
    write_text_atomic(paths["table_md"], md)
    write_text_atomic(paths["table_csv"], table.to_csv(index=False))
    write_text_atomic(paths["report"], report_markdown(fits, md, figures))
    return {k: str(v) for k, v in paths.items()}
