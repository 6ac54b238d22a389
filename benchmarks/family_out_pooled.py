"""Across families: is one strategy better than another on task families in general?

``benchmarks/family_out.py`` tests each family on its own (paired over its tables and seeds), so
with many families and baselines some "losses" come by chance. This script asks the field's
question one level up (Demsar, JMLR 2006): per family, length and budget it takes each strategy's
mean regret over that family's searches (the table and seed pairs every strategy ran), and then, over the families, prints

* each strategy's mean of those regrets and its mean rank (1 = the lowest regret);
* for ``--strategy`` (default ``ppo``) against every other: on how many families it is lower /
  higher, and the exact two-sided Wilcoxon signed-rank p over the families (a family where the
  two are equal is dropped, scipy's ``zero_method='wilcox'``; equal non-zero differences make the
  exact p approximate; with 10 families the smallest p possible is 0.002).

Usage::

    python benchmarks/family_out_pooled.py benchmarks/results/sealed-all/family_out.json
    python benchmarks/family_out_pooled.py RUN.json --families gap token_count --strategy portfolio
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata, wilcoxon


def pooled(regret: dict, families: list[str], strategy: str) -> list[str]:
    lines = []
    lengths = sorted({n for f in families for n in regret[f]})
    for length in lengths:
        budgets = sorted({int(b) for f in families for b in regret[f][length]})
        for budget in budgets:
            cells = [regret[f][length][str(budget)] for f in families]
            names = sorted(set.intersection(*(set(c) for c in cells)))
            if strategy not in names:
                continue
            # each family's mean over the searches (table#seed) every strategy ran, so that they pair
            keys = [sorted(set.intersection(*(set(c[s]) for s in names))) for c in cells]
            mean = np.array(
                [[float(np.mean([c[s][k] for k in ks])) for s in names] for c, ks in zip(cells, keys, strict=True)]
            )
            ranks = np.array([rankdata(row) for row in mean]).mean(0)
            me = mean[:, names.index(strategy)]
            lines.append(f"{length} / {budget} trials, {len(families)} families")
            for j in np.argsort(ranks):
                s, other = names[j], mean[:, j]
                row = f"  {s:<13} mean regret {other.mean():.3f}  mean rank {ranks[j]:.2f}"
                if s != strategy:
                    diff = other - me
                    p = wilcoxon(me, other, method="exact").pvalue if np.any(diff != 0) else 1.0
                    row += (
                        f"  {strategy} lower on {int((diff > 0).sum())}, higher on {int((diff < 0).sum())}, p = {p:.3g}"
                    )
                lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a family_out.json (or family_out_tiles.json)")
    parser.add_argument("--families", nargs="+", help="default: every family the run scored")
    parser.add_argument("--strategy", default="ppo", help="the strategy tested against each other one")
    args = parser.parse_args()
    path = Path(args.run)
    if not path.is_file():
        sys.exit(print(f"error: {path}: no such file", file=sys.stderr) or 2)
    regret = json.loads(path.read_text())["regret"]
    families = args.families or sorted(regret)
    missing = sorted(set(families) - set(regret))
    if missing:
        sys.exit(print(f"error: --families {missing} not in {path} (it has {sorted(regret)})", file=sys.stderr) or 2)
    print("\n".join(pooled(regret, families, args.strategy)))


if __name__ == "__main__":
    main()
