"""``ppo``'s regrets in two family-out runs, paired (same tables and seeds): per family, length and
budget the two medians beside the best baseline's (second run, or the first where the second ran
``ppo`` alone), and over the families both runs scored a paired Wilcoxon test of the two; then the
(family, length, budget) cells where the two differ (paired Wilcoxon p < 0.05), at 20 trials or
fewer and at more. For
recipe changes of the proposer (``--steps``, features) whose searches keep the baselines' seeds.
Where the second run scored ``ppo`` alone on every family, it is then scored as the first run's
``ppo`` was (``family_out.summarise_family_out`` against the first run's baselines): mean ranks,
and the cells where a baseline beats it significantly (paired Wilcoxon p < 0.05).

Usage::

    python benchmarks/family_out_compare.py benchmarks/results/family_out_agents0-4.json benchmarks/results/family_out_agents5-9.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: family_out_compare.py BEFORE.json AFTER.json", file=sys.stderr)
        return 2
    a, b = (json.loads(Path(p).read_text()) for p in args)
    # a run of ppo alone (a recipe variant on some families) is scored against the first run's baselines
    alone = all(set(cell) == {"ppo"} for f in b["regret"] for by_budget in b["regret"][f].values()
                for cell in by_budget.values())  # fmt: skip
    baselines = a if alone else b
    # per cell, the paired test of the two runs' ppo: cells compared and those that differ, at <= 20 trials or more
    compared: dict[bool, int] = {True: 0, False: 0}
    moved: dict[bool, list[str]] = {True: [], False: []}
    print(
        f"family/length/budget: ppo median before -> after | best baseline's median ({'before' if alone else 'after'})"
    )
    for length in ("task", "deploy"):
        for budget in map(str, a["budgets"]):
            before, after = [], []
            for f in [f for f in a["families"] if f in b["regret"]]:
                ra, rb = a["regret"][f][length][budget], b["regret"][f][length][budget]
                keys = sorted(ra["ppo"])
                pa, pb = np.array([ra["ppo"][k] for k in keys]), np.array([rb["ppo"][k] for k in keys])
                compared[int(budget) <= 20] += 1
                if np.any(pa != pb) and wilcoxon(pa, pb).pvalue < 0.05:
                    moved[int(budget) <= 20].append(
                        f"{f}/{length}/{budget} {'better' if pb.mean() < pa.mean() else 'worse'}"
                    )
                cell = baselines["regret"][f][length][budget]
                base = {s: float(np.median(list(v.values()))) for s, v in cell.items() if s != "ppo"}
                best = min(base, key=base.__getitem__)
                print(f"{f:16s} {length:6s} {budget:>2s}: {np.median(pa):.3f} -> {np.median(pb):.3f} | "
                      f"{best} {base[best]:.3f}")  # fmt: skip
                before += list(pa)
                after += list(pb)
            x, y = np.array(before), np.array(after)
            p = wilcoxon(x, y).pvalue if np.any(x != y) else 1.0
            print(f"all families {length} {budget}: mean {x.mean():.3f} -> {y.mean():.3f}, paired Wilcoxon p={p:.3g}, "
                  f"n={len(x)}")  # fmt: skip
    for small, cells in moved.items():
        if compared[small]:
            print(f"(family, length, budget) cells at {'20 trials or fewer' if small else 'more than 20 trials'} where "
                  f"after's ppo differs from before's (paired Wilcoxon p < 0.05): {len(cells)} of {compared[small]}"
                  + (f": {', '.join(cells)}" if cells else ""))  # fmt: skip
    if alone and set(b["regret"]) == set(a["regret"]):
        against_baselines(a, b)
    return 0


def against_baselines(a: dict, b: dict) -> None:
    """``b``'s ppo in place of ``a``'s, scored against ``a``'s baselines (every family)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from family_out import print_beaten, print_ranks, summarise_family_out

    regret = json.loads(json.dumps(a["regret"]))
    for f, lengths in b["regret"].items():
        for length, cells in lengths.items():
            for budget, cell in cells.items():
                regret[f][length][budget]["ppo"] = cell["ppo"]
    report = summarise_family_out(regret, b["per_agent"], a["budgets"])
    print_ranks(report)
    print_beaten(report, a["budgets"])
    losses = [(key, s, t) for key, tests in sorted(report["tests"].items()) for s, t in tests.items()
              if t["p"] < 0.05 and t["mean_diff"] > 0]  # fmt: skip
    small = [x for x in losses if not x[0].endswith("/50")]
    print(f"baselines significantly better than ppo (p < 0.05): {len(small)} (family, length, budget, baseline) cells at 10-20 trials, "
          f"{len(losses) - len(small)} at 50")  # fmt: skip
    for key, s, t in losses:
        print(f"  {key:<28} {s} (+{t['mean_diff']:.3f}, p={t['p']:.3g})")


if __name__ == "__main__":
    raise SystemExit(main())
