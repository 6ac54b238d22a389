"""The architecture issue's counts, measured on the code as it is (before and after a refactor).

Prints one line per count:

* ``daemon threads``: ``threading.Thread(..., daemon=True)`` a search can start, by module (local:
  progress, heartbeat, the threaded agent; Ray adds two);
* ``option reads``: attribute reads of ``SearchOptions`` (``opts.X``) per module outside
  ``attn_search/search/plan.py`` (which checks them once into the loop's plan), and
  ``record.get("options"...)`` reads across the package;
* ``pattern parameter places``: lines that name a pattern parameter as a string or a field, per
  file (what adding a parameter would touch);
* ``root modules``: modules at the package's root, beside its folders (the layers show in the
  folder tree when only the commands sit there);
* ``export lines``: lines of the Python export of one configuration;
* ``a trial of one trains``: the model class a lone trial trains, and whether it has a member axis;
* ``callback layers a freed seat climbs``: a small local search with populations (tiny space,
  8 trials, 3 at a time) runs, and at every ``ask`` of its strategy the call stack is read: the
  frames of the engine and the backends on it are the layers through which a freed population
  seat called up to the strategy (before the event protocol: the population's run loop, its draw,
  the trainer's and the runner's refills and the local backend's; with it: none, since the loop
  asks after the backend returned the seat as an event).

Usage::

    python benchmarks/architecture_counts.py
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "attn_search"
PATTERN_PARAMS = ("window", "dilation", "stride", "block_size", "n_global", "n_random")


def _sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "agents" not in p.parts)


def daemon_threads() -> Counter[str]:
    found: Counter[str] = Counter()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            is_thread = isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Thread"
            if is_thread and any(k.arg == "daemon" for k in node.keywords):  # type: ignore[attr-defined]
                found[str(path.relative_to(ROOT))] += 1
    return found


def option_reads() -> tuple[Counter[str], int]:
    """Attribute reads of the search options (``opts.X``, ``self.opts.X``, ``plan.options.X``) per
    module, outside the module that checks them into the plan (``search/plan.py``; before it
    existed, every read counted)."""
    per_module: Counter[str] = Counter()
    for path in _sources():
        if path.name == "plan.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or isinstance(node.ctx, ast.Store):
                continue
            inner = node.value
            name = getattr(inner, "id", None) if isinstance(inner, ast.Name) else getattr(inner, "attr", None)
            if name == "opts" or (name == "options" and isinstance(inner, ast.Attribute)
                                  and getattr(inner.value, "id", None) == "plan"):  # fmt: skip
                per_module[str(path.relative_to(ROOT))] += 1
    record_reads = sum(len(re.findall(r"""\.get\(["']options["']""", p.read_text())) for p in _sources())
    return per_module, record_reads


def pattern_parameter_places() -> Counter[str]:
    found: Counter[str] = Counter()
    names = "|".join(PATTERN_PARAMS)
    pattern = re.compile(rf"""["'](?:{names})["']|\.(?:{names})\b|\b(?:{names})\s*[:=]""")
    for path in _sources():
        for line in path.read_text().splitlines():
            if pattern.search(line) and not line.strip().startswith("#"):
                found[str(path.relative_to(ROOT))] += 1
    return found


def export_lines() -> int:
    from attn_search import AttentionConfig
    from attn_search.export import python_module

    text = python_module(AttentionConfig(pattern="window", window=32), vocab_size=16, n_classes=16, max_len=256)
    return len(text.splitlines())


def lone_trial_model() -> str:
    """The classes of the model a trial of one trains (a population of one on the CPU), outermost
    first: before the change the member-axis model with K = 1, after it the plain model (what the
    Python export writes) behind the population's interface."""
    from attn_search import AttentionConfig, Budget
    from attn_search.engine.trainer import train_model

    model, _ = train_model(AttentionConfig(d_model=16, n_heads=2, pattern="window", window=4, batch_size=8), "mqar",
                           budget=Budget(steps=2, rungs=1, n_eval=8, latency_batch=2), device="cpu",
                           task_kwargs={"seq_len": 32, "n_pairs": 4, "n_keys": 8, "n_values": 8})  # fmt: skip
    name = " < ".join(f"{c.__module__}.{c.__name__}" for c in type(model).__mro__ if c.__module__.startswith("attn"))
    stacked = any(p.dim() == 3 for p in model.parameters())  # (K, in, out) linear weights
    return f"{name} (member axis: {'yes' if stacked else 'no'})"


def refill_climb() -> tuple[int, int, list[str]]:
    """(asks, the most engine and backend frames on the stack at one ask, those frames' functions)."""
    import inspect
    import tempfile
    import warnings

    from attn_search.search.loop import SearchOptions, run_search
    from attn_search.strategies import samplers

    layers: list[list[str]] = []
    real_ask = samplers.SamplerStrategy.ask

    def ask(self: object) -> object:
        frames = [
            f for f in inspect.stack() if "/attn_search/engine/" in f.filename or "/attn_search/backends/" in f.filename
        ]
        layers.append([f"{Path(f.filename).stem}.{f.function}" for f in frames])
        return real_ask(self)  # type: ignore[arg-type]

    samplers.SamplerStrategy.ask = ask  # type: ignore[method-assign]
    warnings.filterwarnings("ignore")  # (Optuna's experimental-API and heartbeat notes)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_search(SearchOptions(space=str(ROOT / "tests" / "data" / "tiny.yaml"), strategy="random", trials=8,
                                     population=3, steps=20, confirm=0, attention_picture=False, out=f"{tmp}/run",
                                     quiet=True, device="cpu"))  # fmt: skip
    finally:
        samplers.SamplerStrategy.ask = real_ask  # type: ignore[method-assign]
    deepest = max(layers, key=len)
    return len(layers), len(deepest), deepest


def main() -> None:
    threads = daemon_threads()
    print(f"daemon threads: {sum(threads.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(threads.items()))})")
    per_function, record_reads = option_reads()
    print(
        f"option reads outside the plan: {sum(per_function.values())} in {len(per_function)} modules "
        f"({', '.join(f'{k} {v}' for k, v in per_function.most_common(4))}); "
        f'record.get("options") reads: {record_reads}'
    )
    places = pattern_parameter_places()
    print(
        f"pattern parameter places: {sum(places.values())} lines in {len(places)} files "
        f"({', '.join(f'{k}: {v}' for k, v in places.most_common())})"
    )
    root = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    print(f"root modules: {len(root)} ({', '.join(root)})")
    print(f"export lines: {export_lines()}")
    print(f"a trial of one trains: {lone_trial_model()}")
    asks, depth, frames = refill_climb()
    print(
        f"callback layers a freed seat climbs: {depth} (the most engine and backend frames on the stack at any "
        f"of {asks} strategy asks{': ' + ' -> '.join(reversed(frames)) if frames else ''})"
    )


if __name__ == "__main__":
    main()
