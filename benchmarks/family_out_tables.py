"""The README's family-out tables, written from ``benchmarks/results/family_out.json``.

For each length (``task``, ``deploy``): one row per strategy (median over families of the
per-family median regret, mean rank, on how many families it has the best median) and one row per
family (``ppo``'s median and IQR, the best other strategy, and every baseline significantly better
than ``ppo``, paired Wilcoxon p < 0.05, with the mean difference of regrets).

Usage::

    python benchmarks/family_out_tables.py [benchmarks/results/family_out.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("ppo", "acquisition", "random", "tpe", "gp", "portfolio", "portfolio+gp")


def _header(first: str, a: str, b: str, budgets: list[int], last: str) -> list[str]:
    cols = [first, *(a.format(n) for n in budgets), *(b.format(n) for n in budgets), last]
    return ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]


def tables(data: dict[str, Any]) -> str:
    report, budgets = data["report"], data["budgets"]
    families = sorted({key.split("/")[0] for key in report["cells"]})
    out = []
    for length, title in (
        ("task", "compute at the task length"),
        ("deploy", f"compute at L={data['args']['deploy_len']}"),
    ):
        cells = {b: {f: report["cells"].get(f"{f}/{length}/{b}", {}) for f in families} for b in budgets}
        names = [s for s in ORDER if any(s in c for by in cells.values() for c in by.values())]
        out.append(f"#### {title}\n")
        out += _header("strategy", "median @{}", "mean rank @{}", budgets,
                       f"best median (families) @{budgets[0]} / @{budgets[1]}")  # fmt: skip
        for s in names:
            meds, ranks, best = [], [], []
            for b in budgets:
                values = [c[s]["median"] for c in cells[b].values() if s in c]
                meds.append(f"{np.median(values):.3f}" if len(values) == len(families) else "-")
                rank = report["ranks"].get(f"{length}/{b}", {}).get(s)
                ranks.append(f"{rank:.2f}" if rank is not None else "-")
            for b in budgets[:2]:
                wins = sum(
                    1 for c in cells[b].values() if s in c and c[s]["median"] <= min(v["median"] for v in c.values())
                )
                best.append(str(wins))
            out.append(f"| {s} | " + " | ".join(meds + ranks) + f" | {' / '.join(best)} of {len(families)} |")
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


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / "results" / "family_out.json"
    print(tables(json.loads(path.read_text())))
