"""The README's family-out tables, written from ``benchmarks/results/family_out.json``.

For each length (``task``, ``deploy``): one row per strategy (median over families of the
per-family median regret, mean rank of those medians over families, on how many families it has
the best median, ties counted for each, and on how many another strategy is significantly better)
and one row per family (``ppo``'s median and IQR, the best other strategy, and every baseline
significantly better than ``ppo``, paired Wilcoxon p < 0.05, with the mean difference of regrets).
``--families`` limits both to some of the run's families (a fresh sealed set among older ones).

Usage::

    python benchmarks/family_out_tables.py [benchmarks/results/family_out.json] [--families F ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("ppo", "acquisition", "random", "tpe", "gp", "portfolio", "portfolio+gp")


def _header(first: str, a: str, b: str, budgets: list[int], *last: str) -> list[str]:
    cols = [first, *(a.format(n) for n in budgets), *(b.format(n) for n in budgets), *last]
    return ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]


def tables(data: dict[str, Any], only: Sequence[str] | None = None) -> str:
    report, budgets = data["report"], data["budgets"]
    families = sorted(
        {key.split("/")[0] for key in report["cells"]} & set(only or [key.split("/")[0] for key in report["cells"]])
    )
    out = []
    for length, title in (
        ("task", "compute at the task length"),
        ("deploy", f"compute at L={data['args']['deploy_len']}"),
    ):
        cells = {b: {f: report["cells"].get(f"{f}/{length}/{b}", {}) for f in families} for b in budgets}
        names = [s for s in ORDER if any(s in c for by in cells.values() for c in by.values())]
        out.append(f"#### {title}\n")
        out += _header("strategy", "median @{}", "mean rank @{}", budgets,
                       f"best median (families) @{budgets[0]} / @{budgets[1]}",
                       "another significantly better (families) " + " / ".join(f"@{b}" for b in budgets))  # fmt: skip
        for s in names:
            meds, ranks, best, beaten = [], [], [], []
            for b in budgets:
                values = [c[s]["median"] for c in cells[b].values() if s in c]
                full = len(values) == len(families)
                meds.append(f"{np.median(values):.3f}" if full else "-")
                # the rank of s's median among the strategies of each family's cell, averaged over families
                rank = [
                    rankdata([v["median"] for v in c.values()])[list(c).index(s)] for c in cells[b].values() if s in c
                ]
                ranks.append(f"{np.mean(rank):.2f}" if full else "-")
                beaten.append(
                    str(sum(1 for f in families if report["beaten"].get(s, {}).get(f"{f}/{length}/{b}")))
                    if full
                    else "-"
                )
            for b in budgets[:2]:
                wins = sum(
                    1 for c in cells[b].values() if s in c and c[s]["median"] <= min(v["median"] for v in c.values())
                )
                best.append(str(wins))
            out.append(
                f"| {s} | "
                + " | ".join(meds + ranks)
                + f" | {' / '.join(best)} of {len(families)} | {' / '.join(beaten)} |"
            )
        out.append("")
        out += _header("family", "ppo @{} (IQR)", "best other @{}", budgets,
                       "baselines significantly better than ppo (p<0.05)")  # fmt: skip
        for f in families:
            ppo, other, worse = [], [], []
            for b in budgets:
                c = cells[b][f]
                p = c.get("ppo")
                ppo.append(f"{p['median']:.3f} ({p['q1']:.3f}-{p['q3']:.3f})" if p else "-")
                rest = {s: v["median"] for s, v in c.items() if s != "ppo"}
                if rest:
                    s = min(rest, key=lambda k: rest[k])
                    other.append(f"{s} {rest[s]:.3f}")
                else:
                    other.append("-")
                for s, t in sorted(report["tests"].get(f"{f}/{length}/{b}", {}).items()):
                    if t["p"] < 0.05 and t["mean_diff"] > 0:
                        worse.append(f"{s}@{b} (+{t['mean_diff']:.3f}, p={t['p']:.2g})")
            out.append(f"| {f} | " + " | ".join(ppo + other) + f" | {', '.join(worse) or 'none'} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default=str(ROOT / "benchmarks" / "results" / "family_out.json"))
    parser.add_argument("--families", nargs="+", help="default: every family the run scored")
    args = parser.parse_args()
    data = json.loads(Path(args.run).read_text())
    scored = {key.split("/")[0] for key in data["report"]["cells"]}
    if set(args.families or []) - scored:
        sys.exit(
            print(f"error: --families {sorted(set(args.families) - scored)} not in {args.run}", file=sys.stderr) or 2
        )
    print(tables(data, args.families))


if __name__ == "__main__":
    main()
