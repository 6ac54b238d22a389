"""The portfolio baselines on the nine families of tables/, learned from the 8 other families
(benchmarks/results/family_out.json) and from the 14 other families of the fifteen-family run
(benchmarks/results/fifteen/family_out.json). The portfolio's list is the same for every seed, so
its pairs are tables (mean over seeds per table), tested with Wilcoxon over the 10 tables.

Usage::

    python benchmarks/results/fifteen/portfolio_per_table.py
"""

import json
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

HERE = Path(__file__).resolve().parent
before = json.loads((HERE.parent / "family_out.json").read_text())["regret"]
after = json.loads((HERE / "family_out.json").read_text())["regret"]
for strategy in ("portfolio", "portfolio+gp"):
    for length in ("task", "deploy"):
        for budget in ("10", "20", "50"):
            x, y = [], []
            for family in before:
                a, b = (
                    before[family][length].get(budget, {}).get(strategy),
                    after[family][length].get(budget, {}).get(strategy),
                )
                if not a or not b:
                    continue
                for table in sorted({k.split("#")[0] for k in a}):
                    x.append(np.mean([v for k, v in a.items() if k.startswith(table + "#")]))
                    y.append(np.mean([v for k, v in b.items() if k.startswith(table + "#")]))
            if not x:
                continue
            x, y = np.array(x), np.array(y)
            p = wilcoxon(x, y).pvalue if (x != y).any() else 1.0
            print(
                f"{strategy:13s} {length:6s} {budget:>2s}: mean over {len(x)} tables {x.mean():.3f} -> {y.mean():.3f}, "
                f"better on {(y < x).sum()}, worse on {(y > x).sum()}, Wilcoxon p={p:.2g}"
            )
