"""Does the default task tell attention patterns apart under the default training budget?

Trains one model per pattern on ``mqar`` at its default length with the default budget (the
``default`` preset) and prints accuracy, analytic FLOPs and time per trial. Dense attention should
solve the task; a window narrower than the key-query distances should not. Last line: JSON.

Usage::

    python benchmarks/task_discrimination.py            # about 2 minutes on 2 cores
    python benchmarks/task_discrimination.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from attn_search import AttentionConfig, evaluate

CONFIGS = {
    "dense": {"pattern": "dense"},
    "window(32)": {"pattern": "window", "window": 32},
    "window(128)": {"pattern": "window", "window": 128},
    "bigbird": {"pattern": "bigbird"},
    "longformer": {"pattern": "longformer"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mqar")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    print(
        f"{'config':<12} {'accuracy':>9} {'MFLOPs/seq':>11} {'train_s':>8} {'trial_s':>8}  curve (seed {args.seeds[0]})"
    )
    out = {}
    for name, fields in CONFIGS.items():
        accs, trains, walls, curve, flops = [], [], [], [], 0.0
        for seed in args.seeds:
            start = time.perf_counter()
            r = evaluate(AttentionConfig.from_dict({**fields, "seed": seed}), args.task, budget=args.preset)
            walls.append(time.perf_counter() - start)
            accs.append(r.metrics["accuracy"])
            trains.append(r.metrics["train_seconds"])
            flops = r.metrics["flops"]
            curve = curve or [(s, round(a, 3)) for s, a in r.curve]
        out[name] = {
            "accuracy": statistics.median(accs),
            "flops": flops,
            "train_seconds": statistics.median(trains),
            "trial_seconds": statistics.median(walls),
        }
        row = out[name]
        print(
            f"{name:<12} {row['accuracy']:>9.3f} {flops / 1e6:>11.1f} {row['train_seconds']:>8.1f} "
            f"{row['trial_seconds']:>8.1f}  {curve}",
            flush=True,
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
