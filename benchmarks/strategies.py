"""Which strategy should a user pick? The field's protocol over the recorded tables.

Every strategy searches every table (``tables/*.csv``, recorded with ``attn-search record``) by
replaying it (:mod:`attn_search.replay`: the same strategies and early-stopping rule as a real
search, proposals looked up instead of trained), with the same seeds for every strategy:

* strategies: ``random``, ``tpe``, ``nsga2``, ``gp``, ``ppo`` from scratch, ``ppo-meta`` (PPO
  meta-trained on the *other* tables, then searching with ``--agent``), and the zero-shot
  ``portfolio`` (the configurations that cover the other tables' fronts best, in that order).
  Whatever learns from tables is leave-one-table-out: it never sees the table it is scored on;
* budgets 10, 20 and 50 trials (prefixes of one 50-trial search for strategies that do not know
  their budget, random and the portfolio; a search of its own for the others);
* score: normalised-hypervolume regret, ``1 - HV / the table's best HV`` (HPO-B, YAHPO Gym):
  median and interquartile range over seeds per table and budget, and the mean rank across tables;
* cost: training steps each search spent, with MO-ASHA early stopping off and on (the 50-trial
  searches run again with it, for every strategy but ``gp`` by default), so the compute it saves
  is measured, and what it cost in regret;
* discrimination: on each table, random search's median regret at 10 trials (room to be better at
  the budgets users run: at least 0.10), and the most significant paired difference between two
  strategies at 20 trials (Wilcoxon signed-rank over seeds; p < 0.05 wanted).

Writes ``strategies.json`` (every regret per seed) and ``strategies.png`` (median regret against
trials, one panel per table, interquartile band) to ``--out``; prints the tables and its wall time.

Usage::

    python benchmarks/strategies.py                      # the shipped tables, 20 seeds
    python benchmarks/strategies.py --seeds 5 --jobs 2 --strategies random tpe portfolio
    python benchmarks/strategies.py --tables T1.csv T2.csv --budgets 10 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from attn_search.replay import META, PORTFOLIO, Table, run_protocol, summarise
from attn_search.search.space import load_space

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("mqar-128", "mqar-64", "selective_copy-128", "listops-64")
"""The shipped tables of the protocol (``tables/README.md``); ``sparse-smoke`` predates curves and
the protocol (its accuracies span too little to tell strategies apart)."""
STRATEGIES = ("random", "tpe", "nsga2", "gp", "ppo-grid", META, PORTFOLIO)
"""(``ppo-grid`` from scratch; today's ``ppo`` ships trained on every table, so it is scored leave-one-family-out
by ``benchmarks/family_out.py`` instead.)"""


def discrimination(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per table: random's median regret at the smallest budget, and the pair of strategies whose
    regrets at the middle budget differ most significantly (Wilcoxon signed-rank, paired by seed)."""
    from scipy.stats import wilcoxon

    budgets = result["budgets"]
    small, middle = budgets[0], budgets[len(budgets) // 2] if len(budgets) > 1 else budgets[0]
    out = {}
    for table, cells in result["regret"].items():
        row: dict[str, Any] = {}
        if "random" in cells[small]:
            row["random_median_regret"] = float(np.median(cells[small]["random"]))
            row["random_budget"] = small
        best: tuple[float, str, str] = (1.0, "", "")
        names = list(cells.get(middle, {}))
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                x, y = np.asarray(cells[middle][a]), np.asarray(cells[middle][b])
                if np.allclose(x, y):
                    continue
                p = float(wilcoxon(x, y).pvalue)
                if p < best[0]:
                    best = (p, a, b)
        row.update({"pair_budget": middle, "pair": best[1:], "pair_p": best[0]})
        out[table] = row
    return out


def paired_tests(result: dict[str, Any], subject: str, others: list[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """``subject`` against each of ``others`` per table and budget, paired by seed: the median of
    the regret differences (negative: ``subject`` is better), its wins and losses over seeds and the
    Wilcoxon signed-rank p-value (two-sided; 1.0 where every pair ties)."""
    from scipy.stats import wilcoxon

    out: dict[str, dict[int, dict[str, Any]]] = {}
    for table, cells in result["regret"].items():
        for b, row in cells.items():
            if subject not in row:
                continue
            x = np.asarray(row[subject])
            for other in [o for o in others if o in row and o != subject]:
                d = x - np.asarray(row[other])
                p = 1.0 if np.allclose(d, 0) else float(wilcoxon(d).pvalue)
                out.setdefault(table, {}).setdefault(b, {})[other] = {
                    "median_diff": float(np.median(d)), "wins": int((d < 0).sum()), "losses": int((d > 0).sum()),
                    "p": p}  # fmt: skip
    return out


def print_paired(subject: str, tests: dict[str, dict[int, dict[str, Any]]]) -> None:
    print(f"\n{subject} against the others, paired by seed (regret difference: negative = {subject} better; "
          "Wilcoxon signed-rank p)")  # fmt: skip
    for table, per_budget in tests.items():
        for b, row in per_budget.items():
            cells = [f"{o} {t['median_diff']:+.3f} ({t['wins']}-{t['losses']}, p={t['p']:.2g})" for o, t in row.items()]
            print(f"  {table:<20} {b:>3} trials: " + "; ".join(cells))


def print_report(result: dict[str, Any], checks: dict[str, dict[str, Any]]) -> None:
    strategies, budgets = result["strategies"], result["budgets"]
    width = 22
    for table, cells in result["regret"].items():
        info = result["tables"][table]
        print(f"\n{table} ({info['rows']} rows, best normalised HV {info['best_hv']:.4f}): median regret [IQR]")
        print(f"  {'strategy':<10}" + "".join(f"{str(b) + ' trials':>{width}}" for b in budgets))
        for s in strategies:
            stats = [summarise({s: cells[b][s]})[s] if s in cells.get(b, {}) else None for b in budgets]
            print(f"  {s:<10}" + "".join(f"{c['median']:>8.3f} [{c['q1']:.3f},{c['q3']:.3f}]" if c else f"{'not run':>{width}}"
                                         for c in stats))  # fmt: skip
    print(f"\nmean rank across {len(result['regret'])} tables (1 = best median regret)")
    print(f"  {'strategy':<10}" + "".join(f"{str(b) + ' trials':>12}" for b in budgets))
    for s in strategies:
        print(f"  {s:<10}" + "".join(f"{result['ranks'][b][s]:>12.2f}" if s in result["ranks"][b] else f"{'-':>12}"
                                     for b in budgets))  # fmt: skip
    top = budgets[-1]
    print(f"\nearly stopping (MO-ASHA, eta 3) at {top} trials: median training steps and regret, off -> on")
    for table, per in result["early_stopping"].items():
        print(f"  {table}")
        for s in [s for s in strategies if s in per and s in result["steps"][table][top]]:
            off_steps = float(np.median(result["steps"][table][top][s]))
            off_regret = float(np.median(result["regret"][table][top][s]))
            on_steps, on_regret = float(np.median(per[s]["steps"])), float(np.median(per[s]["regret"]))
            print(f"    {s:<10} steps {off_steps:>7.0f} -> {on_steps:>7.0f} ({on_steps / off_steps:5.2f}x)   "
                  f"regret {off_regret:.3f} -> {on_regret:.3f}   pruned {np.median(per[s]['pruned']):.0f}")  # fmt: skip
    print("\ndiscrimination")
    for table, row in checks.items():
        rnd = row.get("random_median_regret")
        ok1 = "ok" if rnd is not None and rnd >= 0.10 else "FAILS"
        ok2 = "ok" if row["pair_p"] < 0.05 else "FAILS"
        rnd_text = f"{rnd:.3f}" if rnd is not None else "n/a"
        print(f"  {table}: random's median regret at {row.get('random_budget')} trials {rnd_text} (>= 0.10: {ok1}); "
              f"most different pair at {row['pair_budget']}: {' vs '.join(row['pair'])} p={row['pair_p']:.2g} "
              f"(< 0.05: {ok2})")  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = list(result["curves"])
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.6), squeeze=False)
    for ax, table in zip(axes[0], tables, strict=True):
        for s in [s for s in result["strategies"] if s in result["curves"][table]]:
            curves = np.asarray(result["curves"][table][s])
            x = np.arange(1, curves.shape[1] + 1)
            q1, med, q3 = np.percentile(curves, [25, 50, 75], axis=0)
            ax.plot(x, med, label=s)
            ax.fill_between(x, q1, q3, alpha=0.15)
        ax.set_title(table)
        ax.set_xlabel("trials")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalised-HV regret (median, IQR)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", help="table CSVs (default: the shipped tables)")
    parser.add_argument("--space", default="sparse", help="the space the tables were recorded on")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--early-stopping", nargs="*", metavar="STRATEGY",
                        help="strategies searched again with MO-ASHA at the largest budget (default: random, tpe, "
                        "nsga2 and the portfolio: the cheap ones; the saving is the rule's, whoever proposes)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1, the same for every strategy")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
    parser.add_argument("--meta-steps", type=int, default=100_000, help="ppo-meta: environment steps of meta-training")
    parser.add_argument("--gp-max-budget", type=int, default=20,
                        help="gp is searched up to this budget only (default 20: a 50-trial gp search costs 30 s or "
                        "more on one core, as much as everything else together)")  # fmt: skip
    parser.add_argument("--agents", default=None, help="ppo-meta: folder for the leave-one-table-out agents "
                        "(default: OUT/agents; an agent already there is reused)")  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for JSON and plot")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    paths = [Path(p) for p in args.tables] if args.tables else [ROOT / "tables" / f"{t}.csv" for t in TABLES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"strategies.py: error: no such table: {', '.join(missing)}", file=sys.stderr)
        return 2
    space = load_space(args.space).with_compute(
        "flops"
    )  # the tables' recorded compute, as the README's figures count it
    tables = [Table(p, space) for p in paths]
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(f"  {done}/{total} searches replayed ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"{len(tables)} tables x {len(args.strategies)} strategies x {args.seeds} seeds, budgets {args.budgets}, "
          f"{args.jobs} process(es)", flush=True)  # fmt: skip
    cheap = ("random", "tpe", "nsga2", PORTFOLIO)
    es = args.early_stopping if args.early_stopping is not None else [s for s in args.strategies if s in cheap]
    agents = args.agents or str(Path(args.out) / "agents")
    result = run_protocol(tables, args.strategies, args.budgets, list(range(args.seeds)), jobs=args.jobs,
                          early_stopping=es, meta_steps=args.meta_steps, agents_dir=agents,
                          max_budget={"gp": args.gp_max_budget}, progress=progress)  # fmt: skip
    checks = discrimination(result)
    wall = time.perf_counter() - start
    print_report(result, checks)
    if META in args.strategies:  # what the learned proposer is worth, against the baselines it must beat
        result["paired"] = {META: paired_tests(result, META, ["tpe", PORTFOLIO, "random"])}
        print_paired(META, result["paired"][META])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["discrimination"] = checks
    result["wall_seconds"] = wall
    result["command"] = " ".join(["python", "benchmarks/strategies.py", *(argv if argv is not None else sys.argv[1:])])
    (out / "strategies.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, out / "strategies.png")
    print(f"\nwall time {wall:.0f} s; wrote {out / 'strategies.json'} and {out / 'strategies.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
